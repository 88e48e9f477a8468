// Stream mode's source side: a proxy inside QEMU's own migration stream.
//
//   source QEMU --migrate tcp:--> streamOut ==link==> streamIn --> destination QEMU (-incoming tcp:)
//
// Each session's codec (encoder.ts: on this thread, or on a worker's with
// --workers) parses QEMU's stream (qemu-stream.ts), hashes every RAM page
// record in batches in the core's memory, and replaces each page that has a
// twin block on the NAS by a reference (the record's header, the block, the
// page's hash). Every other byte travels raw. The session here owns the
// sockets, the handshake, the pacing and stream-in's answers. streamIn (in.ts) rebuilds the
// exact original stream from the NAS; a block that no longer matches is
// asked for again (NEED), and streamOut answers from its replay window, where
// it keeps every referenced page until streamIn acknowledges it. Bytes from
// the destination QEMU back to the source (return path) travel as RETURN
// frames, unchanged.

import type * as net from "node:net";
import type { Engine, TwinIndex } from "../core/engine.js";
import { openNasIndex, type NasIndex } from "../adapters/nas/index-file.js";
import type { DiskFormat } from "../adapters/nas/image.js";
import { BackgroundRefresh } from "../adapters/nas/refresh.js";
import { QemuStreamParser, StreamFormatError } from "./qemu-stream.js";
import { SFrame, STREAM_FRAMES, STREAM_PROTOCOL_VERSION, decodeCredit } from "./frames.js";
import { FrameReader, HANDSHAKE_FRAME_MAX, ProtocolError, abortReason, jsonFrame, parseJson, printable, readU32, type Frame } from "../wire/envelope.js";
import { LinkMeter, type RateLimiter } from "../link/rate.js";
import { ReceiverWait } from "../link/credit.js";
import { dial } from "../link/dial.js";
import { parseEndpoint, type Endpoint } from "../link/endpoint.js";
import { INSECURE_WARNING, resolveSecurity, checkSecurity, isTls, type Security, type SecurityOptions } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { availableAlgorithms, zstdUnavailableReason, type CompressionAlgorithm, type CompressionMode } from "../codec/compress.js";
import { FrameInbox, PeerAbort, dispatch } from "./inbox.js";
import { UsageError } from "../errors.js";
import { PageHasher, type PageLookup } from "./hasher.js";
import { StreamEncoder, type EncoderConfig, type SessionEncoder } from "./encoder.js";
import { EncoderPool } from "./encoder-pool.js";
import { serve } from "./serve.js";
import { LinkPacer } from "./pacer.js";
import { WriteRing } from "./write-ring.js";
import { READ_BUFFER_BYTES, readIntoBuffer } from "../link/read-buffer.js";
import { newStats, type StreamProxy, type StreamStats } from "./stats.js";
import { toLog, type Log, type LogOption, type Progress } from "../log.js";
import { throwIfAborted } from "../abort.js";
import { RunStateWatch } from "../adapters/qemu/run-state.js";
import { readStart, START_WAIT_MS } from "./multifd-channel.js";
import type { ChannelKind } from "./multifd-format.js";
import { StreamTraceGroup, type StreamTraceHook } from "../trace/stream.js";
import type { TraceSink } from "../trace/sink.js";

