// The index file's header: what the index was built from and how fresh it is.
//
// Layout (little-endian). The first 64 bytes are those of version 1:
//   0  magic "PTWINIX1"      8  version u32 (2)     12 block size u32
//   16 seed u64             24 image size u64      32 image mtime ns u64
//   40 image inode u64      48 blocks u32          52 index id (12 random bytes)
// Version 2 goes on:
//   64 generation u64 (0 when built, +1 per refresh)
//   72 hashes offset u32    76 metadata length u32
//   80 metadata: UTF-8 JSON {format, chain, builtAt, refreshedAt, refreshedBy}
// then, at the hashes offset, 16 bytes (canonical XXH3-128) per block.
// size/mtime/inode are the image's identity when the last build or refresh
// started: a different identity now means the image was written since.
// Version 1 files (hashes at 64) still read: generation 0, format raw.

import type { DiskFormat, ImageIdentity } from "./image.js";
export { IndexFormatError } from "../../errors.js";
import { IndexFormatError } from "../../errors.js";

export const MAGIC = "PTWINIX1";
export const VERSION = 2;
const V1_HEADER = 64;
const V2_FIXED = 80;

/** How the index's content was last brought up to date. */
export type RefreshKind = "build" | "dirty-bitmap" | "re-read";

export interface IndexHeader {
  seed: bigint;
  blockSize: number;
  identity: ImageIdentity;
  blocks: number;
  /** Random id of this index, hex; the agents compare it instead of sending the seed. Kept across refreshes. */
  indexId: string;
  /** 1 or 2 as read (always written as 2). */
  version: number;
  /** 0 when built, +1 per refresh. */
  generation: number;
  /** Disk format the blocks were read through ("raw", ...) and the files it was read from, top first. */
  format: string;
  chain: string[];
  /** When the index was first built and last brought up to date (ms since the epoch; 0: unknown). */
  builtAt: number;
  refreshedAt: number;
  refreshedBy: RefreshKind;
  /** File offset of the first block hash. */
  hashesAt: number;
}


/** Decodes a header from the file's first bytes (`b` holds at least the fixed part; `more` reads the rest). */
export function decodeHeader(b: Buffer, path: string, more: (offset: number, length: number) => Buffer): IndexHeader {
  if (b.length < V1_HEADER || b.toString("latin1", 0, 8) !== MAGIC) {
    throw new IndexFormatError(`pagetwin: ${path} is not a pagetwin index (bad magic); delete it and re-index`);
  }
  const version = b.readUInt32LE(8);
  if (version !== 1 && version !== 2) throw new IndexFormatError(`pagetwin: ${path} is index version ${version}, this pagetwin reads versions 1 and 2; re-index`);
  const base = {
    blockSize: b.readUInt32LE(12),
    seed: b.readBigUInt64LE(16),
    identity: { size: Number(b.readBigUInt64LE(24)), mtimeNs: b.readBigUInt64LE(32), ino: b.readBigUInt64LE(40) },
    blocks: b.readUInt32LE(48),
    indexId: b.toString("hex", 52, 64),
    version,
  };
  if (version === 1) {
    return { ...base, generation: 0, format: "raw", chain: [], builtAt: 0, refreshedAt: 0, refreshedBy: "build", hashesAt: V1_HEADER };
  }
  if (b.length < V2_FIXED) throw new IndexFormatError(`pagetwin: ${path} is truncated in its header; re-index`);
  const hashesAt = b.readUInt32LE(72);
  const metaLen = b.readUInt32LE(76);
  if (V2_FIXED + metaLen > hashesAt) throw new IndexFormatError(`pagetwin: ${path} has a corrupt header (metadata past the hashes); re-index`);
  let meta: Partial<{ format: string; chain: string[]; builtAt: number; refreshedAt: number; refreshedBy: RefreshKind }>;
  try {
    meta = JSON.parse(more(V2_FIXED, metaLen).toString("utf8"));
  } catch (err) {
    throw new IndexFormatError(`pagetwin: ${path} has a corrupt header (metadata is not JSON); re-index`, { cause: err });
  }
  return {
    ...base, generation: Number(b.readBigUInt64LE(64)), hashesAt,
    format: typeof meta.format === "string" ? meta.format : "raw",
    chain: Array.isArray(meta.chain) ? meta.chain.filter((c) => typeof c === "string") : [],
    builtAt: Number(meta.builtAt) || 0, refreshedAt: Number(meta.refreshedAt) || 0,
    refreshedBy: meta.refreshedBy === "dirty-bitmap" || meta.refreshedBy === "re-read" ? meta.refreshedBy : "build",
  };
}

/** The header bytes (version 2); sets header.hashesAt (16-byte aligned after the metadata). */
export function encodeHeader(header: IndexHeader): Buffer {
  const meta = Buffer.from(JSON.stringify({
    format: header.format, chain: header.chain, builtAt: header.builtAt, refreshedAt: header.refreshedAt, refreshedBy: header.refreshedBy,
  }), "utf8");
  const hashesAt = Math.ceil((V2_FIXED + meta.length) / 16) * 16;
  const h = Buffer.alloc(hashesAt);
  h.write(MAGIC, 0, "latin1");
  h.writeUInt32LE(VERSION, 8);
  h.writeUInt32LE(header.blockSize, 12);
  h.writeBigUInt64LE(header.seed, 16);
  h.writeBigUInt64LE(BigInt(header.identity.size), 24);
  h.writeBigUInt64LE(header.identity.mtimeNs, 32);
  h.writeBigUInt64LE(header.identity.ino, 40);
  h.writeUInt32LE(header.blocks, 48);
  Buffer.from(header.indexId, "hex").copy(h, 52);
  h.writeBigUInt64LE(BigInt(header.generation), 64);
  h.writeUInt32LE(hashesAt, 72);
  h.writeUInt32LE(meta.length, 76);
  meta.copy(h, V2_FIXED);
  header.hashesAt = hashesAt;
  header.version = VERSION;
  return h;
}

/** What a disk object says it is: GuestDisk readers carry `format` and `chain`; a plain raw image has neither. */
export function diskSource(disk: { path: string; format?: string; chain?: readonly string[] }): { format: string; chain: string[] } {
  return { format: disk.format ?? "raw", chain: disk.chain ? [...disk.chain] : [disk.path] };
}

export function sameIdentity(a: ImageIdentity, b: ImageIdentity): boolean {
  return a.size === b.size && a.mtimeNs === b.mtimeNs && a.ino === b.ino;
}

/** The format the index was read in, for a destination to read the image the same way (null: not one this pagetwin reads; detect). */
export function recordedFormat(header: Pick<IndexHeader, "format">): DiskFormat | null {
  return header.format === "raw" || header.format === "qcow2" ? header.format : null;
}
