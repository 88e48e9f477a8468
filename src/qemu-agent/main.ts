#!/usr/bin/env node
// Entry for the agent-mode commands (`migrate`, `compare-qemu`) that the
// comparison runs as child processes inside network namespaces; the same
// commands are registered in src/cli/main.ts.

import { UsageError } from "../cli/args.js";

const commands: Record<string, () => Promise<{ run: (argv: string[]) => Promise<number> }>> = {
  migrate: () => import("../cli/commands/migrate.js"),
  "compare-qemu": () => import("../cli/commands/compare-qemu.js"),
};

const [name, ...rest] = process.argv.slice(2);
const load = name ? commands[name] : undefined;
if (!load) {
  console.error(`usage: node ${process.argv[1]} ${Object.keys(commands).join("|")} [options]`);
  process.exitCode = 2;
} else {
  load().then((c) => c.run(rest)).then(
    (code) => { process.exitCode = code; },
    (err) => {
      console.error(`pagetwin: ${(err as Error).message}`);
      process.exitCode = err instanceof UsageError ? 2 : 1;
    },
  );
}