export interface StreamOutOptions extends SecurityOptions {
  /** Port QEMU migrates to (`migrate tcp:127.0.0.1:PORT`); 0 picks one. */
  listenPort?: number;
  /** Loopback address to listen on (default 127.0.0.1). */
  listenHost?: string;
  /** A unix socket QEMU migrates to (`migrate unix:PATH`), 0600, instead of a port. */
  listenSocket?: string;
  /** The destination proxy (stream-in): HOST:PORT or unix:/PATH. */
  to: string;
  /** Raw disk image on the NAS (its index is built or loaded beside it). */
  image?: string;
  /** Index file (default IMAGE.pagetwin-index). */
  indexPath?: string;
  /** An index already opened (instead of image/indexPath). */
  nas?: NasIndex;
  /** A stale index (the image was written since) is used as it is and re-read in the background at this many bytes/s (0 or absent: not re-read). */
  refreshRate?: number;
  /** The image's format (default: told by its first bytes). */
  format?: DiskFormat | undefined;
  /** Referenced pages kept until acknowledged (default 16384 = 64 MiB); QEMU is paused when it is nearly full. */
  windowPages?: number;
  /** Keep serving migrations after the first (default false). */
  keep?: boolean;
  /** Turn dedup off (forward everything raw): a baseline through the same proxies. */
  noDedup?: boolean;
  /**
   * Compression of what still travels raw (unique pages, device state):
   * "auto" (default) compresses a RAW frame only when the compressor outruns
   * the link and the data compresses; an algorithm whenever it compresses; "off".
   */
  compress?: CompressionMode;
  /** The link's bandwidth if known, bytes/s (0: measured from the link's backlog). */
  bandwidth?: number;
  /** Link time that may be on its way to stream-in beyond what it handed on, and beyond two credit round trips, before QEMU's socket waits, ms (default 10; see pacer.ts). */
  queueMs?: number;
  /** Where notes and warnings go (level-aware, or a function that gets every message). */
  log?: LogOption;
  /** Progress of the index build (phase "index"), when this call builds it. */
  onProgress?: (p: Progress) => void;
  /**
   * Stops the proxy: aborts the index build, or once listening closes it and
   * cuts the sessions in flight (the source QEMU sees its migration fail and
   * keeps running); `done` then rejects with an AbortError.
   */
  signal?: AbortSignal;
  /** The source QEMU's QMP unix socket (optional): its STOP event times stopToVerdictMs. */
  qmp?: string;
  /** Where each migration's trace records go (docs/TRACE.md): a file, the live view. */
  trace?: readonly TraceSink[];
  /**
   * Worker threads that encode the sessions' streams (parse, hash, look up,
   * compress), each with a copy of the index; a session (a multifd channel)
   * takes the least busy one. 0 (default): every session encodes on the main
   * thread, as it does with a trace (none are started then).
   */
  workers?: number;
}

/** What every stream-out session shares. */
export interface OutContext {
  engine: Engine;
  index: TwinIndex;
  indexId: string;
  stats: StreamStats;
  log: Log;
  windowPages: number;
  to: Endpoint;
  noDedup: boolean;
  compress: CompressionMode;
  bandwidth: number;
  queueMs: number | undefined;
  security: Security;
  /** The source guest's STOP/RESUME events (with --qmp). */
  watch: RunStateWatch | null;
  /** performance.now() of the first byte from the source QEMU, and of the last VERDICT (0: not yet). */
  firstByteAt: number;
  lastVerdictAt: number;
  /** Another lookup than `index`'s (pagetwin serve: every disk of the migration). */
  lookup?: () => PageLookup;
  /** A cap on the link's rate, shared by the migration's sessions (pagetwin serve: libvirt's --bandwidth); QEMU waits while it holds. */
  linkLimit?: RateLimiter;
  /** More HELLO fields (pagetwin serve: the migration id). */
  hello?: Record<string, unknown>;
  trace: readonly TraceSink[];
  /** The trace's label (default "stream-out"). */
  traceLabel?: string;
  /** The migrations' tracers (null without trace sinks): a migration's sessions share one. */
  tracing: StreamTraceGroup | null;
  /** Worker threads that encode the sessions' streams (null: each session encodes on this thread). */
  encoders?: EncoderPool | null;
}

/** Referenced pages kept for resends unless told otherwise (64 MiB). */
export const DEFAULT_WINDOW_PAGES = 16384;

/** What a caller of the sessions chooses; the rest starts at its default. */
export type OutContextFields = Pick<OutContext, "engine" | "index" | "indexId" | "stats" | "log" | "to" | "security">
  & Partial<Omit<OutContext, "firstByteAt" | "lastVerdictAt" | "tracing">>;

/** A fresh context with every default in one place (stream-out and pagetwin serve both build theirs here). */
export function outContext(f: OutContextFields): OutContext {
  const defined = Object.fromEntries(Object.entries(f).filter(([, v]) => v !== undefined)) as OutContextFields;
  const ctx: OutContext = {
    windowPages: DEFAULT_WINDOW_PAGES, noDedup: false, compress: "auto", bandwidth: 0, queueMs: undefined, watch: null, trace: [],
    ...defined, firstByteAt: 0, lastVerdictAt: 0, tracing: null,
  };
  if (ctx.trace.length) {
    ctx.tracing = new StreamTraceGroup(ctx.trace, () => ({ label: ctx.traceLabel ?? "stream-out", stats: ctx.stats, side: "out", windowPages: ctx.windowPages, watch: ctx.watch }));
  }
  return ctx;
}

