// Incremental parser of QEMU 7.2's migration stream (savevm format version 3),
// as far as the RAM section goes. It is fed the bytes as they come off the
// socket (a record may be split anywhere) and hands out, in order:
//   - raw pieces: bytes to forward unchanged;
//   - page records: a RAM PAGE record's header (be64 offset|flags, plus the
//     block idstr when CONTINUE is absent) and its 4096 bytes of content.
// Concatenating every piece in order gives back the input byte for byte.
//
// Format (QEMU migration/savevm.c, migration/ram.c):
//   be32 magic "QEVM", be32 version 3
//   0x07 configuration: be32 len, machine name; subsections (0x05 ...)
//   0x01 START / 0x04 FULL: be32 section id, u8 len + idstr, be32 instance, be32 version
//   0x02 PART / 0x03 END: be32 section id
//   0x7e footer: be32 section id         0x05 EOF        0x08 COMMAND: be16 cmd, be16 len, data
//   RAM section content: records be64 (offset | flags):
//     MEM_SIZE 0x04 (START only): block list (u8 len + idstr, be64 length) until the sizes sum up
//     ZERO 0x02 (+1 fill byte), PAGE 0x08 (+4096 bytes); without CONTINUE 0x20: u8 len + idstr first
//     EOS 0x10 ends the section's records.
// After the RAM END section (device state, FULL sections without a length
// field), and for anything this parser does not know how to rewrite safely,
// the rest of the stream is handed out raw.

export const QEVM_MAGIC = 0x5145564d;
export const QEVM_VERSION = 3;
export const TARGET_PAGE = 4096;
/** Bytes of a new chunk joined to a split record's held-back bytes. */
const BRIDGE = 8192;
/**
 * Bridges are carved from slabs this big: an allocation per split record
 * (nearly one per socket read) cost stream-out about 5% of its time.
 */
const SLAB = 1 << 20;
/**
 * Longest RAM block list (MEM_SIZE record) read; one whose sizes have not
 * added up by then switches the parser to pass-through.
 */
export const BLOCK_LIST_MAX = 64 * 1024;

export const SEC = {
  START: 0x01, PART: 0x02, END: 0x03, FULL: 0x04, EOF: 0x05, SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06, CONFIGURATION: 0x07, COMMAND: 0x08, FOOTER: 0x7e,
} as const;

export const RAM_FLAG = {
  FULL: 0x01, ZERO: 0x02, MEM_SIZE: 0x04, PAGE: 0x08, EOS: 0x10, CONTINUE: 0x20,
  XBZRLE: 0x40, HOOK: 0x80, COMPRESS_PAGE: 0x100, MULTIFD_FLUSH: 0x200,
} as const;

/** QEMU's MIG_CMD_* (migration/savevm.c); the ones that are safe to forward mid-RAM. */
const CMD_OPEN_RETURN_PATH = 1;
const CMD_PING = 2;
/**
 * Sent before the RAM section when the postcopy-ram capability is on (libvirt's --postcopy, Nova's
 * live_migration_permit_post_copy), whether or not postcopy ever starts: the pre-copy that follows is the usual
 * format. Its data: be64 the OR of every RAM block's page size, be64 the target page size (none when only
 * dirty bitmaps use postcopy).
 */
const CMD_POSTCOPY_ADVISE = 3;
const CMD_NAMES: Record<number, string> = {
  1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN", 5: "POSTCOPY_RUN",
  6: "POSTCOPY_RAM_DISCARD", 7: "POSTCOPY_RESUME", 8: "PACKAGED", 9: "RECV_BITMAP", 10: "ENABLE_COLO",
};

/** ENCODING_FLAG_XBZRLE, the one encoding of an XBZRLE record's delta. */
const XBZRLE_ENCODING = 1;

export { StreamFormatError } from "../errors.js";
import { StreamFormatError } from "../errors.js";

export interface RawPiece {
  kind: "raw";
  data: Buffer;
}

