#!/usr/bin/env node
// pagetwin command line: one module per command, each with --help and --json.

import { readFileSync } from "node:fs";
import { UsageError } from "./args.js";
import { errorText, failureRecord, printJson } from "./json.js";

type Command = { run: (argv: string[]) => Promise<number> };

const commands: Record<string, { summary: string; load: () => Promise<Command> }> = {
  demo: { summary: "migrate the embedded VM twice over loopback TCP: plain pre-copy, then pagetwin (--qemu: a real QEMU guest)", load: () => import("./commands/demo.js") },
  analyze: { summary: "tell what a migration of this RAM would move, before moving anything", load: () => import("./commands/analyze.js") },
  index: { summary: "hash every 4 KiB block of a NAS disk image into its block index", load: () => import("./commands/index-cmd.js") },
  listen: { summary: "destination agent: receive a VM's RAM, fetching twin pages from the NAS", load: () => import("./commands/listen.js") },
  send: { summary: "source agent: migrate a RAM file to a `pagetwin listen` agent", load: () => import("./commands/send.js") },
  migrate: { summary: "agent mode: migrate a running QEMU VM (RAM in a shared memory-backend-file)", load: () => import("./commands/migrate.js") },
  "compare-qemu": { summary: "a real guest over a 1 Gbit/s namespace link: QEMU's own migration vs pagetwin", load: () => import("./commands/compare-qemu.js") },
  "stream-out": { summary: "stream mode, source side: a proxy in QEMU's own migration stream", load: async () => ({ run: (await import("./commands/stream.js")).runStreamOutCli }) },
  libvirt: { summary: "migrate a libvirt domain live through pagetwin (a drop-in for virsh migrate --live)", load: () => import("./commands/libvirt.js") },
  "stream-in": { summary: "stream mode, destination side: rebuilds QEMU's stream from the NAS", load: async () => ({ run: (await import("./commands/stream.js")).runStreamInCli }) },
  serve: { summary: "one service per host for every stream-mode migration on it (control socket, peer link)", load: () => import("./commands/serve.js") },
};

/** Usage errors exit 2, failures 1 (as grep, curl and git do); help asked for goes to stdout with 0. */
const EXIT = { ok: 0, failed: 1, usage: 2 } as const;

/** pagetwin's version, from the package.json it ships with (dist/src/cli/main.js -> ../../../package.json). */
function version(): string {
  const pkg = JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string };
  return pkg.version;
}

function usage(): string {
  const lines = ["pagetwin — live VM migration that sends RAM pages found on the shared NAS as references", "",
    "Usage: pagetwin COMMAND [options]   (pagetwin COMMAND --help for each)", "       pagetwin --version", "", "Commands:"];
  for (const [k, c] of Object.entries(commands)) lines.push(`  ${k.padEnd(14)}${c.summary}`);
  return lines.join("\n");
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === "--version" || name === "-V") {
    console.log(`pagetwin ${version()}`);
    return EXIT.ok;
  }
  if (name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return EXIT.ok;
  }
  if (!name) {
    // no command is a usage error: the help goes where errors go
    console.error(usage());
    return EXIT.usage;
  }
  const c = commands[name];
  if (!c) throw new UsageError(`unknown command "${name}". Commands: ${Object.keys(commands).join(", ")}`);
  return (await c.load()).run(rest);
}

const argv = process.argv.slice(2);
main(argv).then(
  (code) => { process.exitCode = code; },
  (err) => {
    // the message always goes to stderr for people; with --json the same failure also ends stdout
    console.error(errorText(err));
    if (argv.includes("--json")) printJson(argv[0] ?? "", "result", failureRecord(err));
    process.exitCode = err instanceof UsageError ? EXIT.usage : EXIT.failed;
  },
);
