#!/usr/bin/env node
// pagetwin command line: one module per command, each with --help and --json.

import { UsageError } from "./args.js";

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
  "stream-in": { summary: "stream mode, destination side: rebuilds QEMU's stream from the NAS", load: async () => ({ run: (await import("./commands/stream.js")).runStreamInCli }) },
};

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    const lines = ["pagetwin — live VM migration that sends RAM pages found on the shared NAS as references", "", "Usage: pagetwin COMMAND [options]   (pagetwin COMMAND --help for each)", "", "Commands:"];
    for (const [k, c] of Object.entries(commands)) lines.push(`  ${k.padEnd(14)}${c.summary}`);
    console.log(lines.join("\n"));
    return name ? 0 : 2;
  }
  const c = commands[name];
  if (!c) {
    console.error(`pagetwin: unknown command "${name}". Commands: ${Object.keys(commands).join(", ")}`);
    return 2;
  }
  return (await c.load()).run(rest);
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => {
    const msg = (err as Error).message;
    console.error(msg.startsWith("pagetwin") ? msg : `pagetwin: ${msg}`);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  },
);
