// Stream mode: a pair of proxies inside QEMU's own migration stream.
//
//   source QEMU --migrate tcp:--> streamOut ==link==> streamIn --> destination QEMU (-incoming tcp:)
//
// streamOut parses QEMU's stream (qemu-stream.ts), hashes every RAM page
// record in batches in the core's memory, and replaces each page that has a
// twin block on the NAS by a reference (the record's header, the block, the
// page's hash). Every other byte travels raw. streamIn reads each referenced
// block from the NAS image, checks its hash, and writes the record header and
// the block's bytes to QEMU: the exact original stream. A block that does not
// match (rewritten since indexing) is never used: streamIn asks for the page
// (NEED) and streamOut answers from its replay window, where it keeps every
// referenced page until streamIn acknowledges it. Bytes from the destination
// QEMU back to the source (return path) travel as RETURN frames, unchanged.

import type * as net from "node:net";
import { once } from "node:events";
import { crc32 } from "node:zlib";
import { createEngine, NO_BLOCK, PAGE_SIZE, HASH_SIZE, type Engine, type Region, type TwinIndex } from "../core/engine.js";
import { openNasIndex, readIndexHeader, defaultIndexPath, type NasIndex } from "../adapters/nas/index-file.js";
import { DiskImage } from "../adapters/nas/image.js";
import { QemuStreamParser, StreamFormatError, type Piece } from "./qemu-stream.js";
import { ReplayWindow } from "./replay-window.js";
import {
  SFrame, STREAM_FRAMES, RefsBuilder, decodeRefs, rawFrame, MAX_REFS, STREAM_PROTOCOL_VERSION, compressedRawFrame, decodeRawZ, RAW_Z_OVERHEAD,
} from "./frames.js";
import { FrameReader, HANDSHAKE_FRAME_MAX, ProtocolError, abortReason, frame, jsonFrame, parseJson, printable, readU32, u32Frame, type Frame } from "../wire/envelope.js";
import { drained } from "../link/rate.js";
import { dial } from "../link/dial.js";
import { Listener, type ListenSecurity } from "../link/listen.js";
import { parseEndpoint, type Endpoint } from "../link/endpoint.js";
import { resolveSecurity, checkSecurity, type Security, type SecurityOptions } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import {
  ALGORITHM_ID, CompressionPolicy, algorithmOfId, availableAlgorithms, createCompressor, emptyCompressionStats, zstdUnavailableReason,
  type CompressionAlgorithm, type CompressionMode, type CompressionStats, type PageCompressor,
} from "../migrate/compress.js";

export interface StreamStats {
  role: "stream-out" | "stream-in";
  /** Migration connections handled (QEMU opens one, more with multifd). */
  sessions: number;
  /** RAM PAGE records seen in QEMU's stream (QEMU's "normal" pages). */
  pagesSeen: number;
  /** RAM ZERO records seen (QEMU's "duplicate" pages). */
  zeroPages: number;
  /** Pages sent (stream-out) or rebuilt (stream-in) from a NAS block reference. */
  twinsReplaced: number;
  /** Pages whose NAS block no longer matched and were sent again from the source. */
  resends: number;
  /** Bytes read from the source QEMU (stream-out) / written to the destination QEMU (stream-in). */
  bytesFromQemu: number;
  bytesToQemu: number;
  /** Bytes written to / read from the link between the proxies (frames included). */
  bytesOutLink: number;
  bytesInLink: number;
  /** Return-path bytes (destination QEMU -> source QEMU). */
  returnBytes: number;
  /** Why dedup was off for (part of) a stream, if it was. */
  passthrough: string[];
  warnings: string[];
  /**
   * stream-in: peers refused before they authenticated (a failed TLS
   * handshake: wrong or no key, a certificate from another CA, too many
   * handshakes at once). They are not migrations: a one-shot stream-in keeps
   * waiting for the real stream-out.
   */
  refused: string[];
  error?: string;
  /** Wall time from the first connection to the end of the last. */
  ms: number;
  /** Where the time went (ms): rewriting/rebuilding, waiting for the link (out) or QEMU (in) to drain, waiting for acks. */
  busyMs: number;
  drainWaitMs: number;
  windowWaitMs: number;
  /** RAW data compressed on the link (stream-out: what it compressed and why not; stream-in: frames decompressed). */
  compression: CompressionStats;
  /** stream-in: sessions whose rebuilt stream was checked against the source's (length and CRC-32 of the whole stream) and matched. */
  streamsVerified: number;
}

function newStats(role: StreamStats["role"]): StreamStats {
  return {
    role, sessions: 0, pagesSeen: 0, zeroPages: 0, twinsReplaced: 0, resends: 0, bytesFromQemu: 0, bytesToQemu: 0,
    bytesOutLink: 0, bytesInLink: 0, returnBytes: 0, passthrough: [], warnings: [], refused: [], ms: 0,
    busyMs: 0, drainWaitMs: 0, windowWaitMs: 0, compression: emptyCompressionStats("auto"), streamsVerified: 0,
  };
}

export interface StreamProxy {
  /** The port it listens on (useful with listenPort 0; 0 on a unix socket). */
  port: number;
  stats: StreamStats;
  /** Resolves when the first migration is over (or, with keep, when closed); rejects never: see stats.error. */
  done: Promise<StreamStats>;
  close(): Promise<void>;
}

