// `pagetwin stream-out` / `pagetwin stream-in`: argument parsing, help, and
// the final stats (human-readable, or one JSON object with --json).

import { parseCompressionMode, type CompressionMode } from "../../codec/compress.js";
import { helpText, parse, parseRate, securityOptions, security, diskFormat, FORMAT_OPTION, REFRESH_RATE_OPTION, UsageError, type CommandSpec } from "../args.js";
import { errorText, failureRecord, printJson } from "../json.js";
import { ProgressReporter } from "../progress.js";
import { parseEndpoint } from "../../link/endpoint.js";
import { streamIn } from "../../stream/in.js";
import { streamOut } from "../../stream/out.js";
import type { StreamStats } from "../../stream/stats.js";
import { openTraceOutputs, traceOptions, withUiDefault } from "../trace.js";

const common: CommandSpec["options"] = {
  keep: { type: "boolean", help: "serve further migrations instead of exiting after the first" },
  json: { type: "boolean", help: "NDJSON on stdout: progress events, then the stats as one result (docs/JSON.md)" },
  quiet: { type: "boolean", help: "no log or progress lines on stderr, no progress events" },
};

const SECURITY_NOTE = `Security of the link (docs/SECURITY.md): give both proxies the same --psk-file (TLS-PSK),
or --tls-cert/--tls-key/--tls-ca with certificates from one CA (TLS 1.3, mutual). Every byte
between the proxies is then encrypted and authenticated. stream-in refuses a peer that fails
the TLS handshake before it connects to QEMU; stream-out sends nothing of QEMU's stream to a
stream-in that failed it. Without either, both refuse to start unless given --insecure.`;

export const outSpec: CommandSpec = {
  name: "stream-out",
  summary: "source-side proxy in QEMU's own migration stream",
  usage: "pagetwin stream-out --to HOST:PORT --image IMAGE [--listen [HOST:]PORT | unix:PATH] (--psk-file KEY | --tls-cert C --tls-key K --tls-ca CA | --insecure) [--json]",
  options: {
    listen: { type: "string", default: "127.0.0.1:4446", help: "where the source QEMU connects: a loopback [HOST:]PORT, or unix:PATH (a 0600 socket: only this user's processes can connect)" },
    to: { type: "string", help: "HOST:PORT (or unix:PATH) of the destination's pagetwin stream-in" },
    image: { type: "string", help: "disk image on the NAS, raw or qcow2 (its block index is built or loaded beside it)" },
    index: { type: "string", help: "index file (default IMAGE.pagetwin-index)" },
    ...FORMAT_OPTION,
    ...REFRESH_RATE_OPTION,
    window: { type: "string", default: "16384", help: "referenced pages kept for resends until acknowledged (16384 pages = 64 MiB)" },
    "no-dedup": { type: "boolean", help: "forward everything raw (a baseline through the same proxies)" },
    compress: { type: "string", default: "auto", help: "what still travels raw: auto (compress when the compressor outruns the link and the data compresses), off, zstd or brotli" },
    bandwidth: { type: "string", help: "the link's rate if known (e.g. 1gbit, 125MB): auto compares the compressor with it; without it, the rate is measured from the link's backlog" },
    "queue-ms": { type: "string", default: "10", help: "link time (ms) that may be on its way to stream-in beyond what it has handed to its QEMU, and beyond two of its credit's round trips, before QEMU's socket waits: QEMU then measures the link's effective rate and its downtime estimate holds" },
    workers: { type: "string", default: "0", help: "worker threads that encode QEMU's stream (parse, hash, look up, compress), each with a copy of the index; each multifd channel takes the least busy one, so the channels use more cores. 0: all on the main thread" },
    qmp: { type: "string", help: "the source QEMU's QMP unix socket (optional): times stopToVerdictMs, from the guest's STOP to stream-in's verdict; QEMU's own numbers in the trace" },
    ...securityOptions("stream-in", false),
    ...traceOptions,
    ...common,
  },
  details: `Point the source QEMU at it:  migrate tcp:127.0.0.1:PORT  (or migrate unix:PATH)
RAM pages that are copies of blocks of IMAGE (on the NAS both hosts mount)
travel as references; everything else passes through unchanged. stream-in
always checks that it handed its QEMU exactly the stream the source QEMU sent
(length and CRC-32 of the whole stream) and fails the migration otherwise.

${SECURITY_NOTE}`,
};

