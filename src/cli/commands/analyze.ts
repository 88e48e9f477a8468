import { statSync } from "node:fs";
import { defaultIndexPath } from "../../adapters/nas/index-file.js";
import type { DiskFormat } from "../../adapters/nas/image.js";
import { RamFile } from "../../adapters/ram/ram-file.js";
import { Planner, estimateDirtyPages, planIteration } from "../../plan/planner.js";
import { PAGE_SIZE } from "../../core/engine.js";
import { parseCompressionMode } from "../../codec/compress.js";
import { parse, helpText, str, parseRate, fmtBytes, diskFormat, FORMAT_OPTION, UsageError, type CommandSpec } from "../args.js";
import { ProgressReporter } from "../progress.js";
import { printJson } from "../json.js";
import { openImageIndex } from "../image-index.js";
import { sampleCompression, roundBytes, rawRoundMs, modelTime, LEAVES_OUT } from "../analyze-model.js";
import { sampleDestination } from "../analyze-destination.js";
import { sampleWire } from "../analyze-wire.js";

export const spec: CommandSpec = {
  name: "analyze",
  summary: "tell what a migration of this RAM would move, before moving anything",
  usage: "pagetwin analyze --ram FILE --image IMAGE [--bandwidth 1gbit] [--compress auto] [--index FILE] [--json]",
  options: {
    ram: { type: "string", help: "the VM's RAM file (QEMU memory-backend-file, or a dump)" },
    image: { type: "string", help: "the VM's disk image on the NAS (raw or qcow2)" },
    ...FORMAT_OPTION,
    index: { type: "string", help: "write the block index here (default: an up-to-date index beside the image is read; otherwise the index is built in memory and nothing is written)" },
    bandwidth: { type: "string", default: "1gbit", help: "link bandwidth for the estimate (above 0)" },
    compress: { type: "string", default: "auto", help: "the compression the migration would use: auto, off, zstd or brotli (as `pagetwin migrate --compress`)" },
    json: { type: "boolean", help: "NDJSON on stdout: progress events, then one result (docs/JSON.md)" },
  },
  details: [
    "Reads the VM's files only. Counts zero pages (not sent), twin pages (sent as a 24-byte reference to a NAS block) and",
    "the pages sent in full, compresses a sample of those with the codec agent mode would use, and predicts",
    "the first pre-copy round's bytes and a time: the slowest of the source (the scan of RAM and the",
    "compressor, timed here), the link and the destination (its twin checks and page writes, timed here on a",
    "sample, in a scratch file removed at once), plus agent mode's final scan. The time leaves out what the",
    "guest writes while it migrates, set-up, agents sharing one host and QEMU's device state (listed in the output).",
  ].join("\n"),
};

interface Args { ram: string; image: string; format: DiskFormat | undefined; index?: string; bandwidth: number; compress: ReturnType<typeof parseCompressionMode>; json: boolean }