/** One migration connection from the source QEMU through to stream-in (pagetwin serve runs these itself). */
export function runOutSession(ctx: OutContext, qemu: net.Socket, channel: number): Promise<void> {
  return new OutSession(ctx, qemu, channel).run();
}

/**
 * Starts stream-out, the source-side proxy: the source QEMU migrates to it
 * (`migrate tcp:127.0.0.1:PORT`), it forwards the stream to stream-in with
 * twin pages replaced by NAS references. Resolves once listening.
 */
export async function streamOut(opts: StreamOutOptions): Promise<StreamProxy> {
  const log = toLog(opts.log);
  throwIfAborted(opts.signal, "stream-out");
  const to = parseEndpoint(opts.to, "--to");
  const security = resolveSecurity(opts, "pagetwin stream-out");
  const workers = opts.workers ?? 0;
  if (!(Number.isInteger(workers) && workers >= 0)) throw new UsageError(`pagetwin stream-out: workers must be a whole number >= 0 (got ${workers})`);
  if (security.kind === "insecure") log.warn(INSECURE_WARNING);
  checkSecurity(security); // unreadable files: say so now, not when QEMU connects
  const nas = opts.nas ?? await openIndex(opts, log);
  let watch: RunStateWatch | null = null;
  try {
    watch = opts.qmp ? await RunStateWatch.open(opts.qmp) : null;
  } catch (err) {
    if (!opts.nas) nas.image.close();
    throw err;
  }
  const refresh = nas.stale && opts.refreshRate ? new BackgroundRefresh(nas, opts.refreshRate, log) : null;
  const stats = newStats("stream-out");
  const compress = opts.compress ?? "auto";
  stats.compression.mode = compress;
  if (compress !== "auto" && compress !== "off" && !availableAlgorithms().includes(compress)) {
    throw new Error(`pagetwin stream-out: --compress ${compress} is not available here (${zstdUnavailableReason()})`);
  }
  // a trace follows every page on the main thread, so its sessions encode there
  if (workers && opts.trace?.length) log.warn(`stream-out: a trace follows every page on the main thread; the ${workers} encoder workers asked for are not started`);
  let encoders: EncoderPool | null = null;
  try {
    encoders = workers && !opts.trace?.length ? await EncoderPool.create(workers, [{ engine: nas.engine, index: nas.index, blocks: nas.header.blocks, offset: 0, slot: 0 }]) : null;
  } catch (err) {
    await refresh?.stop();
    watch?.close();
    if (!opts.nas) nas.image.close();
    throw err;
  }
  const ctx = outContext({
    engine: nas.engine, index: nas.index, indexId: nas.header.indexId, stats, log, to, security, watch, compress,
    windowPages: opts.windowPages, noDedup: opts.noDedup, bandwidth: opts.bandwidth, queueMs: opts.queueMs, trace: opts.trace, encoders,
  });
  stats.workers.threads = encoders?.size ?? 0;
  // QEMU's side is local (loopback or a 0600 unix socket); the link to stream-in is what TLS covers
  const at: Endpoint = opts.listenSocket ? { kind: "unix", path: opts.listenSocket } : { kind: "tcp", host: opts.listenHost ?? "127.0.0.1", port: opts.listenPort ?? 0 };
  return serve({ at, security: { kind: "local" }, peer: "qemu" }, {
    stats, keep: opts.keep ?? false, log, signal: opts.signal,
    session: (sock, channel) => new OutSession(ctx, sock, channel).run(),
    onClose: async () => {
      await refresh?.stop();
      await encoders?.close();
      if (!opts.nas) nas.image.close();
      watch?.close();
    },
  });
}

