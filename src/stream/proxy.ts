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

import * as net from "node:net";
import * as tls from "node:tls";
import { once } from "node:events";
import { crc32 } from "node:zlib";
import { createEngine, NO_BLOCK, PAGE_SIZE, HASH_SIZE, type Engine, type Region, type TwinIndex } from "../core/engine.js";
import { openNasIndex, readIndexHeader, defaultIndexPath, type NasIndex } from "../adapters/nas/index-file.js";
import { DiskImage } from "../adapters/nas/image.js";
import { QemuStreamParser, StreamFormatError, type Piece } from "./qemu-stream.js";
import { ReplayWindow } from "./replay-window.js";
import {
  SFrame, StreamFrameReader, abortReason, StreamProtocolError, RefsBuilder, decodeRefs, jsonFrame, parseJson, rawFrame, readU32, u32Frame,
  STREAM_PROTOCOL_VERSION, frame, type StreamFrame,
  compressedRawFrame, decodeRawZ, RAW_Z_OVERHEAD,
} from "./frames.js";
import { PskInitiator, PskResponder, type AuthNames } from "../migrate/auth.js";
import { drained } from "../migrate/link.js";
import { tlsClientOptions, tlsServerOptions, unverifiedPeer, type TlsFiles } from "../migrate/tls.js";
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
   * stream-in: peers refused before they authenticated (wrong or no key, a
   * certificate from another CA). They are not migrations: a one-shot
   * stream-in keeps waiting for the real stream-out.
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
  /**
   * stream-in: sessions whose rebuilt stream was checked against the source's
   * (length and CRC-32 of the whole stream, with stream-out's verifyStream) and matched.
   */
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
  /** The port it listens on (useful with listenPort 0). */
  port: number;
  stats: StreamStats;
  /** Resolves when the first migration is over (or, with keep, when closed); rejects never: see stats.error. */
  done: Promise<StreamStats>;
  close(): Promise<void>;
}

export type Logger = (msg: string) => void;

function parseHostPort(s: string, what: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(s) ?? /^()()(\d+)$/.exec(s);
  if (!m) throw new Error(`pagetwin: ${what} must be HOST:PORT (got "${s}")`);
  const port = Number(m[3]);
  if (!(port >= 0 && port < 65536)) throw new Error(`pagetwin: ${what} has an invalid port ${m[3]}`);
  return { host: m[1] || m[2] || "127.0.0.1", port };
}

/** Bytes queued on a socket before the producer waits for it to drain. */
const BUFFER_HIGH = 4 * 1024 * 1024;

/** The names and HMAC label of stream mode's key exchange (see auth.ts). */
const STREAM_AUTH: AuthNames = { initiator: "stream-out", responder: "stream-in", context: "pagetwin-stream-v2" };

/** A TCP connection, or with `tlsFiles` a mutual-TLS one whose peer certificate checked out. */
function connect(host: string, port: number, timeoutMs = 10_000, tlsFiles: TlsFiles | null = null): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    // (tls.connect passes allowHalfOpen on to its socket; its types do not list it)
    const s = tlsFiles ? tls.connect({ ...tlsClientOptions(tlsFiles, host, port), allowHalfOpen: true } as tls.ConnectionOptions) : net.connect({ host, port, allowHalfOpen: true });
    const t = setTimeout(() => { s.destroy(); reject(new Error(`pagetwin: no connection to ${host}:${port} within ${timeoutMs} ms`)); }, timeoutMs);
    s.once(tlsFiles ? "secureConnect" : "connect", () => { clearTimeout(t); s.off("error", onErr); s.setNoDelay(true); resolve(s); });
    const onErr = (e: Error) => { clearTimeout(t); reject(new Error(`pagetwin: cannot connect to ${host}:${port}: ${e.message}`)); };
    s.once("error", onErr);
  });
}

/** Waits for `n` frames-worth of link input with a timeout. */
class FrameInbox {
  private queue: StreamFrame[] = [];
  private waiter: ((f: StreamFrame | null) => void) | null = null;
  closed = false;
  push(f: StreamFrame): void {
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(f); } else this.queue.push(f);
  }
  close(): void {
    this.closed = true;
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(null); }
  }
  next(timeoutMs: number, what: string): Promise<StreamFrame> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    if (this.closed) return Promise.reject(new StreamProtocolError(`the link closed while waiting for ${what}`));
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => { this.waiter = null; reject(new StreamProtocolError(`no ${what} within ${timeoutMs} ms`)); }, timeoutMs);
      this.waiter = (f) => { clearTimeout(t); f ? resolve(f) : reject(new StreamProtocolError(`the link closed while waiting for ${what}`)); };
    });
  }
}

