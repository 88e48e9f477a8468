// Stream mode's destination side: stream-out's link in, the exact original
// stream out to the destination QEMU's -incoming socket.
//
// Each referenced page is rebuilt from its NAS block, which is read and
// hashed first: a block that does not match (rewritten since indexing) is
// never used; the page is asked for again (NEED) and comes from stream-out's
// replay window (RESEND). At END the whole stream handed to QEMU is checked
// against the source's (length and CRC-32, inside the protected channel).
// With --workers, the block reads and their verification (rebuild.ts) and
// the decompression run on worker threads (rebuild-pool.ts); the session
// keeps the order, the resends and the check.

import type * as net from "node:net";
import { once } from "node:events";
import { createEngine, PAGE_SIZE, type Engine } from "../core/engine.js";
import { readIndexHeader, defaultIndexPath } from "../adapters/nas/index-file.js";
import type { GuestDisk } from "../adapters/nas/image.js";
import { openDisk } from "../adapters/nas/disk.js";
import type { DiskFormat } from "../adapters/nas/image.js";
import { recordedFormat } from "../adapters/nas/index-header.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import type { PageVerifier } from "./disks.js";
import { CheckCrc } from "./check-crc.js";
import { SFrame, STREAM_FRAMES, rebuiltLength, MAX_REFS, STREAM_PROTOCOL_VERSION, creditFrame, linkLength } from "./frames.js";
import { WriteRing } from "./write-ring.js";
import { FrameReader, HANDSHAKE_FRAME_MAX, ProtocolError, abortReason, frame, jsonFrame, parseJson, printable, u32Frame, type Frame } from "../wire/envelope.js";
import { drained } from "../link/rate.js";
import { readChunks } from "../link/read-buffer.js";
import { dial } from "../link/dial.js";
import { parseEndpoint, type Endpoint } from "../link/endpoint.js";
import { resolveSecurity, checkSecurity, isTls, type SecurityOptions } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { availableAlgorithms } from "../codec/compress.js";
import { FrameInbox, PeerAbort, dispatch } from "./inbox.js";
import { UsageError } from "../errors.js";
import { RawDecoder } from "./raw-codec.js";
import { decodeRefsFrame, rebuildRefs, type Rebuilt } from "./rebuild.js";
import { RebuildPool, type RemoteRebuilder } from "./rebuild-pool.js";
import { serve } from "./serve.js";
import { newStats, type StreamProxy, type StreamStats } from "./stats.js";
import { toLog, type Log, type LogOption } from "../log.js";
import { throwIfAborted } from "../abort.js";
import { RunStateWatch } from "../adapters/qemu/run-state.js";
import { ChannelOrder, MAIN_WAIT_MS } from "./multifd-channel.js";
import { StreamTraceGroup } from "../trace/stream.js";
import { RebuiltStreamTrace } from "../trace/rebuilt.js";
import type { TraceSink } from "../trace/sink.js";

export interface StreamInOptions extends SecurityOptions {
  /** Port stream-out connects to; 0 picks one. */
  listenPort?: number;
  /** Address to listen on (default 127.0.0.1: give the address stream-out reaches this host at). */
  listenHost?: string;
  /** A unix socket to listen on instead of a port. */
  listenSocket?: string;
  /** The destination QEMU's -incoming address: HOST:PORT or unix:/PATH. */
  qemu: string;
  /** The NAS image (same file as the source sees). */
  image: string;
  indexPath?: string;
  /** The destination QEMU's QMP unix socket (optional): its RESUME event times endToResumeMs. */
  qmp?: string;
  keep?: boolean;
  /** Where notes and warnings go (level-aware, or a function that gets every message). */
  log?: LogOption;
  /** Where each migration's trace records go (docs/TRACE.md): the destination's view, what arrived and how. */
  trace?: readonly TraceSink[];
  /**
   * Stops the proxy: closes it and cuts the sessions in flight (the
   * destination QEMU's incoming migration fails); `done` then rejects with an AbortError.
   */
  signal?: AbortSignal;
  /**
   * Worker threads that read and verify the NAS blocks of the sessions'
   * references and decompress what came compressed, each with the image
   * open; a session (a multifd channel) takes the least busy one. 0
   * (default): every session does it on the main thread.
   */
  workers?: number;
}

