// The guest-visible disk of a qcow2 image: guest clusters mapped through the
// L1/L2 tables to the image's own clusters, zero clusters, compressed
// clusters (zlib or zstd), and unallocated clusters read from the backing
// disk (raw or qcow2, to any depth) or as zeros past its end.
//
// A running guest allocates clusters as it writes, so the cached tables are
// dropped when the image file's mtime has moved (looked at most every
// RECHECK_MS, so a busy guest does not cost a table read per block): a stale
// mapping could only give a block that fails its hash check, but fresh tables
// keep twins usable.

import { closeSync, fstatSync, readSync, readvSync } from "node:fs";
import { inflateRawSync } from "node:zlib";
import { dirname, isAbsolute, resolve } from "node:path";
import { ImageFormatError, UnsupportedImageError } from "../../errors.js";
import { zstdPrefixDecoder, zstdUnavailableReason } from "../../codec/compress.js";
import { readQcow2Header, readExact, type Qcow2Header } from "./qcow2-header.js";
import { BLOCK_SIZE, type DiskFormat, type GuestDisk, type ImageIdentity } from "./image.js";

/** Opens a backing disk: `format` from the image's header, or null to detect it. */
export type OpenBacking = (path: string, format: DiskFormat | null) => GuestDisk;

const enum Kind { Data, Zero, Compressed, Backing }

/** Clusters' bytes of L2 tables kept (whole tables; at least 16). */
const L2_CACHE_BYTES = 32 << 20;
const RECHECK_MS = 50;
/** Own bytes between two runs from the backing disk that are read from it anyway (a read fewer costs more than that copy). */
const MERGE_GAP = 64 << 10;
/** Buffers per readv (Linux's IOV_MAX). */
const IOV_MAX = 1024;

export class Qcow2Image implements GuestDisk {
  readonly format = "qcow2" as const;
  readonly size: number;
  readonly backing: GuestDisk | null;
  private fd: number;
  private header: Qcow2Header;
  private l1: Buffer;
  private readonly l2 = new Map<number, Buffer>();
  private readonly l2Max: number;
  private readonly perL2: number;
  private mtimeNs: bigint;
  private checkedAt = performance.now();
  /** Host offset (Data), or the descriptor's high and low 32 bits (Compressed), of the last lookup(). */
  private host = 0;
  private descLo = 0;
  private compressed: { hi: number; lo: number; data: Buffer } | null = null;
  private readonly zstd: ((src: Uint8Array, dst: Uint8Array) => number) | null = null;

  private constructor(readonly path: string, fd: number, header: Qcow2Header, backing: GuestDisk | null) {
    this.fd = fd;
    this.header = header;
    this.size = header.size;
    this.backing = backing;
    this.perL2 = header.clusterSize / 8;
    this.l2Max = Math.max(16, Math.floor(L2_CACHE_BYTES / header.clusterSize));
    this.l1 = this.readL1();
    this.mtimeNs = fstatSync(fd, { bigint: true }).mtimeNs;
    if (header.compression === "zstd") {
      this.zstd = zstdPrefixDecoder();
      if (!this.zstd) throw new UnsupportedImageError(path, "zstd-compressed clusters", `zstd-napi did not load here (${zstdUnavailableReason()})`);
    }
  }

  /** Opens `path` (already known to be qcow2) and its backing chain through `openBacking`. */
  static open(path: string, fd: number, openBacking: OpenBacking): Qcow2Image {
    const header = readQcow2Header(fd, path);
    let backing: GuestDisk | null = null;
    if (header.backingFile !== null) backing = openBacking(backingPath(path, header.backingFile), backingFormat(path, header.backingFormat));
    try {
      return new Qcow2Image(path, fd, header, backing);
    } catch (err) {
      backing?.close();
      throw err;
    }
  }

  get chain(): string[] {
    return [this.path, ...(this.backing?.chain ?? [])];
  }

  get blocks(): number {
    return Math.floor(this.size / BLOCK_SIZE);
  }

  identity(): ImageIdentity {
    const st = fstatSync(this.fd, { bigint: true });
    const below = this.backing?.identity().mtimeNs ?? 0n;
    return { size: this.size, mtimeNs: st.mtimeNs > below ? st.mtimeNs : below, ino: st.ino };
  }

  readBlocks(first: number, count: number, into: Uint8Array): void {
    if ((first + count) * BLOCK_SIZE > this.size) {
      throw new Error(`pagetwin: the disk ${this.path} has ${this.blocks} blocks (wanted blocks ${first}..${first + count - 1})`);
    }
    this.readAt(first * BLOCK_SIZE, into.subarray(0, count * BLOCK_SIZE));
  }