export interface PagePiece {
  kind: "page";
  /** The record header exactly as sent: be64 offset|flags [+ u8 len + idstr]. */
  header: Buffer;
  /** The page's 4096 bytes. */
  data: Buffer;
  /** RAM block the page belongs to and its offset in the block. */
  block: string;
  offset: number;
}

export type Piece = RawPiece | PagePiece;

export type ParserMode =
  /** Still parsing: RAM records are recognized. */
  | "parsing"
  /** The RAM END section is over: device state and the rest go through raw. */
  | "done"
  /** Something this parser cannot rewrite safely: the rest goes through raw. */
  | "passthrough";

export interface ParserStats {
  bytes: number;
  sections: number;
  ramSections: number;
  pages: number;
  zeroPages: number;
  pageBytes: number;
  /** XBZRLE records, handed on raw. */
  xbzrlePages: number;
}

type State =
  | "header" | "top" | "configName" | "configSub" | "sectionHead" | "ramRecord"
  | "blockList" | "footerOrTop" | "passthrough";

/** A MEM_SIZE block list being read entry by entry. */
interface BlockList {
  /** Total bytes of RAM the record announced. */
  announced: number;
  /** Announced bytes not yet covered by a block. */
  left: number;
  found: Map<string, number>;
  /** Bytes of the list read so far. */
  bytes: number;
}

export interface ParserOptions {
  /**
   * Complete split records in two bridge buffers used in turn instead of
   * fresh slabs: a piece in a bridge then holds only until the next push()
   * (inBridge() tells). Fresh memory for every bridge cost stream-out more in
   * page faults than all of its parsing in the stream replay.
   */
  reuseBridges?: boolean;
}

/**
 * Push chunks, get pieces. Throws StreamFormatError on input that cannot be a
 * QEMU stream of the kind it started as (the caller should end the migration).
 */
export class QemuStreamParser {
  private buf: Buffer = Buffer.alloc(0);
  private pos = 0;
  private slab: Buffer = Buffer.alloc(0);
  private slabUsed = 0;
  /** With reuseBridges: the two bridge buffers, and the one the last join() wrote. */
  private readonly bridges: Buffer[] = [];
  private bridgeTurn = 0;
  private state: State = "header";
  private pieces: Piece[] = [];
  private rawFrom = 0;
  /** run() stops at the first record boundary at or past this position. */
  private limit = Infinity;
  private ramSectionId = -1;
  /** Id of the section whose records are being read. */
  private curSection = -1;
  private curIsEnd = false;
  private blocks = new Map<string, number>();
  private curBlock: string | null = null;
  private blockList: BlockList | null = null;
  private warnings: string[] = [];
  /** Footer expected after this section's records (0x7e + be32 id), if any. */
  private footerFor = -1;
  readonly stats: ParserStats = { bytes: 0, sections: 0, ramSections: 0, pages: 0, zeroPages: 0, pageBytes: 0, xbzrlePages: 0 };
  mode: ParserMode = "parsing";
  /** Why the parser went to pass-through (undefined otherwise). */
  passthroughReason: string | undefined;
  /** Machine type from the configuration section. */
  machine: string | undefined;
  /**
   * Called for each RAM page and ZERO record in stream order, as it is
   * parsed (a trace's page map: no piece carries ZERO records); `final`: in
   * the RAM END section, with the guest stopped.
   */
  onRecord: ((block: string, offset: number, zero: boolean, final: boolean) => void) | null = null;
  /** Called as a RAM section's records begin (a trace's rounds); `final`: the RAM END section. */
  onRamSection: ((final: boolean) => void) | null = null;

  /**
   * The caller reuses each chunk's memory once push() returns (a socket's one
   * read buffer): the pieces are used before that, and the parser copies what
   * it holds back. Set before the first such push().
   */
  inputReused = false;

  constructor(private readonly o: ParserOptions = {}) {}

  /** RAM blocks and their sizes in bytes, in the stream's order, once the block list was read. */
  get ramBlocks(): ReadonlyMap<string, number> {
    return this.blocks;
  }