/** What every stream-in session shares; the index fields follow the newest index the source used. */
export interface InContext {
  engine: Engine;
  image: GuestDisk;
  indexId: string | null;
  indexError: string | null;
  indexPath: string;
  qemu: Endpoint;
  stats: StreamStats;
  log: Log;
  /** The destination guest's STOP/RESUME events (with --qmp). */
  watch: RunStateWatch | null;
  /** performance.now() of the first byte handed to QEMU, and of the last end of a stream (0: not yet). */
  firstByteAt: number;
  lastEndAt: number;
  /** Several disks (pagetwin serve): they decide dedup and verify the blocks instead of engine/image/index*. */
  disks?: { refusal(): string | null; verifier(): PageVerifier; readonly seeds: readonly bigint[] };
  /** Worker threads that verify and decompress for the sessions, with every disk's image, or their start (null: each session does it on this thread). */
  rebuilders?: RebuildPool | Promise<RebuildPool | null> | null;
  /** Multifd sessions reach the destination QEMU after the main one. */
  order: ChannelOrder;
  /** The migrations' tracers (null without trace sinks): a migration's sessions share one. */
  tracing: StreamTraceGroup | null;
}

/** What a caller chooses: trace sinks and the trace's label (default "stream-in") besides the context's fields. */
export type InContextFields = Omit<InContext, "firstByteAt" | "lastEndAt" | "order" | "tracing"> & { trace?: readonly TraceSink[] | undefined; traceLabel?: string };

/**
 * A fresh context: the sessions' own running state starts here (stream-in and pagetwin serve both build theirs here).
 * The trace's references are resent within their own REFS frame here: a window of MAX_REFS places them.
 */
export function inContext({ trace, traceLabel, ...f }: InContextFields): InContext {
  const ctx: InContext = { ...f, firstByteAt: 0, lastEndAt: 0, order: new ChannelOrder(), tracing: null };
  traceInContext(ctx, trace ?? [], traceLabel ?? "stream-in");
  return ctx;
}

/** Traces the context's migrations from now on, into these sinks (none: no trace). */
export function traceInContext(ctx: InContext, sinks: readonly TraceSink[], label: string): void {
  ctx.tracing = sinks.length ? new StreamTraceGroup(sinks, () => ({ label, stats: ctx.stats, side: "in", windowPages: MAX_REFS, watch: null })) : null;
}

/** One link from stream-out through to the destination QEMU (pagetwin serve runs these itself). */
export function runInSession(ctx: InContext, link: net.Socket, channel: number): Promise<void> {
  return new InSession(ctx, link, channel).run();
}

/**
 * Frames from stream-out queued here before the link is paused, counted as the
 * stream they rebuild to: a few ms of rebuilding. What waits here the source
 * QEMU counts as sent, so a longer queue would make its downtime estimate
 * too short whenever rebuilding (or the destination QEMU) is slower than the link.
 */
const QUEUE_LIMIT = 4 * 1024 * 1024;
/** Bytes written to the destination QEMU's socket and not yet taken by it before rebuilding waits (the same reason). */
const TO_QEMU_QUEUE_BYTES = 1024 * 1024;
/** A CREDIT goes back once this many more link bytes, or bytes of QEMU's stream, were handed on (stream-out's windows are several times larger). */
const CREDIT_STEP = 128 * 1024;
const CREDIT_STREAM_STEP = 1024 * 1024;
const RESEND_LINK_GONE = "the link closed while waiting for a resent page";

/**
 * Starts stream-in, the destination-side proxy: stream-out connects to it,
 * it rebuilds QEMU's exact stream (verified NAS blocks in place of the
 * references) into the destination QEMU's -incoming socket. Resolves once listening.
 */