async function openIndex(opts: StreamOutOptions, log: Log): Promise<NasIndex> {
  if (!opts.image) throw new UsageError("pagetwin stream-out: give the NAS image (--image)");
  const t0 = performance.now();
  const nas = await openNasIndex(opts.image, {
    ...(opts.indexPath ? { indexPath: opts.indexPath } : {}), signal: opts.signal, format: opts.format, ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
  });
  log.info(`index ${nas.indexPath}: ${nas.header.blocks} blocks, ${nas.built ? "built" : "loaded"} in ${(performance.now() - t0).toFixed(0)} ms${nas.stale ? `; stale (generation ${nas.header.generation}, the image was written since): its stale entries cost resends` : ""}`);
  return nas;
}

type HelloAck = { ready?: unknown; dedup?: unknown; reason?: string; compression?: unknown; noFrameCrc?: unknown };

/** One migration connection from the source QEMU, and its link to stream-in. */
class OutSession {
  private readonly stats: StreamStats;
  private link!: net.Socket;
  private readonly reader = new FrameReader({ ...STREAM_FRAMES, handshakeMax: HANDSHAKE_FRAME_MAX });
  private readonly inbox = new FrameInbox();
  // Until stream-in has answered the handshake, nothing from it may reach
  // the source QEMU and nothing of QEMU's goes out.
  private ready = false;
  /** Chunks a worker is encoding: each settles once its frames were sent. */
  private readonly encoding: Promise<void>[] = [];
  /** The session's codec (on this thread, or a worker's), once the handshake settled it. */
  private encoder: SessionEncoder | null = null;
  /** The page lookup of an encoder on this thread. */
  private lookup: PageLookup | null = null;
  /** References below this one stream-in has acknowledged. */
  private acked = 0;
  private failure: Error | null = null;
  private qemuEnded = false;
  private windowWaiter: (() => void) | null = null;
  private finished!: () => void;
  private readonly over = new Promise<void>((r) => { this.finished = r; });
  private dedup = false;
  /** Whether data frames carry their CRC: yes unless stream-in agreed to go without, inside TLS. */
  private frameCrc = true;
  /** What the stream's first bytes say this connection is. */
  private kind: ChannelKind = "unknown";
  private pumping = Promise.resolve();
  /** Chunks (and waits) chained on `pumping` and not done yet. */
  private queued = 0;
  /** The link's rate, timed on the waits for it to drain (compression weighs it). */
  private readonly meter = new LinkMeter();
  /** How much of the time stream-in waited for the link (from its CREDITs): the compression policy's receiver. */
  private readonly receiver = new ReceiverWait();
  /** How much may queue toward the link before QEMU's socket waits. */
  private readonly pacer: LinkPacer;
  /** Memory of the frames on their way to the link, reused once the socket took them. */
  private readonly frameMem = new WriteRing(8 * 1024 * 1024);
  /** stream-in's VERDICT on this session's stream arrived. */
  private verdict = false;
  private trace: StreamTraceHook | null = null;
  /** The counters as the session began (a migration's trace counts from its first session's start). */
  private readonly since: { link: number; qemu: number };

  constructor(private readonly ctx: OutContext, private readonly qemu: net.Socket, private readonly channel: number) {
    this.stats = ctx.stats;
    this.since = { link: ctx.stats.bytesOutLink, qemu: ctx.stats.bytesFromQemu };
    this.pacer = new LinkPacer(this.meter, { bandwidth: ctx.bandwidth, ...(ctx.queueMs !== undefined ? { queueMs: ctx.queueMs } : {}) });
  }

  async run(): Promise<void> {
    let error: string | undefined;
    try {
      this.qemu.pause();
      this.qemu.setNoDelay(true);
      const start = await this.readKind();
      this.link = await dial(this.ctx.to, this.ctx.security, { peer: "stream-in", allowHalfOpen: true });
      this.wireLink();
      await this.handshake();
      this.wireQemu();
      if (start.data.length) this.onQemuData(start.data);
      // the end may have come with the first bytes, before wireQemu() listened for it
      if (start.ended || this.qemu.readableEnded) this.pumping = this.pumping.then(() => this.end());
      else {
        this.startReading();
        this.qemu.resume();
      }
      await this.over;
      await this.pumping;
      if (this.failure) throw this.failure;
      if (!this.verdict) {
        throw new Error("stream-in's verdict on the stream never came (the link closed first, or stream-in is an older pagetwin): " +
          "whether the destination QEMU got the source's exact stream is unknown; see stream-in's log");
      }
    } catch (err) {
      error = (err as Error).message;
      throw err;
    } finally {
      await this.trace?.end(error);
      await this.encoder?.close();
      this.lookup?.free();
    }
  }