  readAt(offset: number, into: Uint8Array): void {
    this.dropTablesIfChanged();
    const cs = this.header.clusterSize;
    const run = new RunReader(this.fd, this.path, this.backing, into);
    for (let pos = 0; pos < into.length;) {
      const off = offset + pos, within = off % cs;
      const n = Math.min(cs - within, into.length - pos);
      switch (this.lookup(Math.floor(off / cs))) {
        case Kind.Data: run.own(this.host + within, pos, n); break;
        case Kind.Zero: run.direct(); into.fill(0, pos, pos + n); break;
        case Kind.Backing: run.below(off, pos, n); break;
        case Kind.Compressed: run.direct(); into.set(this.decompress(this.host, this.descLo).subarray(within, within + n), pos); break;
      }
      pos += n;
    }
    run.flush();
  }

  fromBacking(block: number): boolean {
    this.dropTablesIfChanged();
    const cs = this.header.clusterSize;
    const last = Math.floor(((block + 1) * BLOCK_SIZE - 1) / cs);
    for (let c = Math.floor((block * BLOCK_SIZE) / cs); c <= last; c++) if (this.lookup(c) !== Kind.Backing) return false;
    return true;
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
    this.backing?.close();
  }

  /** What guest cluster `c` reads as; sets `host` for Data and Compressed. */
  private lookup(c: number): Kind {
    const l1i = Math.floor(c / this.perL2);
    if (l1i >= this.header.l1Size) return Kind.Backing;
    const table = this.l2Table(l1i);
    if (!table) return Kind.Backing;
    const at = (c % this.perL2) * 8;
    const hi = table.readUInt32BE(at), lo = table.readUInt32BE(at + 4);
    if (hi & 0x40000000) {
      this.host = hi & 0x3fffffff; // the compressed descriptor, decoded in decompress()
      this.descLo = lo;
      return Kind.Compressed;
    }
    if (this.header.version === 3 && lo & 1) return Kind.Zero;
    const host = offsetBits(hi, lo);
    if (host === 0) return Kind.Backing;
    this.host = host;
    return Kind.Data;
  }

  private l2Table(l1i: number): Buffer | null {
    const cached = this.l2.get(l1i);
    if (cached) return cached;
    const off = offsetBits(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4));
    if (off === 0) return null;
    const cs = this.header.clusterSize;
    if (off % cs !== 0) throw new ImageFormatError(`pagetwin: ${this.path}: L2 table ${l1i} at ${off} is not cluster-aligned`);
    const table = readExact(this.fd, this.path, off, cs, `L2 table ${l1i}`, true);
    if (this.l2.size >= this.l2Max) this.l2.delete(this.l2.keys().next().value!);
    this.l2.set(l1i, table);
    return table;
  }

  /** One guest cluster from its compressed descriptor (the last one is kept: blocks of a cluster come in turn). */
  private decompress(hi: number, lo: number): Buffer {
    if (this.compressed?.hi === hi && this.compressed.lo === lo) return this.compressed.data;
    const cs = this.header.clusterSize;
    // offset in bits 0..x-1, then the count of 512-byte sectors after the first (62 bits: BigInt, past 2^53)
    const x = BigInt(62 - (this.header.clusterBits - 8));
    const desc = (BigInt(hi) << 32n) | BigInt(lo);
    const offset = Number(desc & ((1n << x) - 1n));
    const sectors = Number(desc >> x) + 1;
    const src = readExact(this.fd, this.path, offset, sectors * 512 - (offset % 512), "a compressed cluster", false);
    let data: Buffer;
    try {
      data = this.header.compression === "zstd" ? this.unzstd(src, cs) : inflateRawSync(src, { maxOutputLength: cs, finishFlush: 2 /* Z_SYNC_FLUSH: the stream may end without its final block */ });
    } catch (err) {
      throw new ImageFormatError(`pagetwin: ${this.path}: the compressed cluster at ${offset} does not decompress: ${(err as Error).message}`, { cause: err });
    }
    if (data.length !== cs) throw new ImageFormatError(`pagetwin: ${this.path}: the compressed cluster at ${offset} decompresses to ${data.length} bytes, not ${cs}`);
    this.compressed = { hi, lo, data };
    return data;
  }

  private unzstd(src: Buffer, cs: number): Buffer {
    const out = Buffer.alloc(cs);
    return out.subarray(0, this.zstd!(src, out));
  }

  private readL1(): Buffer {
    return readExact(this.fd, this.path, this.header.l1Offset, this.header.l1Size * 8, "the L1 table", true);
  }

  private dropTablesIfChanged(): void {
    const now = performance.now();
    if (now - this.checkedAt < RECHECK_MS) return;
    this.checkedAt = now;
    const m = fstatSync(this.fd, { bigint: true }).mtimeNs;
    if (m === this.mtimeNs) return;
    this.mtimeNs = m;
    this.header = readQcow2Header(this.fd, this.path);
    this.l1 = this.readL1();
    this.l2.clear();
    this.compressed = null;
  }
}