export async function streamIn(opts: StreamInOptions): Promise<StreamProxy> {
  const log = toLog(opts.log);
  throwIfAborted(opts.signal, "stream-in");
  const qemu = parseEndpoint(opts.qemu, "--qemu");
  const security = resolveSecurity(opts, "pagetwin stream-in");
  checkSecurity(security);
  const indexPath = opts.indexPath ?? defaultIndexPath(opts.image);
  // Only the seed and the index id are needed here: every block is verified
  // by hashing it, so the image may have changed since indexing.
  let seed = 0n;
  let indexId: string | null = null;
  let indexError: string | null = null;
  let format: DiskFormat | null = null; // the source's, as its index records it
  try {
    const h = readIndexHeader(indexPath);
    seed = h.seed;
    indexId = h.indexId;
    format = recordedFormat(h);
  } catch (err) {
    indexError = (err as Error).message;
    log.warn(`no usable index (${indexError}); migrations will pass through without dedup`);
  }
  const workers = opts.workers ?? 0;
  if (!(Number.isInteger(workers) && workers >= 0)) throw new UsageError(`pagetwin stream-in: workers must be a whole number >= 0 (got ${workers})`);
  const engine = await createEngine({ seed });
  const watch = opts.qmp ? await RunStateWatch.open(opts.qmp) : null;
  const image = openDisk(opts.image, { format });
  let rebuilders: RebuildPool | null = null;
  try {
    rebuilders = workers ? await RebuildPool.create(workers, [{ image: opts.image, format, offset: 0, blocks: image.blocks }]) : null;
  } catch (err) {
    image.close();
    watch?.close();
    throw err;
  }
  const stats = newStats("stream-in");
  stats.workers.threads = rebuilders?.size ?? 0;
  const ctx = inContext({ engine, image, indexId, indexError, indexPath, qemu, stats, log, watch, trace: opts.trace, rebuilders });
  const at: Endpoint = opts.listenSocket ? { kind: "unix", path: opts.listenSocket } : { kind: "tcp", host: opts.listenHost ?? "127.0.0.1", port: opts.listenPort ?? 0 };
  // serve() closes these when listening fails too
  return serve({ at, security, peer: "proxy" }, {
    stats, keep: opts.keep ?? false, log, signal: opts.signal,
    session: (sock, channel) => new InSession(ctx, sock, channel).run(),
    onClose: () => { image.close(); watch?.close(); void rebuilders?.close(); },
  });
}

/** Frames whose bytes count as handed on only once their output is in QEMU's socket (the rest count on arrival). */
const DATA_FRAMES = new Set<number>([SFrame.Raw, SFrame.RawZ, SFrame.Refs, SFrame.MultifdRefs, SFrame.End]);

type Hello = { v?: unknown; indexId?: string; kind?: unknown; compression?: unknown; verdict?: unknown; noFrameCrc?: unknown };

/** One link from stream-out, and its connection to the destination QEMU. */
class InSession {
  private readonly stats: StreamStats;
  private reader!: FrameReader;
  /**
   * Where stream-out's data frames are put together from the link's reads, each kept until rebuilt (a RAW frame:
   * until QEMU's socket took it, for it goes there from here); a fresh Buffer per read and per frame spanning
   * reads cost more than copying them (allocation, page faults, GC).
   */
  private readonly linkMem = new WriteRing(8 * 1024 * 1024);
  /** Data frames in order, rebuilt one at a time by drain(). */
  private readonly queue: Frame[] = [];
  private queuedBytes = 0;
  private resendWaiter: { seq: number; resolve: (b: Buffer) => void } | null = null;
  private kick: (() => void) | null = null;
  private failure: Error | null = null;
  /** HELLO waits here; no other frame is taken before the handshake has ended. */
  private readonly inbox = new FrameInbox();
  private helloDone = false;
  private linkClosed = false;
  /** stream-out's side of the link has ended (FIN or close): no RESEND can come any more. */
  private linkEnded = false;
  private endReceived = false;
  private qemu: net.Socket | null = null;
  private qemuClosed = false;
  private streamEnded = false;
  private raw!: RawDecoder;
  /** This session's worker (with a pool), and the frames handed to it as they arrived, by frame. */
  private rebuilder: RemoteRebuilder | null = null;
  private readonly ahead = new Map<Frame, Promise<Rebuilt | Buffer>>();
  private readonly handing: Frame[] = [];
  /** Memory of the rebuilt stream on its way to QEMU, reused once the socket took it. */
  private readonly toQemuMem = new WriteRing(8 * 1024 * 1024);
  /** This session's own block buffers, in the engine of the index agreed in the handshake. */
  private verifier!: PageVerifier;
  /** What this session hands QEMU, checked at END against the source's stream (check-crc.ts). */
  private streamBytes = 0;
  private readonly check = new CheckCrc();
  /** stream-out asked for the END check's outcome (a VERDICT frame). */
  private verdictWanted = false;
  /** When this session handed QEMU the end of its stream (0: not yet). */
  private endAt = 0;
  /** What stream-out found this connection to be ("main", "multifd", "unknown"). */
  private kind: unknown = "unknown";
  /** QEMU's id of this multifd channel, from its first MREFS frame (-1: none yet). */
  private multifdId = -1;
  /** The destination's trace of this session (with trace sinks). */
  private trace: RebuiltStreamTrace | null = null;
  /** The counters as the session began (its HELLO counts in its migration's trace). */
  private readonly since: { link: number; qemu: number };
  /** Bytes of stream-out's frames handed on, and the totals last sent back in a CREDIT (pacer.ts). */
  private handed = 0;
  private credited = 0;
  private creditedStream = 0;
  /** When this session began, and how long it has waited for the link's next frame since, ms (CREDIT carries both). */
  private readonly startedAt = performance.now();
  private linkWaitMs = 0;