  /** Feed one chunk; returns the pieces it completes (raw pieces may be coalesced). */
  push(chunk: Buffer): Piece[] {
    const out = this.pushChunk(chunk);
    // the bytes of a record split across reads are held back; the caller is about to overwrite them
    if (this.inputReused && this.pos < this.buf.length && this.buf.buffer === chunk.buffer) {
      this.buf = Buffer.from(this.buf.subarray(this.pos));
      this.pos = this.rawFrom = 0;
    }
    return out;
  }

  private pushChunk(chunk: Buffer): Piece[] {
    this.stats.bytes += chunk.length;
    if (this.state === "passthrough") {
      return chunk.length ? [{ kind: "raw", data: chunk }] : [];
    }
    this.pieces = [];
    const restLen = this.buf.length - this.pos;
    if (restLen > 0) {
      // A record is split across reads: finish it in a small bridge buffer
      // (the held-back bytes + the head of this chunk), then go on in the
      // chunk itself, so that big chunks are never copied.
      const head = Math.min(chunk.length, BRIDGE);
      this.buf = this.join(this.buf.subarray(this.pos), chunk.subarray(0, head));
      this.pos = 0;
      this.rawFrom = 0;
      this.limit = restLen;
      this.run();
      this.limit = Infinity;
      this.flushRaw(this.pos);
      if ((this.state as State) === "passthrough") {
        const out = this.takePieces(); // with the rest of the bridge
        if (head < chunk.length) out.push({ kind: "raw", data: chunk.subarray(head) });
        return out;
      }
      if (this.pos >= restLen) {
        const off = this.pos - restLen;
        this.buf = chunk;
        this.pos = off;
        this.rawFrom = off;
      } else if (head < chunk.length) {
        // The record is longer than the bridge (e.g. a long block list): join it all.
        this.buf = Buffer.concat([this.buf.subarray(this.pos), chunk.subarray(head)]);
        this.pos = 0;
        this.rawFrom = 0;
      } else {
        return this.takePieces(); // the whole chunk was in the bridge
      }
    } else {
      this.buf = chunk;
      this.pos = 0;
      this.rawFrom = 0;
    }
    this.run();
    return this.takePieces();
  }

  /**
   * `a` and `b` in one buffer. Pieces handed out point into it (the replay
   * window keeps pages as views), so a slab's bytes are never reused: a new
   * slab is taken when one is used up, and the old one lives while they do.
   */
  private join(a: Uint8Array, b: Uint8Array): Buffer {
    const n = a.length + b.length;
    if (n > SLAB / 8) return Buffer.concat([a, b]);
    if (this.o.reuseBridges) return this.reusedBridge(a, b, n);
    if (this.slabUsed + n > this.slab.length) {
      this.slab = Buffer.allocUnsafe(SLAB);
      this.slabUsed = 0;
    }
    const out = this.slab.subarray(this.slabUsed, this.slabUsed + n);
    out.set(a, 0);
    out.set(b, a.length);
    this.slabUsed += (n + 7) & ~7;
    return out;
  }

  /**
   * `a` and `b` in the bridge the last join() did not write: `a` (the held-back
   * bytes) may lie in that one, when a record spans three reads.
   */
  private reusedBridge(a: Uint8Array, b: Uint8Array, n: number): Buffer {
    this.bridgeTurn ^= 1;
    const bridge = (this.bridges[this.bridgeTurn] ??= Buffer.allocUnsafe(SLAB / 8));
    const out = bridge.subarray(0, n);
    out.set(a, 0);
    out.set(b, a.length);
    return out;
  }

  /** Whether `data` (a piece's bytes) lies in a reused bridge, so holds only until the next push(). */
  inBridge(data: Uint8Array): boolean {
    return this.bridges.some((b) => b.buffer === data.buffer);
  }