export type Logger = (msg: string) => void;

/** Bytes queued on a socket before the producer waits for it to drain. */
const BUFFER_HIGH = 4 * 1024 * 1024;

/** Waits for `n` frames-worth of link input with a timeout. */
class FrameInbox {
  private queue: Frame[] = [];
  private waiter: ((f: Frame | null) => void) | null = null;
  closed = false;
  push(f: Frame): void {
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(f); } else this.queue.push(f);
  }
  close(): void {
    this.closed = true;
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(null); }
  }
  next(timeoutMs: number, what: string): Promise<Frame> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    if (this.closed) return Promise.reject(new ProtocolError(`the link closed while waiting for ${what}`));
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => { this.waiter = null; reject(new ProtocolError(`no ${what} within ${timeoutMs} ms`)); }, timeoutMs);
      this.waiter = (f) => { clearTimeout(t); f ? resolve(f) : reject(new ProtocolError(`the link closed while waiting for ${what}`)); };
    });
  }
}

// ---------------------------------------------------------------- stream-out

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
  log?: Logger;
}

export async function streamOut(opts: StreamOutOptions): Promise<StreamProxy> {
  const log = opts.log ?? (() => {});
  const to = parseEndpoint(opts.to, "--to");
  const security = resolveSecurity(opts, "pagetwin stream-out");
  checkSecurity(security); // unreadable files: say so now, not when QEMU connects
  let nas = opts.nas;
  if (!nas) {
    if (!opts.image) throw new Error("pagetwin stream-out: give the NAS image (--image)");
    const t0 = performance.now();
    nas = await openNasIndex(opts.image, { ...(opts.indexPath ? { indexPath: opts.indexPath } : {}) });
    log(`index ${nas.indexPath}: ${nas.header.blocks} blocks, ${nas.built ? "built" : "loaded"} in ${(performance.now() - t0).toFixed(0)} ms`);
  }
  const stats = newStats("stream-out");
  const compress = opts.compress ?? "auto";
  stats.compression.mode = compress;
  if (compress !== "auto" && compress !== "off" && !availableAlgorithms().includes(compress)) {
    throw new Error(`pagetwin stream-out: --compress ${compress} is not available here (${zstdUnavailableReason()})`);
  }
  const ctx: OutContext = {
    engine: nas.engine, index: nas.index, indexId: nas.header.indexId, stats, log,
    windowPages: opts.windowPages ?? 16384, to, noDedup: opts.noDedup ?? false, hashRegion: null, capacity: 0,
    compress, bandwidth: opts.bandwidth ?? 0, security,
  };
  // QEMU's side is local (loopback or a 0600 unix socket); the link to stream-in is what TLS covers
  const at: Endpoint = opts.listenSocket ? { kind: "unix", path: opts.listenSocket } : { kind: "tcp", host: opts.listenHost ?? "127.0.0.1", port: opts.listenPort ?? 0 };
  return serve({ at, security: { kind: "local" }, peer: "qemu" }, stats, opts.keep ?? false, log,
    (sock, channel) => outSession(ctx, sock, channel), () => {
      if (!opts.nas) { nas!.image.close(); }
    });
}

interface OutContext {
  engine: Engine;
  index: TwinIndex;
  indexId: string;
  stats: StreamStats;
  log: Logger;
  windowPages: number;
  to: Endpoint;
  noDedup: boolean;
  compress: CompressionMode;
  bandwidth: number;
  security: Security;
  hashRegion: { pages: Region; hashes: Region; blocks: Region } | null;
  capacity: number;
}

function hashRegions(ctx: OutContext, n: number): { pages: Region; hashes: Region; blocks: Region } {
  if (!ctx.hashRegion || ctx.capacity < n) {
    if (ctx.hashRegion) { ctx.hashRegion.pages.free(); ctx.hashRegion.hashes.free(); ctx.hashRegion.blocks.free(); }
    const cap = Math.max(n, 64);
    ctx.hashRegion = { pages: ctx.engine.alloc(cap * PAGE_SIZE), hashes: ctx.engine.alloc(cap * HASH_SIZE), blocks: ctx.engine.alloc(cap * 4) };
    ctx.capacity = cap;
  }
  return ctx.hashRegion;
}

interface Listen {
  at: Endpoint;
  security: ListenSecurity;
  /**
   * Who connects: the other proxy (after a failure it gets a moment to read
   * the ABORT), or the source QEMU (its socket is closed at once: QEMU must
   * see its migration fail, never a stream that was read to the end).
   */
  peer: "proxy" | "qemu";
}