  /** The stream's first bytes say which channel this is: multifd channels get their own parser and frames. */
  private async readKind(): Promise<{ data: Buffer; ended: boolean }> {
    const start = await readStart(this.qemu, START_WAIT_MS);
    if (this.qemu.destroyed && !start.ended) throw new Error("the source QEMU closed the connection before sending anything");
    this.kind = start.kind;
    this.trace = this.ctx.tracing?.join(start.kind, this.since) ?? null;
    if (start.kind === "multifd") this.stats.multifd.channels++;
    return start;
  }

  private inWindow(): number {
    return (this.encoder?.seq ?? 0) - this.acked;
  }

  /** Nearly full: QEMU is paused until acks make room. */
  private full(): boolean {
    const w = this.ctx.windowPages;
    return this.inWindow() > 0 && this.inWindow() >= w - Math.min(256, Math.floor(w / 4));
  }

  // False when more is on its way to stream-in than the pacer allows: QEMU's socket then waits.
  // `written`: called once the socket has taken `buf` (a worker's buffer then goes back to it).
  private sendLink(buf: Buffer, written?: () => void): boolean {
    this.stats.bytesOutLink += buf.length;
    this.pacer.onSent(buf.length);
    if (written) this.link.write(buf, () => written());
    else this.frameMem.write(this.link, buf);
    return !this.pacer.over();
  }

  private fail(err: Error, tellPeer: boolean): void {
    if (this.failure) return;
    this.failure = err;
    this.ctx.log.error(`channel ${this.channel}: ${err.message}`, { channel: this.channel });
    const link = this.link;
    if (tellPeer && !link.destroyed) {
      try { link.end(jsonFrame(SFrame.Abort, { reason: err.message })); } catch { /* closed */ }
    }
    // The source QEMU sees its migration fail and keeps the VM running.
    this.qemu.destroy();
    setTimeout(() => link.destroy(), TIMEOUTS.abortLingerMs).unref();
    this.wakeWindow();
    this.pacer.close();
    this.inbox.close();
    this.finished();
  }

  private wakeWindow(): void {
    if (this.windowWaiter) { const w = this.windowWaiter; this.windowWaiter = null; w(); }
  }

  private wireLink(): void {
    const link = this.link;
    link.on("data", (chunk: Buffer) => this.onLinkData(chunk));
    link.on("error", (e) => this.fail(new Error(`link to stream-in failed: ${e.message}`), false));
    link.on("close", () => {
      this.inbox.close();
      if (!this.failure && !this.ready) this.fail(new Error("the link to stream-in closed during the handshake (see stream-in's log)"), false);
      if (!this.failure && !this.qemuEnded) this.fail(new Error("the link to stream-in closed before the migration ended"), false);
      this.finished();
    });
    link.on("end", () => { link.end(); });
    link.setTimeout(TIMEOUTS.idleMs, () => this.fail(new Error(`stream-in sent nothing for ${TIMEOUTS.idleMs} ms`), true));
  }

  private onLinkData(chunk: Buffer): void {
    this.stats.bytesInLink += chunk.length;
    dispatch(this.reader, chunk, (f) => this.onFrame(f), (err, tellPeer) => this.fail(err, tellPeer));
  }