  private takePieces(): Piece[] {
    // Everything before `pos` is decided: flush it as raw (pages already out).
    this.flushRaw(this.pos);
    const out = this.pieces;
    this.pieces = [];
    if ((this.state as State) === "passthrough" && this.pos < this.buf.length) {
      out.push({ kind: "raw", data: this.buf.subarray(this.pos) });
      this.pos = this.buf.length;
    }
    return out;
  }

  /** Bytes held back because they do not yet make a whole record. */
  get pending(): number {
    return this.buf.length - this.pos;
  }

  /** Warnings collected so far (pass-through reasons). */
  takeWarnings(): string[] {
    const w = this.warnings;
    this.warnings = [];
    return w;
  }

  /** Call at the end of the input: throws if it stopped inside a record. */
  finish(): void {
    if (this.state !== "passthrough" && this.pending > 0) {
      throw new StreamFormatError(`the migration stream ended inside a record (${this.pending} bytes of an incomplete ${this.state} record, at stream byte ${this.stats.bytes - this.pending})`);
    }
  }

  private flushRaw(upTo: number): void {
    if (upTo > this.rawFrom) this.pieces.push({ kind: "raw", data: this.buf.subarray(this.rawFrom, upTo) });
    this.rawFrom = upTo;
  }

  private toPassthrough(reason: string, mode: ParserMode = "passthrough"): void {
    this.state = "passthrough";
    this.mode = mode;
    if (mode === "passthrough") {
      this.passthroughReason = reason;
      this.warnings.push(`pagetwin stream: ${reason}; the rest of this migration passes through unchanged (no dedup)`);
    }
  }

  private malformed(what: string, at = this.pos): never {
    throw new StreamFormatError(`malformed QEMU migration stream at byte ${this.stats.bytes - (this.buf.length - at)}: ${what}`);
  }

  private avail(n: number, from = this.pos): boolean {
    return this.buf.length - from >= n;
  }

  private run(): void {
    for (;;) {
      if (this.state === "passthrough" || this.pos >= this.limit) return;
      if (!this.step()) return;
    }
  }

  /** One item in the current state; false when more bytes are needed (or the stream went passthrough). */
  private step(): boolean {
    switch (this.state) {
      case "header": return this.header();
      case "top":
      case "footerOrTop": return this.footerOrTop();
      case "configName": return this.configName();
      case "configSub": return this.configSub();
      case "ramRecord": return this.ramRecord();
      case "blockList": return this.blockListEntry();
      // section heads are read whole in top(); passthrough ends run()
      case "sectionHead":
      case "passthrough": return false;
    }
  }

  private header(): boolean {
    const b = this.buf;
    if (!this.avail(8)) return false;
    const magic = b.readUInt32BE(this.pos);
    const version = b.readUInt32BE(this.pos + 4);
    if (magic !== QEVM_MAGIC) {
      const hex = b.toString("hex", this.pos, this.pos + 4);
      this.toPassthrough(magic === 0x11223344 ? "a multifd channel (its pages are not rewritten)" : `not a QEMU savevm stream (starts with 0x${hex})`);
      return false;
    }
    if (version !== QEVM_VERSION) {
      this.toPassthrough(`savevm stream version ${version} (this parser knows version ${QEVM_VERSION})`);
      return false;
    }
    this.pos += 8;
    this.state = "top";
    return true;
  }

  /** A section's footer (when one is due) or the next top-level item. */
  private footerOrTop(): boolean {
    const b = this.buf;
    if (!this.avail(1)) return false;
    const t = b[this.pos]!;
    if (this.state === "footerOrTop" && t === SEC.FOOTER) {
      if (!this.avail(5)) return false;
      const id = b.readUInt32BE(this.pos + 1);
      if (id !== this.footerFor) this.malformed(`section footer names section ${id}, expected ${this.footerFor}`);
      this.pos += 5;
      this.afterSection();
      return true;
    }
    if (this.state === "footerOrTop") {
      this.afterSection(); // stream without section footers
      if ((this.state as State) !== "top") return true;
    }
    return this.top(t);
  }

