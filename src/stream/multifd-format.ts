// QEMU 7.2's multifd channel format (migration/multifd.{c,h}), compression
// "none": decode and encode of the two records a channel carries. All fields
// big-endian, structs packed.
//
//   MultiFDInit_t (once, first):  be32 magic 0x11223344, be32 version 1,
//     16-byte uuid, u8 channel id, 7 + 32 reserved bytes          = 64 bytes
//   MultiFDPacket_t (then, repeated):  be32 magic, be32 version, be32 flags,
//     be32 pages_alloc, be32 pages_used, be32 next_packet_size,
//     be64 packet_num, 32 reserved bytes, 256-byte ramblock name (NUL padded),
//     be64 offset[pages_alloc]                                   = 320 + 8 x pages_alloc
//   followed (compression none) by pages_used x 4096 bytes of page data,
//   or (zlib/zstd) by next_packet_size bytes of compressed data.
//
// QEMU reuses one packet buffer per channel: offsets past pages_used, and the
// ramblock name of a packet without pages, are left over from earlier packets.
// They are kept here as they are, so encode(decode(bytes)) gives back bytes.

import { StreamFormatError } from "../errors.js";

export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_INIT_BYTES = 64;
/** Packet header bytes before the offsets. */
export const MULTIFD_HEADER_FIXED = 320;
export const MULTIFD_PAGE = 4096;
/** Pages per packet a QEMU 7.2 x86 sends and expects (MULTIFD_PACKET_SIZE 512 KiB / 4 KiB pages). */
export const MULTIFD_PAGES_ALLOC = 128;
/** QEMU refuses a packet allocating more than 100 times its own pages per packet. */
export const MULTIFD_PAGES_ALLOC_MAX = MULTIFD_PAGES_ALLOC * 100;

export const MULTIFD_FLAG = { SYNC: 1, COMPRESSION_MASK: 7 << 1, ZLIB: 1 << 1, ZSTD: 2 << 1 } as const;
const KNOWN_FLAGS = MULTIFD_FLAG.SYNC | MULTIFD_FLAG.COMPRESSION_MASK;
const RAMBLOCK_BYTES = 256;

export interface MultifdInit {
  version: number;
  uuid: Buffer;
  channel: number;
  /** The 39 reserved bytes (zero from QEMU 7.2), kept as sent. */
  reserved: Buffer;
}

export interface MultifdPacket {
  version: number;
  flags: number;
  pagesAlloc: number;
  pagesUsed: number;
  nextPacketSize: number;
  packetNum: bigint;
  reserved: Buffer;
  /** The name up to its first NUL (QEMU reads at most 255 bytes of it). */
  ramblock: string;
  /** All pages_alloc offsets; only the first pagesUsed are this packet's pages. */
  offsets: bigint[];
}

/** The channel's first 4 bytes say what kind of connection QEMU opened. */
export type ChannelKind = "main" | "multifd" | "unknown";

export function channelKind(first: Uint8Array): ChannelKind {
  if (first.length < 4) return "unknown";
  const magic = ((first[0]! << 24) | (first[1]! << 16) | (first[2]! << 8) | first[3]!) >>> 0;
  return magic === 0x5145564d ? "main" : magic === MULTIFD_MAGIC ? "multifd" : "unknown";
}

/** Which of QEMU's multifd compressions a packet's flags name (null: none). */
export function compressionOf(flags: number): string | null {
  const c = flags & MULTIFD_FLAG.COMPRESSION_MASK;
  return c === 0 ? null : c === MULTIFD_FLAG.ZLIB ? "zlib" : c === MULTIFD_FLAG.ZSTD ? "zstd" : `method ${c >> 1}`;
}

/** Flag bits QEMU 7.2 does not define (0: none). */
export function unknownFlags(flags: number): number {
  return flags & ~KNOWN_FLAGS;
}

function bad(what: string): never {
  throw new StreamFormatError(`malformed multifd channel: ${what}`);
}

export function decodeInit(b: Uint8Array): MultifdInit {
  if (b.length < MULTIFD_INIT_BYTES) bad(`initial packet of ${b.length} bytes; ${MULTIFD_INIT_BYTES} expected`);
  const v = Buffer.from(b.buffer, b.byteOffset, MULTIFD_INIT_BYTES);
  const magic = v.readUInt32BE(0);
  if (magic !== MULTIFD_MAGIC) bad(`initial packet magic ${magic.toString(16)}, expected ${MULTIFD_MAGIC.toString(16)}`);
  return { version: v.readUInt32BE(4), uuid: Buffer.from(v.subarray(8, 24)), channel: v[24]!, reserved: Buffer.from(v.subarray(25, 64)) };
}

export function encodeInit(m: Pick<MultifdInit, "uuid" | "channel"> & Partial<MultifdInit>): Buffer {
  const b = Buffer.alloc(MULTIFD_INIT_BYTES);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(m.version ?? MULTIFD_VERSION, 4);
  if (m.uuid.length !== 16) throw new RangeError("a multifd uuid has 16 bytes");
  b.set(m.uuid, 8);
  b[24] = m.channel;
  if (m.reserved) b.set(m.reserved.subarray(0, 39), 25);
  return b;
}

