// Running pagetwin's CLI from tests.
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

/** dist/src/cli/main.js, beside this compiled helper. */
export const cliPath = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

/** Starts a command, waits until stderr matches `ready` (and `settleMs` more for what follows), kills it; its stderr. */
export async function startAndStop(args: string[], ready: RegExp, settleMs = 0): Promise<string> {
  const p = spawn(process.execPath, args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  try {
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`not ready in 10 s: ${err}`)), 10_000);
      p.stderr.on("data", (d: Buffer) => { err += d; if (ready.test(err)) { clearTimeout(t); resolve(); } });
      p.once("exit", (code) => { clearTimeout(t); reject(new Error(`exited ${code}: ${err}`)); });
    });
    if (settleMs) await new Promise((r) => setTimeout(r, settleMs));
  } finally {
    p.kill();
  }
  return err;
}

/** The NDJSON lines a command printed with --json (docs/JSON.md). */
export const jsonLines = (stdout: string) => stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, any>);

/** The result line (the last) of a command's --json output. */
export function jsonResult(stdout: string): Record<string, any> {
  const r = jsonLines(stdout).at(-1)!;
  if (r.event !== "result") throw new Error(`the last --json line is a ${String(r.event)} event, not the result`);
  return r;
}
