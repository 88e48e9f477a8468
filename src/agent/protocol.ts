// Agent mode's frames, protocol version 4 (see docs/PROTOCOL.md), in the
// envelope of wire/envelope.ts. Binary payloads are big-endian; control
// frames carry a UTF-8 JSON object. Authentication is the channel's (TLS).

import { PAGE_SIZE } from "../core/engine.js";
import { FRAME_OVERHEAD, TRAILER, ProtocolError, seal, type Frame } from "../wire/envelope.js";
import type { FrameSet } from "../link/channel.js";

export const PROTOCOL_VERSION = 4;
export const MAX_FRAME = 8 * 1024 * 1024 + 64;
export const REF_SIZE = 24; // page u32, block u32, hash 16
/** Most references one Refs frame may hold. */
export const MAX_REFS = 4096;

export enum FrameType {
  Hello = 1,      // src -> dst, JSON
  HelloAck = 2,   // dst -> src, JSON
  Pages = 3,      // src -> dst: u32 count, count x u32 page, count x 4096 bytes
  Refs = 4,       // src -> dst: u32 count, count x (u32 page, u32 block, 16-byte hash)
  Zeros = 5,      // src -> dst: u32 count, count x u32 page
  IterEnd = 6,    // src -> dst, JSON {iteration, final}
  IterAck = 7,    // dst -> src: u32 iteration, u32 count, count x u32 page to resend
  Switchover = 8, // src -> dst, JSON {digest}
  Done = 9,       // dst -> src, JSON {ok, digest, error?}: the destination's own verdict
  Abort = 10,     // either way, JSON {reason}
  // 11 was Auth (protocol 2's challenge answer): TLS authenticates now
  CompressedPages = 12, // src -> dst: u8 algorithm, u32 count, count x u32 page, compressed count x 4096 bytes
  Device = 13,    // src -> dst: bytes of QEMU's device-state stream, for the destination QEMU (after Done)
  DeviceEnd = 14, // src -> dst, JSON {}: the source QEMU closed its device-state stream
  DeviceDone = 15, // dst -> src, JSON {ok, error?}: the destination QEMU has the whole device state
  Credit = 16,    // dst -> src: u64 bytes of the source's frames received so far (the source times the link on them)
}

export const AGENT_FRAMES: FrameSet = {
  maxFrame: MAX_FRAME,
  known: (t) => t in FrameType,
  name: (t) => FrameType[t] ?? `#${t}`,
};

/** Most pages one CompressedPages frame may hold (its data decompresses to at most 8 MiB). */
export const MAX_COMPRESSED_PAGES = 2048;

/** Pages frame: the page list and the page bytes, built in one allocation. */
export function encodePages(pages: ArrayLike<number>, bytesOf: (i: number) => Uint8Array): Buffer {
  const n = pages.length;
  const b = Buffer.allocUnsafe(FRAME_OVERHEAD + 4 + 4 * n + PAGE_SIZE * n);
  b[4] = FrameType.Pages;
  b.writeUInt32BE(n, 5);
  for (let i = 0; i < n; i++) b.writeUInt32BE(pages[i]!, 9 + 4 * i);
  const data = 9 + 4 * n;
  for (let i = 0; i < n; i++) b.set(bytesOf(i), data + i * PAGE_SIZE);
  return seal(b);
}

/** Pages per Pages frame unless the source is told otherwise. */
export const DEFAULT_FRAME_PAGES = 256;

/** Bytes encodePagesMaybeCompressed allocates for a frame of `n` pages. */
export function pagesFrameSize(n: number): number {
  return FRAME_OVERHEAD + 4 + 4 * n + PAGE_SIZE * n;
}

/**
 * Builds a frame of `n` full pages in one allocation (from `alloc`), sized for the raw Pages
 * frame: `compress(dst)` may write compressed page data straight into the
 * frame (at most 90% of the raw size by default, returns its length, or -1);
 * if it does not, the raw Pages frame is built in the same buffer.
 */
