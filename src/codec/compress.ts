// Compression of the pages that still travel in full (CompressedPages frames).
//
// zstd level 1 is the one pagetwin uses: through zstd-napi (an optional
// dependency, libzstd built by node-gyp) when it loads, else through Node's own
// node:zlib zstd (Node >= 22.15 / 23.8; feature-detected). Without either,
// brotli quality 1 (node:zlib, always there). Both zstd ways make standard
// zstd frames, so peers interoperate; the Hello of each mode offers only what
// this process has (availableAlgorithms). bench/compress.ts measured the
// algorithms (and deflate, lz4, zstd-wasm) on real page data.
//
// The source compresses straight from the RAM window into the frame buffer
// (zstd streaming over runs of contiguous pages, no copy of the page bytes);
// the destination decompresses straight into its hashing scratch (bounded to
// exactly n x 4096 bytes: a bomb or corrupt data is a ProtocolError, never a
// large allocation). CompressionPolicy decides per frame whether compressing
// can make the transfer faster: only when the compressor outruns the link and
// the data compresses.

import { createRequire } from "node:module";
import zlib from "node:zlib";
import { PAGE_SIZE } from "../core/engine.js";
import { ProtocolError } from "../wire/envelope.js";
import { LinkMeter, type LinkRates } from "../link/rate.js";

export type CompressionAlgorithm = "zstd" | "brotli";
export type CompressionMode = "auto" | "off" | CompressionAlgorithm;
export const ALGORITHMS: readonly CompressionAlgorithm[] = ["zstd", "brotli"];
/** Wire ids of the algorithms (first payload byte of a CompressedPages frame). */
export const ALGORITHM_ID: Record<CompressionAlgorithm, number> = { zstd: 1, brotli: 2 };
export function algorithmOfId(id: number): CompressionAlgorithm | null {
  return id === 1 ? "zstd" : id === 2 ? "brotli" : null;
}

export function parseCompressionMode(s: string | undefined): CompressionMode {
  const v = (s ?? "auto").toLowerCase();
  if (v === "auto" || v === "off" || v === "zstd" || v === "brotli") return v;
  throw new RangeError(`pagetwin: --compress ${s}: expected auto, off, zstd or brotli`);
}

interface ZstdBinding {
  CCtx: new () => {
    setParameter(param: number, value: number): void;
    setPledgedSrcSize(size: number): void;
    reset(reset: number): void;
    compressStream2(dst: Uint8Array, src: Uint8Array, endOp: number): [number, number, number];
  };
  DCtx: new () => {
    decompress(dst: Uint8Array, src: Uint8Array): number;
    decompressStream(dst: Uint8Array, src: Uint8Array): [number, number, number];
    reset(reset: number): void;
  };
  versionString(): string;
  CParameter: { compressionLevel: number };
  ResetDirective: { sessionOnly: number };
  EndDirective: { continue: number; end: number };
}

let zstdBinding: ZstdBinding | null | undefined;
let zstdError = "";
function zstd(): ZstdBinding | null {
  if (zstdBinding === undefined) {
    try {
      zstdBinding = createRequire(import.meta.url)("zstd-napi/binding.js") as ZstdBinding;
    } catch (err) {
      zstdBinding = null;
      zstdError = (err as Error).message.split("\n")[0]!;
    }
  }
  return zstdBinding;
}

/** node:zlib's zstd (Node >= 22.15 / 23.8); @types/node 20 does not declare it. */
interface ZlibZstd {
  zstdCompressSync(src: Uint8Array, o: { params: Record<number, number> }): Buffer;
  zstdDecompressSync(src: Uint8Array, o: { maxOutputLength: number }): Buffer;
  constants: { ZSTD_c_compressionLevel: number; ZSTD_c_srcSizeHint?: number };
}

function zlibZstd(): ZlibZstd | null {
  const z = zlib as unknown as Partial<ZlibZstd>;
  return typeof z.zstdCompressSync === "function" && typeof z.zstdDecompressSync === "function" && z.constants?.ZSTD_c_compressionLevel !== undefined
    ? (z as ZlibZstd)
    : null;
}

export type ZstdProvider = "zstd-napi" | "node:zlib";

/** Where zstd comes from in this process (null: nowhere, brotli only). */
export function zstdProvider(): ZstdProvider | null {
  return zstd() ? "zstd-napi" : zlibZstd() ? "node:zlib" : null;
}

