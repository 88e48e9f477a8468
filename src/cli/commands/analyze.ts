import { openNasIndex } from "../../adapters/nas/index-file.js";
import { RamFile } from "../../adapters/ram/ram-file.js";
import { Planner, planIteration } from "../../plan/planner.js";
import { PAGE_SIZE } from "../../core/engine.js";
import { REF_SIZE } from "../../agent/protocol.js";
import { parse, helpText, str, parseRate, progress, fmtBytes, type CommandSpec } from "../args.js";

export const spec: CommandSpec = {
  name: "analyze",
  summary: "tell what a migration of this RAM would move, before moving anything",
  usage: "pagetwin analyze --ram FILE --image IMAGE [--bandwidth 1gbit] [--json]",
  options: {
    ram: { type: "string", help: "the VM's RAM file (QEMU memory-backend-file, or a dump)" },
    image: { type: "string", help: "the VM's raw disk image on the NAS" },
    index: { type: "string", help: "index file (default: beside the image)" },
    bandwidth: { type: "string", default: "1gbit", help: "link bandwidth for the time estimate" },
    json: { type: "boolean", help: "print one JSON object" },
  },
  details: "Counts zero pages (not sent), twin pages (sent as a 24-byte reference to a NAS block) and unique\npages (sent in full), and the first pre-copy round's time at the bandwidth, with and without pagetwin.",
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const bw = parseRate(values.bandwidth as string);
  const nas = await openNasIndex(str(values, "image"), { indexPath: values.index as string | undefined, onProgress: progress("indexing") });
  const ram = RamFile.open(str(values, "ram"));
  const planner = new Planner(nas.engine, { pages: ram.pages, index: nas.index });
  const t0 = performance.now();
  const plan = planIteration(planner, 1, (first, count, into) => ram.readPages(first, count, into));
  const scanMs = performance.now() - t0;
  planner.free();
  ram.close();
  nas.image.close();
  const unique = plan.normal;
  const baselineBytes = (plan.normal + plan.twin) * PAGE_SIZE;
  const pagetwinBytes = plan.normal * PAGE_SIZE + plan.twin * REF_SIZE;
  const out = {
    pages: ram.pages, zero: ram.pages - plan.dirty + plan.zero, twin: plan.twin, unique,
    twinShareOfNonZero: +(plan.twin / Math.max(plan.twin + unique, 1)).toFixed(4),
    bandwidthBytesPerSecond: bw,
    baseline: { bytes: baselineBytes, seconds: +(baselineBytes / bw).toFixed(3) },
    pagetwin: { bytes: pagetwinBytes, seconds: +(pagetwinBytes / bw).toFixed(3) },
    scanMs: Math.round(scanMs),
  };
  if (values.json) { console.log(JSON.stringify(out)); return 0; }
  const pct = (n: number) => `${((n / out.pages) * 100).toFixed(1)}%`;
  console.log(`RAM ${fmtBytes(out.pages * PAGE_SIZE)} (${out.pages} pages), scanned in ${out.scanMs} ms`);
  console.log(`  zero    ${String(out.zero).padStart(9)}  ${pct(out.zero)}  not sent`);
  console.log(`  twin    ${String(out.twin).padStart(9)}  ${pct(out.twin)}  sent as references (${(out.twinShareOfNonZero * 100).toFixed(1)}% of non-zero pages)`);
  console.log(`  unique  ${String(out.unique).padStart(9)}  ${pct(out.unique)}  sent in full`);
  console.log(`first round at ${fmtBytes(bw)}/s: plain pre-copy ${fmtBytes(baselineBytes)} in ${out.baseline.seconds} s; pagetwin ${fmtBytes(pagetwinBytes)} in ${out.pagetwin.seconds} s`);
  return 0;
}
