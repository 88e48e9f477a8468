import { QmpClient } from "../../adapters/qemu/qmp.js";
import { migrateQemuAgentMode, AgentMigrationError, type AgentMigrationResult } from "../../agent/qemu.js";
import type { ConvergenceOptions } from "../../plan/convergence.js";
import { parseEndpoint } from "../../link/endpoint.js";
import { ProgressReporter } from "../progress.js";
import { errorText, failureRecord, printJson } from "../json.js";
import { migrateRecord } from "../records.js";
import { parse, helpText, str, num, int, parseRate, fmtBytes, securityOptions, security, warnIfInsecure, workersWhen, diskFormat, FORMAT_OPTION, REFRESH_RATE_OPTION, UsageError, type CommandSpec } from "../args.js";
import { parseCompressionMode } from "../../codec/compress.js";
import { openTraceOutputs, traceOptions, withUiDefault } from "../trace.js";
import { AgentTracer, type AgentTraceEnd } from "../../trace/agent.js";
import { statSync } from "node:fs";
import { compressionLine } from "./send.js";

export const spec: CommandSpec = {
  name: "migrate",
  summary: "migrate a running QEMU VM in agent mode (RAM by pagetwin, device state by QEMU)",
  usage: "pagetwin migrate --src-qmp SOCK --dst-qmp SOCK --src-ram FILE (--dst-ram FILE | --dst-agent HOST:PORT) --image IMAGE [--incoming tcp:HOST:PORT] [--bandwidth 0] [--json]",
  options: {
    "src-qmp": { type: "string", help: "QMP unix socket of the source QEMU (running)" },
    "dst-qmp": { type: "string", help: "QMP unix socket of the destination QEMU (started with -incoming defer -S)" },
    "src-ram": { type: "string", help: "the source VM's RAM file (memory-backend-file mem-path, share=on)" },
    "dst-ram": { type: "string", help: "the destination VM's RAM file; a destination agent runs in this process" },
    "dst-agent": { type: "string", help: "a `pagetwin listen` agent on the destination host, HOST:PORT (instead of --dst-ram)" },
    image: { type: "string", help: "the VM's disk image on the NAS (raw or qcow2)" },
    ...FORMAT_OPTION,
    index: { type: "string", help: "index file (default: beside the image; built if missing)" },
    ...REFRESH_RATE_OPTION,
    incoming: { type: "string", help: "send QEMU's device state straight from QEMU to QEMU at this URI (e.g. tcp:10.0.0.2:4444), unprotected unless QEMU has TLS of its own; default: through pagetwin's TLS link (the source QEMU migrates into a private unix socket, the destination agent hands it to its QEMU)" },
    bandwidth: { type: "string", default: "0", help: "rate limit of pagetwin's link, e.g. 1gbit (0: none)" },
    "no-dedup": { type: "boolean", help: "plain pre-copy by pagetwin: every non-zero dirty page in full" },
    downtime: { type: "string", default: "300", help: "downtime target, ms (QEMU's downtime-limit default): the agent switches over once the next round fits it (after the first round, a sample of RAM estimates that round); a lower target makes it run more live rounds first" },
    "max-iterations": { type: "string", default: "30", help: "iteration cap" },
    "on-cap": { type: "string", default: "switchover", help: "at a cap without convergence: switchover or abort" },
    compress: { type: "string", default: "auto", help: "compress the pages sent in full: auto, off, zstd or brotli" },
    workers: { type: "string", default: "0", help: "hash on this many worker threads (0: on the agent's own thread)" },
    "workers-when": { type: "string", default: "always", help: "always, or switchover: workers hash only the final pass, with the guest stopped (on a host with few cores they slow the live passes, where they compete with the agent's own thread)" },
    ...securityOptions("destination agent", false),
    ...traceOptions,
    json: { type: "boolean", help: "NDJSON on stdout: progress events, then one result named as query-migrate's (docs/JSON.md); messages still go to stderr" },
  },
  details: [
    "Both QEMUs need their RAM in a shared file: -machine memory-backend=mem -object",
    "memory-backend-file,id=mem,size=SIZE,mem-path=/dev/shm/NAME,share=on (same SIZE on both).",
    "The destination starts with -incoming defer -S. Pre-copy runs while the guest runs; at switchover",
    "the source is stopped, the last pages are sent, the destination's RAM digest is checked against the",
    "source's, QEMU moves only the device state (capability x-ignore-shared), and the destination gets",
    "`cont`. On any failure the destination QEMU is stopped and the source keeps (or goes back to) running.",
  ].join("\n"),
};