/** Algorithms this process can compress and decompress, preferred first. */
export function availableAlgorithms(): CompressionAlgorithm[] {
  return zstdProvider() ? ["zstd", "brotli"] : ["brotli"];
}

/** Why zstd is not available here ("" when it is). */
export function zstdUnavailableReason(): string {
  if (zstdProvider()) return "";
  return `zstd-napi did not load (${zstdError}) and this Node (${process.version}) has no zlib zstd (Node >= 22.15)`;
}

export interface PageCompressor {
  readonly algorithm: CompressionAlgorithm;
  /**
   * Compresses the concatenation of `chunks` into `dst`; returns the bytes
   * written, or -1 when they do not fit in `dst` (the caller sends raw).
   */
  compressChunks(chunks: readonly Uint8Array[], dst: Uint8Array): number;
  /** Decompresses `src` into `dst`, which it must fill exactly; throws ProtocolError otherwise. */
  decompressInto(src: Uint8Array, dst: Uint8Array): void;
  /** Convenience for benchmarks: compress one buffer into dst (-1: does not fit). */
  compressInto(src: Uint8Array, dst: Uint8Array): number;
  bound(n: number): number;
}

const ZSTD_LEVEL = 1;

class ZstdPages implements PageCompressor {
  readonly algorithm = "zstd" as const;
  private readonly c;
  private readonly d;
  private readonly reset: number;
  private readonly cont: number;
  private readonly end: number;
  private gather: Buffer = Buffer.alloc(0);
  constructor(z: ZstdBinding) {
    this.c = new z.CCtx();
    this.c.setParameter(z.CParameter.compressionLevel, ZSTD_LEVEL);
    this.d = new z.DCtx();
    this.reset = z.ResetDirective.sessionOnly;
    this.cont = z.EndDirective.continue;
    this.end = z.EndDirective.end;
  }
  bound(n: number): number {
    return n + (n >> 8) + 64 + (n < 128 << 10 ? ((128 << 10) - n) >> 11 : 0);
  }
  compressChunks(chunks: readonly Uint8Array[], dst: Uint8Array): number {
    const c = this.c;
    c.reset(this.reset);
    let total = 0;
    for (const ch of chunks) total += ch.length;
    c.setPledgedSrcSize(total);
    if (chunks.length > 2) {
      // many small pieces (a QEMU page header, then its page): one copy into a
      // contiguous buffer costs less than a native call per piece, and lets
      // zstd compress in one go instead of buffering the pieces itself
      if (this.gather.length < total) this.gather = Buffer.allocUnsafe(Math.max(total, this.gather.length * 2));
      let o = 0;
      for (const ch of chunks) { this.gather.set(ch, o); o += ch.length; }
      chunks = [this.gather.subarray(0, total)];
    }
    let pos = 0;
    try {
      for (const ch of chunks) {
        let used = 0;
        while (used < ch.length) {
          const [, produced, consumed] = c.compressStream2(dst.subarray(pos), ch.subarray(used), this.cont);
          pos += produced;
          used += consumed;
          if (produced === 0 && consumed === 0) return -1; // out of room
        }
      }
      for (;;) {
        const [left, produced] = c.compressStream2(dst.subarray(pos), EMPTY, this.end);
        pos += produced;
        if (left === 0) return pos;
        if (pos >= dst.length || produced === 0) return -1;
      }
    } catch {
      return -1; // e.g. dstSize too small: send raw
    }
  }
  compressInto(src: Uint8Array, dst: Uint8Array): number {
    return this.compressChunks([src], dst);
  }
  decompressInto(src: Uint8Array, dst: Uint8Array): void {
    let n: number;
    try {
      this.d.reset(this.reset);
      n = this.d.decompress(dst, src);
    } catch (err) {
      throw new ProtocolError(`CompressedPages frame: zstd data does not decompress into ${dst.length} bytes: ${(err as Error).message}`);
    }
    if (n !== dst.length) throw new ProtocolError(`CompressedPages frame: zstd data decompresses to ${n} bytes, want exactly ${dst.length}`);
  }
}

const EMPTY = new Uint8Array(0);

/** The one-shot node:zlib calls of one algorithm. */
interface ZlibCalls {
  compress(src: Uint8Array): Buffer;
  /** Throws when the output would exceed `max` bytes. */
  decompress(src: Uint8Array, max: number): Buffer;
}