  /** Handles one frame from stream-in; a returned error ends the session. */
  private onFrame(f: Frame): Error | null {
    if (!this.ready && f.type !== SFrame.HelloAck && f.type !== SFrame.Abort) {
      return new ProtocolError(`${SFrame[f.type]} frame from stream-in before the handshake ended`);
    }
    switch (f.type) {
      case SFrame.HelloAck:
        if (this.ready) return new ProtocolError("a second HELLO_ACK from stream-in");
        this.inbox.push(f);
        return null;
      case SFrame.Need:
        return this.onNeed(readU32(f, "NEED"));
      case SFrame.Ack:
        return this.onAck(readU32(f, "ACK"));
      case SFrame.Credit: {
        const c = decodeCredit(f);
        this.receiver.record(c.linkWaitUs / 1000, c.clockUs / 1000);
        const bad = this.pacer.credit(c.linkBytes, c.streamBytes);
        return bad ? new ProtocolError(bad) : null;
      }
      case SFrame.Return:
        this.stats.returnBytes += f.payload.length;
        if (!this.qemu.destroyed) this.qemu.write(f.payload);
        return null;
      case SFrame.ReturnEnd:
        if (!this.qemu.destroyed) this.qemu.end();
        return null;
      case SFrame.Verdict:
        return this.onVerdict(f);
      case SFrame.Abort:
        return new PeerAbort(`stream-in aborted the migration: ${abortReason(f)}`);
      default:
        return new ProtocolError(`unexpected ${SFrame[f.type]} frame from stream-in`);
    }
  }

  /** stream-in's block did not match: resend the page from the replay window. */
  private onNeed(s: number): Error | null {
    const seq = this.encoder?.seq ?? 0;
    if (!(s >= this.acked && s < seq)) {
      return new ProtocolError(`stream-in asked for page #${s}, which is not in the replay window (acked below ${this.acked}, next ${seq})`);
    }
    this.stats.resends++;
    this.trace?.resend(s);
    const f = this.encoder!.resend(s);
    if (f instanceof Promise) f.then((b) => { if (!this.failure) this.sendLink(b); }, (err: Error) => this.fail(err, true));
    else this.sendLink(f);
    return null;
  }

  /** stream-in's END check: the stream its QEMU got is (or is not) the one the source QEMU sent. */
  private onVerdict(f: Frame): Error | null {
    if (!this.qemuEnded || this.verdict) return new ProtocolError("a VERDICT from stream-in before the end of the stream, or a second one");
    const v = parseJson<{ verified?: unknown; reason?: unknown }>(f, "VERDICT");
    this.verdict = true;
    const { stats, ctx } = this;
    if (v.verified !== true) {
      stats.streamsFailed++;
      return new PeerAbort(`stream-in's end-to-end check failed: ${printable(String(v.reason ?? "no reason given"))}`);
    }
    stats.streamsVerified++;
    const at = ctx.lastVerdictAt = performance.now();
    stats.streamToVerdictMs = at - ctx.firstByteAt;
    if (ctx.watch && ctx.watch.stopAt > ctx.firstByteAt) stats.stopToVerdictMs = at - ctx.watch.stopAt;
    return null;
  }

  private onAck(upTo: number): Error | null {
    const seq = this.encoder?.seq ?? 0;
    if (upTo > seq || upTo < this.acked) return new ProtocolError(`stream-in acknowledged up to #${upTo}, outside ${this.acked}..${seq}`);
    this.encoder!.release(upTo);
    this.acked = upTo;
    if (!this.full()) this.wakeWindow();
    return null;
  }

  private async handshake(): Promise<void> {
    const { ctx, stats } = this;
    const offer: CompressionAlgorithm[] = ctx.compress === "off" ? [] : ctx.compress === "auto" ? availableAlgorithms() : [ctx.compress];
    // a new migration (--keep): its times count from its own first byte
    if (ctx.lastVerdictAt > 0) ctx.firstByteAt = ctx.lastVerdictAt = 0;
    const tls = isTls(this.link);
    this.sendLink(jsonFrame(SFrame.Hello, { ...ctx.hello, v: STREAM_PROTOCOL_VERSION, indexId: ctx.indexId, channel: this.channel, kind: this.kind, compression: offer, verdict: true, ...(tls ? { noFrameCrc: true } : {}) }));
    const ack = await this.nextAck("HELLO_ACK from stream-in");
    if (ack.ready !== true) {
      const err = new ProtocolError("stream-in did not say it is ready (does it run the same pagetwin version?)");
      this.fail(err, true);
      throw this.failure ?? err;
    }
    this.ready = true;
    this.reader.handshakeDone();
    this.dedup = ack.dedup === true && !ctx.noDedup;
    this.frameCrc = stats.frameCrc = !(tls && ack.noFrameCrc === true);
    const accepted = Array.isArray(ack.compression) ? ack.compression : [];
    const algo = offer.find((a) => accepted.includes(a)) ?? null;
    if (algo) stats.compression.algorithm = algo;
    else stats.compression.note = offer.length ? `stream-in decompresses none of ${offer.join(", ")}: RAW frames travel as they are` : "compression off";
    this.encoder = this.newEncoder({
      kind: this.kind, dedup: this.dedup, windowPages: ctx.windowPages, frameCrc: this.frameCrc, algorithm: algo, compress: ctx.compress, bandwidth: ctx.bandwidth,
    });
    if (!ack.dedup) {
      const why = `stream-in cannot dedup: ${printable(String(ack.reason ?? "no reason"))}`;
      stats.passthrough.push(why);
      ctx.log.warn(why);
    }
  }

