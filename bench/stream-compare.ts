// QEMU's own migration vs stream mode across a 1 Gbit/s namespace link, on
// the real guest: node dist/bench/stream-compare.js [--runs N] [--rate 1gbit] [--mode M ...]
//   [--downtime-limit MS] (QEMU's, the same for every mode; default QEMU's 300) [--json]
import { parseArgs } from "node:util";
import { compareStreamMode, formatCompare, type CompareMode } from "../src/compare/stream.js";

const { values } = parseArgs({
  options: {
    runs: { type: "string", default: "1" }, rate: { type: "string", default: "1gbit" }, json: { type: "boolean" },
    mode: { type: "string", multiple: true }, mem: { type: "string", default: "512" },
    "downtime-limit": { type: "string" },
  },
});
// Ctrl-C: exit through process.exit so the VMs, RAM files and namespaces are removed.
for (const sig of ["SIGINT", "SIGTERM"] as const) process.once(sig, () => process.exit(130));
const r = await compareStreamMode({
  runs: Number(values.runs), rate: values.rate!, memoryMiB: Number(values.mem),
  ...(values["downtime-limit"] ? { downtimeLimitMs: Number(values["downtime-limit"]) } : {}),
  ...(values.mode ? { modes: values.mode as CompareMode[] } : {}),
  log: (m) => process.stderr.write(`[compare] ${m}\n`),
});
if (values.json) console.log(JSON.stringify(r, null, 2));
else console.log(formatCompare(r));