  constructor(private readonly ctx: InContext, private readonly link: net.Socket, private readonly channel: number) {
    this.stats = ctx.stats;
    this.since = { link: this.stats.bytesInLink, qemu: this.stats.bytesToQemu };
  }

  async run(): Promise<void> {
    let error: string | undefined;
    try {
      await this.serve();
    } catch (err) {
      error = (err as Error).message;
      throw err;
    } finally {
      await this.trace?.end(error);
      // QEMU closes the main channel only once every channel has connected (and the migration has loaded)
      if (this.kind === "main") this.ctx.order.mainEnded();
    }
  }

  private async serve(): Promise<void> {
    this.wireLink();
    await this.handshake();
    this.verifier = this.ctx.disks?.verifier() ?? new BlockVerifier(this.ctx.engine, this.ctx.image);
    await this.drain();
    this.verifier.free();
    await this.rebuilder?.close();
    if (this.failure) throw this.failure;
    // Wait for the destination QEMU to finish with the connection and the link to close.
    if (!this.qemuClosed) await once(this.qemu!, "close").catch(() => undefined);
    await this.timeResume();
    if (!this.linkClosed) {
      this.link.end();
      await Promise.race([once(this.link, "close"), new Promise((r) => setTimeout(r, TIMEOUTS.closeWaitMs).unref())]);
    }
  }

  private sendLink(buf: Buffer): void {
    if (this.link.destroyed) return;
    this.stats.bytesOutLink += buf.length;
    this.link.write(buf);
  }

  private wake(): void {
    if (this.kick) { const k = this.kick; this.kick = null; k(); }
  }

  private fail(err: Error, tellPeer: boolean): void {
    if (this.failure) return;
    this.failure = err;
    this.ctx.log.error(`channel ${this.channel}: ${err.message}`, { channel: this.channel });
    const link = this.link;
    if (tellPeer && !link.destroyed) link.end(jsonFrame(SFrame.Abort, { reason: err.message }));
    this.qemu?.destroy();
    setTimeout(() => link.destroy(), TIMEOUTS.abortLingerMs).unref();
    this.wake();
    this.inbox.close();
    // a rebuild waiting for a resent page must wake up to see the failure
    if (this.resendWaiter) { const w = this.resendWaiter; this.resendWaiter = null; w.resolve(Buffer.alloc(0)); }
  }

  private wireLink(): void {
    const link = this.link;
    // data frames go into linkMem, the others (HELLO, RESEND, ABORT: rare, used outside the rebuild's order) get their own Buffer
    const frames = { ...STREAM_FRAMES, handshakeMax: HANDSHAKE_FRAME_MAX, alloc: (n: number, type: number) => (DATA_FRAMES.has(type) ? this.linkMem.take(n) : Buffer.allocUnsafe(n)) };
    this.reader = new FrameReader({ ...frames, inputReused: true });
    if (!readChunks(link, (chunk) => this.onLinkData(chunk))) this.reader = new FrameReader(frames);
    link.on("error", (e) => this.fail(new Error(`link from stream-out failed: ${e.message}`), false));
    link.on("close", () => {
      this.linkClosed = true;
      this.linkEnd();
      if (!this.streamEnded) this.fail(new Error("the link from stream-out closed before the end of the stream"), false);
      this.wake();
    });
    // The link is half-open capable: a FIN from stream-out without END is the
    // end of the link too (waiting for 'close' would wait for our own write to fail).
    link.on("end", () => {
      this.linkEnd();
      if (!this.endReceived) this.fail(new Error("the link from stream-out closed before the end of the stream"), false);
    });
    link.setTimeout(TIMEOUTS.idleMs, () => this.fail(new Error(`stream-out sent nothing for ${TIMEOUTS.idleMs} ms`), true));
  }

  /**
   * No RESEND can come any more. END may be queued already (stream-out sends ahead of the rebuild), so a FIN is not
   * always a failure; but a rebuild that waits for a resent page, or asks for one later, can never finish.
   */
  private linkEnd(): void {
    this.linkEnded = true;
    if (this.resendWaiter) this.fail(new Error(RESEND_LINK_GONE), false);
  }

  private onLinkData(chunk: Buffer): void {
    this.stats.bytesInLink += chunk.length;
    dispatch(this.reader, chunk, (f) => this.onFrame(f), (err, tellPeer) => this.fail(err, tellPeer));
    // the frames of one read go to the worker in one message
    if (this.handing.length) this.handOver();
  }


