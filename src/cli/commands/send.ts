import { RamFile } from "../../adapters/ram/ram-file.js";
import { migrateSource, MigrationError, type MigrationResult } from "../../agent/source.js";
import { parseCompressionMode } from "../../codec/compress.js";
import { parseEndpoint } from "../../link/endpoint.js";
import { parse, helpText, str, num, int, parseRate, fmtBytes, securityOptions, security, warnIfInsecure, UsageError, type CommandSpec } from "../args.js";
import { ProgressReporter } from "../progress.js";
import { errorText, failureRecord, printJson } from "../json.js";
import { openImageIndex } from "../image-index.js";
import { sendRecord } from "../records.js";
import { openTraceOutputs, traceOptions, withUiDefault } from "../trace.js";
import { AgentTracer } from "../../trace/agent.js";

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
    ...securityOptions("destination agent", false),
    ...traceOptions,
    json: { type: "boolean", help: "NDJSON on stdout: progress events, then one result named as query-migrate's (docs/JSON.md)" },
  },
  details: "Without a hypervisor to stop, the RAM file is taken as it is at switchover; use `pagetwin migrate`\nfor a QEMU VM.",
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, withUiDefault(argv));
  if (help) { console.log(helpText(spec)); return 0; }
  warnIfInsecure(values);
  const to = parseEndpoint(str(values, "to"), "--to");
  const onCap = values["on-cap"];
  if (onCap !== "switchover" && onCap !== "abort") throw new UsageError("--on-cap is switchover or abort");
  let compress;
  try { compress = parseCompressionMode(values.compress as string); } catch (err) { throw new UsageError((err as Error).message); }
  const bandwidth = parseRate(values.bandwidth as string);
  const convergence = { downtimeMs: num(values, "downtime", 1), maxIterations: int(values, "max-iterations", 1), onCap } as const;
  const json = !!values.json;
  const sec = security(values);
  const progress = new ProgressReporter("send", { json });
  const nas = await openImageIndex(str(values, "image"), progress, { indexPath: values.index as string | undefined });
  let ram: RamFile;
  try {
    ram = RamFile.open(str(values, "ram"));
  } catch (err) {
    nas.image.close();
    throw err;
  }
  const traces = await openTraceOutputs(values, (m) => console.error(`pagetwin send: ${m}`));
  // times from this process's start, as the migration's own (startedAt: 0)
  const tracer = traces.sinks.length ? new AgentTracer(traces.sinks, {
    mode: "agent", method: values["no-dedup"] ? "baseline" : "pagetwin", label: `send ${values.ram as string}`, pages: ram.pages,
    config: { bandwidthBytesPerSecond: bandwidth, downtimeMs: convergence.downtimeMs, maxIterations: convergence.maxIterations },
  }, 0) : null;
  const traceEnd = (r: MigrationResult) => tracer?.end({
    ok: r.status === "completed", ...(r.error ? { error: r.error } : {}), totalTimeMs: r.totalTimeMs, downtimeMs: r.downtimeMs, transferredBytes: r.transferredBytes,
    iterations: r.iterations, pages: r.pages, verified: r.verified, convergence: r.convergence, expectedDowntimeMs: r.expectedDowntimeMs,
  });
  try {
    const r = await migrateSource({
      engine: nas.engine, index: values["no-dedup"] ? null : nas.index, indexId: nas.header.indexId, ram,
      vm: { pause: async () => {}, resume: async () => {} },
      ...(to.kind === "unix" ? { host: "", port: 0, socketPath: to.path } : { host: to.host, port: to.port }), bandwidth,
      convergence, trace: tracer !== null, compress, ...sec,
      startedAt: 0, // performance.now() counts from this process's start: total-time is the command's
      onProgress: (p) => tracer?.progress(p),
      onIteration: (it) => { tracer?.iteration(it); progress.step("iteration", { iteration: it.iteration, final: it.final, dirty: it.dirty, ...it.pages, transferredBytes: it.transferredBytes, durationMs: it.durationMs },
        `iteration ${it.iteration}: ${it.pages.normal} sent, ${it.pages.twin} twin, ${it.pages.zero} zero, ${it.pages.resent} resent, ${fmtBytes(it.transferredBytes)}`); },
    });
    traceEnd(r);
    print(r, json);
    return 0;
  } catch (err) {
    if (err instanceof MigrationError) traceEnd(err.result as MigrationResult);
    if (err instanceof MigrationError) {
      // the message for people always goes to stderr, --json or not
      console.error(errorText(err));
      if (json) printJson("send", "result", failureRecord(err, sendRecord(err.result)));
      else print(err.result, false);
      return 1;
    }
    throw err;
  } finally {
    await traces.close();
    ram.close();
    nas.image.close();
  }
}

function print(r: import("../../agent/source.js").MigrationResult, json: boolean): void {
  if (json) {
    printJson("send", "result", sendRecord(r));
    return;
  }
  console.log(`status ${r.status}; total-time ${r.totalTimeMs.toFixed(0)} ms, downtime ${r.downtimeMs.toFixed(0)} ms, transferred ${fmtBytes(r.transferredBytes)}, ${r.iterations} iterations; pages: ${r.pages.normal} normal, ${r.pages.twin} twin, ${r.pages.zero} zero, ${r.pages.resent} resent; RAM digest ${r.verified ? "verified" : "NOT verified"}`);
  console.log(compressionLine(r.compression));
}

/** How the pages sent in full travelled (send's and migrate's text output). */
export function compressionLine(c: import("../../codec/compress.js").CompressionStats): string {
  return c.algorithm
    ? `compression ${c.algorithm} (${c.mode}): ${c.framesCompressed} frames compressed (${fmtBytes(c.bytesBefore)} -> ${fmtBytes(c.bytesAfter)}), ${c.framesRaw} raw (${c.rawSlow} compressor slower than the link, ${c.rawPoorRatio} did not compress); link ${c.linkMBs.toFixed(0)} MB/s, compressor ${c.compressMBs.toFixed(0)} MB/s`
    : `compression off${c.note && c.note !== "compression off" ? `: ${c.note}` : ""}`;
}