export const inSpec: CommandSpec = {
  name: "stream-in",
  summary: "destination-side proxy: rebuilds QEMU's migration stream",
  usage: "pagetwin stream-in --qemu HOST:PORT --image IMAGE [--listen [HOST:]PORT] (--psk-file KEY | --tls-cert C --tls-key K --tls-ca CA | --insecure) [--json]",
  options: {
    listen: { type: "string", default: "127.0.0.1:4447", help: "[HOST:]PORT where stream-out connects (give the address stream-out reaches: the default is loopback only), or unix:PATH" },
    qemu: { type: "string", help: "HOST:PORT or unix:PATH, the destination QEMU's -incoming address" },
    image: { type: "string", help: "the same disk image, as mounted on this host (read in the format its index records)" },
    index: { type: "string", help: "index file (default IMAGE.pagetwin-index; only its seed and id are read)" },
    workers: { type: "string", default: "0", help: "worker threads that read and verify the NAS blocks of the references and decompress what came compressed, each with the image open; each multifd channel takes the least busy one, so the channels use more cores. 0: all on the main thread" },
    qmp: { type: "string", help: "the destination QEMU's QMP unix socket (optional): times endToResumeMs, from the end of the stream to the guest's RESUME" },
    ...traceOptions,
    ...securityOptions("stream-out", true),
    ...common,
  },
  details: `Start the destination QEMU with -incoming tcp:HOST:PORT first. Every referenced
NAS block is read and its hash checked; a block that no longer matches (or cannot
be read) is asked for from stream-out. QEMU receives the exact byte stream the
source QEMU sent. A peer refused before it authenticated does not end stream-in:
it is reported (stats "refused") and stream-in waits for the real stream-out.

${SECURITY_NOTE}`,
};

/** --workers: threads, 0 for none. */
function workersOf(v: Record<string, unknown>): number {
  const workers = Number(v["workers"]);
  if (!(Number.isInteger(workers) && workers >= 0)) throw new UsageError("--workers must be a whole number of threads (0: none)");
  return workers;
}

/** --listen as stream options: a unix socket, or a host and port. */
function listenAt(v: string | undefined, defHost: string, defPort: number): { listenSocket: string } | { listenHost: string; listenPort: number } {
  const e = parseEndpoint(v ?? String(defPort), "--listen", defHost);
  return e.kind === "unix" ? { listenSocket: e.path } : { listenHost: e.host, listenPort: e.port };
}

/** The stats as --json prints them: StreamStats, with its wall time named as every command's (elapsedMs). */
function record(stats: StreamStats): object {
  const { ms, ...rest } = stats;
  return { ok: !stats.error, ...rest, elapsedMs: ms };
}

