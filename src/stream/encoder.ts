// stream-out's codec for one session, socket-free: QEMU's stream in (chunks
// as read), the session's frames out (RAW, RAW_Z, REFS, MREFS, RESEND, END),
// in order, through `emit`. It parses the chunk (the main channel's parser
// or a multifd channel's), looks its pages up, keeps each referenced page in
// the replay window until stream-in acknowledges it, and sums the stream as
// checked at the END (check-crc.ts). The session (out.ts) owns the sockets,
// the pacing and the handshake; it runs this on its own thread, or has a
// worker run it (encoder-pool.ts).

import { HASH_SIZE, NO_BLOCK, PAGE_SIZE } from "../core/engine.js";
import type { CompressionAlgorithm, CompressionMode } from "../codec/compress.js";
import type { LinkRates } from "../link/rate.js";
import { frame, jsonFrame } from "../wire/envelope.js";
import { QemuStreamParser, type Piece } from "./qemu-stream.js";
import { MultifdStreamParser } from "./multifd-stream.js";
import { MultifdRefsBuilder } from "./multifd-frames.js";
import type { ChannelKind } from "./multifd-format.js";
import { MAX_REFS, RefsBuilder, SFrame } from "./frames.js";
import { ReplayWindow } from "./replay-window.js";
import { CheckCrc } from "./check-crc.js";
import { RawEncoder } from "./raw-codec.js";
import type { PageLookup } from "./hasher.js";
import type { FrameAlloc } from "./write-ring.js";
import type { StreamStats } from "./stats.js";
import type { StreamTraceHook } from "../trace/stream.js";

/** What a session's encoder is, once the handshake has settled it (plain data: it crosses to a worker). */
export interface EncoderConfig {
  kind: ChannelKind;
  /** Replace twin pages by references (false: everything travels raw). */
  dedup: boolean;
  windowPages: number;
  /** Data frames carry their CRC (false inside TLS, when stream-in agreed). */
  frameCrc: boolean;
  /** The agreed algorithm (null: none) and what --compress asked. */
  algorithm: CompressionAlgorithm | null;
  compress: CompressionMode;
  bandwidth: number;
}

/** What the encoder uses besides its config (the session's, or a worker's own). */
export interface EncoderParts {
  lookup: PageLookup;
  /** Where its counters go (pagesSeen, twinsReplaced, multifd, compression, passthrough). */
  stats: StreamStats;
  alloc: FrameAlloc;
  emit: (frame: Buffer) => void;
  warn: (message: string) => void;
  /** The link's rate and stream-in's load, as the compression policy weighs them. */
  meter: LinkRates;
  receiver: { readonly busy: boolean };
  trace?: StreamTraceHook | null;
}

/** The session's side of an encoder: StreamEncoder itself, or a worker's (encoder-pool.ts), whose answers come later. */
export interface SessionEncoder {
  /** The next reference number (of the frames emitted so far). */
  readonly seq: number;
  /** Encodes a chunk: its frames are emitted by the return, or (a worker's) when the promise resolves to their bytes. */
  encode(chunk: Buffer): void | Promise<number>;
  /** A worker's: null when it takes another chunk now, else resolves when it does (QEMU's socket waits meanwhile). */
  room?(): Promise<void> | null;
  /** A worker's: QEMU's socket may read straight into the memory it hands to the worker. */
  readonly reads?: ReadTarget;
  release(upTo: number): void;
  resend(seq: number): Buffer | Promise<Buffer>;
  finish(bytesFromQemu: number): Buffer | Promise<Buffer>;
  /** The session is over: the compressor's rates go into the stats, memory is freed. */
  close(): void | Promise<void>;
}

/** Where a session's socket reads go, when its encoder gives the memory (read-buffer.ts' function form). */
export interface ReadTarget {
  /** Memory for the next read (asked for right after each read, and before the first). */
  next(): Uint8Array;
  /** A read landed (in the memory next() gave, or anywhere for what the socket held before). */
  landed(chunk: Buffer): void;
}

export class StreamEncoder implements SessionEncoder {
  readonly parser: QemuStreamParser | MultifdStreamParser;
  private readonly refs: RefsBuilder | MultifdRefsBuilder;
  private readonly ring: ReplayWindow;
  readonly raw: RawEncoder;
  private readonly check = new CheckCrc();
  /** The next reference number, and the first one stream-in has not acknowledged. */
  seq = 0;
  private acked = 0;
  /** This session's stream as QEMU sent it (END's streamBytes). */
  private streamBytes = 0;
  private reported = false;
  private reused = false;

  constructor(private readonly cfg: EncoderConfig, private readonly parts: EncoderParts) {
    if (cfg.kind === "multifd") {
      const parser = new MultifdStreamParser({ reuseBridges: true });
      this.parser = parser;
      this.refs = new MultifdRefsBuilder(() => parser.channel);
    } else {
      this.parser = new QemuStreamParser({ reuseBridges: true });
      this.refs = new RefsBuilder();
    }
    this.ring = new ReplayWindow(cfg.windowPages);
    this.raw = new RawEncoder(cfg.algorithm, cfg.compress, cfg.bandwidth, parts.stats.compression, parts.meter, parts.alloc, cfg.frameCrc, parts.receiver);
  }

  /** Chunks come in one buffer read into again after encode() (the window then keeps copies). */
  set inputReused(reused: boolean) {
    this.reused = reused;
    // a multifd parser holds no view of its input: it copies header bytes and split pages
    if (this.parser instanceof QemuStreamParser) this.parser.inputReused = reused;
  }