/** Every argument checked before any work: the RAM file, the image, the numbers. */
function validate(values: Record<string, string | boolean | undefined>): Args {
  const format = diskFormat(values);
  const bandwidth = parseRate(values.bandwidth as string, "--bandwidth", true);
  let compress;
  try { compress = parseCompressionMode(values.compress as string); } catch (err) { throw new UsageError((err as Error).message); }
  const ram = str(values, "ram"), image = str(values, "image");
  const kind = (p: string, what: string) => {
    try {
      const st = statSync(p);
      if (!st.isFile() && !(what === "disk image" && st.isBlockDevice())) throw new UsageError(`the ${what} ${p} is not a regular file${st.isDirectory() ? " (EISDIR: it is a directory)" : ""}`);
      return st;
    } catch (err) {
      if (err instanceof UsageError) throw err;
      throw new UsageError(`cannot read the ${what} ${p}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  };
  const rs = kind(ram, "RAM file");
  if (rs.size === 0 || rs.size % PAGE_SIZE) throw new UsageError(`the RAM file ${ram} has ${rs.size} bytes; want a whole number of ${PAGE_SIZE}-byte pages`);
  kind(image, "disk image");
  const index = values.index as string | undefined;
  if (index !== undefined && statSync(index, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`--index ${index} is a directory (EISDIR): give a file path`);
  return { ram, image, format, index, bandwidth, compress, json: !!values.json };
}

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const a = validate(values);
  const progress = new ProgressReporter("analyze", { json: a.json });
  // an up-to-date index beside the image is read; a new one is written only where --index says
  const t0 = performance.now();
  const nas = await openImageIndex(a.image, progress, { indexPath: a.index ?? defaultIndexPath(a.image), write: a.index !== undefined, format: a.format });
  if (nas.stale) {
    process.stderr.write(`pagetwin analyze: the index ${nas.indexPath} is stale (generation ${nas.header.generation}; the image was written since): ` +
      "it is used as it is, so twins counted here may include blocks rewritten since, which a migration would resend; `pagetwin index --image IMAGE` refreshes it\n");
  }
  const indexMs = performance.now() - t0; // the migration opens (or builds) it first, too
  const ram = RamFile.open(a.ram);
  try {
    const planner = new Planner(nas.engine, { pages: ram.pages, index: nas.index });
    const s0 = performance.now();
    const plan = planIteration(planner, 1, (first, count, into) => {
      ram.readPages(first, count, into);
      progress.update("scanning", first + count, ram.pages, "pages");
    });
    const scanMs = performance.now() - s0;
    // what changed during the scan, sampled as the agent samples it after its round 1
    const d0 = performance.now();
    const dirty = estimateDirtyPages(planner, (first, count, into) => ram.readPages(first, count, into));
    // a later round's scan: read and hash, most pages clean (no index lookups), timed on the sample
    const laterScanMs = ((performance.now() - d0) * ram.pages) / dirty.sampled;
    const dirtyPages = dirty.pages;
    planner.free();
    const dst = sampleDestination(nas.engine, nas.image, ram.pages, plan.send, plan.twinPages, plan.twinBlocks);
    const wire = sampleWire();
    const round = { normal: plan.normal, twin: plan.twin, zero: plan.zero };
    // the agent times the link on what the destination received: at most the rate the agents feed it raw
    const rawBytes = roundBytes(round, null).bytes;
    const linkRate = Math.min(a.bandwidth, rawBytes / (rawRoundMs(rawBytes, scanMs, dst, wire) / 1000));
    const c = sampleCompression(ram, plan.send, a.compress, a.bandwidth, linkRate);
    const { bytes, uncompressedBytes } = roundBytes(round, c);
    const time = modelTime({ bytes, bandwidth: a.bandwidth, scanMs, laterScanMs, indexMs, dirtyPages, ramPages: ram.pages }, c, dst, wire);
    const baselineBytes = (plan.normal + plan.twin) * PAGE_SIZE;
    const out = {
      ok: true,
      pages: ram.pages, zero: ram.pages - plan.dirty + plan.zero, twin: plan.twin, normal: plan.normal,
      twinShareOfNonZero: plan.twin / Math.max(plan.twin + plan.normal, 1),
      bandwidthBytesPerSecond: a.bandwidth,
      index: {
        path: nas.built && a.index === undefined ? undefined : nas.indexPath, built: nas.built, saved: nas.built && a.index !== undefined,
        stale: nas.stale, generation: nas.header.generation, format: nas.image.format,
      },
      compression: { ...c, linkBytesPerSecond: linkRate },
      baseline: { bytes: baselineBytes, timeMs: (baselineBytes / a.bandwidth) * 1000 },
      pagetwin: {
        bytes, uncompressedBytes, timeMs: time.ms, oneHostMs: time.oneHostMs, setupMs: time.setupMs, roundMs: time.roundMs, rounds: time.rounds, dirtyPages, laterScanMs, linkMs: time.linkMs, scanMs: time.scanMs, compressMs: time.compressMs,
        sourceMs: time.sourceMs, destinationMs: time.destinationMs, wireSourceMs: time.wireSourceMs,
        destination: { ramHashMs: dst.ramHashMs, twinMs: dst.twinMs, pagesMs: dst.pagesMs, decompressMs: c.decompressMs, wireMs: time.wireDestinationMs },
      },
      leavesOut: LEAVES_OUT,
    };
    if (a.json) { printJson("analyze", "result", out); return 0; }
    print(out, c.why);
    return 0;
  } finally {
    ram.close();
    nas.image.close();
  }
}

function print(out: { pages: number; zero: number; twin: number; normal: number; twinShareOfNonZero: number; bandwidthBytesPerSecond: number; baseline: { bytes: number; timeMs: number }; pagetwin: { bytes: number; uncompressedBytes: number; timeMs: number; setupMs: number; roundMs: number; rounds: number; linkMs: number; scanMs: number; compressMs: number; sourceMs: number; destinationMs: number } }, why: string): void {
  const pct = (n: number) => `${((n / out.pages) * 100).toFixed(1)}%`;
  const p = out.pagetwin;
  console.log(`RAM ${fmtBytes(out.pages * PAGE_SIZE)} (${out.pages} pages), scanned in ${p.scanMs.toFixed(0)} ms`);
  console.log(`  zero    ${String(out.zero).padStart(9)}  ${pct(out.zero)}  not sent`);
  console.log(`  twin    ${String(out.twin).padStart(9)}  ${pct(out.twin)}  sent as references (${(out.twinShareOfNonZero * 100).toFixed(1)}% of non-zero pages)`);
  console.log(`  normal  ${String(out.normal).padStart(9)}  ${pct(out.normal)}  sent in full`);
  console.log(`compression: ${why}`);
  console.log(`first round at ${fmtBytes(out.bandwidthBytesPerSecond)}/s: plain pre-copy ${fmtBytes(out.baseline.bytes)} in ${(out.baseline.timeMs / 1000).toFixed(2)} s; ` +
    `pagetwin ${fmtBytes(p.bytes)} (${fmtBytes(p.uncompressedBytes)} before compression)`);
  console.log(`pagetwin's time, modelled: ${(p.timeMs / 1000).toFixed(2)} s: the block index ${p.setupMs.toFixed(0)} ms, round 1 ${p.roundMs.toFixed(0)} ms, the slowest of link ${p.linkMs.toFixed(0)} ms, ` +
    `source ${p.sourceMs.toFixed(0)} ms (scan ${p.scanMs.toFixed(0)}, compressor ${p.compressMs.toFixed(0)}) and destination ${p.destinationMs.toFixed(0)} ms; ${p.rounds} rounds in all, each later one a scan`);
  console.log(`the time leaves out: ${LEAVES_OUT.join("; ")}`);
}