  /** Counts a frame as handed on (its output is in QEMU's socket, or it has none) and credits stream-out now and then. */
  private handedOn(f: Frame): void {
    this.handed += linkLength(f);
    if (this.handed - this.credited < CREDIT_STEP && this.streamBytes - this.creditedStream < CREDIT_STREAM_STEP) return;
    this.credited = this.handed;
    this.creditedStream = this.streamBytes;
    this.sendLink(creditFrame({
      linkBytes: this.handed, streamBytes: this.streamBytes, linkWaitUs: this.linkWaitMs * 1000, clockUs: (performance.now() - this.startedAt) * 1000,
    }));
  }

  /** Takes one frame from stream-out; a returned error ends the session. */
  private onFrame(f: Frame): Error | null {
    if (!DATA_FRAMES.has(f.type)) this.handedOn(f);
    if (!this.helloDone && f.type !== SFrame.Hello && f.type !== SFrame.Abort) {
      return new ProtocolError(`${SFrame[f.type]} frame from stream-out before the handshake ended`);
    }
    switch (f.type) {
      case SFrame.Hello:
        if (this.helloDone) return new ProtocolError("a second HELLO from stream-out");
        this.helloDone = true;
        this.inbox.push(f);
        return null;
      case SFrame.Raw:
      case SFrame.RawZ:
      case SFrame.Refs:
      case SFrame.MultifdRefs:
      case SFrame.End:
        if (f.type === SFrame.End) this.endReceived = true;
        if (this.rebuilder && f.type !== SFrame.Raw && f.type !== SFrame.End) {
          const err = this.toHandOver(f);
          if (err) return err;
        }
        this.queue.push(f);
        this.queuedBytes += rebuiltLength(f);
        if (this.queuedBytes > QUEUE_LIMIT && !this.resendWaiter) this.link.pause();
        this.wake();
        return null;
      case SFrame.Resend:
        return this.onResend(f);
      case SFrame.Abort:
        return new PeerAbort(`stream-out aborted the migration: ${abortReason(f)}`);
      default:
        return new ProtocolError(`unexpected ${SFrame[f.type]} frame from stream-out`);
    }
  }

  /** A REFS or RAW_Z frame goes to the session's worker as it arrives (with the others of its read); drain() takes its answer in order. */
  private toHandOver(f: Frame): Error | null {
    if (f.type === SFrame.RawZ) {
      try {
        this.raw.account(f);
      } catch (err) {
        return err as Error;
      }
    }
    this.handing.push(f);
    return null;
  }

  private handOver(): void {
    const frames = this.handing.splice(0);
    const answers = this.rebuilder!.frames(frames);
    frames.forEach((f, i) => {
      const p = answers.then((a) => a[i]!);
      p.catch(() => {}); // a failure reaches drain() when it comes to this frame, or the session has failed already
      this.ahead.set(f, p);
    });
  }

  /** What the worker made of a frame handed over. */
  private async answerFor<T extends Rebuilt | Buffer>(f: Frame): Promise<T> {
    const p = this.ahead.get(f);
    if (!p) throw new Error(`stream-in: a ${SFrame[f.type]} frame was not handed to its worker`);
    this.ahead.delete(f);
    return await p as T;
  }

  private onResend(f: Frame): Error | null {
    if (f.payload.length !== 4 + PAGE_SIZE) return new ProtocolError(`RESEND frame of ${f.payload.length} bytes`);
    const s = f.payload.readUInt32BE(0);
    // only the page this side asked for: nothing unsolicited is kept
    if (!this.resendWaiter || this.resendWaiter.seq !== s) return new ProtocolError(`RESEND of page #${s}, which this stream-in did not ask for`);
    const w = this.resendWaiter;
    this.resendWaiter = null;
    w.resolve(f.payload.subarray(4));
    return null;
  }