/** An algorithm through node:zlib (brotli; zstd where Node has it). */
export class ZlibPages implements PageCompressor {
  constructor(readonly algorithm: CompressionAlgorithm, private readonly calls: ZlibCalls) {}
  bound(n: number): number {
    return n + (n >> 8) + 64;
  }
  compressChunks(chunks: readonly Uint8Array[], dst: Uint8Array): number {
    // node:zlib has no streaming sync API into a caller's buffer: one copy here (fallback only)
    const src = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
    const out = this.calls.compress(src);
    if (out.length > dst.length) return -1;
    dst.set(out);
    return out.length;
  }
  compressInto(src: Uint8Array, dst: Uint8Array): number {
    return this.compressChunks([src], dst);
  }
  decompressInto(src: Uint8Array, dst: Uint8Array): void {
    let out: Buffer;
    try {
      out = this.calls.decompress(src, dst.length);
    } catch (err) {
      throw new ProtocolError(`CompressedPages frame: ${this.algorithm} data does not decompress into ${dst.length} bytes: ${(err as Error).message}`);
    }
    if (out.length !== dst.length) throw new ProtocolError(`CompressedPages frame: ${this.algorithm} data decompresses to ${out.length} bytes, want exactly ${dst.length}`);
    dst.set(out);
  }
}

const BROTLI: ZlibCalls = {
  compress: (src) =>
    zlib.brotliCompressSync(src, {
      params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 1, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: src.length },
    }),
  decompress: (src, max) => zlib.brotliDecompressSync(src, { maxOutputLength: max }),
};

function zlibZstdCalls(z: ZlibZstd): ZlibCalls {
  return {
    compress: (src) => z.zstdCompressSync(src, { params: { [z.constants.ZSTD_c_compressionLevel]: ZSTD_LEVEL } }),
    decompress: (src, max) => z.zstdDecompressSync(src, { maxOutputLength: max }),
  };
}

export function createCompressor(algo: CompressionAlgorithm): PageCompressor {
  if (algo === "zstd") {
    const z = zstd();
    if (z) return new ZstdPages(z);
    const nz = zlibZstd();
    if (nz) return new ZlibPages("zstd", zlibZstdCalls(nz));
    throw new Error(`pagetwin: zstd is not available here: ${zstdUnavailableReason()}; use --compress brotli or auto`);
  }
  return new ZlibPages("brotli", BROTLI);
}

/**
 * A zstd decoder for data that ends inside `src` with bytes after it (qcow2's
 * compressed clusters): fills `dst` from the frame at the start of `src` and
 * returns the bytes written. null when zstd-napi cannot load here.
 */
export function zstdPrefixDecoder(): ((src: Uint8Array, dst: Uint8Array) => number) | null {
  const z = zstd();
  if (!z) return null;
  const d = new z.DCtx();
  const reset = z.ResetDirective.sessionOnly;
  return (src, dst) => {
    d.reset(reset);
    let written = 0, used = 0;
    while (written < dst.length && used < src.length) {
      const [left, produced, consumed] = d.decompressStream(dst.subarray(written), src.subarray(used));
      written += produced;
      used += consumed;
      if (left === 0 || (produced === 0 && consumed === 0)) break; // frame ended, or no progress
    }
    return written;
  };
}

export interface CompressionStats {
  /** What was asked for (--compress). */
  mode: CompressionMode;
  /** The algorithm both agents agreed on; null: every page travelled raw. */
  algorithm: CompressionAlgorithm | null;
  /** Frames of full pages sent compressed / raw. */
  framesCompressed: number;
  framesRaw: number;
  /** Raw frames because compressing would not have made them faster (compressor slower than the link, or costlier per byte) / because the batch did not compress (ratio > maxRatio). */
  rawSlow: number;
  rawPoorRatio: number;
  /** Raw frames because the receiver, not the link, limited the transfer (it seldom waited for the link): compressing would only cost both ends CPU. */
  rawReceiverBusy: number;
  /** Page bytes that went into compressed frames, and what they became. */
  bytesBefore: number;
  bytesAfter: number;
  /** Last measured compressor rate, and the link's rate measured from the peer's acknowledgements (0: not measured), MB/s (1e6 B/s). */
  compressMBs: number;
  linkMBs: number;
  /** Why compression is off, when it is. */
  note?: string;
}

export function emptyCompressionStats(mode: CompressionMode): CompressionStats {
  return { mode, algorithm: null, framesCompressed: 0, framesRaw: 0, rawSlow: 0, rawPoorRatio: 0, rawReceiverBusy: 0, bytesBefore: 0, bytesAfter: 0, compressMBs: 0, linkMBs: 0 };
}

