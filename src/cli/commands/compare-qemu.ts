import { writeFileSync } from "node:fs";
import { runComparison, formatComparison, COMPARE_MODES, DEFAULT_APPEND, type CompareMode } from "../../compare/agent.js";
import { jsonLine, printJson } from "../json.js";
import { compareRecord } from "../records.js";
import { parse, helpText, num, int, parseRate, workersWhen, UsageError, type CommandSpec } from "../args.js";

export const spec: CommandSpec = {
  name: "compare-qemu",
  summary: "migrate a real QEMU guest across a 1 Gbit/s link three ways: QEMU, pagetwin without dedup, pagetwin",
  usage: "pagetwin compare-qemu [--modes qemu,qemu-multifd-zstd,pagetwin-nodedup,pagetwin] [--repeat 1] [--rate 1gbit] [--json] [--out FILE]",
  options: {
    modes: { type: "string", default: COMPARE_MODES.join(","), help: "which migrations to run, in order" },
    repeat: { type: "string", default: "1", help: "runs of each (the table shows medians)" },
    rate: { type: "string", default: "1gbit", help: "link rate (tc tbf on the veth pair)" },
    "qemu-max-bandwidth": { type: "string", help: "QEMU's max-bandwidth, e.g. 1gbit; 0 keeps QEMU's own default (128 MiB/s in 7.2) (default: 10 GB/s, the link is the limit)" },
    workers: { type: "string", default: "0", help: "pagetwin hashes on this many worker threads" },
    "workers-when": { type: "string", default: "always", help: "always, or switchover: the workers hash only the final pass, with the guest stopped" },
    "memory-mib": { type: "string", default: "512", help: "guest RAM, MiB" },
    downtime: { type: "string", default: "300", help: "downtime target for both, ms (QEMU's downtime-limit)" },
    append: { type: "string", default: DEFAULT_APPEND, help: "guest kernel command line (pt_dirty=MiB/s, pt_dirty_ws=MiB, pt_read=0|1)" },
    "no-build": { type: "boolean", help: "fail instead of building the guest when it is missing" },
    out: { type: "string", help: "also write the JSON result here (pretty-printed)" },
    json: { type: "boolean", help: "one JSON result on stdout: every run, with QEMU's query-migrate and pagetwin's stats (docs/JSON.md)" },
  },
  details: [
    "Needs root (ip netns, tc), qemu-system-x86_64 and the guest of scripts/build-guest.sh (built if missing).",
    "Each run boots a fresh 512 MiB guest under TCG in the source namespace, waits until it has read its",
    "files (page cache) and counts, starts the destination QEMU in the other namespace, and migrates:",
    "  qemu              QEMU's own pre-copy to -incoming tcp:DST:4444 (stats from query-migrate)",
    "  pagetwin-nodedup  `pagetwin migrate --no-dedup`: every non-zero page in full",
    "  pagetwin          `pagetwin migrate`: pages found on the NAS disk travel as references",
    "pagetwin's agents run inside the namespaces; QEMU moves the device state over the same link.",
    "Bytes on the link are the source veth's tx counter. The guest's serial counter must go on at the",
    "destination from the number after the last one the source printed.",
  ].join("\n"),
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const modes = String(values.modes).split(",").map((m) => m.trim()).filter(Boolean);
  for (const m of modes) if (!COMPARE_MODES.includes(m as CompareMode)) throw new UsageError(`--modes: unknown "${m}" (use ${COMPARE_MODES.join(", ")})`);
  const json = !!values.json;
  const r = await runComparison({
    modes: modes as CompareMode[], repeat: int(values, "repeat", 1, 20), rate: values.rate as string,
    memoryMiB: int(values, "memory-mib", 64, 8192), downtimeMs: num(values, "downtime", 1), append: values.append as string,
    build: !values["no-build"], workers: int(values, "workers", 0, 16), workersWhen: workersWhen(values),
    ...(values["qemu-max-bandwidth"] ? { qemuMaxBandwidth: parseRate(values["qemu-max-bandwidth"] as string) } : {}), log: (m) => console.error(`compare-qemu: ${m}`),
  });
  if (values.out) writeFileSync(values.out as string, JSON.stringify(JSON.parse(jsonLine("compare-qemu", "result", compareRecord(r))), null, 2));
  if (json) printJson("compare-qemu", "result", compareRecord(r));
  else console.log(formatComparison(r));
  return r.runs.every((x) => x.status === "completed") ? 0 : 1;
}