async function serve(l: Listen, stats: StreamStats, keep: boolean, log: Logger,
  session: (sock: net.Socket, channel: number) => Promise<void>, onClose: () => void): Promise<StreamProxy> {
  let active = 0;
  let channels = 0;
  let ended = 0;
  let t0 = 0;
  let finished = false;
  let resolveDone!: (s: StreamStats) => void;
  const done = new Promise<StreamStats>((r) => { resolveDone = r; });
  const sockets = new Set<net.Socket>();
  let listener: Listener | null = null;
  const finish = () => {
    if (finished) return;
    finished = true;
    void listener?.close();
    for (const s of sockets) s.destroy();
    onClose();
    resolveDone(stats);
  };
  const onSession = (sock: net.Socket) => {
    if (t0 === 0) t0 = performance.now();
    sockets.add(sock);
    sock.on("close", () => sockets.delete(sock));
    active++;
    stats.sessions++;
    const channel = channels++;
    let failed = false;
    session(sock, channel).catch((err: Error) => {
      failed = true;
      stats.error ??= err.message;
      log(`error: ${err.message}`);
    }).finally(() => {
      active--;
      ended++;
      // after a failure, let the other proxy read the ABORT before the socket goes (a destroy with unread data resets it)
      if (failed && l.peer === "proxy" && !sock.destroyed) {
        sock.end();
        sock.resume();
        setTimeout(() => sock.destroy(), TIMEOUTS.refuseLingerMs).unref();
      } else sock.destroy();
      if (t0) stats.ms = performance.now() - t0;
      // Multifd channels of the same migration connect soon after the first; give them a moment.
      if (!keep && active === 0 && ended > 0) setTimeout(() => { if (active === 0) finish(); }, 200);
    });
  };
  listener = await Listener.open({
    at: l.at, security: l.security, peer: l.peer === "qemu" ? "source QEMU" : "stream-out", allowHalfOpen: true, log,
    onSession, onRefused: (reason) => stats.refused.push(reason),
    refusalFrame: (why) => jsonFrame(SFrame.Abort, { reason: `stream-in refused this stream-out: ${why}` }),
  });
  return { port: listener.port, stats, done, close: async () => { finish(); await done; } };
}

