// Incremental parser of one QEMU 7.2 multifd channel (multifd-format.ts), fed
// the bytes as they come off the socket (split anywhere). It hands out, in
// order, raw pieces (the initial packet, every packet header) and page pieces
// (each page's 4096 bytes, with an empty record header: a multifd page has
// none of its own). Concatenating the pieces gives back the input byte for byte.
//
// Header bytes go out as raw at once (a copy is kept to decode the header);
// only a page split across reads is held back until it is whole, so a SYNC
// packet (no pages) is never held: the destination's main thread waits for it.
// With reuseBridges, a split page is completed in one of two page buffers
// used in turn (it holds until the next push(): inBridge() tells), as the
// main channel's parser does; else in fresh memory.
// A channel with QEMU's own compression, or flags or a version this parser
// does not know, passes through raw from that packet on.

import { StreamFormatError } from "../errors.js";
import type { ParserMode, ParserOptions, Piece } from "./qemu-stream.js";
import {
  MULTIFD_FLAG, MULTIFD_HEADER_FIXED, MULTIFD_INIT_BYTES, MULTIFD_PAGE, MULTIFD_VERSION,
  compressionOf, decodeFixed, decodeInit, decodePacketHead, offsetAt, packetHeaderBytes, unknownFlags, type MultifdPacketHead,
} from "./multifd-format.js";

const EMPTY = Buffer.alloc(0);
/** Without reuseBridges, pages split across reads are completed in slabs this big (never reused: the replay window keeps views). */
const SLAB = 1 << 20;

export interface MultifdStats {
  bytes: number;
  packets: number;
  /** Packets with the SYNC flag. */
  syncs: number;
  pages: number;
  /** Always 0: QEMU 7.2 sends zero pages on the main channel. */
  zeroPages: number;
  pageBytes: number;
}

type State = "init" | "header" | "pages" | "passthrough";

export class MultifdStreamParser {
  private state: State = "init";
  /** The record being read: its bytes so far (a copy; they went out raw already). */
  private head = Buffer.alloc(MULTIFD_INIT_BYTES);
  private got = 0;
  private need = MULTIFD_INIT_BYTES;
  /** The packet whose pages are being read (its offsets are in `head` until the next header). */
  private packet: MultifdPacketHead | null = null;
  private pageIndex = 0;
  /** A page split across reads, being completed. */
  private partPage: Buffer | null = null;
  private partGot = 0;
  private slab = Buffer.alloc(0);
  private slabUsed = 0;
  /** With reuseBridges: the two page buffers split pages are completed in, and the one the last split page took. */
  private readonly bridges: Buffer[] = [];
  private bridgeTurn = 0;
  private warnings: string[] = [];
  readonly stats: MultifdStats = { bytes: 0, packets: 0, syncs: 0, pages: 0, zeroPages: 0, pageBytes: 0 };
  mode: ParserMode = "parsing";
  passthroughReason: string | undefined;
  /** QEMU's multifd channel id, from the initial packet (-1: not yet read). */
  channel = -1;
  constructor(private readonly o: ParserOptions = {}) {}

  push(chunk: Buffer): Piece[] {
    const base = this.stats.bytes;
    this.stats.bytes += chunk.length;
    if (this.state === "passthrough") return chunk.length ? [{ kind: "raw", data: chunk }] : [];
    const out: Piece[] = [];
    let pos = 0;
    let rawFrom = 0;
    const flushRaw = (upTo: number) => { if (upTo > rawFrom) out.push({ kind: "raw", data: chunk.subarray(rawFrom, upTo) }); rawFrom = upTo; };
    while (pos < chunk.length && (this.state as State) !== "passthrough") {
      if (this.state === "pages") {
        flushRaw(pos);
        pos = this.takePages(chunk, pos, out);
        rawFrom = pos;
        continue;
      }
      const n = Math.min(this.need - this.got, chunk.length - pos);
      this.head.set(chunk.subarray(pos, pos + n), this.got);
      this.got += n;
      pos += n;
      if (this.got === this.need) this.headerRead(base + pos);
    }
    flushRaw((this.state as State) === "passthrough" ? chunk.length : pos);
    return out;
  }

  /** Bytes held back: a page not yet whole. */
  get pending(): number {
    return this.partGot;
  }

  takeWarnings(): string[] {
    const w = this.warnings;
    this.warnings = [];
    return w;
  }

  /** Call at the end of the input: throws if it stopped inside a record. */
  finish(): void {
    if (this.state === "passthrough") return;
    if (this.state === "pages" || this.got > 0) {
      const what = this.state === "pages" ? `page ${this.pageIndex + 1} of ${this.packet!.pagesUsed}` : this.state === "init" ? "the initial packet" : "a packet header";
      throw new StreamFormatError(`the multifd channel ended inside ${what} (at stream byte ${this.stats.bytes})`);
    }
  }