function hostPort(s: string, what: string): { host: string; port: number } {
  const e = parseEndpoint(s, what);
  if (e.kind !== "tcp") throw new UsageError(`${what} must be HOST:PORT (got "${s}")`);
  return { host: e.host, port: e.port };
}

type Values = ReturnType<typeof parse>["values"];

/** The migration's options from the command line (checked before any connection). */
function migrationOptions(values: Values) {
  const agent = values["dst-agent"] ? hostPort(values["dst-agent"] as string, "--dst-agent") : undefined;
  if (!agent && !values["dst-ram"]) throw new UsageError("give --dst-ram (local destination agent) or --dst-agent HOST:PORT");
  const onCap = values["on-cap"];
  if (onCap !== "switchover" && onCap !== "abort") throw new UsageError("--on-cap is switchover or abort");
  const incoming = values.incoming as string | undefined;
  if (incoming !== undefined && !/^(tcp|unix|rdma|exec|fd):/.test(incoming)) throw new UsageError(`--incoming must be a QEMU migration URI such as tcp:HOST:PORT (got "${incoming}")`);
  const convergence: ConvergenceOptions = { downtimeMs: num(values, "downtime", 1), maxIterations: int(values, "max-iterations", 1), onCap };
  const workers = int(values, "workers", 0, 64);
  const sec = security(values);
  const bandwidth = parseRate(values.bandwidth as string);
  const refreshRate = parseRate(values["refresh-rate"] as string, "--refresh-rate");
  const format = diskFormat(values);
  let compress;
  try { compress = parseCompressionMode(values.compress as string); } catch (err) { throw new UsageError((err as Error).message); }
  return {
    convergence, workers, workersWhen: workersWhen(values), ...sec, bandwidth, refreshRate, format, compress,
    image: str(values, "image"), srcRam: str(values, "src-ram"), dstRam: values["dst-ram"] as string | undefined,
    indexPath: values.index as string | undefined, dedup: !values["no-dedup"], agent, incomingUri: incoming,
  };
}