export interface PolicyOptions {
  /** "auto": compress only when it makes the transfer faster; "always": whenever the batch compresses. */
  mode: "auto" | "always";
  /** Configured link bandwidth, bytes/s (0: unknown, measured). */
  bandwidth: number;
  /** Where the link's rate is measured (the peer's acknowledgements, or the sender's drain waits); default: one of the policy's own, fed by recordSend. */
  meter?: LinkRates;
  /** A batch whose compressed size exceeds this fraction of its raw size travels raw. */
  maxRatio?: number;
  /** Compress only when the compressor is this many times faster than the link. */
  margin?: number;
  /**
   * While skipping for a poor ratio, still try one frame in this many (default 4). Compressibility is
   * local (a stretch of compressed or random data, then page cache that compresses 10:1), and a failed
   * try on incompressible data is cheap (zstd gives up on it at GB/s): on the test guest one in 16 sent
   * 9-13% more bytes than one in 4, which costs under 1% of the compressor's time in failed tries.
   */
  probeEvery?: number;
  /** While skipping because the compressor is slower than the link, one frame in this many (default 64). */
  probeSlowEvery?: number;
  /**
   * Raw frames sent to time a link not measured yet (see probing(); default 0: none). A sender whose
   * compressed frames never fill the link never learns its rate: these raw frames either fill it (and the
   * peer's acknowledgements time it) or show that the link outruns the sender even raw, when compressing
   * only costs time. Needs recordFrame and recordAcked.
   */
  linkProbeFrames?: number;
  /**
   * What the receiver reports of its own load (stream mode's CREDIT): while it is busy nearly all along, the link
   * delivers faster than it hands on, so fewer bytes on the link buy nothing and decompressing costs the host that
   * is already the bottleneck ("auto" only; no probes, the receiver's next sample decides again).
   */
  receiver?: { readonly busy: boolean };
}

/**
 * Decides, frame by frame, whether to compress. Compressing pays when the
 * compressor produces page bytes faster than the link carries raw ones
 * (with compression overlapping the link's sending of the previous frame,
 * the transfer runs at min(compressor rate, link rate / ratio)): so compress
 * when compressorRate > margin x linkRate and the data compresses (ratio <
 * maxRatio). The compressor's rate and the ratio are measured on the frames
 * compressed; the link's rate is the configured bandwidth, or the rate the
 * LinkMeter measured, whichever is lower; a link never found busy is not
 * the bottleneck. Both modes feed the meter from the peer's acknowledgements
 * of what it received (agent mode's Credit frames, stream-in's CREDIT), taken
 * only while a backlog kept the link busy: bytes handed to a socket are not
 * yet across the link (its buffers hold megabytes).
 */
export class CompressionPolicy {
  readonly maxRatio: number;
  private readonly margin: number;
  private readonly probeEvery: number;
  private readonly probeSlowEvery: number;
  private readonly meter: LinkRates;
  /** Compressor input bytes per second (best of the last 8 frames), 0: not measured yet. */
  compressRate = 0;
  private recentRates: number[] = [];
  /** Compressed/raw (EWMA over frames), 0: not measured yet. */
  ratio = 0;
  private skipped = 0;
  /** Raw frames of the link probe still to send (-1: not started), and whether the probe is over (it runs once). */
  private probeLeft = -1;
  private probeDone = false;
  /** The sender's running total once the probe's frames were out (-1: not yet), and the peer's acknowledged total. */
  private probeUntil = -1;
  private acked = 0;
  /** The probe's raw frames never filled the link: it outruns this sender. */
  linkOutruns = false;

  constructor(readonly o: PolicyOptions) {
    this.maxRatio = o.maxRatio ?? 0.9;
    this.margin = o.margin ?? 1.25;
    this.probeEvery = o.probeEvery ?? 4;
    this.probeSlowEvery = o.probeSlowEvery ?? 64;
    this.meter = o.meter ?? new LinkMeter();
  }

  /** Bytes per second the link carries (Infinity: never waited for, and no bandwidth configured). */
  get linkRate(): number {
    const configured = this.o.bandwidth > 0 ? this.o.bandwidth : Infinity;
    return Math.min(this.meter.rate, configured);
  }

  /** Bytes per second the link was measured at (0: not measured); for the stats. */
  get measuredLinkRate(): number {
    return this.meter.measured;
  }