/** Bits 9-55 of an L1/L2 entry given as its high and low 32 bits. */
function offsetBits(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
}

/**
 * Gathers the clusters of one readAt() into as few reads as it can: the
 * image's own clusters that follow each other in the file go in one readv,
 * wherever they land in the guest range (an image converted or written in
 * order keeps its data clusters in order, with the guest's holes left out);
 * guest ranges that go to the backing disk are read a run at a time, a run
 * spanning short gaps of own clusters, which are read after it, over it.
 */
class RunReader {
  /** File offset where the pending own run starts and ends; its destinations as [pos, len] pairs. */
  private hostFrom = 0;
  private hostEnd = -1;
  private readonly dest: number[] = [];
  private belowFrom = 0;
  private belowPos = 0;
  private belowLen = 0;

  constructor(private readonly fd: number, private readonly path: string, private readonly backing: GuestDisk | null, private readonly into: Uint8Array) {}

  own(host: number, pos: number, n: number): void {
    const d = this.dest, k = d.length;
    if (host !== this.hostEnd || k >= 2 * IOV_MAX) {
      this.readBelow(); // its run may span own clusters: it is read before them
      this.readOwn();
      this.hostFrom = host;
    } else if (d[k - 2]! + d[k - 1]! === pos) {
      d[k - 1]! += n;
      this.hostEnd += n;
      return;
    }
    d.push(pos, n);
    this.hostEnd = host + n;
  }

  below(guest: number, pos: number, n: number): void {
    // a short gap of own clusters is read from below too (then over it): one read fewer
    const gap = pos - (this.belowPos + this.belowLen);
    if (this.belowLen > 0 && this.belowFrom - this.belowPos === guest - pos && gap <= MERGE_GAP) {
      this.belowLen += gap + n;
      return;
    }
    this.readBelow();
    this.belowFrom = guest;
    this.belowPos = pos;
    this.belowLen = n;
  }

  /** The caller is about to write at the current position itself: no run from below may span it. */
  direct(): void {
    this.readBelow();
  }

  flush(): void {
    this.readBelow();
    this.readOwn();
  }

  private readOwn(): void {
    const d = this.dest;
    if (d.length === 0) return;
    const bufs: Uint8Array[] = [];
    for (let i = 0; i < d.length; i += 2) bufs.push(this.into.subarray(d[i]!, d[i]! + d[i + 1]!));
    let done = readvSync(this.fd, bufs, this.hostFrom);
    // a short readv (a signal, the file's end) goes on buffer by buffer
    let at = this.hostFrom;
    for (const b of bufs) {
      if (done < b.length) this.readFully(b.subarray(done), at + done);
      done = Math.max(0, done - b.length);
      at += b.length;
    }
    d.length = 0;
    this.hostEnd = -1;
  }

  private readFully(b: Uint8Array, from: number): void {
    for (let got = 0; got < b.length;) {
      const n = readSync(this.fd, b, got, b.length - got, from + got);
      if (n === 0) throw new ImageFormatError(`pagetwin: ${this.path}: a data cluster at ${from + got} lies past the end of the file`);
      got += n;
    }
  }

  /** Guest bytes the backing disk has, zeros past its end (or with no backing disk). */
  private readBelow(): void {
    const len = this.belowLen;
    if (len === 0) return;
    const has = this.backing ? Math.max(0, Math.min(len, this.backing.size - this.belowFrom)) : 0;
    if (has > 0) this.backing!.readAt(this.belowFrom, this.into.subarray(this.belowPos, this.belowPos + has));
    this.into.fill(0, this.belowPos + has, this.belowPos + len);
    this.belowLen = 0;
  }
}

/** A backing file name as QEMU resolves it: relative to the overlay's directory. */
function backingPath(overlay: string, name: string): string {
  if (name.startsWith("json:") || /^[a-z][a-z0-9+.-]*:\/\//i.test(name)) {
    throw new UnsupportedImageError(overlay, `a backing file given as a protocol or JSON (${name})`, "only backing files on a file system are read");
  }
  return isAbsolute(name) ? name : resolve(dirname(overlay), name);
}

function backingFormat(overlay: string, format: string | null): DiskFormat | null {
  if (format === null || format === "raw" || format === "qcow2") return format;
  throw new UnsupportedImageError(overlay, `a backing file in format ${format}`, "only raw and qcow2 backing files are read");
}