/** Both QMP connections, or neither (the first closed when the second fails). */
async function connectBoth(values: Values): Promise<{ src: QmpClient; dst: QmpClient }> {
  const src = await QmpClient.connect(str(values, "src-qmp"));
  try {
    return { src, dst: await QmpClient.connect(str(values, "dst-qmp")) };
  } catch (err) {
    src.close();
    throw err;
  }
}

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, withUiDefault(argv));
  if (help) { console.log(helpText(spec)); return 0; }
  warnIfInsecure(values);
  const json = !!values.json;
  const opts = migrationOptions(values);
  const progress = new ProgressReporter("migrate", { json });
  const traces = await openTraceOutputs(values, (m) => console.error(`pagetwin migrate: ${m}`));
  let qemus: { src: QmpClient; dst: QmpClient };
  let srcRamPages = 0;
  try {
    if (traces.sinks.length) srcRamPages = Math.floor(statSync(opts.srcRam).size / 4096);
    qemus = await connectBoth(values);
  } catch (err) {
    await traces.close();
    throw err;
  }
  // times from this process's start, as the migration's own (startedAt: 0)
  const tracer = traces.sinks.length ? new AgentTracer(traces.sinks, {
    mode: "agent", method: opts.dedup ? "pagetwin" : "baseline", label: `migrate ${opts.srcRam}`, pages: srcRamPages,
    config: { image: opts.image, bandwidthBytesPerSecond: opts.bandwidth, downtimeMs: opts.convergence.downtimeMs, maxIterations: opts.convergence.maxIterations },
  }, 0) : null;
  try {
    const r = await migrateQemuAgentMode({
      ...opts, source: { qmp: qemus.src }, destination: { qmp: qemus.dst }, trace: tracer !== null,
      startedAt: 0, // performance.now() counts from this process's start: total-time is the command's, as QEMU's is its migrate's
      onIteration: (it) => { tracer?.iteration(it); progress.step("iteration", { iteration: it.iteration, final: it.final, dirty: it.dirty, ...it.pages, transferredBytes: it.transferredBytes, durationMs: it.durationMs },
        `iteration ${it.iteration}${it.final ? " (final, guest stopped)" : ""}: ${it.pages.normal} sent, ${it.pages.twin} twin, ${it.pages.zero} zero, ${it.pages.resent} resent, ${fmtBytes(it.transferredBytes)} in ${it.durationMs.toFixed(0)} ms`); },
      onProgress: (p) => { tracer?.progress(p); if (p.phase === "index") progress.update("indexing", p.done, p.total, "blocks"); },
      log: (m) => { if (!json) console.error(`pagetwin migrate: ${m}`); },
    });
    tracer?.end(agentTraceEnd(r));
    print(r, json);
    return 0;
  } catch (err) {
    return failed(err, tracer, json);
  } finally {
    qemus.src.close();
    qemus.dst.close();
    await traces.close();
  }
}

/** A failed migration: the trace ends, the message goes to stderr (--json or not), the result to stdout; exit 1. Anything else is thrown on. */
function failed(err: unknown, tracer: AgentTracer | null, json: boolean): number {
  if (!(err instanceof AgentMigrationError)) {
    tracer?.end({ ok: false, error: (err as Error).message, totalTimeMs: tracer.recorder.now(), downtimeMs: 0, transferredBytes: 0, iterations: 0, pages: { normal: 0, twin: 0, zero: 0, resent: 0 } });
    throw err;
  }
  tracer?.end(agentTraceEnd(err.result));
  // the message (what failed, the source VM's state, what to do) always goes to stderr, --json or not
  console.error(errorText(err));
  if (json) printJson("migrate", "result", failureRecord(err, migrateRecord(err.result)));
  else print(err.result, false);
  return 1;
}

/** The end of an agent-mode trace: query-migrate's numbers as the result has them. */
function agentTraceEnd(r: AgentMigrationResult): AgentTraceEnd {
  return {
    ok: r.status === "completed", ...(r.error ? { error: r.error } : {}), totalTimeMs: r["total-time"], downtimeMs: r.downtime,
    transferredBytes: r.ram.transferred, iterations: r.ram["dirty-sync-count"],
    pages: { normal: r.ram.normal, twin: r.ram.twin, zero: r.ram.duplicate, resent: r.ram.resent },
    verified: r.verified, convergence: r.convergence, stats: migrateRecord(r) as Record<string, unknown>,
    ...(r.device ? { qemu: { device: r.device } } : {}),
  };
}

function print(r: AgentMigrationResult, json: boolean): void {
  if (json) {
    printJson("migrate", "result", migrateRecord(r));
    return;
  }
  const dev = r.device ? `; device state ${fmtBytes(r.device.transferred)} by QEMU in ${r.device["total-time"]} ms` : "";
  console.log(`status ${r.status}; total-time ${r["total-time"]} ms, downtime ${r.downtime} ms, transferred ${fmtBytes(r.ram.transferred)}, ` +
    `${r.ram["dirty-sync-count"]} iterations; pages: ${r.ram.normal} normal, ${r.ram.twin} twin, ${r.ram.duplicate} zero, ${r.ram.resent} resent${dev}; ` +
    `RAM digest ${r.verified ? "verified" : "NOT verified"}; source ${r["source-status"]}`);
  if (r.compression) console.log(compressionLine(r.compression));
}
