// The docs' quick starts as test input: a fenced ```sh block whose first line is
// `# quick start: NAME` is read from the doc, its `NAME=value` lines give way to
// the test's values, and every other line runs as written (bash, `pagetwin`
// being this build's CLI). A line ending in `&` is a service: it is started, and
// the next line runs once it says it listens.
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { cliPath } from "./cli.js";

export interface QuickStart {
  /** The names the block sets, with the doc's values. */
  vars: Map<string, string>;
  /** Its commands, comments dropped. */
  commands: string[];
}

export const docPath = (name: string) => fileURLToPath(new URL(`../../../docs/${name}`, import.meta.url));

/** The ```sh block of `doc` marked `# quick start: NAME`. */
export function quickStart(doc: string, name: string): QuickStart {
  const text = readFileSync(docPath(doc), "utf8");
  const m = new RegExp("```sh\\n# quick start: " + name + "\\b[^\\n]*\\n([\\s\\S]*?)```").exec(text);
  if (!m) throw new Error(`${doc} has no \`\`\`sh block marked "# quick start: ${name}"`);
  const vars = new Map<string, string>();
  const commands: string[] = [];
  for (const raw of m[1]!.split("\n")) {
    const line = raw.replace(/\s+#.*$/, "").trim();
    if (!line || line.startsWith("#")) continue;
    const v = /^([A-Z_]+)=(\S+)$/.exec(line);
    if (v) vars.set(v[1]!, v[2]!);
    else commands.push(line);
  }
  return { vars, commands };
}

/** The doc's fenced block that starts with `first` (e.g. "(qemu) "): its lines. */
export function docLines(doc: string, first: string): string[] {
  const text = readFileSync(docPath(doc), "utf8");
  const block = text.split("```").find((b) => b.replace(/^\w*\n/, "").startsWith(first));
  if (!block) throw new Error(`${doc} has no block starting with "${first}"`);
  return block.replace(/^\w*\n/, "").split("\n").filter((l) => l.startsWith(first));
}

/** A `pagetwin` on PATH that execs this build (exec all the way: a service's pid is node's, so the test can stop it). */
function binDir(cwd: string): string {
  const dir = join(cwd, ".bin");
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "pagetwin"), `#!/bin/sh\nexec "${process.execPath}" "${cliPath}" "$@"\n`);
  chmodSync(join(dir, "pagetwin"), 0o755);
  return dir;
}

export interface Started { line: string; child: ChildProcess; stdout: string; stderr: string; exited: Promise<number | null> }

/**
 * Runs the block's commands in `cwd` with `values` for its names (every name must get one).
 * Foreground commands must exit 0; services are returned, still running or done.
 */
export async function runQuickStart(qs: QuickStart, cwd: string, values: Record<string, string>): Promise<Started[]> {
  const env = quickStartEnv(qs, cwd, values);
  const services: Started[] = [];
  try {
    for (const line of qs.commands) {
      const bg = line.endsWith("&");
      const cmd = bg ? line.slice(0, -1).trim() : line;
      const s = start(cmd, cwd, env);
      if (bg) {
        services.push(s);
        await listening(s);
      } else {
        const code = await s.exited;
        if (code !== 0) throw new Error(`\`${cmd}\` exited ${code}: ${s.stderr}`);
      }
    }
  } catch (err) {
    stopAll(services);
    throw err;
  }
  return services;
}

function quickStartEnv(qs: QuickStart, cwd: string, values: Record<string, string>): NodeJS.ProcessEnv {
  for (const k of qs.vars.keys()) if (!(k in values)) throw new Error(`the test gives no value for ${k}`);
  return { ...process.env, ...values, PATH: `${binDir(cwd)}:${process.env["PATH"] ?? ""}` };
}

/** Starts one of the block's commands (in the foreground: wait for exitOf) with `values` for its names, to read its output. */
export function startQuickStartLine(qs: QuickStart, line: string, cwd: string, values: Record<string, string>): Started {
  return start(line, cwd, quickStartEnv(qs, cwd, values));
}

/** Stops the services still running (a test's clean-up). */
export function stopAll(services: Started[]): void {
  for (const s of services) if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill("SIGKILL");
}

/** Waits for a service to exit, at most `ms` (then kills it): its exit code. */
export async function exitOf(s: Started, ms = 30_000): Promise<number | null> {
  const t = setTimeout(() => s.child.kill("SIGKILL"), ms);
  try { return await s.exited; } finally { clearTimeout(t); }
}

function start(cmd: string, cwd: string, env: NodeJS.ProcessEnv): Started {
  const child = spawn("bash", ["-c", cmd], { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  const s: Started = { line: cmd, child, stdout: "", stderr: "", exited: new Promise((r) => child.once("exit", (c) => r(c))) };
  child.stdout!.on("data", (d: Buffer) => { s.stdout += d; });
  child.stderr!.on("data", (d: Buffer) => { s.stderr += d; });
  return s;
}

function listening(s: Started): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`\`${s.line}\` did not listen within 20 s: ${s.stderr}`)), 20_000);
    const check = () => { if (/listening on/.test(s.stderr)) { clearTimeout(t); resolve(); } };
    s.child.stderr!.on("data", check);
    void s.exited.then((c) => { clearTimeout(t); reject(new Error(`\`${s.line}\` exited ${c} before listening: ${s.stderr}`)); });
  });
}