/** Bytes of a packet header that allocates `pagesAlloc` pages. */
export function packetHeaderBytes(pagesAlloc: number): number {
  return MULTIFD_HEADER_FIXED + 8 * pagesAlloc;
}

/**
 * The fixed part of a packet header (320 bytes): checked as QEMU 7.2 checks
 * it (magic, version, pages_alloc within its limit, pages_used within
 * pages_alloc), so that the header's full length is known.
 */
export function decodeFixed(b: Uint8Array): Omit<MultifdPacket, "offsets" | "ramblock" | "reserved"> {
  if (b.length < MULTIFD_HEADER_FIXED) bad(`packet header of ${b.length} bytes; ${MULTIFD_HEADER_FIXED} at least`);
  const v = Buffer.from(b.buffer, b.byteOffset, MULTIFD_HEADER_FIXED);
  const magic = v.readUInt32BE(0);
  if (magic !== MULTIFD_MAGIC) bad(`packet magic ${magic.toString(16)}, expected ${MULTIFD_MAGIC.toString(16)}`);
  const version = v.readUInt32BE(4);
  if (version !== MULTIFD_VERSION) bad(`packet version ${version}, expected ${MULTIFD_VERSION}`);
  const pagesAlloc = v.readUInt32BE(12);
  if (pagesAlloc < 1 || pagesAlloc > MULTIFD_PAGES_ALLOC_MAX) bad(`packet allocates ${pagesAlloc} pages; QEMU accepts 1..${MULTIFD_PAGES_ALLOC_MAX}`);
  const pagesUsed = v.readUInt32BE(16);
  if (pagesUsed > pagesAlloc) bad(`packet holds ${pagesUsed} pages but allocates ${pagesAlloc}`);
  return { version, flags: v.readUInt32BE(8), pagesAlloc, pagesUsed, nextPacketSize: v.readUInt32BE(20), packetNum: v.readBigUInt64BE(24) };
}

/** What a packet header says besides its offsets and reserved bytes (read an offset with offsetAt()). */
export type MultifdPacketHead = Omit<MultifdPacket, "offsets" | "reserved">;

/** A whole packet header (its length from pages_alloc), its offsets left in `b`: a parser's per-packet decode, no BigInt per page. */
export function decodePacketHead(b: Uint8Array): MultifdPacketHead {
  const fixed = decodeFixed(b);
  const len = packetHeaderBytes(fixed.pagesAlloc);
  if (b.length < len) bad(`packet header of ${b.length} bytes; it allocates ${fixed.pagesAlloc} pages, so ${len} expected`);
  const name = Buffer.from(b.buffer, b.byteOffset + 64, RAMBLOCK_BYTES - 1);
  const nul = name.indexOf(0);
  const ramblock = name.subarray(0, nul < 0 ? name.length : nul).toString("latin1");
  if (fixed.pagesUsed > 0 && ramblock === "") bad(`packet of ${fixed.pagesUsed} pages names no RAM block`);
  return { ...fixed, ramblock };
}

/** Offset `i` of the packet header `b` (decodePacketHead() checked it), as a number: exact below 2^53, as RAM offsets are. */
export function offsetAt(b: Buffer, i: number): number {
  const o = MULTIFD_HEADER_FIXED + 8 * i;
  return b.readUInt32BE(o) * 2 ** 32 + b.readUInt32BE(o + 4);
}

/** A whole packet header (its length from pages_alloc). */
export function decodePacket(b: Uint8Array): MultifdPacket {
  const head = decodePacketHead(b);
  const v = Buffer.from(b.buffer, b.byteOffset, packetHeaderBytes(head.pagesAlloc));
  const offsets: bigint[] = [];
  for (let i = 0; i < head.pagesAlloc; i++) offsets.push(v.readBigUInt64BE(MULTIFD_HEADER_FIXED + 8 * i));
  return { ...head, reserved: Buffer.from(v.subarray(32, 64)), offsets };
}

export function encodePacket(p: Omit<MultifdPacket, "version" | "reserved" | "nextPacketSize" | "packetNum"> & Partial<MultifdPacket>): Buffer {
  if (p.offsets.length !== p.pagesAlloc) throw new RangeError(`${p.offsets.length} offsets for ${p.pagesAlloc} allocated pages`);
  if (Buffer.byteLength(p.ramblock, "latin1") >= RAMBLOCK_BYTES) throw new RangeError("a RAM block name has at most 255 bytes");
  const b = Buffer.alloc(packetHeaderBytes(p.pagesAlloc));
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(p.version ?? MULTIFD_VERSION, 4);
  b.writeUInt32BE(p.flags, 8);
  b.writeUInt32BE(p.pagesAlloc, 12);
  b.writeUInt32BE(p.pagesUsed, 16);
  b.writeUInt32BE(p.nextPacketSize ?? p.pagesUsed * MULTIFD_PAGE, 20);
  b.writeBigUInt64BE(p.packetNum ?? 0n, 24);
  if (p.reserved) b.set(p.reserved.subarray(0, 32), 32);
  b.write(p.ramblock, 64, "latin1");
  p.offsets.forEach((o, i) => b.writeBigUInt64BE(o, MULTIFD_HEADER_FIXED + 8 * i));
  return b;
}