  // The peer is authenticated already (TLS); this side opens nothing (no
  // QEMU connection) before a HELLO it can serve.
  private async handshake(): Promise<void> {
    const h = await this.receiveHello();
    // stream-out sends nothing between its HELLO and this side's HELLO_ACK: every later frame follows what is agreed here
    const noFrameCrc = h.noFrameCrc === true && isTls(this.link);
    this.reader.handshakeDone({ crc: !noFrameCrc });
    this.stats.frameCrc = !noFrameCrc;
    this.verdictWanted = h.verdict === true;
    // a new migration (--keep): its times count from its own first byte
    if (this.ctx.lastEndAt > 0) this.ctx.firstByteAt = this.ctx.lastEndAt = 0;
    const offered = Array.isArray(h.compression) ? h.compression : [];
    const agreed = availableAlgorithms().filter((a) => offered.includes(a));
    this.raw = new RawDecoder(agreed, this.stats.compression);
    // after dedupRefusal, which loads an index made since this proxy started (its seed is the sessions')
    const reason = await this.dedupRefusal(h);
    const pool = await this.ctx.rebuilders;
    if (pool) {
      this.rebuilder = pool.open(this.ctx.disks?.seeds ?? [this.ctx.engine.seed], agreed);
      this.stats.workers.sessions++;
    }
    this.kind = h.kind;
    const hook = this.ctx.tracing?.join(h.kind === "multifd" ? "multifd" : h.kind === "main" ? "main" : "unknown", this.since);
    if (hook) this.trace = new RebuiltStreamTrace(hook, h.kind === "multifd");
    if (h.kind === "multifd") await this.afterMain();
    try {
      this.qemu = await dial(this.ctx.qemu, { kind: "insecure" }, { peer: "destination QEMU" });
    } catch (err) {
      this.fail(err as Error, true);
      throw this.failure!;
    }
    if (h.kind === "main") this.ctx.order.mainOpened();
    const dedup = reason === null;
    const crc = noFrameCrc ? { noFrameCrc } : {};
    this.sendLink(jsonFrame(SFrame.HelloAck, dedup ? { ready: true, dedup, compression: agreed, ...crc } : { ready: true, dedup, reason, compression: agreed, ...crc }));
    if (!dedup) { this.stats.passthrough.push(reason); this.ctx.log.warn(reason); }
    this.wireQemu(this.qemu);
  }

  /** QEMU 7.2 takes its first connection as the main channel: a multifd channel waits for it. */
  private async afterMain(): Promise<void> {
    this.stats.multifd.channels++;
    if (await this.ctx.order.afterMain(MAIN_WAIT_MS)) return;
    this.ctx.log.warn(`channel ${this.channel}: a multifd channel, and no main channel in ${MAIN_WAIT_MS} ms: connecting it to QEMU anyway`, { channel: this.channel });
  }

  private async receiveHello(): Promise<Hello> {
    try {
      const h = parseJson<Hello>(await this.inbox.next(TIMEOUTS.helloMs, "HELLO from stream-out"), "HELLO");
      if (h.v !== STREAM_PROTOCOL_VERSION) throw new ProtocolError(`stream-out speaks stream protocol ${printable(String(h.v))}, this stream-in speaks ${STREAM_PROTOCOL_VERSION}: run the same pagetwin version on both hosts`);
      return h;
    } catch (err) {
      this.fail(this.failure ?? (err as Error), true);
      throw this.failure!;
    }
  }

  /** Why this side cannot rebuild the source's references (null: it can). */
  private async dedupRefusal(h: Hello): Promise<string | null> {
    const ctx = this.ctx;
    if (ctx.disks) return ctx.disks.refusal();
    // The source may have (re)built the index after this proxy started.
    if (ctx.indexId !== h.indexId) {
      try {
        const hdr = readIndexHeader(ctx.indexPath);
        if (hdr.indexId === h.indexId) {
          ctx.engine = await createEngine({ seed: hdr.seed });
          ctx.indexId = hdr.indexId;
          ctx.indexError = null;
        }
      } catch { /* keep the earlier answer */ }
    }
    if (ctx.indexId === h.indexId) return null;
    return ctx.indexError ?? `the source uses index ${printable(String(h.indexId))}, this side has ${ctx.indexId} (${ctx.indexPath}): not the same image index`;
  }

  private wireQemu(q: net.Socket): void {
    q.on("data", (chunk: Buffer) => {
      this.stats.returnBytes += chunk.length;
      this.sendLink(frame(SFrame.Return, chunk));
    });
    q.on("end", () => { this.sendLink(jsonFrame(SFrame.ReturnEnd, {})); });
    q.on("error", (e) => { if (!this.streamEnded) this.fail(new Error(`destination QEMU connection failed: ${e.message}`), true); });
    q.on("close", () => {
      this.qemuClosed = true;
      if (this.streamEnded) {
        if (!this.link.destroyed) this.link.end();
        return;
      }
      // QEMU closes a channel once the migration is loaded (its multifd channels; the main one too, as
      // libvirt runs it), which may be just before the source's END arrives here: END still gets its
      // check and its verdict. Data still to come for QEMU (toQemu) fails at once; no END in time fails here.
      setTimeout(() => {
        if (!this.streamEnded) this.fail(new Error("the destination QEMU closed the connection before the end of the stream (see its log)"), true);
      }, TIMEOUTS.closeWaitMs).unref();
    });
  }