  private configName(): boolean {
    const b = this.buf;
    if (!this.avail(5)) return false;
    const len = b.readUInt32BE(this.pos + 1);
    if (len > 256) this.malformed(`configuration machine name of ${len} bytes`);
    if (!this.avail(5 + len)) return false;
    this.machine = b.toString("latin1", this.pos + 5, this.pos + 5 + len);
    this.pos += 5 + len;
    this.state = "configSub";
    return true;
  }

  /** One subsection of the configuration section: the ones QEMU 7.2 sends are checked, any other goes passthrough. */
  private configSub(): boolean {
    const b = this.buf;
    if (!this.avail(1)) return false;
    if (b[this.pos] !== SEC.SUBSECTION) {
      this.state = "top";
      return true;
    }
    if (!this.avail(2)) return false;
    const nlen = b[this.pos + 1]!;
    if (!this.avail(2 + nlen + 4)) return false;
    const name = b.toString("latin1", this.pos + 2, this.pos + 2 + nlen);
    const p = this.configField(name, this.pos + 2 + nlen + 4);
    if (p < 0) return false;
    this.pos = p;
    return true;
  }

  /** The body of configuration subsection `name` at `p`: where it ends, or -1 (more bytes needed, or passthrough). */
  private configField(name: string, p: number): number {
    const b = this.buf;
    if (name === "configuration/target-page-bits") {
      if (!this.avail(4, p)) return -1;
      const bits = b.readUInt32BE(p);
      if (bits === 12) return p + 4;
      this.toPassthrough(`target page size 2^${bits} (not 4096)`);
      return -1;
    }
    if (name === "configuration/capabilities") {
      if (!this.avail(4, p)) return -1;
      const count = b.readUInt32BE(p);
      p += 4;
      const caps: string[] = [];
      for (let i = 0; i < count; i++) {
        if (!this.avail(1, p)) return -1;
        const l = b[p]!;
        if (!this.avail(1 + l, p)) return -1;
        caps.push(b.toString("latin1", p + 1, p + 1 + l));
        p += 1 + l;
      }
      if (!caps.length) return p;
      this.pos = p;
      this.toPassthrough(`migration capabilities ${caps.join(", ")} in use`);
      return -1;
    }
    if (name === "configuration/uuid") return this.avail(16, p) ? p + 16 : -1;
    this.toPassthrough(`unknown configuration subsection "${name}"`);
    return -1;
  }