async function outSession(ctx: OutContext, qemu: net.Socket, channel: number): Promise<void> {
  const { stats, log, engine, index } = ctx;
  qemu.pause();
  qemu.setNoDelay(true);
  const link = await dial(ctx.to, ctx.security, { peer: "stream-in", allowHalfOpen: true });
  const reader = new FrameReader({ ...STREAM_FRAMES, handshakeMax: HANDSHAKE_FRAME_MAX });
  const inbox = new FrameInbox();
  // Until stream-in has answered the handshake, nothing from it may reach
  // the source QEMU and nothing of QEMU's goes out.
  let ready = false;
  // Replay window: reference #seq's page until stream-in acknowledges it.
  const W = ctx.windowPages;
  const ring = new ReplayWindow(W);
  const inWindow = () => seq - acked;
  const full = () => inWindow() > 0 && inWindow() >= W - Math.min(256, Math.floor(W / 4));
  let acked = 0;
  let seq = 0;
  let failure: Error | null = null;
  let qemuEnded = false;
  let windowWaiter: (() => void) | null = null;
  let finished!: () => void;
  const over = new Promise<void>((r) => { finished = r; });

  // Keep up to BUFFER_HIGH bytes queued on the link so that this process and
  // the network work at the same time; pause QEMU's socket beyond that.
  const sendLink = (buf: Buffer): boolean => {
    stats.bytesOutLink += buf.length;
    link.write(buf);
    return link.writableLength < BUFFER_HIGH;
  };
  const fail = (err: Error, tellPeer: boolean) => {
    if (failure) return;
    failure = err;
    log(`channel ${channel}: ${err.message}`);
    if (tellPeer && !link.destroyed) {
      try { link.end(jsonFrame(SFrame.Abort, { reason: err.message })); } catch { /* closed */ }
    }
    // The source QEMU sees its migration fail and keeps the VM running.
    qemu.destroy();
    setTimeout(() => link.destroy(), TIMEOUTS.abortLingerMs).unref();
    if (windowWaiter) { const w = windowWaiter; windowWaiter = null; w(); }
    inbox.close();
    finished();
  };

  link.on("data", (chunk: Buffer) => {
    stats.bytesInLink += chunk.length;
    let frames: Frame[];
    try {
      frames = reader.push(chunk);
    } catch (err) {
      fail(err as Error, true);
      return;
    }
    for (const f of frames) {
      if (!ready && f.type !== SFrame.HelloAck && f.type !== SFrame.Abort) {
        fail(new ProtocolError(`${SFrame[f.type]} frame from stream-in before the handshake ended`), true);
        return;
      }
      switch (f.type) {
        case SFrame.HelloAck:
          if (ready) { fail(new ProtocolError("a second HELLO_ACK from stream-in"), true); return; }
          inbox.push(f);
          break;
        case SFrame.Need: {
          const s = readU32(f, "NEED");
          if (!(s >= acked && s < seq)) {
            fail(new ProtocolError(`stream-in asked for page #${s}, which is not in the replay window (acked below ${acked}, next ${seq})`), true);
            return;
          }
          stats.resends++;
          const b = Buffer.allocUnsafe(4 + PAGE_SIZE);
          b.writeUInt32BE(s, 0);
          b.set(ring.get(s), 4);
          sendLink(frame(SFrame.Resend, b));
          break;
        }
        case SFrame.Ack: {
          const upTo = readU32(f, "ACK");
          if (upTo > seq || upTo < acked) { fail(new ProtocolError(`stream-in acknowledged up to #${upTo}, outside ${acked}..${seq}`), true); return; }
          ring.release(acked, upTo);
          acked = upTo;
          if (windowWaiter && !full()) { const w = windowWaiter; windowWaiter = null; w(); }
          break;
        }
        case SFrame.Return:
          stats.returnBytes += f.payload.length;
          if (!qemu.destroyed) qemu.write(f.payload);
          break;
        case SFrame.ReturnEnd:
          if (!qemu.destroyed) qemu.end();
          break;
        case SFrame.Abort:
          fail(new Error(`stream-in aborted the migration: ${abortReason(f)}`), false);
          return;
        default:
          fail(new ProtocolError(`unexpected ${SFrame[f.type]} frame from stream-in`), true);
          return;
      }
    }
  });
  link.on("error", (e) => fail(new Error(`link to stream-in failed: ${e.message}`), false));
  link.on("close", () => {
    inbox.close();
    if (!failure && !ready) fail(new Error("the link to stream-in closed during the handshake (see stream-in's log)"), false);
    if (!failure && !qemuEnded) fail(new Error("the link to stream-in closed before the migration ended"), false);
    finished();
  });
  link.on("end", () => { link.end(); });
  link.setTimeout(TIMEOUTS.idleMs, () => fail(new Error(`stream-in sent nothing for ${TIMEOUTS.idleMs} ms`), true));

  const offer: CompressionAlgorithm[] = ctx.compress === "off" ? [] : ctx.compress === "auto" ? availableAlgorithms() : [ctx.compress];
  sendLink(jsonFrame(SFrame.Hello, { v: STREAM_PROTOCOL_VERSION, indexId: ctx.indexId, channel, compression: offer }));
  type Ack = { ready?: unknown; dedup?: unknown; reason?: string; compression?: unknown };
  const refuse = (msg: string): never => {
    const err = new ProtocolError(msg);
    fail(err, true);
    throw failure ?? err;
  };
  // A failure while waiting (stream-in's ABORT, a corrupt frame) says more than "the link closed".
  const nextAck = async (what: string): Promise<Ack> => {
    let f: Frame;
    try {
      f = await inbox.next(TIMEOUTS.helloMs, what);
    } catch (err) {
      if (!failure) fail(err as Error, true);
      throw failure ?? err;
    }
    return parseJson<Ack>(f, "HELLO_ACK");
  };
  const ack = await nextAck("HELLO_ACK from stream-in");
  if (ack.ready !== true) refuse("stream-in did not say it is ready (does it run the same pagetwin version?)");
  ready = true;
  reader.handshakeDone();
  let dedup = ack.dedup === true && !ctx.noDedup;
  const cstats = stats.compression;
  const accepted = Array.isArray(ack.compression) ? ack.compression : [];
  const algo = offer.find((a) => accepted.includes(a)) ?? null;
  const compressor: PageCompressor | null = algo ? createCompressor(algo) : null;
  if (algo) cstats.algorithm = algo;
  else cstats.note = offer.length ? `stream-in decompresses none of ${offer.join(", ")}: RAW frames travel as they are` : "compression off";
  const cpolicy = new CompressionPolicy({ mode: ctx.compress === "auto" ? "auto" : "always", bandwidth: ctx.bandwidth });
  /** A RAW frame around `pieces`, compressed straight from them into the frame when that pays. */
  const rawOut = (pieces: Uint8Array[], bytes: number): Buffer => {
    const verdict = compressor && bytes >= 4096 ? cpolicy.decide() : null;
    if (compressor && verdict === "compress") {
      let ms = 0;
      const f = compressedRawFrame(bytes, ALGORITHM_ID[compressor.algorithm], (dst) => {
        const t = performance.now();
        const n = compressor.compressChunks(pieces, dst);
        ms = performance.now() - t;
        return n;
      }, cpolicy.maxRatio);
      cpolicy.recordCompress(bytes, f ? f.length - RAW_Z_OVERHEAD : bytes, ms);
      cstats.compressMBs = cpolicy.compressRate / 1e6;
      if (f) {
        cstats.framesCompressed++;
        cstats.bytesBefore += bytes;
        cstats.bytesAfter += f.length - RAW_Z_OVERHEAD;
        return f;
      }
      cstats.rawPoorRatio++;
    } else if (verdict === "slow") cstats.rawSlow++;
    else if (verdict === "poor") cstats.rawPoorRatio++;
    cstats.framesRaw++;
    return rawFrame(pieces, bytes);
  };
  if (!ack.dedup) {
    const why = `stream-in cannot dedup: ${printable(String(ack.reason ?? "no reason"))}`;
    stats.passthrough.push(why);
    log(why);
  }
  const parser = new QemuStreamParser();
  let reported = false;

  // one builder for the session: take() empties it, and every chunk ends with its references flushed
  const refs = new RefsBuilder();
  const handleChunk = (chunk: Buffer): boolean => {
    if (!dedup) return sendLink(rawOut([chunk], chunk.length));
    const pieces: Piece[] = parser.push(chunk);
    for (const w of parser.takeWarnings()) { log(`channel ${channel}: ${w}`); stats.warnings.push(w); }
    if (!reported && parser.mode === "passthrough") {
      reported = true;
      stats.passthrough.push(parser.passthroughReason ?? "unknown");
    }
    let pages = 0;
    for (const p of pieces) if (p.kind === "page") pages++;
    let blocks: Uint32Array | null = null;
    let hashes: Uint8Array | null = null;
    if (pages) {
      const r = hashRegions(ctx, pages);
      const mem = engine.u8();
      let i = 0;
      for (const p of pieces) if (p.kind === "page") mem.set(p.data, r.pages.ptr + PAGE_SIZE * i++);
      engine.hashPagesAt(r.pages.ptr, pages, r.hashes.ptr, 0);
      index.lookupAt(r.hashes.ptr, pages, 0, r.blocks.ptr, 0);
      blocks = engine.u32(r.blocks.ptr, pages);
      hashes = r.hashes.view(0, pages * HASH_SIZE);
      stats.pagesSeen += pages;
    }
    let ok = true;
    let raw: Uint8Array[] = [];
    let rawBytes = 0;
    const flushRaw = () => {
      if (rawBytes) ok = sendLink(rawOut(raw, rawBytes)) && ok;
      raw = [];
      rawBytes = 0;
    };
    const flushRefs = () => {
      if (refs.count) ok = sendLink(refs.take()) && ok;
    };
    let i = 0;
    for (const p of pieces) {
      if (p.kind === "raw") {
        flushRefs();
        raw.push(p.data);
        rawBytes += p.data.length;
        continue;
      }
      const blk = blocks![i]!;
      const h = hashes!.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE);
      i++;
      if (blk === NO_BLOCK || inWindow() >= W || p.header.length > 255) {
        // No twin, the replay window is full, or a header a REFS entry cannot hold: the page travels as it is.
        flushRefs();
        raw.push(p.header, p.data);
        rawBytes += p.header.length + p.data.length;
        continue;
      }
      flushRaw();
      ring.hold(seq, p.data);
      refs.add(seq++, p.header, blk, h);
      if (refs.count >= MAX_REFS) flushRefs();
      stats.twinsReplaced++;
    }
    flushRaw();
    flushRefs();
    return ok;
  };

  // Pump QEMU's stream: one chunk at a time, pausing for link backpressure
  // and for a full replay window.
  let pumping = Promise.resolve();
  // this session's stream as QEMU sent it, for stream-in's end-to-end check
  let streamBytes = 0;
  let streamCrc = 0;
  const pump = async (chunk: Buffer) => {
    stats.bytesFromQemu += chunk.length;
    streamBytes += chunk.length;
    streamCrc = crc32(chunk, streamCrc);
    if (failure) return;
    let ok: boolean;
    const t0 = performance.now();
    try {
      ok = handleChunk(chunk);
    } catch (err) {
      fail(err instanceof StreamFormatError ? err : new Error(`stream-out: ${(err as Error).message}`), true);
      return;
    }
    const t1 = performance.now();
    stats.busyMs += t1 - t0;
    if (!ok || full()) {
      qemu.pause();
      const backlog = link.writableLength;
      if (!ok) await drained(link);
      const t2 = performance.now();
      stats.drainWaitMs += t2 - t1;
      // the link moved `backlog` bytes in that time, busy all along: its rate
      if (!ok && backlog > 0) {
        cpolicy.recordSend(backlog, t2 - t1);
        if (Number.isFinite(cpolicy.linkRate)) stats.compression.linkMBs = cpolicy.linkRate / 1e6;
      }
      if (full() && !failure) await new Promise<void>((r) => { windowWaiter = r; });
      stats.windowWaitMs += performance.now() - t2;
      if (!failure) qemu.resume();
    }
  };
  qemu.on("data", (chunk: Buffer) => {
    pumping = pumping.then(() => pump(chunk));
  });
  qemu.on("end", () => {
    pumping = pumping.then(() => {
      qemuEnded = true;
      if (failure) return;
      if (dedup) {
        try {
          parser.finish();
        } catch (err) {
          fail(err as Error, true);
          return;
        }
      }
      stats.zeroPages += parser.stats.zeroPages;
      sendLink(jsonFrame(SFrame.End, {
        bytes: stats.bytesFromQemu, pages: parser.stats.pages, zeroPages: parser.stats.zeroPages,
        streamBytes, crc32: streamCrc,
      }));
    });
  });
  qemu.on("error", (e) => { if (!qemuEnded) fail(new Error(`source QEMU connection failed: ${e.message}`), true); });
  qemu.on("close", () => {
    if (!qemuEnded && !failure) fail(new Error("source QEMU closed the connection in the middle of the stream"), true);
  });
  qemu.resume();
  await over;
  await pumping;
  if (failure) throw failure;
}