  /** Rebuilds the queued frames in order until END, a failure, or the link's end. */
  private async drain(): Promise<void> {
    for (;;) {
      if (this.failure) return;
      const f = this.queue.shift();
      if (!f) {
        if (this.linkClosed) return;
        const t0 = performance.now();
        await new Promise<void>((r) => { this.kick = r; });
        const waited = performance.now() - t0;
        this.linkWaitMs += waited;
        this.stats.linkWaitMs += waited;
        continue;
      }
      this.queuedBytes -= rebuiltLength(f);
      if (this.link.isPaused() && this.queuedBytes < QUEUE_LIMIT / 2) this.link.resume();
      try {
        if (await this.step(f)) return;
        // a RAW frame's memory returns once QEMU's socket took it (toQemu)
        if (f.mem && f.type !== SFrame.Raw) this.linkMem.release(f.mem);
        this.handedOn(f);
      } catch (err) {
        this.fail(err instanceof ProtocolError ? err : new Error(`stream-in: ${(err as Error).message}`), true);
        return;
      }
    }
  }

  /** One data frame to QEMU; true at END. */
  private async step(f: Frame): Promise<boolean> {
    const t0 = performance.now();
    const w0 = this.stats.drainWaitMs;
    if (f.type === SFrame.Raw || f.type === SFrame.RawZ) {
      const remote = f.type === SFrame.RawZ ? this.rebuilder : null;
      const b = f.type === SFrame.Raw ? f.payload : remote ? await this.answerFor<Buffer>(f) : this.raw.unpack(f, this.toQemuMem);
      this.trace?.raw(b);
      this.check.add(b);
      this.check.flush();
      if (f.type === SFrame.Raw && f.mem) await this.toQemu(b, this.linkMem, f.mem);
      else await this.toQemu(b, this.toQemuMem, b, remote ? () => remote.done(b) : undefined);
    } else if (f.type === SFrame.Refs || f.type === SFrame.MultifdRefs) await this.rebuildRefs(f);
    this.stats.busyMs += performance.now() - t0 - (this.stats.drainWaitMs - w0);
    if (f.type !== SFrame.End) return false;
    this.streamEnded = true;
    this.checkEnd(f);
    if (!this.qemu!.destroyed) this.qemu!.end();
    this.endAt = this.ctx.lastEndAt = performance.now();
    this.stats.streamToEndMs = this.endAt - this.ctx.firstByteAt;
    return true;
  }

  /** With the destination's QMP: when its guest resumed after this stream's end. */
  private async timeResume(): Promise<void> {
    const { watch } = this.ctx;
    if (!watch || !this.endAt) return;
    const at = await watch.resumeAfter(this.endAt, TIMEOUTS.closeWaitMs);
    if (at === null) return;
    this.stats.endToResumeMs = at - this.ctx.lastEndAt;
    this.stats.streamToResumeMs = at - this.ctx.firstByteAt;
  }

  /** Writes `buf` to QEMU; its memory (`from`, of `mem`) returns to `mem` once the socket took it (a worker's: `written` is called then). */
  private async toQemu(buf: Buffer, mem = this.toQemuMem, from = buf, written?: () => void): Promise<void> {
    const q = this.qemu!;
    if (this.ctx.firstByteAt === 0) this.ctx.firstByteAt = performance.now();
    this.stats.bytesToQemu += buf.length;
    this.streamBytes += buf.length;
    if (q.destroyed) throw new Error("the destination QEMU connection is closed");
    if (written) q.write(buf, () => written());
    else mem.write(q, buf, from);
    // Let QEMU read while the next frames are rebuilt; wait only when far ahead.
    if (q.writableLength > 0 && q.writableLength < TO_QEMU_QUEUE_BYTES) {
      // The kernel's buffer is full (a unix socket holds about 0.26 MB): let the event loop refill it as QEMU
      // reads, or QEMU waits while frames are rebuilt up to TO_QEMU_QUEUE_BYTES ahead.
      await new Promise<void>((r) => setImmediate(r));
    } else if (q.writableLength >= TO_QEMU_QUEUE_BYTES) {
      const t0 = performance.now();
      await drained(q);
      this.stats.drainWaitMs += performance.now() - t0;
      if (q.destroyed) throw new Error("the destination QEMU connection closed");
    }
  }