  // A failure while waiting (stream-in's ABORT, a corrupt frame) says more than "the link closed".
  private async nextAck(what: string): Promise<HelloAck> {
    let f: Frame;
    try {
      f = await this.inbox.next(TIMEOUTS.helloMs, what);
    } catch (err) {
      if (!this.failure) this.fail(err as Error, true);
      throw this.failure ?? err;
    }
    return parseJson<HelloAck>(f, "HELLO_ACK");
  }

  private wireQemu(): void {
    const qemu = this.qemu;
    qemu.on("end", () => {
      this.pumping = this.pumping.then(() => this.end());
    });
    qemu.on("error", (e) => { if (!this.qemuEnded) this.fail(new Error(`source QEMU connection failed: ${e.message}`), true); });
    qemu.on("close", () => {
      if (!this.qemuEnded && !this.failure) this.fail(new Error("source QEMU closed the connection in the middle of the stream"), true);
    });
  }

  /**
   * QEMU's stream into one read buffer of the session's (any channel, where
   * Node allows it: read-buffer.ts), else through 'data' events. A chunk in
   * the read buffer is rewritten before the next read overwrites it: the
   * parser and the replay window keep copies of what they hold on to.
   */
  private startReading(): void {
    // a worker's encoder: reads land straight in the memory it hands over, each the encoder's to keep
    const reads = this.encoder?.reads;
    if (reads && readIntoBuffer(this.qemu, () => reads.next(), (chunk) => { reads.landed(chunk); return this.onQemuData(chunk); })) return;
    if (!readIntoBuffer(this.qemu, READ_BUFFER_BYTES, (chunk) => this.onQemuData(chunk, true))) {
      this.qemu.on("data", (chunk: Buffer) => this.onQemuData(chunk));
      return;
    }
    if (this.encoder instanceof StreamEncoder) this.encoder.inputReused = true;
  }

  /** Takes a chunk now unless others wait before it; false: QEMU's socket waits (for the link, the window). */
  private onQemuData(chunk: Buffer, reused = false): boolean {
    if (this.ctx.firstByteAt === 0) this.ctx.firstByteAt = performance.now();
    if (this.queued === 0) {
      const wait = this.take(chunk);
      if (!wait) return true;
      this.chain(wait);
      return false;
    }
    // a chunk read while the one before waits (the socket is paused then: only what it had read already)
    const own = reused ? Buffer.from(chunk) : chunk;
    this.chain(() => this.pump(own));
    return true;
  }

  private chain(work: () => Promise<void>): void {
    this.queued++;
    this.pumping = this.pumping.then(work).finally(() => { this.queued--; });
  }

  private async pump(chunk: Buffer): Promise<void> {
    await this.take(chunk)?.();
  }

  /**
   * One chunk of QEMU's stream rewritten and sent; what to wait for before
   * the next (link backpressure, a full replay window, the link's cap), if
   * anything: QEMU's socket is paused then.
   */
  private take(chunk: Buffer): (() => Promise<void>) | null {
    this.stats.bytesFromQemu += chunk.length;
    this.pacer.onTaken(chunk.length);
    if (this.failure) return null;
    let pending: void | Promise<number>;
    const t0 = performance.now();
    const sent = this.stats.bytesOutLink;
    // a chunk's frames leave in one write: one TLS write and one system call, not one per frame
    this.link.cork();
    try {
      pending = this.encoder!.encode(chunk);
    } catch (err) {
      this.fail(encodeError(err), true);
      return null;
    } finally {
      this.link.uncork();
    }
    const t1 = performance.now();
    this.stats.busyMs += t1 - t0;
    if (pending) return this.inFlight(pending);
    const limit = this.ctx.linkLimit ? this.stats.bytesOutLink - sent : -1;
    const ok = !this.pacer.over();
    if (limit < 0 && ok && !this.full()) return null;
    this.qemu.pause();
    return async () => {
      if (limit >= 0) await this.limitLink(limit);
      if (!ok || this.full()) await this.holdQemu(ok, t1);
    };
  }