  /** Whole pages straight from the chunk; a split one is completed in a slab. Returns the new position. */
  private takePages(chunk: Buffer, pos: number, out: Piece[]): number {
    const p = this.packet!;
    while (this.pageIndex < p.pagesUsed && pos < chunk.length) {
      let data: Buffer;
      if (this.partPage || chunk.length - pos < MULTIFD_PAGE) {
        this.partPage ??= this.o.reuseBridges ? this.nextBridge() : this.slabPage();
        const n = Math.min(MULTIFD_PAGE - this.partGot, chunk.length - pos);
        this.partPage.set(chunk.subarray(pos, pos + n), this.partGot);
        this.partGot += n;
        pos += n;
        if (this.partGot < MULTIFD_PAGE) return pos;
        data = this.partPage;
        this.partPage = null;
        this.partGot = 0;
      } else {
        data = chunk.subarray(pos, pos + MULTIFD_PAGE);
        pos += MULTIFD_PAGE;
      }
      out.push({ kind: "page", header: EMPTY, data, block: p.ramblock, offset: offsetAt(this.head, this.pageIndex) });
      this.pageIndex++;
      this.stats.pages++;
      this.stats.pageBytes += MULTIFD_PAGE;
    }
    if (this.pageIndex === p.pagesUsed) this.nextHeader();
    return pos;
  }

  /** Whether `data` (a page's bytes) lies in a reused bridge, so holds only until the next push(). */
  inBridge(data: Uint8Array): boolean {
    return this.bridges.some((b) => b.buffer === data.buffer);
  }

  /** The bridge the last split page did not take: that page's piece may still be in use until this push() returns. */
  private nextBridge(): Buffer {
    this.bridgeTurn ^= 1;
    return (this.bridges[this.bridgeTurn] ??= Buffer.allocUnsafeSlow(MULTIFD_PAGE));
  }

  private slabPage(): Buffer {
    if (this.slabUsed + MULTIFD_PAGE > this.slab.length) {
      this.slab = Buffer.allocUnsafe(SLAB);
      this.slabUsed = 0;
    }
    this.slabUsed += MULTIFD_PAGE;
    return this.slab.subarray(this.slabUsed - MULTIFD_PAGE, this.slabUsed);
  }

  private nextHeader(): void {
    this.state = "header";
    this.got = 0;
    this.expect(MULTIFD_HEADER_FIXED);
    this.packet = null;
  }

  /** The record in `head` is complete (`at`: stream position after it). */
  private headerRead(at: number): void {
    try {
      if (this.state === "init") return this.initRead();
      if (this.need === MULTIFD_HEADER_FIXED) return this.fixedRead();
      this.packetRead();
    } catch (err) {
      if (err instanceof StreamFormatError) throw new StreamFormatError(`${err.message} (record ending at stream byte ${at})`);
      throw err;
    }
  }

  private initRead(): void {
    const init = decodeInit(this.head.subarray(0, MULTIFD_INIT_BYTES));
    this.channel = init.channel;
    if (init.version !== MULTIFD_VERSION) return this.toPassthrough(`multifd channel version ${init.version} (this parser knows ${MULTIFD_VERSION})`);
    this.nextHeader();
  }

  private fixedRead(): void {
    const f = decodeFixed(this.head.subarray(0, MULTIFD_HEADER_FIXED));
    const comp = compressionOf(f.flags);
    if (comp) return this.toPassthrough(`multifd channel ${this.channel} uses QEMU's own ${comp} compression`);
    const unknown = unknownFlags(f.flags);
    if (unknown) return this.toPassthrough(`multifd channel ${this.channel} sent flags 0x${unknown.toString(16)} this parser does not know`);
    this.expect(packetHeaderBytes(f.pagesAlloc));
  }

  /** The record being read is `n` bytes long (the bytes so far stay). */
  private expect(n: number): void {
    this.need = n;
    if (this.head.length >= n) return;
    const h = Buffer.alloc(n);
    h.set(this.head.subarray(0, this.got));
    this.head = h;
  }

  private packetRead(): void {
    const p = decodePacketHead(this.head.subarray(0, this.need));
    this.stats.packets++;
    if (p.flags & MULTIFD_FLAG.SYNC) this.stats.syncs++;
    this.packet = p;
    this.pageIndex = 0;
    this.got = 0;
    if (p.pagesUsed === 0) this.nextHeader();
    else this.state = "pages";
  }

  private toPassthrough(reason: string): void {
    this.state = "passthrough";
    this.mode = "passthrough";
    this.passthroughReason = reason;
    this.warnings.push(`pagetwin stream: ${reason}; the rest of this channel passes through unchanged (no dedup)`);
  }
}