  /** Header + page per reference, in order; a page whose block did not verify is asked for again. */
  private async rebuildRefs(f: Frame): Promise<void> {
    const { firstSeq, refs, channel } = decodeRefsFrame(f);
    if (channel !== undefined) this.onMultifdChannel(channel);
    const remote = this.rebuilder;
    const { out, ok } = remote ? await this.answerFor<Rebuilt>(f) : rebuildRefs(this.verifier, refs, this.toQemuMem);
    const resent: number[] = [];
    let o = 0;
    for (let i = 0; i < refs.length; i++) {
      const ref = refs[i]!;
      o += ref.header.length;
      this.check.add(ref.header);
      if (ok[i]) {
        // the block's hash was verified equal to this one
        this.check.add(ref.hash);
        this.stats.twinsReplaced++;
        if (f.type === SFrame.MultifdRefs) this.stats.multifd.twins++;
      } else {
        const page = await this.resend(firstSeq + i);
        out.set(page, o);
        this.check.add(this.resentHash(ref.block, page, firstSeq + i));
        this.stats.resends++;
        resent.push(i);
      }
      o += PAGE_SIZE;
    }
    this.check.flush();
    this.trace?.refs(out, firstSeq, resent);
    await this.toQemu(out, this.toQemuMem, out, remote ? () => remote.done(out) : undefined);
    this.sendLink(u32Frame(SFrame.Ack, firstSeq + refs.length));
  }

  /** A resent page enters the end-to-end check by its hash, as the source took it (of the page it looked up). */
  private resentHash(block: number, page: Uint8Array, seq: number): Uint8Array {
    const h = this.verifier.hash(block, page);
    if (!h) throw new ProtocolError(`page #${seq} was resent for block ${block}, which is in no disk this side has an index of: its bytes cannot be checked end to end`);
    return h;
  }

  /** An MREFS frame: on a multifd session, and always for the same one of QEMU's channels. */
  private onMultifdChannel(channel: number): void {
    if (this.kind !== "multifd") throw new ProtocolError(`an MREFS frame on a session stream-out called ${printable(String(this.kind))}`);
    if (this.multifdId >= 0 && channel !== this.multifdId) throw new ProtocolError(`an MREFS frame for multifd channel ${channel} on the session of channel ${this.multifdId}`);
    this.multifdId = channel;
  }

  /** Asks stream-out for page #seq (NEED) and waits for its RESEND. */
  private async resend(seq: number): Promise<Buffer> {
    if (this.linkEnded) this.fail(new Error(RESEND_LINK_GONE), false);
    if (this.failure) throw this.failure;
    this.sendLink(u32Frame(SFrame.Need, seq));
    if (this.link.isPaused()) this.link.resume();
    const page = await new Promise<Buffer>((resolve) => { this.resendWaiter = { seq, resolve }; });
    if (this.failure) throw this.failure;
    return page;
  }

  /** END: the stream handed to QEMU must be, byte for byte, the one the source QEMU sent; stream-out hears the verdict. */
  private checkEnd(f: Frame): void {
    try {
      this.compareEnd(f);
    } catch (err) {
      this.stats.streamsFailed++;
      this.tellVerdict({ verified: false, reason: (err as Error).message });
      throw err;
    }
    this.stats.streamsVerified++;
    this.tellVerdict({ verified: true });
  }

  private tellVerdict(v: { verified: boolean; reason?: string }): void {
    if (this.verdictWanted) this.sendLink(jsonFrame(SFrame.Verdict, v));
  }

  private compareEnd(f: Frame): void {
    const e = parseJson<{ pages?: number; zeroPages?: number; streamBytes?: unknown; crc32?: unknown }>(f, "END");
    this.stats.zeroPages += Number(e.zeroPages) || 0;
    this.stats.pagesSeen += Number(e.pages) || 0;
    if (typeof e.streamBytes !== "number" || typeof e.crc32 !== "number") {
      throw new ProtocolError("stream-out's END frame has no stream length and CRC-32: the stream cannot be checked end to end");
    }
    const crc = this.check.value;
    if (e.streamBytes !== this.streamBytes || e.crc32 !== crc) {
      const hex = (n: number) => (n >>> 0).toString(16).padStart(8, "0");
      throw new Error(`the stream rebuilt for the destination QEMU is not the one the source QEMU sent (here ${this.streamBytes} bytes, ` +
        `CRC-32 ${hex(crc)}; at the source ${e.streamBytes} bytes, CRC-32 ${hex(e.crc32)}): a pagetwin bug, please report it. ` +
        `Do not resume the destination VM; the source VM is paused and goes on with "cont"`);
    }
  }
}