// ---------------------------------------------------------------- stream-in

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
  keep?: boolean;
  log?: Logger;
}

interface InContext {
  engine: Engine;
  image: DiskImage;
  indexId: string | null;
  indexError: string | null;
  qemu: Endpoint;
  stats: StreamStats;
  log: Logger;
}

export async function streamIn(opts: StreamInOptions): Promise<StreamProxy> {
  const log = opts.log ?? (() => {});
  const qemu = parseEndpoint(opts.qemu, "--qemu");
  const security = resolveSecurity(opts, "pagetwin stream-in");
  checkSecurity(security);
  const indexPath = opts.indexPath ?? defaultIndexPath(opts.image);
  // Only the seed and the index id are needed here: every block is verified
  // by hashing it, so the image may have changed since indexing.
  let seed = 0n;
  let indexId: string | null = null;
  let indexError: string | null = null;
  try {
    const h = readIndexHeader(indexPath);
    seed = h.seed;
    indexId = h.indexId;
  } catch (err) {
    indexError = (err as Error).message;
    log(`no usable index (${indexError}); migrations will pass through without dedup`);
  }
  const engine = await createEngine({ seed });
  const image = DiskImage.open(opts.image);
  const stats = newStats("stream-in");
  const ctx: InContext = { engine, image, indexId, indexError, qemu, stats, log };
  const at: Endpoint = opts.listenSocket ? { kind: "unix", path: opts.listenSocket } : { kind: "tcp", host: opts.listenHost ?? "127.0.0.1", port: opts.listenPort ?? 0 };
  try {
    return await serve({ at, security, peer: "proxy" }, stats, opts.keep ?? false, log,
      (sock, ch) => inSession(ctx, sock, ch, indexPath), () => image.close());
  } catch (err) {
    image.close();
    throw err;
  }
}