// ---------------------------------------------------------------- stream-out

export interface StreamOutOptions {
  /** Port QEMU migrates to (`migrate tcp:127.0.0.1:PORT`); 0 picks one. */
  listenPort: number;
  /** Address to listen on (default 127.0.0.1). */
  listenHost?: string;
  /** The destination proxy (stream-in), HOST:PORT. */
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
  /** Pre-shared key: stream-in must prove it holds it before any byte of QEMU's stream goes out (and this side proves it back). */
  psk?: Uint8Array | null;
  /** Mutual TLS on the link (PEM files): stream-in's certificate is checked against `ca`, and ours is sent. */
  tls?: TlsFiles | null;
  /**
   * Check end to end that stream-in hands its QEMU exactly the bytes the
   * source QEMU sent: both sides take the length and CRC-32 of the whole
   * stream, and stream-in fails the session on a mismatch (default false:
   * it costs each side ~45 ms of CPU per 300 MB).
   */
  verifyStream?: boolean;
  log?: Logger;
}

export async function streamOut(opts: StreamOutOptions): Promise<StreamProxy> {
  const log = opts.log ?? (() => {});
  const to = parseHostPort(opts.to, "--to");
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
    compress, bandwidth: opts.bandwidth ?? 0, psk: opts.psk ?? null, tls: opts.tls ?? null, verifyStream: opts.verifyStream ?? false,
  };
  if (ctx.tls) tlsClientOptions(ctx.tls, to.host, to.port); // unreadable files: say so now, not when QEMU connects
  // QEMU's side is a plain local socket; the link to stream-in is what security covers
  return serve({ host: opts.listenHost ?? "127.0.0.1", port: opts.listenPort, tls: null, peer: "qemu" }, stats, opts.keep ?? false, log,
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
  to: { host: string; port: number };
  noDedup: boolean;
  compress: CompressionMode;
  bandwidth: number;
  psk: Uint8Array | null;
  tls: TlsFiles | null;
  verifyStream: boolean;
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

/**
 * A peer turned away before it authenticated (stream-in with a key). It is
 * logged and counted in stats.refused but is no migration: whoever can reach
 * the port must not be able to end a one-shot stream-in.
 */
class PeerRefused extends Error {
  override name = "PeerRefused";
}

interface Listen {
  host: string;
  port: number;
  /** Mutual TLS: only peers with a certificate from this CA get a session at all. */
  tls: TlsFiles | null;
  /**
   * Who connects: the other proxy (after a failure it gets a moment to read
   * the ABORT), or the source QEMU (its socket is closed at once: QEMU must
   * see its migration fail, never a stream that was read to the end).
   */
  peer: "proxy" | "qemu";
}

function serve(l: Listen, stats: StreamStats, keep: boolean, log: Logger,
  session: (sock: net.Socket, channel: number) => Promise<void>, onClose: () => void): Promise<StreamProxy> {
  return new Promise((resolve, reject) => {
    let server: net.Server;
    try {
      // the handshake may finish with a foreign certificate so that the peer can be told why it is refused (below)
      server = l.tls
        ? tls.createServer({ ...tlsServerOptions(l.tls), rejectUnauthorized: false, allowHalfOpen: true, noDelay: true })
        : net.createServer({ allowHalfOpen: true, noDelay: true });
    } catch (err) {
      reject(err);
      return;
    }
    let active = 0;
    let channels = 0;
    let ended = 0; // sessions over, refused peers not counted
    let t0 = 0;
    let finished = false;
    let resolveDone!: (s: StreamStats) => void;
    const done = new Promise<StreamStats>((r) => { resolveDone = r; });
    const sockets = new Set<net.Socket>();
    const finish = () => {
      if (finished) return;
      finished = true;
      server.close();
      for (const s of sockets) s.destroy();
      onClose();
      resolveDone(stats);
    };
    const refuse = (msg: string) => {
      stats.refused.push(msg);
      log(`refused: ${msg}`);
    };
    if (l.tls) {
      // the TLS handshake failed (no certificate, one from another CA): no session was started
      server.on("tlsClientError", (err, sock) => refuse(`a peer at ${sock.remoteAddress ?? "?"}:${sock.remotePort ?? "?"} failed the TLS handshake: ${err.message}`));
    }
    server.on(l.tls ? "secureConnection" : "connection", (sock: net.Socket) => {
      const unverified = l.tls ? unverifiedPeer(sock as tls.TLSSocket) : null;
      if (unverified) {
        // not a byte of it is read: it gets the reason and the door
        refuse(`a peer at ${sock.remoteAddress ?? "?"}:${sock.remotePort ?? "?"}: ${unverified}`);
        sock.end(jsonFrame(SFrame.Abort, { reason: `stream-in refused this stream-out: ${unverified}` }));
        setTimeout(() => sock.destroy(), 150).unref();
        return;
      }
      if (t0 === 0) t0 = performance.now();
      sockets.add(sock);
      sock.on("close", () => sockets.delete(sock));
      active++;
      stats.sessions++;
      const channel = channels++;
      let failed = false;
      let refused = false;
      session(sock, channel).catch((err: Error) => {
        failed = true;
        if (err instanceof PeerRefused) {
          refused = true;
          refuse(err.message);
          return;
        }
        stats.error ??= err.message;
        log(`error: ${err.message}`);
      }).finally(() => {
        active--;
        if (refused) {
          stats.sessions--;
          if (stats.sessions === 0) t0 = 0;
        } else ended++;
        // after a failure, let the other proxy read the ABORT before the socket goes (a destroy with unread data resets it)
        if (failed && l.peer === "proxy" && !sock.destroyed) {
          sock.end();
          sock.resume();
          setTimeout(() => sock.destroy(), 150).unref();
        } else sock.destroy();
        if (t0) stats.ms = performance.now() - t0;
        // Multifd channels of the same migration connect soon after the first; give them a moment.
        if (!keep && active === 0 && ended > 0) setTimeout(() => { if (active === 0) finish(); }, 200);
      });
    });
    server.once("error", (err) => reject(new Error(`pagetwin: cannot listen on ${l.host}:${l.port}: ${err.message}`)));
    server.listen(l.port, l.host, () => {
      const addr = server.address() as net.AddressInfo;
      log(`listening on ${l.host}:${addr.port}${l.tls ? " (mutual TLS)" : ""}`);
      resolve({
        port: addr.port, stats, done,
        close: async () => { finish(); await done; },
      });
    });
  });
}

async function outSession(ctx: OutContext, qemu: net.Socket, channel: number): Promise<void> {
  const { stats, log, engine, index } = ctx;
  qemu.pause();
  qemu.setNoDelay(true);
  const link = await connect(ctx.to.host, ctx.to.port, 10_000, ctx.tls);
  const reader = new StreamFrameReader();
  const inbox = new FrameInbox();
  // Until stream-in has answered the handshake (and proved the key), nothing
  // from it may reach the source QEMU and nothing of QEMU's goes out.
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
    setTimeout(() => link.destroy(), 1000).unref();
    if (windowWaiter) { const w = windowWaiter; windowWaiter = null; w(); }
    inbox.close();
    finished();
  };

  link.on("data", (chunk: Buffer) => {
    stats.bytesInLink += chunk.length;
    let frames: StreamFrame[];
    try {
      frames = reader.push(chunk);
    } catch (err) {
      fail(err as Error, true);
      return;
    }
    for (const f of frames) {
      if (!ready && f.type !== SFrame.HelloAck && f.type !== SFrame.Abort) {
        fail(new StreamProtocolError(`${SFrame[f.type]} frame from stream-in before the handshake ended`), true);
        return;
      }
      switch (f.type) {
        case SFrame.HelloAck:
          if (ready) { fail(new StreamProtocolError("a second HELLO_ACK from stream-in"), true); return; }
          inbox.push(f);
          break;
        case SFrame.Need: {
          const s = readU32(f, "NEED");
          if (!(s >= acked && s < seq)) {
            fail(new StreamProtocolError(`stream-in asked for page #${s}, which is not in the replay window (acked below ${acked}, next ${seq})`), true);
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
          if (upTo > seq || upTo < acked) { fail(new StreamProtocolError(`stream-in acknowledged up to #${upTo}, outside ${acked}..${seq}`), true); return; }
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
          fail(new StreamProtocolError(`unexpected ${SFrame[f.type]} frame from stream-in`), true);
          return;
      }
    }
  });
  link.on("error", (e) => fail(new Error(`link to stream-in failed: ${e.message}`), false));
  link.on("close", () => {
    inbox.close();
    if (!failure && !ready) fail(new Error("the link to stream-in closed during the handshake (does stream-in want TLS or a key that this stream-out lacks? see its log)"), false);
    if (!failure && !qemuEnded) fail(new Error("the link to stream-in closed before the migration ended"), false);
    finished();
  });
  link.on("end", () => { link.end(); });

  const offer: CompressionAlgorithm[] = ctx.compress === "off" ? [] : ctx.compress === "auto" ? availableAlgorithms() : [ctx.compress];
  const auth = new PskInitiator(ctx.psk, STREAM_AUTH);
  sendLink(jsonFrame(SFrame.Hello, { v: STREAM_PROTOCOL_VERSION, indexId: ctx.indexId, channel, compression: offer, ...(ctx.verifyStream ? { verify: true } : {}), ...auth.hello() }));
  type Ack = { ready?: unknown; dedup?: unknown; reason?: string; compression?: unknown; nonce?: unknown; proof?: unknown };
  const refuse = (msg: string): never => {
    const err = new StreamProtocolError(msg);
    fail(err, true);
    throw failure ?? err;
  };
  // A failure while waiting (stream-in's ABORT, a corrupt frame) says more than "the link closed".
  const nextAck = async (what: string): Promise<Ack> => {
    let f: StreamFrame;
    try {
      f = await inbox.next(15_000, what);
    } catch (err) {
      if (!failure) fail(err as Error, true);
      throw failure ?? err;
    }
    return parseJson<Ack>(f);
  };
  let ack = await nextAck("HELLO_ACK from stream-in");
  if (auth.required) {
    const answer = auth.answer(ack);
    if (!answer.ok) return refuse(answer.error);
    sendLink(jsonFrame(SFrame.Auth, { proof: answer.proof }));
    ack = await nextAck("stream-in's HELLO_ACK after authentication");
  }
  if (ack.ready !== true) refuse("stream-in did not say it is ready (does it run the same pagetwin version?)");
  ready = true;
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
    const why = `stream-in cannot dedup: ${ack.reason ?? "no reason"}`;
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
      if (blk === NO_BLOCK || inWindow() >= W) {
        // No twin, or the replay window is full: the page travels as it is.
        flushRefs();
        raw.push(p.header, p.data);
        rawBytes += p.header.length + p.data.length;
        continue;
      }
      flushRaw();
      ring.hold(seq, p.data);
      refs.add(seq++, p.header, blk, h);
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
    if (ctx.verifyStream) streamCrc = crc32(chunk, streamCrc);
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
        ...(ctx.verifyStream ? { streamBytes, crc32: streamCrc } : {}),
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

export interface StreamInOptions {
  /** Port stream-out connects to; 0 picks one. */
  listenPort: number;
  /** Address to listen on (default 0.0.0.0). */
  listenHost?: string;
  /** The destination QEMU's -incoming tcp address, HOST:PORT. */
  qemu: string;
  /** The NAS image (same file as the source sees). */
  image: string;
  indexPath?: string;
  keep?: boolean;
  /** Pre-shared key: stream-out must prove it holds it before this side connects to QEMU (and this side proves it back). */
  psk?: Uint8Array | null;
  /** Mutual TLS on the link (PEM files): stream-out must present a certificate signed by `ca`. */
  tls?: TlsFiles | null;
  log?: Logger;
}

interface InContext {
  engine: Engine;
  image: DiskImage;
  indexId: string | null;
  indexError: string | null;
  qemu: { host: string; port: number };
  stats: StreamStats;
  log: Logger;
  region: { pages: Region; hashes: Region } | null;
  capacity: number;
  psk: Uint8Array | null;
}

export async function streamIn(opts: StreamInOptions): Promise<StreamProxy> {
  const log = opts.log ?? (() => {});
  const qemu = parseHostPort(opts.qemu, "--qemu");
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
  const ctx: InContext = { engine, image, indexId, indexError, qemu, stats, log, region: null, capacity: 0, psk: opts.psk ?? null };
  try {
    return await serve({ host: opts.listenHost ?? "0.0.0.0", port: opts.listenPort, tls: opts.tls ?? null, peer: "proxy" }, stats, opts.keep ?? false, log,
      (sock, ch) => inSession(ctx, sock, ch, indexPath), () => image.close());
  } catch (err) {
    image.close();
    throw err;
  }
}

function inRegions(ctx: InContext, n: number): { pages: Region; hashes: Region } {
  if (!ctx.region || ctx.capacity < n) {
    if (ctx.region) { ctx.region.pages.free(); ctx.region.hashes.free(); }
    const cap = Math.max(n, 256);
    ctx.region = { pages: ctx.engine.alloc(cap * PAGE_SIZE), hashes: ctx.engine.alloc(cap * HASH_SIZE) };
    ctx.capacity = cap;
  }
  return ctx.region;
}

async function inSession(ctx: InContext, link: net.Socket, channel: number, indexPath: string): Promise<void> {
  const { stats, log, engine, image } = ctx;
  link.setNoDelay(true);
  const reader = new StreamFrameReader();
  const queue: StreamFrame[] = [];
  let queuedBytes = 0;
  const QUEUE_LIMIT = 64 * 1024 * 1024;
  const resends = new Map<number, Buffer>();
  let resendWaiter: { seq: number; resolve: (b: Buffer) => void } | null = null;
  let kick: (() => void) | null = null;
  let failure: Error | null = null;
  // HELLO and AUTH wait here; no other frame is taken before the handshake has ended
  const inbox = new FrameInbox();
  let authenticated = false;
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
    setTimeout(() => link.destroy(), 1000).unref();
    wake();
    inbox.close();
    // a rebuild waiting for a resent page must wake up to see the failure
    if (resendWaiter) { const w = resendWaiter; resendWaiter = null; w.resolve(Buffer.alloc(0)); }
  };

  link.on("data", (chunk: Buffer) => {
    stats.bytesInLink += chunk.length;
    let frames: StreamFrame[];
    try {
      frames = reader.push(chunk);
    } catch (err) {
      fail(err as Error, true);
      return;
    }
    for (const f of frames) {
      if (!authenticated && f.type !== SFrame.Hello && f.type !== SFrame.Auth && f.type !== SFrame.Abort) {
        fail(new StreamProtocolError(`${SFrame[f.type]} frame from stream-out before the handshake ended`), true);
        return;
      }
      switch (f.type) {
        case SFrame.Hello:
        case SFrame.Auth:
          if (authenticated) { fail(new StreamProtocolError(`${SFrame[f.type]} frame from stream-out after the handshake`), true); return; }
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
          if (f.payload.length !== 4 + PAGE_SIZE) { fail(new StreamProtocolError(`RESEND frame of ${f.payload.length} bytes`), true); return; }
          const s = f.payload.readUInt32BE(0);
          const page = f.payload.subarray(4);
          if (resendWaiter && resendWaiter.seq === s) { const w = resendWaiter; resendWaiter = null; w.resolve(page); } else resends.set(s, page);
          break;
        }
        case SFrame.Abort:
          fail(new Error(`stream-out aborted the migration: ${abortReason(f)}`), false);
          return;
        default:
          fail(new StreamProtocolError(`unexpected ${SFrame[f.type]} frame from stream-out`), true);
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

  // Handshake. Until stream-out has proved the key, this side opens nothing
  // (no QEMU connection) and passes nothing on.
  const auth = new PskResponder(ctx.psk, STREAM_AUTH);
  type Hello = { v?: unknown; indexId?: string; compression?: unknown; auth?: unknown; nonce?: unknown; verify?: unknown };
  let h: Hello;
  try {
    const next = async (want: SFrame): Promise<StreamFrame> => {
      const f = await inbox.next(15_000, `${SFrame[want]} from stream-out`);
      if (f.type !== want) throw new StreamProtocolError(`${SFrame[f.type]} frame from stream-out where ${SFrame[want]} belongs`);
      return f;
    };
    h = parseJson<Hello>(await next(SFrame.Hello));
    if (h.v !== STREAM_PROTOCOL_VERSION) throw new StreamProtocolError(`stream-out speaks stream protocol ${String(h.v)}, this stream-in speaks ${STREAM_PROTOCOL_VERSION}: run the same pagetwin version on both hosts`);
    const refused = auth.refusal(h);
    if (refused) throw new StreamProtocolError(refused);
    if (auth.required) {
      sendLink(jsonFrame(SFrame.HelloAck, { ready: false, ...auth.challenge() }));
      const bad = auth.check(parseJson<{ proof?: unknown }>(await next(SFrame.Auth)));
      if (bad) throw new StreamProtocolError(bad);
    }
  } catch (err) {
    const e = failure ?? (err as Error);
    fail(e, true);
    // a peer that never proved the key is refused, and does not end this proxy
    throw auth.required ? new PeerRefused(`${link.remoteAddress ?? "?"}:${link.remotePort ?? "?"}: ${e.message}`) : e;
  }
  authenticated = true;
  const offered = Array.isArray(h.compression) ? h.compression : [];
  const agreed = availableAlgorithms().filter((a) => offered.includes(a));
  const decompressors = new Map<CompressionAlgorithm, PageCompressor>();
  /** A RAW_Z frame's bytes, decompressed into exactly the length it names (4 MiB at most). */
  const unpack = (f: StreamFrame): Buffer => {
    const { algorithmId, rawLength, packed } = decodeRawZ(f);
    const algo = algorithmOfId(algorithmId);
    if (!algo || !agreed.includes(algo)) throw new StreamProtocolError(`RAW_Z frame uses algorithm ${algo ?? `#${algorithmId}`}, which was not agreed (agreed: ${agreed.join(", ") || "none"})`);
    let d = decompressors.get(algo);
    if (!d) decompressors.set(algo, (d = createCompressor(algo)));
    const out = Buffer.allocUnsafe(rawLength);
    try {
      d.decompressInto(packed, out);
    } catch (err) {
      throw new StreamProtocolError(`RAW_Z frame: ${(err as Error).message.replace(/^CompressedPages frame: /, "")}`);
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
        ctx.region = null;
        ctx.indexId = hdr.indexId;
        ctx.indexError = null;
      }
    } catch { /* keep the earlier answer */ }
  }
  const dedup = ctx.indexId === h.indexId;
  const reason = dedup ? undefined : ctx.indexError ?? `the source uses index ${h.indexId}, this side has ${ctx.indexId} (${indexPath}): not the same image index`;
  try {
    qemu = await connect(ctx.qemu.host, ctx.qemu.port);
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

  // what this session hands QEMU, checked at END against the source's stream when stream-out asked for it
  const verify = h.verify === true;
  let streamBytes = 0;
  let streamCrc = 0;
  const toQemu = async (buf: Uint8Array) => {
    stats.bytesToQemu += buf.length;
    streamBytes += buf.length;
    if (verify) streamCrc = crc32(buf, streamCrc);
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
  const eng = () => ctx.engine;

  const refsToQemu = async (f: StreamFrame) => {
    const { firstSeq, refs } = decodeRefs(f);
    const n = refs.length;
    const r = inRegions(ctx, n);
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
    eng().hashPagesAt(r.pages.ptr, n, r.hashes.ptr, 0);
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
        let page = resends.get(s);
        if (!page) {
          sendLink(u32Frame(SFrame.Need, s));
          if (link.isPaused()) link.resume();
          page = await new Promise<Buffer>((resolve) => { resendWaiter = { seq: s, resolve }; });
          if (failure) throw failure;
        }
        resends.delete(s);
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
        const e = parseJson<{ pages?: number; zeroPages?: number; streamBytes?: unknown; crc32?: unknown }>(f);
        stats.zeroPages += e.zeroPages ?? 0;
        stats.pagesSeen += e.pages ?? 0;
        if (verify) {
          if (typeof e.streamBytes !== "number" || typeof e.crc32 !== "number") {
            throw new StreamProtocolError("stream-out asked for an end-to-end check, but its END frame has no stream length and CRC-32");
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
      fail(err instanceof StreamProtocolError ? err : new Error(`stream-in: ${(err as Error).message}`), true);
      break;
    }
  }
  if (failure) throw failure;
  // Wait for the destination QEMU to finish with the connection and the link to close.
  if (!qemuClosed) await once(q, "close").catch(() => undefined);
  if (!linkClosed) {
    link.end();
    await Promise.race([once(link, "close"), new Promise((r) => setTimeout(r, 5000).unref())]);
  }
}

export { parseHostPort };