  /** One top-level item starting with type byte `t`; false if more bytes are needed. */
  private top(t: number): boolean {
    const b = this.buf;
    const p = this.pos;
    switch (t) {
      case SEC.CONFIGURATION:
        this.state = "configName";
        return true;
      case SEC.START:
      case SEC.FULL: {
        if (!this.avail(6)) return false;
        const id = b.readUInt32BE(p + 1);
        const len = b[p + 5]!;
        if (!this.avail(6 + len + 8)) return false;
        const idstr = b.toString("latin1", p + 6, p + 6 + len);
        const version = b.readUInt32BE(p + 6 + len + 4);
        this.stats.sections++;
        if (t === SEC.FULL) {
          this.toPassthrough(`device section "${idstr}" before the RAM section ended`);
          return false;
        }
        if (idstr !== "ram") {
          this.toPassthrough(`iterative section "${idstr}" (only "ram" is understood)`);
          return false;
        }
        if (version !== 4) {
          this.toPassthrough(`RAM section version ${version} (this parser knows version 4)`);
          return false;
        }
        if (this.ramSectionId >= 0) this.malformed(`a second RAM START section (id ${id})`);
        this.ramSectionId = id;
        this.pos = p + 6 + len + 8;
        this.enterRam(id, false);
        return true;
      }
      case SEC.PART:
      case SEC.END: {
        if (!this.avail(5)) return false;
        const id = b.readUInt32BE(p + 1);
        this.stats.sections++;
        if (id !== this.ramSectionId) {
          if (this.ramSectionId < 0) this.malformed(`section ${t === SEC.PART ? "PART" : "END"} ${id} before any START`);
          this.toPassthrough(`section ${id} is not the RAM section ${this.ramSectionId}`);
          return false;
        }
        this.pos = p + 5;
        this.enterRam(id, t === SEC.END);
        return true;
      }
      case SEC.COMMAND: {
        if (!this.avail(5)) return false;
        const cmd = b.readUInt16BE(p + 1);
        const len = b.readUInt16BE(p + 3);
        if (cmd !== CMD_OPEN_RETURN_PATH && cmd !== CMD_PING && cmd !== CMD_POSTCOPY_ADVISE) {
          this.toPassthrough(`migration command ${CMD_NAMES[cmd] ?? cmd} (postcopy, COLO and packaged streams are not rewritten)`);
          return false;
        }
        if (!this.avail(5 + len)) return false;
        // with RAM blocks in pages bigger than the host's, postcopy adds each one's page size to the block list
        const pageSizes = cmd === CMD_POSTCOPY_ADVISE && len >= 8 ? b.readBigUInt64BE(p + 5) : BigInt(TARGET_PAGE);
        if (pageSizes !== BigInt(TARGET_PAGE)) {
          this.toPassthrough(`postcopy with RAM in pages of 0x${pageSizes.toString(16)} bytes (QEMU's page size summary; only 4 KiB pages are rewritten)`);
          return false;
        }
        this.pos = p + 5 + len;
        return true;
      }
      case SEC.EOF:
        this.toPassthrough("end of stream", "done");
        return false;
      default:
        this.toPassthrough(`unknown section type 0x${t.toString(16)}`);
        return false;
    }
  }

  private enterRam(id: number, isEnd: boolean): void {
    this.curSection = id;
    this.curIsEnd = isEnd;
    this.stats.ramSections++;
    this.state = "ramRecord";
    this.onRamSection?.(isEnd);
  }

  private afterSection(): void {
    this.state = "top";
    if (this.curIsEnd) {
      // RAM is complete; device state follows (no length fields).
      this.toPassthrough("RAM END section complete", "done");
    }
  }

  /**
   * One entry of the block list (u8 len, idstr, be64 used_length); the list
   * ends when the lengths add up. False if more bytes are needed.
   */
  private blockListEntry(): boolean {
    const list = this.blockList!;
    if (list.left === 0) {
      for (const [k, v] of list.found) this.blocks.set(k, v);
      this.blockList = null;
      this.state = "ramRecord";
      return true;
    }
    const b = this.buf;
    const q = this.pos;
    if (!this.avail(1)) return false;
    const size = 1 + b[q]! + 8;
    if (list.bytes + size > BLOCK_LIST_MAX) {
      this.toPassthrough(`RAM block list longer than ${BLOCK_LIST_MAX} bytes (its block sizes have not added up to the ${list.announced} bytes announced)`);
      return false;
    }
    if (!this.avail(size)) return false;
    const id = b.toString("latin1", q + 1, q + size - 8);
    const len = b.readUInt32BE(q + size - 8) * 0x100000000 + b.readUInt32BE(q + size - 4);
    if (len > list.left || len === 0) this.malformed(`RAM block "${id}" of ${len} bytes does not fit the ${list.announced} bytes announced`, q);
    list.found.set(id, len);
    list.left -= len;
    list.bytes += size;
    this.pos = q + size;
    return true;
  }

