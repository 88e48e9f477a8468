import { writeFileSync } from "node:fs";
import { openNasIndex } from "../../adapters/nas/index-file.js";
import { RamFile } from "../../adapters/ram/ram-file.js";
import { migrateSource, MigrationError } from "../../agent/source.js";
import { parseCompressionMode } from "../../codec/compress.js";
import { parseEndpoint } from "../../link/endpoint.js";
import { parse, helpText, str, num, parseRate, fmtBytes, progress, securityOptions, security, warnIfInsecure, UsageError, type CommandSpec } from "../args.js";

export const spec: CommandSpec = {
  name: "send",
  summary: "source agent: migrate a RAM file to a `pagetwin listen` agent",
  usage: "pagetwin send --ram FILE --image IMAGE --to HOST:PORT [--bandwidth 1gbit] [--compress auto|off|zstd|brotli] [--no-dedup] [--json]",
  options: {
    ram: { type: "string", help: "the source VM's RAM file" },
    image: { type: "string", help: "the VM's raw disk image on the NAS" },
    index: { type: "string", help: "index file (default: beside the image)" },
    to: { type: "string", help: "the destination agent, HOST:PORT or unix:PATH" },
    bandwidth: { type: "string", default: "1gbit", help: "rate limit on the link (0: none)" },
    compress: { type: "string", default: "auto", help: "pages sent in full: auto (compress when the compressor outruns the link and the data compresses), off, zstd or brotli" },
    "no-dedup": { type: "boolean", help: "plain pre-copy: send every non-zero dirty page in full" },
    downtime: { type: "string", default: "300", help: "downtime target, ms" },
    "max-iterations": { type: "string", default: "30", help: "iteration cap" },
    "on-cap": { type: "string", default: "switchover", help: "at a cap without convergence: switchover or abort" },
    trace: { type: "string", help: "write a per-iteration trace (JSON) here" },
    ...securityOptions("destination agent", false),
    json: { type: "boolean", help: "print one JSON object (stats named as query-migrate's)" },
  },
  details: "Without a hypervisor to stop, the RAM file is taken as it is at switchover; use `pagetwin migrate`\nfor a QEMU VM.",
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  warnIfInsecure(values);
  const to = parseEndpoint(str(values, "to"), "--to");
  const onCap = values["on-cap"];
  if (onCap !== "switchover" && onCap !== "abort") throw new UsageError("--on-cap is switchover or abort");
  let compress;
  try { compress = parseCompressionMode(values.compress as string); } catch (err) { throw new UsageError((err as Error).message); }
  const nas = await openNasIndex(str(values, "image"), { indexPath: values.index as string | undefined, onProgress: progress("indexing") });
  const ram = RamFile.open(str(values, "ram"));
  try {
    const r = await migrateSource({
      engine: nas.engine, index: values["no-dedup"] ? null : nas.index, indexId: nas.header.indexId, ram,
      vm: { pause: async () => {}, resume: async () => {} },
      ...(to.kind === "unix" ? { host: "", port: 0, socketPath: to.path } : { host: to.host, port: to.port }), bandwidth: parseRate(values.bandwidth as string),
      convergence: { downtimeMs: num(values, "downtime", 1), maxIterations: num(values, "max-iterations", 1), onCap },
      trace: !!values.trace, compress,
      startedAt: 0, // performance.now() counts from this process's start: total-time is the command's
      ...security(values),
      onIteration: (it) => { if (!values.json) console.error(`iteration ${it.iteration}: ${it.pages.normal} sent, ${it.pages.twin} twin, ${it.pages.zero} zero, ${it.pages.resent} resent, ${fmtBytes(it.transferredBytes)}`); },
    });
    if (values.trace) writeFileSync(values.trace as string, JSON.stringify({ format: "pagetwin-trace", version: 1, pages: ram.pages, runs: [{ mode: r.mode, result: { ...r, iterationLog: undefined }, iterations: r.iterationLog }] }));
    print(r, !!values.json);
    return 0;
  } catch (err) {
    if (err instanceof MigrationError) {
      print(err.result, !!values.json);
      if (!values.json) console.error(err.message);
      return 1;
    }
    throw err;
  } finally {
    ram.close();
    nas.image.close();
  }
}

function print(r: import("../../agent/source.js").MigrationResult, json: boolean): void {
  if (json) {
    console.log(JSON.stringify({ ...r, iterationLog: r.iterationLog.map((i) => ({ ...i, pageMap: undefined })) }));
    return;
  }
  console.log(`status ${r.status}; total-time ${r.totalTimeMs.toFixed(0)} ms, downtime ${r.downtimeMs.toFixed(0)} ms, transferred ${fmtBytes(r.transferredBytes)}, ${r.iterations} iterations; pages: ${r.pages.normal} normal, ${r.pages.twin} twin, ${r.pages.zero} zero, ${r.pages.resent} resent; RAM digest ${r.verified ? "verified" : "NOT verified"}`);
  const c = r.compression;
  console.log(c.algorithm
    ? `compression ${c.algorithm} (${c.mode}): ${c.framesCompressed} frames compressed (${fmtBytes(c.bytesBefore)} -> ${fmtBytes(c.bytesAfter)}), ${c.framesRaw} raw (${c.rawSlow} compressor slower than the link, ${c.rawPoorRatio} did not compress)`
    : `compression off${c.note && c.note !== "compression off" ? `: ${c.note}` : ""}`);
}