  /** Try this frame? ("slow", "poor" or "receiver" when not, and why.) */
  decide(): "compress" | "slow" | "poor" | "receiver" {
    if (this.o.mode === "auto" && this.o.receiver?.busy) return "receiver";
    if (this.compressRate === 0) return "compress"; // first frame measures the compressor
    let why: "compress" | "slow" | "poor" = "compress";
    const link = this.linkRate;
    if (this.probing(link)) return "slow";
    if (this.ratio > this.maxRatio) why = "poor";
    // a link not measured yet (Infinity) is not yet known to outrun the compressor: compress until it is;
    // nor is a compressor timed on fewer than 4 frames (the first runs cold) known to be slower than the link
    else if (this.o.mode === "auto" && Number.isFinite(link) && this.recentRates.length >= 4 && this.compressRate < this.margin * link) why = "slow";
    else if (this.o.mode === "auto" && this.linkOutruns && !Number.isFinite(link)) why = "slow";
    if (why === "compress") return why;
    if (++this.skipped % (why === "slow" ? this.probeSlowEvery : this.probeEvery) === 0) return "compress";
    return why;
  }

  recordCompress(bytesIn: number, bytesOut: number, ms: number): void {
    const rate = bytesIn / Math.max(ms / 1000, 1e-6);
    const r = bytesOut / bytesIn;
    // what the compressor can do: the best of its recent frames (a frame preempted by
    // another process or a GC only ever measures slower, and must not switch it off)
    this.recentRates.push(rate);
    if (this.recentRates.length > 8) this.recentRates.shift();
    this.compressRate = Math.max(...this.recentRates);
    this.ratio = this.ratio === 0 ? r : 0.7 * this.ratio + 0.3 * r;
  }

  /** The link carried `bytes` in `ms` while busy all along (what the meter's drain() records itself). */
  recordSend(bytes: number, ms: number): void {
    this.meter.record(bytes, ms);
  }

  /** A frame went out; `sentTotal`: the sender's running total of bytes sent, it included. */
  recordFrame(sentTotal: number): void {
    if (this.probeLeft === 0 && this.probeUntil < 0) this.probeUntil = sentTotal;
  }

  /** The peer acknowledged a running total of `total` bytes received (the probe waits for its own bytes). */
  recordAcked(total: number): void {
    this.acked = Math.max(this.acked, total);
  }

  /**
   * The link probe ("auto", linkProbeFrames > 0): once the compressor has
   * been timed on 4 frames while the link is still unmeasured, the next
   * frames go raw, and go on raw until the peer has acknowledged them. If
   * they built a backlog (the meter timed anything: its rate comes from the
   * peer's acknowledgements behind one), the link is not faster than this
   * sender: compress, and the rates decide once the link is measured; if the
   * peer took them all with no backlog, the link outruns this sender even raw
   * (linkOutruns: compression only costs the sender time, so frames go raw,
   * with the usual probes of the compressor).
   */
  private probing(link: number): boolean {
    const frames = this.o.linkProbeFrames ?? 0;
    if (this.o.mode !== "auto" || frames <= 0 || this.probeDone) return false;
    if (this.probeLeft < 0) {
      if (Number.isFinite(link) || this.recentRates.length < 4) return false;
      this.probeLeft = frames;
    }
    // over once its frames are out and either acknowledged or found queued behind a backlog (any timing at all)
    const waiting = this.probeLeft > 0 || (this.probeUntil < 0 || this.acked < this.probeUntil) && this.meter.measured === 0;
    if (!Number.isFinite(link) && waiting) {
      if (this.probeLeft > 0) this.probeLeft--;
      return true;
    }
    this.linkOutruns = this.meter.measured === 0;
    this.probeDone = true; // it runs once
    return false;
  }
}

/** Splits the pages of a batch into runs that are contiguous in memory (fewer compressor calls). */
export function contiguousRuns(n: number, bytesOf: (i: number) => Uint8Array): Uint8Array[] {
  const runs: Uint8Array[] = [];
  let cur: Uint8Array | null = null;
  for (let i = 0; i < n; i++) {
    const b = bytesOf(i);
    if (cur && b.buffer === cur.buffer && b.byteOffset === cur.byteOffset + cur.byteLength) {
      cur = new Uint8Array(cur.buffer, cur.byteOffset, cur.byteLength + b.byteLength);
      runs[runs.length - 1] = cur;
    } else {
      cur = b;
      runs.push(b);
    }
  }
  return runs;
}

export { PAGE_SIZE };
