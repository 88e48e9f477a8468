#!/usr/bin/env node
// pagetwin command line: one module per command, each with --help and --json.

import { UsageError } from "./args.js";

type Command = { spec: { name: string; summary: string }; run: (argv: string[]) => Promise<number> };

const commands: Record<string, () => Promise<Command>> = {
  demo: () => import("./commands/demo.js"),
  analyze: () => import("./commands/analyze.js"),
  index: () => import("./commands/index-cmd.js"),
  listen: () => import("./commands/listen.js"),
  send: () => import("./commands/send.js"),
};

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    const lines = ["pagetwin — live VM migration that sends RAM pages found on the shared NAS as references", "", "Usage: pagetwin COMMAND [options]   (pagetwin COMMAND --help for each)", "", "Commands:"];
    for (const [k, load] of Object.entries(commands)) lines.push(`  ${k.padEnd(12)}${(await load()).spec.summary}`);
    console.log(lines.join("\n"));
    return name ? 0 : 2;
  }
  const load = commands[name];
  if (!load) {
    console.error(`pagetwin: unknown command "${name}". Commands: ${Object.keys(commands).join(", ")}`);
    return 2;
  }
  return (await load()).run(rest);
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => {
    if (err instanceof UsageError) console.error(`pagetwin: ${err.message}`);
    else console.error(`pagetwin: ${(err as Error).message}`);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  },
);