  /** One RAM record; false if more bytes are needed. */
  private ramRecord(): boolean {
    const b = this.buf;
    const p = this.pos;
    if (!this.avail(8)) return false;
    const hi = b.readUInt32BE(p);
    const lo = b.readUInt32BE(p + 4);
    const flags = lo & 0xfff;
    const offset = hi * 0x100000000 + (lo - flags);
    if (flags & ~(RAM_FLAG.ZERO | RAM_FLAG.MEM_SIZE | RAM_FLAG.PAGE | RAM_FLAG.EOS | RAM_FLAG.CONTINUE | RAM_FLAG.XBZRLE)) {
      const names = Object.entries(RAM_FLAG).filter(([, v]) => flags & v).map(([k]) => k).join("|");
      this.toPassthrough(`RAM record with flags 0x${flags.toString(16)} (${names}): compression, RDMA and multifd streams are not rewritten`);
      return false;
    }
    if (flags === RAM_FLAG.EOS) {
      this.pos = p + 8;
      this.footerFor = this.curSection;
      this.state = "footerOrTop";
      return true;
    }
    if (flags === RAM_FLAG.MEM_SIZE) {
      // The block list is read one entry per step (blockListEntry), so a long
      // list split over many reads is never held back or parsed again whole.
      this.pos = p + 8;
      this.blockList = { announced: offset, left: offset, found: new Map(), bytes: 0 };
      this.state = "blockList";
      return true;
    }
    const isPage = flags & RAM_FLAG.PAGE;
    const isZero = flags & RAM_FLAG.ZERO;
    const isDelta = flags & RAM_FLAG.XBZRLE;
    if ((isPage ? 1 : 0) + (isZero ? 1 : 0) + (isDelta ? 1 : 0) !== 1 || flags & (RAM_FLAG.EOS | RAM_FLAG.MEM_SIZE)) {
      this.malformed(`RAM record with an invalid flag combination 0x${flags.toString(16)}`);
    }
    let q = p + 8;
    let block = this.curBlock;
    if (!(flags & RAM_FLAG.CONTINUE)) {
      if (!this.avail(9)) return false;
      const l = b[q]!;
      if (!this.avail(9 + l)) return false;
      block = b.toString("latin1", q + 1, q + 1 + l);
      q += 1 + l;
    } else if (block === null) {
      this.malformed("RAM record with CONTINUE before any block was named");
    }
    const blockLen = this.blocks.get(block!);
    if (blockLen === undefined) this.malformed(`RAM record for unknown block "${block}"`);
    if (offset + TARGET_PAGE > blockLen) this.malformed(`RAM record at offset 0x${offset.toString(16)} past the end of block "${block}" (${blockLen} bytes)`);
    if (isDelta) return this.xbzrleRecord(q, block!);
    const bodyLen = isPage ? TARGET_PAGE : 1;
    if (!this.avail(q - p + bodyLen)) return false;
    this.curBlock = block;
    if (isZero) {
      this.stats.zeroPages++;
      this.onRecord?.(block!, offset, true, this.curIsEnd);
      this.pos = q + 1;
      return true;
    }
    // A page: flush raw bytes up to it, then hand it out.
    this.flushRaw(p);
    this.pieces.push({ kind: "page", header: b.subarray(p, q), data: b.subarray(q, q + TARGET_PAGE), block: block!, offset });
    this.onRecord?.(block!, offset, false, this.curIsEnd);
    this.stats.pages++;
    this.stats.pageBytes += q - p + TARGET_PAGE;
    this.pos = q + TARGET_PAGE;
    this.rawFrom = this.pos;
    return true;
  }

  /**
   * An XBZRLE record (the xbzrle capability, libvirt's --compressed): a page QEMU sent before, as its delta
   * against that earlier content (u8 encoding 1, be16 length, at most a page of delta). It goes on raw, as the
   * destination needs it, and the records after it are read as usual. `q`: where its body starts.
   */
  private xbzrleRecord(q: number, block: string): boolean {
    const b = this.buf;
    if (!this.avail(q - this.pos + 3)) return false;
    const len = b.readUInt16BE(q + 1);
    if (b[q] !== XBZRLE_ENCODING || len > TARGET_PAGE) this.malformed(`XBZRLE record with encoding ${b[q]} and ${len} bytes of delta (QEMU sends encoding 1, at most ${TARGET_PAGE} bytes)`);
    if (!this.avail(q - this.pos + 3 + len)) return false;
    this.curBlock = block;
    this.stats.xbzrlePages++;
    this.pos = q + 3 + len;
    return true;
  }
}
