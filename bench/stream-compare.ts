// QEMU's own migration vs stream mode across a 1 Gbit/s namespace link, on
// the real guest: node dist/bench/stream-compare.js [--runs N] [--rate 1gbit] [--mode M ...]
//   [--downtime-limit MS] (QEMU's, the same for every mode; default QEMU's 300) [--prealloc] [--out-arg ARG ...] [--baseline MAIN] [--json]
import { parseArgs } from "node:util";
import { formatRunTimeline } from "../src/compare/migrate-timeline.js";
import { compareStreamMode, formatCompare, COMPARE_MODES, ALL_MODES, type CompareMode } from "../src/compare/stream.js";

const { values } = parseArgs({
  options: {
    runs: { type: "string", default: "1" }, rate: { type: "string", default: "1gbit" }, json: { type: "boolean" },
    mode: { type: "string", multiple: true }, mem: { type: "string", default: "512" },
    "downtime-limit": { type: "string" }, "out-arg": { type: "string", multiple: true }, baseline: { type: "string" }, timeline: { type: "boolean" }, "qemu-side": { type: "string", default: "unix" }, prealloc: { type: "boolean" }, help: { type: "boolean", short: "h" },
  },
});
if (values.help) {
  console.log(`node dist/bench/stream-compare.js [options]: QEMU's own migration vs stream mode, on the real guest, over a namespace link
  --runs N             runs per mode (medians; default 1)
  --rate R             the link's rate, as tc takes it (default 1gbit; e.g. 300mbit)
  --mode M             a mode to run (repeat; default ${COMPARE_MODES.join(", ")}; with --baseline pagetwin-baseline too;
                       relay: pagetwin's layout with plain socket.pipe() relays in place of the proxies)
                       (the multifd modes use 2 channels: QEMU's zstd, or none through the proxies, which dedup each channel)
  --mem MIB            guest RAM (default 512)
  --downtime-limit MS  QEMU's downtime-limit for every mode (default QEMU's, 300)
  --out-arg ARG        one more stream-out argument (repeat; e.g. --out-arg=--queue-ms --out-arg=5)
  --baseline MAIN      another build's dist/src/cli/main.js: its proxies run the pagetwin-baseline rows (before and after in one run)
  --qemu-side unix|tcp how each QEMU reaches its proxy (default unix, as docs/STREAM.md advises; tcp: loopback TCP, whose kernel buffers hold MBs that QEMU counts as sent)
  --prealloc           both QEMUs of every mode allocate all guest RAM as they start (QEMU's prealloc=on, libvirt's
                       <allocation mode='immediate'/>); default: as first written (libvirt's default), which the destination
                       QEMU pays during the migration
  --timeline           per run, the source's query-migrate every 50 ms (QEMU's rate, remaining, expected downtime) and the proxies' waits
  --json               the results as JSON`);
  process.exit(0);
}
const modes = (values.mode ?? [...COMPARE_MODES, ...(values.baseline ? ["pagetwin-baseline"] : [])]) as CompareMode[];
for (const m of modes) if (!ALL_MODES.includes(m)) throw new Error(`--mode: unknown "${m}" (use ${ALL_MODES.join(", ")})`);
// Ctrl-C: exit through process.exit so the VMs, RAM files and namespaces are removed.
for (const sig of ["SIGINT", "SIGTERM"] as const) process.once(sig, () => process.exit(130));
const r = await compareStreamMode({
  runs: Number(values.runs), rate: values.rate!, memoryMiB: Number(values.mem),
  ...(values["downtime-limit"] ? { downtimeLimitMs: Number(values["downtime-limit"]) } : {}),
  modes,
  ...(values["out-arg"] ? { outArgs: values["out-arg"] } : {}),
  ...(values.baseline ? { baselineMain: values.baseline } : {}),
  prealloc: values.prealloc === true,
  qemuSide: values["qemu-side"] === "tcp" ? "tcp" : "unix",
  log: (m) => process.stderr.write(`[compare] ${m}\n`),
});
if (values.timeline) for (const [mode, runs] of Object.entries(r.runs)) runs.forEach((run, i) => console.log(formatRunTimeline(`${mode} run ${i}`, run)));
if (values.json) console.log(JSON.stringify(r, null, 2));
else console.log(formatCompare(r));
