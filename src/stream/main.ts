#!/usr/bin/env node
// Stand-alone entry for the stream proxies (the comparison runner spawns it
// inside network namespaces): node dist/src/stream/main.js stream-out|stream-in ARGS
import { runStreamInCli, runStreamOutCli } from "./cli.js";

const [cmd, ...rest] = process.argv.slice(2);
let code: number;
if (cmd === "stream-out") code = await runStreamOutCli(rest);
else if (cmd === "stream-in") code = await runStreamInCli(rest);
else {
  process.stderr.write("usage: main.js stream-out|stream-in [--help]\n");
  code = 2;
}
process.exit(code);