  /** References in the replay window, not acknowledged yet. */
  get inWindow(): number {
    return this.seq - this.acked;
  }

  /**
   * Parses a chunk, looks its pages up, and emits every page with a twin as a
   * reference and everything else raw, in order.
   */
  encode(chunk: Buffer): void {
    this.streamBytes += chunk.length;
    const check = this.check;
    if (!this.cfg.dedup) {
      check.add(chunk);
      check.flush();
      this.parts.emit(this.raw.frame([chunk], chunk.length));
      return;
    }
    const { stats, trace } = this.parts;
    const pieces = this.parse(chunk);
    let pages = 0;
    for (const p of pieces) if (p.kind === "page") pages++;
    const found = pages ? this.parts.lookup.lookup(pieces, pages) : null;
    stats.pagesSeen += pages;
    if (this.cfg.kind === "multifd") stats.multifd.pages += pages;
    const out = new ChunkWriter(this);
    let i = 0;
    for (const p of pieces) {
      if (p.kind === "raw") { check.add(p.data); out.raw(p.data); continue; }
      const blk = found!.blocks[i]!;
      const hash = found!.hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE);
      i++;
      // No twin, the replay window is full, or a header a REFS entry cannot hold: the page travels as it is.
      const ref = !(blk === NO_BLOCK || this.inWindow >= this.cfg.windowPages || p.header.length > 255);
      check.add(p.header);
      check.add(ref ? hash : p.data);
      if (ref) out.ref(p.header, p.data, blk, hash);
      else out.raw(p.header, p.data);
      trace?.page(ref, p.block, p.offset);
    }
    // the bridge a piece may lie in is rewritten by the next chunk
    check.flush();
    out.end();
  }

  /** stream-in acknowledged every reference below `upTo`. */
  release(upTo: number): void {
    if (upTo <= this.acked) return;
    this.ring.release(this.acked, upTo);
    this.acked = upTo;
  }

  /** The RESEND frame of reference #seq (in the window: the session checked). */
  resend(seq: number): Buffer {
    const b = Buffer.allocUnsafe(4 + PAGE_SIZE);
    b.writeUInt32BE(seq, 0);
    b.set(this.ring.get(seq), 4);
    return frame(SFrame.Resend, b);
  }

  /** QEMU closed its stream: the END frame (throws StreamFormatError if the stream stopped inside a record). */
  finish(bytesFromQemu: number): Buffer {
    if (this.cfg.dedup) this.parser.finish();
    const ps = this.parser.stats;
    const { stats } = this.parts;
    stats.zeroPages += ps.zeroPages;
    if ("syncs" in ps) stats.multifd.syncs += ps.syncs;
    return jsonFrame(SFrame.End, {
      bytes: bytesFromQemu, pages: ps.pages, zeroPages: ps.zeroPages,
      streamBytes: this.streamBytes, crc32: this.check.value,
    });
  }

  close(): void {
    this.raw.report();
  }

  private parse(chunk: Buffer): Piece[] {
    const pieces = this.parser.push(chunk);
    for (const w of this.parser.takeWarnings()) { this.parts.warn(w); this.parts.stats.warnings.push(w); }
    if (!this.reported && this.parser.mode === "passthrough") {
      this.reported = true;
      this.parts.stats.passthrough.push(this.parser.passthroughReason ?? "unknown");
    }
    return pieces;
  }

  /** Holds a referenced page in the replay window and adds it to the REFS frame being built; true when that frame is full. */
  holdRef(header: Uint8Array, data: Uint8Array, block: number, hash: Uint8Array): boolean {
    // a page in a reused read buffer, or completed in the parser's bridge, is overwritten by the next chunk: the window keeps a copy of it
    if (this.reused || this.parser.inBridge(data)) this.ring.holdCopy(this.seq, data);
    else this.ring.hold(this.seq, data);
    this.refs.add(this.seq++, header, block, hash);
    const { stats } = this.parts;
    stats.twinsReplaced++;
    if (this.cfg.kind === "multifd") stats.multifd.twins++;
    return this.refs.count >= MAX_REFS;
  }

  /** Emits the REFS frame being built, if any. */
  flushRefs(): void {
    if (this.refs.count) this.parts.emit(this.refs.take(this.parts.alloc, this.cfg.frameCrc));
  }

  emitRaw(pieces: Uint8Array[], bytes: number): void {
    this.parts.emit(this.raw.frame(pieces, bytes));
  }
}

/**
 * One chunk's output in order: consecutive raw bytes gather into one RAW
 * frame, consecutive references into one REFS frame; a switch from one kind
 * to the other emits what was gathered.
 */
class ChunkWriter {
  private pieces: Uint8Array[] = [];
  private bytes = 0;

  constructor(private readonly e: StreamEncoder) {}

  raw(...data: Uint8Array[]): void {
    this.e.flushRefs();
    for (const d of data) { this.pieces.push(d); this.bytes += d.length; }
  }

  ref(header: Uint8Array, data: Uint8Array, block: number, hash: Uint8Array): void {
    this.flushRaw();
    if (this.e.holdRef(header, data, block, hash)) this.e.flushRefs();
  }

  end(): void {
    this.flushRaw();
    this.e.flushRefs();
  }

  private flushRaw(): void {
    if (this.bytes) this.e.emitRaw(this.pieces, this.bytes);
    this.pieces = [];
    this.bytes = 0;
  }
}