export function encodePagesMaybeCompressed(
  pages: ArrayLike<number>, bytesOf: (i: number) => Uint8Array, algorithmId: number,
  compress: ((dst: Uint8Array) => number) | null, maxRatio = 0.9, alloc: (size: number) => Buffer = Buffer.allocUnsafe, crc = true,
): { frame: Buffer; compressed: number } {
  const n = pages.length;
  const b = alloc(pagesFrameSize(n));
  if (compress && n > 0 && n <= MAX_COMPRESSED_PAGES) {
    b[4] = FrameType.CompressedPages;
    b[5] = algorithmId;
    b.writeUInt32BE(n, 6);
    for (let i = 0; i < n; i++) b.writeUInt32BE(pages[i]!, 10 + 4 * i);
    const data = 10 + 4 * n;
    const room = Math.floor(PAGE_SIZE * n * maxRatio);
    const got = compress(b.subarray(data, data + room));
    if (got >= 0 && got <= room) return { frame: seal(b.subarray(0, data + got + TRAILER), crc), compressed: got };
  }
  b[4] = FrameType.Pages;
  b.writeUInt32BE(n, 5);
  for (let i = 0; i < n; i++) b.writeUInt32BE(pages[i]!, 9 + 4 * i);
  const data = 9 + 4 * n;
  for (let i = 0; i < n; i++) b.set(bytesOf(i), data + i * PAGE_SIZE);
  return { frame: seal(b, crc), compressed: -1 };
}

/** `crc` false (here, in encodePageList and in encodePagesMaybeCompressed): the frame goes without its CRC, as agreed inside TLS (Hello's noFrameCrc). */
export function encodeRefs(pages: ArrayLike<number>, blocks: ArrayLike<number>, hashOf: (i: number) => Uint8Array, crc = true): Buffer {
  const n = pages.length;
  const b = Buffer.allocUnsafe(4 + 1 + 4 + REF_SIZE * n + TRAILER);
  b[4] = FrameType.Refs;
  b.writeUInt32BE(n, 5);
  for (let i = 0; i < n; i++) {
    const o = 9 + REF_SIZE * i;
    b.writeUInt32BE(pages[i]!, o);
    b.writeUInt32BE(blocks[i]!, o + 4);
    b.set(hashOf(i), o + 8);
  }
  return seal(b, crc);
}

export function encodePageList(type: FrameType.Zeros, pages: ArrayLike<number>, crc = true): Buffer {
  const n = pages.length;
  const b = Buffer.allocUnsafe(9 + 4 * n + TRAILER);
  b[4] = type;
  b.writeUInt32BE(n, 5);
  for (let i = 0; i < n; i++) b.writeUInt32BE(pages[i]!, 9 + 4 * i);
  return seal(b, crc);
}

export function encodeIterAck(iteration: number, resend: ArrayLike<number>): Buffer {
  const n = resend.length;
  const b = Buffer.allocUnsafe(13 + 4 * n + TRAILER);
  b[4] = FrameType.IterAck;
  b.writeUInt32BE(iteration, 5);
  b.writeUInt32BE(n, 9);
  for (let i = 0; i < n; i++) b.writeUInt32BE(resend[i]!, 13 + 4 * i);
  return seal(b);
}

/** Credit: the running total of bytes of the source's frames the destination has received (exact up to 2^53). */
export function encodeCredit(total: number): Buffer {
  const b = Buffer.allocUnsafe(13 + TRAILER);
  b[4] = FrameType.Credit;
  b.writeBigUInt64BE(BigInt(total), 5);
  return seal(b);
}

export function decodeCredit(f: Frame): number {
  if (f.payload.length !== 8) throw new ProtocolError(`Credit frame of ${f.payload.length} bytes; 8 expected`);
  return Number(view(f.payload).getBigUint64(0));
}

function view(p: Uint8Array): DataView {
  return new DataView(p.buffer, p.byteOffset, p.byteLength);
}