/** One session's block buffers in the core's memory: no other session ever writes them. */
class SessionRegions {
  private pages: Region | null = null;
  private hashes: Region | null = null;
  private capacity = 0;

  constructor(private readonly engine: Engine) {}

  get(n: number): { pages: Region; hashes: Region } {
    if (!this.pages || this.capacity < n) {
      this.free();
      this.capacity = Math.max(n, 256);
      this.pages = this.engine.alloc(this.capacity * PAGE_SIZE);
      this.hashes = this.engine.alloc(this.capacity * HASH_SIZE);
    }
    return { pages: this.pages, hashes: this.hashes! };
  }

  free(): void {
    this.pages?.free();
    this.hashes?.free();
    this.pages = this.hashes = null;
    this.capacity = 0;
  }
}

async function inSession(ctx: InContext, link: net.Socket, channel: number, indexPath: string): Promise<void> {
  const { stats, log, image } = ctx;
  const reader = new FrameReader({ ...STREAM_FRAMES, handshakeMax: HANDSHAKE_FRAME_MAX });
  const queue: Frame[] = [];
  let queuedBytes = 0;
  const QUEUE_LIMIT = 64 * 1024 * 1024;
  let resendWaiter: { seq: number; resolve: (b: Buffer) => void } | null = null;
  let kick: (() => void) | null = null;
  let failure: Error | null = null;
  // HELLO waits here; no other frame is taken before the handshake has ended
  const inbox = new FrameInbox();
  let helloDone = false;
  let linkClosed = false;
  let endReceived = false;
  let qemu: net.Socket | null = null;
  let streamEnded = false;

  const sendLink = (buf: Buffer) => {
    if (link.destroyed) return;
    stats.bytesOutLink += buf.length;
    link.write(buf);
  };
  const wake = () => { if (kick) { const k = kick; kick = null; k(); } };
  const fail = (err: Error, tellPeer: boolean) => {
    if (failure) return;
    failure = err;
    log(`channel ${channel}: ${err.message}`);
    if (tellPeer && !link.destroyed) link.end(jsonFrame(SFrame.Abort, { reason: err.message }));
    qemu?.destroy();
    setTimeout(() => link.destroy(), TIMEOUTS.abortLingerMs).unref();
    wake();
    inbox.close();
    // a rebuild waiting for a resent page must wake up to see the failure
    if (resendWaiter) { const w = resendWaiter; resendWaiter = null; w.resolve(Buffer.alloc(0)); }
  };

  link.on("data", (chunk: Buffer) => {
    stats.bytesInLink += chunk.length;
    let frames: Frame[];
    try {
      frames = reader.push(chunk);
    } catch (err) {
      fail(err as Error, true);
      return;
    }
    for (const f of frames) {
      if (!helloDone && f.type !== SFrame.Hello && f.type !== SFrame.Abort) {
        fail(new ProtocolError(`${SFrame[f.type]} frame from stream-out before the handshake ended`), true);
        return;
      }
      switch (f.type) {
        case SFrame.Hello:
          if (helloDone) { fail(new ProtocolError("a second HELLO from stream-out"), true); return; }
          helloDone = true;
          inbox.push(f);
          break;
        case SFrame.Raw:
        case SFrame.RawZ:
        case SFrame.Refs:
        case SFrame.End:
          if (f.type === SFrame.End) endReceived = true;
          queue.push(f);
          queuedBytes += f.payload.length;
          if (queuedBytes > QUEUE_LIMIT && !resendWaiter) link.pause();
          wake();
          break;
        case SFrame.Resend: {
          if (f.payload.length !== 4 + PAGE_SIZE) { fail(new ProtocolError(`RESEND frame of ${f.payload.length} bytes`), true); return; }
          const s = f.payload.readUInt32BE(0);
          // only the page this side asked for: nothing unsolicited is kept
          if (!resendWaiter || resendWaiter.seq !== s) { fail(new ProtocolError(`RESEND of page #${s}, which this stream-in did not ask for`), true); return; }
          const w = resendWaiter;
          resendWaiter = null;
          w.resolve(f.payload.subarray(4));
          break;
        }
        case SFrame.Abort:
          fail(new Error(`stream-out aborted the migration: ${abortReason(f)}`), false);
          return;
        default:
          fail(new ProtocolError(`unexpected ${SFrame[f.type]} frame from stream-out`), true);
          return;
      }
    }
  });
  link.on("error", (e) => fail(new Error(`link from stream-out failed: ${e.message}`), false));
  link.on("close", () => {
    linkClosed = true;
    if (resendWaiter) fail(new Error("the link closed while waiting for a resent page"), false);
    if (!streamEnded) fail(new Error("the link from stream-out closed before the end of the stream"), false);
    wake();
  });
  // The link is half-open capable: a FIN from stream-out without END is the
  // end of the link too (waiting for 'close' would wait for our own write to fail).
  link.on("end", () => {
    if (!endReceived) fail(new Error("the link from stream-out closed before the end of the stream"), false);
  });
  link.setTimeout(TIMEOUTS.idleMs, () => fail(new Error(`stream-out sent nothing for ${TIMEOUTS.idleMs} ms`), true));

  // Handshake: the peer is authenticated already (TLS); this side opens
  // nothing (no QEMU connection) before a HELLO it can serve.
  type Hello = { v?: unknown; indexId?: string; compression?: unknown };
  let h: Hello;
  try {
    h = parseJson<Hello>(await inbox.next(TIMEOUTS.helloMs, "HELLO from stream-out"), "HELLO");
    if (h.v !== STREAM_PROTOCOL_VERSION) throw new ProtocolError(`stream-out speaks stream protocol ${printable(String(h.v))}, this stream-in speaks ${STREAM_PROTOCOL_VERSION}: run the same pagetwin version on both hosts`);
  } catch (err) {
    fail(failure ?? (err as Error), true);
    throw failure!;
  }
  reader.handshakeDone();
  const offered = Array.isArray(h.compression) ? h.compression : [];
  const agreed = availableAlgorithms().filter((a) => offered.includes(a));
  const decompressors = new Map<CompressionAlgorithm, PageCompressor>();
  /** A RAW_Z frame's bytes, decompressed into exactly the length it names (4 MiB at most). */
  const unpack = (f: Frame): Buffer => {
    const { algorithmId, rawLength, packed } = decodeRawZ(f);
    const algo = algorithmOfId(algorithmId);
    if (!algo || !agreed.includes(algo)) throw new ProtocolError(`RAW_Z frame uses algorithm ${algo ?? `#${algorithmId}`}, which was not agreed (agreed: ${agreed.join(", ") || "none"})`);
    let d = decompressors.get(algo);
    if (!d) decompressors.set(algo, (d = createCompressor(algo)));
    const out = Buffer.allocUnsafe(rawLength);
    try {
      d.decompressInto(packed, out);
    } catch (err) {
      throw new ProtocolError(`RAW_Z frame: ${(err as Error).message.replace(/^CompressedPages frame: /, "")}`);
    }
    stats.compression.framesCompressed++;
    stats.compression.bytesBefore += rawLength;
    stats.compression.bytesAfter += packed.length;
    stats.compression.algorithm = algo;
    return out;
  };
  // The source may have (re)built the index after this proxy started.
  if (ctx.indexId !== h.indexId) {
    try {
      const hdr = readIndexHeader(indexPath);
      if (hdr.indexId === h.indexId) {
        ctx.engine = await createEngine({ seed: hdr.seed });
        ctx.indexId = hdr.indexId;
        ctx.indexError = null;
      }
    } catch { /* keep the earlier answer */ }
  }
  const dedup = ctx.indexId === h.indexId;
  const reason = dedup ? undefined : ctx.indexError ?? `the source uses index ${printable(String(h.indexId))}, this side has ${ctx.indexId} (${indexPath}): not the same image index`;
  try {
    qemu = await dial(ctx.qemu, { kind: "insecure" }, { peer: "destination QEMU" });
  } catch (err) {
    fail(err as Error, true);
    throw failure!;
  }
  sendLink(jsonFrame(SFrame.HelloAck, dedup ? { ready: true, dedup, compression: agreed } : { ready: true, dedup, reason, compression: agreed }));
  if (!dedup) { stats.passthrough.push(reason!); log(reason!); }
  const q = qemu;
  let qemuClosed = false;
  q.on("data", (chunk: Buffer) => {
    stats.returnBytes += chunk.length;
    sendLink(frame(SFrame.Return, chunk));
  });
  q.on("end", () => { sendLink(jsonFrame(SFrame.ReturnEnd, {})); });
  q.on("error", (e) => { if (!streamEnded) fail(new Error(`destination QEMU connection failed: ${e.message}`), true); });
  q.on("close", () => {
    qemuClosed = true;
    if (!streamEnded) fail(new Error("the destination QEMU closed the connection before the end of the stream (see its log)"), true);
    else if (!link.destroyed) link.end();
  });

  // what this session hands QEMU, checked at END against the source's stream
  let streamBytes = 0;
  let streamCrc = 0;
  const toQemu = async (buf: Uint8Array) => {
    stats.bytesToQemu += buf.length;
    streamBytes += buf.length;
    streamCrc = crc32(buf, streamCrc);
    if (q.destroyed) throw new Error("the destination QEMU connection is closed");
    q.write(buf);
    // Let QEMU read while the next frames are rebuilt; wait only when far ahead.
    if (q.writableLength >= BUFFER_HIGH) {
      const t0 = performance.now();
      await drained(q);
      stats.drainWaitMs += performance.now() - t0;
      if (q.destroyed) throw new Error("the destination QEMU connection closed");
    }
  };
  const engine = ctx.engine;
  const regions = new SessionRegions(engine);

  const refsToQemu = async (f: Frame) => {
    const { firstSeq, refs } = decodeRefs(f);
    const n = refs.length;
    if (n > MAX_REFS) throw new ProtocolError(`a REFS frame holds ${n} references; at most ${MAX_REFS}`);
    const r = regions.get(n);
    // Read the blocks (runs of consecutive blocks in one read), hash, compare.
    // A block that cannot be read (past the end, the image truncated or
    // failing since) counts as a mismatch: the page is asked for again.
    const readOk = new Array<boolean>(n).fill(true);
    const readOne = (k: number) => {
      const b = refs[k]!.block;
      try {
        if (b >= image.blocks) throw new RangeError("past the end");
        image.readBlocks(b, 1, r.pages.view(k * PAGE_SIZE, PAGE_SIZE));
      } catch {
        readOk[k] = false;
      }
    };
    for (let i = 0; i < n;) {
      let j = i + 1;
      while (j < n && refs[j]!.block === refs[j - 1]!.block + 1 && j - i < 256) j++;
      const first = refs[i]!.block;
      let whole = first + (j - i) <= image.blocks;
      if (whole) {
        try {
          image.readBlocks(first, j - i, r.pages.view(i * PAGE_SIZE, (j - i) * PAGE_SIZE));
        } catch {
          whole = false;
        }
      }
      if (!whole) for (let k = i; k < j; k++) readOne(k); // block by block: the readable ones still count
      i = j;
    }
    engine.hashPagesAt(r.pages.ptr, n, r.hashes.ptr, 0);
    const got = r.hashes.view(0, n * HASH_SIZE);
    const bad: number[] = [];
    for (let i = 0; i < n; i++) {
      if (!readOk[i] || Buffer.compare(got.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE), refs[i]!.hash) !== 0) bad.push(i);
    }
    // Output: header + page per reference, in order.
    let size = 0;
    for (const ref of refs) size += ref.header.length + PAGE_SIZE;
    const out = Buffer.allocUnsafe(size);
    const pages = r.pages.view(0, n * PAGE_SIZE);
    let o = 0;
    let b = 0;
    for (let i = 0; i < n; i++) {
      const ref = refs[i]!;
      out.set(ref.header, o);
      o += ref.header.length;
      if (b < bad.length && bad[b] === i) {
        b++;
        const s = firstSeq + i;
        sendLink(u32Frame(SFrame.Need, s));
        if (link.isPaused()) link.resume();
        const page = await new Promise<Buffer>((resolve) => { resendWaiter = { seq: s, resolve }; });
        if (failure) throw failure;
        out.set(page, o);
        stats.resends++;
      } else {
        out.set(pages.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), o);
        stats.twinsReplaced++;
      }
      o += PAGE_SIZE;
    }
    await toQemu(out);
    sendLink(u32Frame(SFrame.Ack, firstSeq + n));
  };

  // Drain the queue in order.
  for (;;) {
    if (failure) break;
    const f = queue.shift();
    if (!f) {
      if (linkClosed) break;
      await new Promise<void>((r) => { kick = r; });
      continue;
    }
    queuedBytes -= f.payload.length;
    if (link.isPaused() && queuedBytes < QUEUE_LIMIT / 2) link.resume();
    try {
      const t0 = performance.now();
      const w0 = stats.drainWaitMs;
      if (f.type === SFrame.Raw) await toQemu(f.payload);
      else if (f.type === SFrame.RawZ) await toQemu(unpack(f));
      else if (f.type === SFrame.Refs) await refsToQemu(f);
      stats.busyMs += performance.now() - t0 - (stats.drainWaitMs - w0);
      if (f.type === SFrame.End) {
        streamEnded = true;
        const e = parseJson<{ pages?: number; zeroPages?: number; streamBytes?: unknown; crc32?: unknown }>(f, "END");
        stats.zeroPages += Number(e.zeroPages) || 0;
        stats.pagesSeen += Number(e.pages) || 0;
        {
          if (typeof e.streamBytes !== "number" || typeof e.crc32 !== "number") {
            throw new ProtocolError("stream-out's END frame has no stream length and CRC-32: the stream cannot be checked end to end");
          }
          if (e.streamBytes !== streamBytes || e.crc32 !== streamCrc) {
            const hex = (n: number) => (n >>> 0).toString(16).padStart(8, "0");
            throw new Error(`the stream rebuilt for the destination QEMU is not the one the source QEMU sent (here ${streamBytes} bytes, ` +
              `CRC-32 ${hex(streamCrc)}; at the source ${e.streamBytes} bytes, CRC-32 ${hex(e.crc32)}): a pagetwin bug, please report it. ` +
              `Do not resume the destination VM; the source VM is paused and goes on with "cont"`);
          }
          stats.streamsVerified++;
        }
        q.end();
        break;
      }
    } catch (err) {
      fail(err instanceof ProtocolError ? err : new Error(`stream-in: ${(err as Error).message}`), true);
      break;
    }
  }
  regions.free();
  if (failure) throw failure;
  // Wait for the destination QEMU to finish with the connection and the link to close.
  if (!qemuClosed) await once(q, "close").catch(() => undefined);
  if (!linkClosed) {
    link.end();
    await Promise.race([once(link, "close"), new Promise((r) => setTimeout(r, 5000).unref())]);
  }
}