function report(stats: StreamStats, json: boolean): void {
  if (json) {
    printJson(stats.role, "result", stats.error ? failureRecord(new Error(stats.error), record(stats)) : record(stats));
    return;
  }
  const mb = (n: number) => (n / 1e6).toFixed(1) + " MB";
  const lines = [
    `${stats.role}: ${stats.error ? `FAILED: ${stats.error}` : "migration stream complete"}`,
    `  pages seen ${stats.pagesSeen}, zero ${stats.zeroPages}, twins replaced ${stats.twinsReplaced}` +
      (stats.pagesSeen ? ` (${((100 * stats.twinsReplaced) / stats.pagesSeen).toFixed(1)}%)` : "") + `, resends ${stats.resends}`,
    `  QEMU bytes in ${mb(stats.bytesFromQemu)}, out ${mb(stats.bytesToQemu)}; link out ${mb(stats.bytesOutLink)}, in ${mb(stats.bytesInLink)}; return path ${stats.returnBytes} B`,
    `  ${(stats.ms / 1000).toFixed(2)} s`,
  ];
  lines.push(`  end-to-end check (length and CRC-32 of the whole stream${stats.role === "stream-out" ? ", stream-in's verdict" : ""}): ${stats.verdict}, ${stats.streamsVerified} of ${stats.sessions} session(s) verified` +
    (stats.streamsFailed ? `, ${stats.streamsFailed} failed` : ""));
  const times = ([["first byte -> verdict", stats.streamToVerdictMs], ["STOP -> verdict", stats.stopToVerdictMs], ["first byte -> end", stats.streamToEndMs],
    ["end -> RESUME", stats.endToResumeMs], ["first byte -> RESUME", stats.streamToResumeMs]] as const).filter(([, v]) => v !== null);
  if (times.length) lines.push(`  times: ${times.map(([k, v]) => `${k} ${v!.toFixed(0)} ms`).join(", ")}`);
  const c = stats.compression;
  if (c.algorithm) lines.push(`  compression ${c.algorithm}: ${c.framesCompressed} RAW frames compressed (${mb(c.bytesBefore)} -> ${mb(c.bytesAfter)})` + (stats.role === "stream-out" ? `, ${c.framesRaw} raw (${c.rawSlow} compressor slower than the link, ${c.rawPoorRatio} did not compress, ${c.rawReceiverBusy} stream-in busy)` : ""));
  for (const p of stats.passthrough) lines.push(`  pass-through: ${p}`);
  for (const r of stats.refused) lines.push(`  refused: ${r}`);
  process.stdout.write(lines.join("\n") + "\n");
}

type Values = Record<string, string | boolean | undefined>;

const SIGNALS = { SIGINT: 2, SIGTERM: 15 } as const;

/** The proxy's live counters as progress: while bytes move, at most once a second. */
function watch(proxy: { stats: StreamStats }, progress: ProgressReporter): () => void {
  let seen = -1;
  const t = setInterval(() => {
    const s = proxy.stats;
    const moved = s.bytesFromQemu + s.bytesToQemu;
    if (moved === seen) return;
    seen = moved;
    progress.status("stream", { sessions: s.sessions, pagesSeen: s.pagesSeen, zeroPages: s.zeroPages, twinsReplaced: s.twinsReplaced, bytesFromQemu: s.bytesFromQemu, bytesToQemu: s.bytesToQemu, bytesOutLink: s.bytesOutLink, bytesInLink: s.bytesInLink, busyMs: s.busyMs, drainWaitMs: s.drainWaitMs, windowWaitMs: s.windowWaitMs, linkWaitMs: s.linkWaitMs },
      `${s.role}: ${s.pagesSeen} pages, ${s.twinsReplaced} as references; ${(Math.max(s.bytesFromQemu, s.bytesToQemu) / 1e6).toFixed(1)} MB of QEMU's stream, ${(Math.max(s.bytesOutLink, s.bytesInLink) / 1e6).toFixed(1)} MB on the link`);
  }, 1000);
  t.unref();
  return () => { clearInterval(t); progress.closeBar(); };
}

async function run(argv: string[], spec: CommandSpec,
  start: (v: Values, log: (m: string) => void) => Promise<{ stats: StreamStats; done: Promise<StreamStats>; close(): Promise<void> }>): Promise<number> {
  const p = parse(spec, argv);
  if (p.help) {
    process.stdout.write(helpText(spec) + "\n");
    return 0;
  }
  const v = p.values;
  const json = Boolean(v["json"]);
  const log = v["quiet"] ? () => {} : (m: string) => process.stderr.write(`[pagetwin] ${m}\n`);
  // taken before the proxy starts: it says "listening" as it starts, and a signal may follow at once
  let stoppedBy: keyof typeof SIGNALS | null = null;
  let proxy: Awaited<ReturnType<typeof start>> | null = null;
  const onSig = (sig: keyof typeof SIGNALS) => { stoppedBy ??= sig; void proxy?.close(); };
  process.once("SIGINT", onSig);
  process.once("SIGTERM", onSig);
  let stats: StreamStats;
  try {
    proxy = await start(v, log);
    if (stoppedBy) void proxy.close();
    const unwatch = watch(proxy, new ProgressReporter(spec.name, { json, quiet: Boolean(v["quiet"]) }));
    stats = await proxy.done;
    unwatch();
  } finally {
    process.off("SIGINT", onSig);
    process.off("SIGTERM", onSig);
  }
  // a one-shot proxy stopped before its migration ended did not migrate anything: that is no success
  if (stoppedBy && !v["keep"] && !stats.error) {
    stats.error = `stopped by ${stoppedBy} before ${stats.sessions ? "the migration ended" : "any migration"}`;
  }
  if (stats.error) process.stderr.write(`${errorText(new Error(`${stats.role}: ${stats.error}`))}\n`);
  report(stats, json);
  if (stoppedBy && !v["keep"]) return 128 + SIGNALS[stoppedBy];
  if (!stats.error && exitStatus(stats) !== 0) process.stderr.write(`${stats.role}: the migration stream was not verified end to end (verdict: ${stats.verdict ?? "unknown"})\n`);
  return exitStatus(stats);
}