/** Checks a count-prefixed payload's size: count * each + head bytes exactly. */
function counted(f: Frame, head: number, each: number, what: string): number {
  if (f.payload.length < head) throw new ProtocolError(`${what} frame of ${f.payload.length} bytes is too short`);
  const n = view(f.payload).getUint32(head - 4);
  if (f.payload.length !== head + n * each) {
    throw new ProtocolError(`${what} frame says ${n} entries but holds ${f.payload.length} bytes (want ${head + n * each})`);
  }
  return n;
}

export function decodePages(f: Frame, maxPage: number): { pages: Uint32Array; data: Uint8Array } {
  const n = counted(f, 4, 4 + PAGE_SIZE, "Pages");
  const dv = view(f.payload);
  const pages = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const p = dv.getUint32(4 + 4 * i);
    if (p >= maxPage) throw new ProtocolError(`Pages frame names page ${p}, past the VM's ${maxPage} pages`);
    pages[i] = p;
  }
  return { pages, data: f.payload.subarray(4 + 4 * n) };
}

/** CompressedPages frame: the algorithm's wire id, the page list, and the compressed data (not yet checked). */
export function decodeCompressedPages(f: Frame, maxPage: number): { algorithmId: number; pages: Uint32Array; packed: Uint8Array } {
  const p = f.payload;
  if (p.length < 5) throw new ProtocolError(`CompressedPages frame of ${p.length} bytes is too short`);
  const dv = view(p);
  const n = dv.getUint32(1);
  if (n === 0 || n > MAX_COMPRESSED_PAGES) throw new ProtocolError(`CompressedPages frame says ${n} pages; 1..${MAX_COMPRESSED_PAGES} allowed`);
  if (p.length < 5 + 4 * n) throw new ProtocolError(`CompressedPages frame says ${n} pages but holds ${p.length} bytes`);
  const pages = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const pg = dv.getUint32(5 + 4 * i);
    if (pg >= maxPage) throw new ProtocolError(`CompressedPages frame names page ${pg}, past the VM's ${maxPage} pages`);
    pages[i] = pg;
  }
  return { algorithmId: p[0]!, pages, packed: p.subarray(5 + 4 * n) };
}

export function decodeRefs(f: Frame, maxPage: number, maxBlock: number): { pages: Uint32Array; blocks: Uint32Array; hashes: Uint8Array } {
  const n = counted(f, 4, REF_SIZE, "Refs");
  if (n > MAX_REFS) throw new ProtocolError(`a Refs frame holds ${n} references; at most ${MAX_REFS}`);
  const dv = view(f.payload);
  const pages = new Uint32Array(n), blocks = new Uint32Array(n), hashes = new Uint8Array(16 * n);
  for (let i = 0; i < n; i++) {
    const o = 4 + REF_SIZE * i;
    const p = dv.getUint32(o), b = dv.getUint32(o + 4);
    if (p >= maxPage) throw new ProtocolError(`Refs frame names page ${p}, past the VM's ${maxPage} pages`);
    if (b >= maxBlock) throw new ProtocolError(`Refs frame names block ${b}, past the image's ${maxBlock} blocks`);
    pages[i] = p;
    blocks[i] = b;
    hashes.set(f.payload.subarray(o + 8, o + 24), 16 * i);
  }
  return { pages, blocks, hashes };
}

export function decodePageList(f: Frame, maxPage: number, what: string): Uint32Array {
  const n = counted(f, 4, 4, what);
  const dv = view(f.payload);
  const pages = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const p = dv.getUint32(4 + 4 * i);
    if (p >= maxPage) throw new ProtocolError(`${what} frame names page ${p}, past the VM's ${maxPage} pages`);
    pages[i] = p;
  }
  return pages;
}

export function decodeIterAck(f: Frame, maxPage: number): { iteration: number; resend: Uint32Array } {
  const n = counted(f, 8, 4, "IterAck");
  const dv = view(f.payload);
  const resend = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const p = dv.getUint32(8 + 4 * i);
    if (p >= maxPage) throw new ProtocolError(`IterAck asks for page ${p}, past the VM's ${maxPage} pages`);
    resend[i] = p;
  }
  return { iteration: dv.getUint32(0), resend };
}