  /**
   * A chunk a worker encodes (its promise: the link bytes it became, sent):
   * QEMU's socket is read on while the worker has room, and within the
   * link's limits.
   */
  private inFlight(pending: Promise<number>): (() => Promise<void>) | null {
    const done = pending.then(async (bytes) => { if (this.ctx.linkLimit && !this.failure) await this.ctx.linkLimit.take(bytes); }, (err) => this.fail(encodeError(err), true));
    this.encoding.push(done);
    void done.finally(() => { this.encoding.splice(this.encoding.indexOf(done), 1); });
    const room = this.encoder!.room?.() ?? null;
    if (!room && !this.pacer.over() && !this.full()) return null;
    this.qemu.pause();
    return async () => {
      const t = performance.now();
      await room;
      this.stats.drainWaitMs += performance.now() - t;
      const ok = !this.pacer.over();
      if (!ok || this.full()) await this.holdQemu(ok, performance.now());
      else if (!this.failure) this.qemu.resume();
    };
  }

  /** QEMU waits until the link's cap allows the bytes this chunk became. */
  private async limitLink(bytes: number): Promise<void> {
    this.qemu.pause();
    await this.ctx.linkLimit!.take(bytes);
    if (!this.failure) this.qemu.resume();
  }

  /** QEMU waits while stream-in has not handed on enough (`linkOk` false) or the replay window is full. */
  private async holdQemu(linkOk: boolean, t1: number): Promise<void> {
    const { stats } = this;
    this.qemu.pause();
    if (!linkOk) await this.pacer.wait();
    const t2 = performance.now();
    stats.drainWaitMs += t2 - t1;
    if (this.full() && !this.failure) await new Promise<void>((r) => { this.windowWaiter = r; });
    stats.windowWaitMs += performance.now() - t2;
    if (!this.failure) this.qemu.resume();
  }

  /** QEMU closed its stream: the parser must have ended cleanly; END carries what stream-in checks. */
  private async end(): Promise<void> {
    this.qemuEnded = true;
    if (this.failure) return;
    let f: Buffer;
    try {
      // after every chunk's frames (a worker answers in order)
      await Promise.all(this.encoding);
      f = await this.encoder!.finish(this.stats.bytesFromQemu);
    } catch (err) {
      this.fail(encodeError(err), true);
      return;
    }
    if (!this.failure) this.sendLink(f);
  }

  /** The session's codec: a worker's when stream-out has a pool (and no trace follows the pages), else one on this thread. */
  private newEncoder(cfg: EncoderConfig): SessionEncoder {
    const { ctx, stats } = this;
    const warn = (w: string) => ctx.log.warn(`channel ${this.channel}: ${w}`, { channel: this.channel });
    // a worker's frames may arrive after the session failed: they go nowhere
    const io = { stats, meter: this.meter, receiver: this.receiver, emit: (f: Buffer, written?: () => void) => { if (!this.failure) this.sendLink(f, written); }, warn };
    if (ctx.encoders && !this.trace) {
      stats.workers.sessions++;
      return ctx.encoders.open(cfg, io);
    }
    this.lookup = ctx.lookup ? ctx.lookup() : new PageHasher(ctx.engine, ctx.index);
    const e = new StreamEncoder(cfg, { ...io, lookup: this.lookup, alloc: this.frameMem, trace: this.trace });
    // the trace follows QEMU's main stream (its rounds and records); multifd channels carry no sections
    if (e.parser instanceof QemuStreamParser) this.trace?.attach(e.parser);
    return e;
  }
}

/** An encoder's failure as the session reports it: a malformed stream says so, anything else is stream-out's. */
function encodeError(err: unknown): Error {
  return err instanceof StreamFormatError ? err : new Error(`stream-out: ${(err as Error).message}`);
}