/** 0 only when nothing failed and every session's stream was verified end to end (a proxy that served none: 0). */
export function exitStatus(stats: StreamStats): number {
  if (stats.error || stats.verdict === "failed") return 1;
  return stats.sessions > 0 && stats.verdict !== "verified" ? 1 : 0;
}

function need(v: Values, k: string): string {
  const x = v[k];
  if (typeof x !== "string" || !x) throw new UsageError(`--${k} is required (see --help)`);
  return x;
}

export function runStreamOutCli(argv: string[]): Promise<number> {
  return run(withUiDefault(argv), outSpec, async (v, log) => {
    const l = listenAt(v["listen"] as string | undefined, "127.0.0.1", 4446);
    const to = need(v, "to");
    const image = need(v, "image");
    const window = Number(v["window"]);
    if (!(Number.isInteger(window) && window > 0)) throw new UsageError("--window must be a positive number of pages");
    let compress: CompressionMode;
    try { compress = parseCompressionMode(v["compress"] as string | undefined); } catch (err) { throw new UsageError((err as Error).message); }
    const bandwidth = v["bandwidth"] ? parseRate(v["bandwidth"] as string) : 0;
    const queueMs = Number(v["queue-ms"]);
    if (!(queueMs > 0 && Number.isFinite(queueMs))) throw new UsageError("--queue-ms must be a positive number of milliseconds");
    const refreshRate = parseRate(v["refresh-rate"] as string, "--refresh-rate");
    const workers = workersOf(v);
    const traces = await openTraceOutputs(v, (m) => process.stderr.write(`[pagetwin] ${m}\n`)); // the URL even with --quiet
    let proxy;
    try {
      proxy = await streamOut({
        ...l, to, image, log, keep: Boolean(v["keep"]), noDedup: Boolean(v["no-dedup"]), compress, bandwidth, queueMs, workers,
        ...(v["qmp"] ? { qmp: v["qmp"] as string } : {}),
        windowPages: window, ...security(v), refreshRate, trace: traces.sinks,
        ...(v["index"] ? { indexPath: v["index"] as string } : {}), format: diskFormat(v),
      });
    } catch (err) {
      await traces.close();
      throw err;
    }
    const p = proxy;
    return { stats: p.stats, done: p.done.finally(() => traces.close()), close: () => p.close() };
  });
}

export function runStreamInCli(argv: string[]): Promise<number> {
  return run(withUiDefault(argv), inSpec, async (v, log) => {
    const l = listenAt(v["listen"] as string | undefined, "127.0.0.1", 4447);
    const qemu = need(v, "qemu"), image = need(v, "image");
    const traces = await openTraceOutputs(v, (m) => process.stderr.write(`[pagetwin] ${m}\n`)); // the URL even with --quiet
    let proxy;
    try {
      proxy = await streamIn({
        ...l, qemu, image, log, keep: Boolean(v["keep"]), workers: workersOf(v),
        ...(v["qmp"] ? { qmp: v["qmp"] as string } : {}),
        ...security(v), trace: traces.sinks,
        ...(v["index"] ? { indexPath: v["index"] as string } : {}),
      });
    } catch (err) {
      await traces.close();
      throw err;
    }
    const p = proxy;
    return { stats: p.stats, done: p.done.finally(() => traces.close()), close: () => p.close() };
  });
}
