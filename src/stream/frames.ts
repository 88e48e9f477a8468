// Stream mode's frames between `stream-out` (source host) and `stream-in`
// (destination host), protocol version 6, in the envelope of
// wire/envelope.ts. Binary fields are big-endian. Authentication and
// encryption are the channel's (TLS).
//
//   HELLO      1 out->in  JSON {v, indexId, channel, kind, compression, verdict?}
//   HELLO_ACK  2 in->out  JSON {ready, dedup, reason?, compression}
//   RAW        3 out->in  bytes of QEMU's stream, to forward unchanged
//   REFS       4 out->in  u32 first seq, u32 count, then per page:
//                         u8 header length, header (QEMU's record header: be64
//                         offset|flags [+ idstr]), u32 block, 16-byte hash
//   RESEND     5 out->in  u32 seq, 4096 page bytes (answer to NEED)
//   NEED       6 in->out  u32 seq: the block did not match, send the page
//   ACK        7 in->out  u32 seq: every reference below seq is in QEMU's stream
//   RETURN     8 in->out  bytes of the destination QEMU's return path
//   END        9 out->in  JSON {bytes, pages, zeroPages, streamBytes, crc32}: the
//                         source QEMU closed its stream; stream-in checks that it
//                         handed its QEMU exactly that stream (always; inside TLS):
//                         its length, and the CRC-32 of it with each referenced
//                         page replaced by its hash (check-crc.ts)
//   ABORT     10 either   JSON {reason}
//   RETURN_END 11 in->out JSON {}: the destination QEMU closed its side
//   RAW_Z     12 out->in  u8 algorithm (1 zstd, 2 brotli), u32 raw length
//                         (1..4 MiB), compressed bytes: a RAW frame compressed
//                         (only with an algorithm agreed in HELLO/HELLO_ACK)
//   (13 was AUTH, protocol 2's challenge answer: TLS authenticates now)
//   VERDICT   14 in->out  JSON {verified, reason?}: the END check's outcome, sent
//                         only to a stream-out whose HELLO asked (verdict: true),
//                         before an ABORT when the check failed
//   MREFS     15 out->in  references on a multifd channel (multifd-frames.ts):
//                         u8 QEMU's channel id, u32 first seq, u32 count, then
//                         per page: u32 block, 16-byte hash (no record header)
//   CREDIT    16 in->out  u64 link bytes, u64 stream bytes: of stream-out's frames
//                         (as on the link, from HELLO on), how many stream-in has
//                         handed on (their output is in its QEMU's socket), and
//                         how many bytes of QEMU's stream that output was;
//                         stream-out keeps only a few ms beyond both (pacer.ts);
//                         u64 wait us, u64 clock us: how long stream-in has waited
//                         for the link's next frame, and its clock, so stream-out
//                         can tell a busy receiver from a full link (compression)
//   (protocol 3 had no CREDIT: a stream-out paced only by its own socket;
//   protocol 4's END CRC-32 covered every page's bytes; protocol 5's CREDIT
//   had no wait and clock)

import { FRAME_OVERHEAD, TRAILER, ProtocolError, seal, type Frame } from "../wire/envelope.js";
import type { FrameSet } from "../link/channel.js";
import { HEAP_ALLOC, type FrameAlloc } from "./write-ring.js";

export const STREAM_PROTOCOL_VERSION = 6;
/** Largest frame body (type + payload + CRC). */
export const MAX_STREAM_FRAME = 4 * 1024 * 1024 + 64;
/** Largest RAW or RAW_Z data (decompressed). */
export const MAX_RAW = 4 * 1024 * 1024;
/** Bytes of a RAW_Z frame besides the compressed data: length, type, algorithm, raw length, CRC. */
export const RAW_Z_OVERHEAD = 10 + TRAILER;
export const HASH_BYTES = 16;
const PAGE_BYTES = 4096;

export enum SFrame {
  Hello = 1,
  HelloAck = 2,
  Raw = 3,
  Refs = 4,
  Resend = 5,
  Need = 6,
  Ack = 7,
  Return = 8,
  End = 9,
  Abort = 10,
  ReturnEnd = 11,
  RawZ = 12,
  Verdict = 14,
  MultifdRefs = 15,
  Credit = 16,
}

export const STREAM_FRAMES: FrameSet = {
  maxFrame: MAX_STREAM_FRAME,
  known: (t) => t in SFrame,
  name: (t) => SFrame[t] ?? `#${t}`,
};

/** A frame's bytes on the link (length, type, payload, CRC): what CREDIT counts. */
export function linkLength(f: Frame): number {
  return FRAME_OVERHEAD + f.payload.length;
}

/** What a CREDIT says: running totals since the session began. */
export interface Credit {
  /** Bytes of stream-out's frames handed on, and of QEMU's stream they rebuilt to. */
  linkBytes: number;
  streamBytes: number;
  /** Microseconds stream-in spent waiting for the link's next frame, and microseconds on its clock. */
  linkWaitUs: number;
  clockUs: number;
}

/** CREDIT: four u64 running totals (exact up to 2^53). */
export function creditFrame(c: Credit): Buffer {
  const b = Buffer.allocUnsafe(FRAME_OVERHEAD + 32);
  b[4] = SFrame.Credit;
  b.writeBigUInt64BE(BigInt(c.linkBytes), 5);
  b.writeBigUInt64BE(BigInt(c.streamBytes), 13);
  b.writeBigUInt64BE(BigInt(Math.round(c.linkWaitUs)), 21);
  b.writeBigUInt64BE(BigInt(Math.round(c.clockUs)), 29);
  return seal(b);
}

export function decodeCredit(f: Frame): Credit {
  if (f.payload.length !== 32) throw new ProtocolError(`CREDIT frame of ${f.payload.length} bytes; 32 expected`);
  const u = (at: number) => Number(f.payload.readBigUInt64BE(at));
  return { linkBytes: u(0), streamBytes: u(8), linkWaitUs: u(16), clockUs: u(24) };
}

/** Most references one REFS frame may hold. */
export const MAX_REFS = 4096;

/**
 * A RAW_Z frame around `pieces` (`bytes` in all): `compress(dst)` writes the
 * compressed bytes straight into the frame (returns their length, or -1 when
 * they do not fit in maxRatio x bytes); null when it did not pay.
 */
export function compressedRawFrame(bytes: number, algorithmId: number, compress: (dst: Uint8Array) => number, maxRatio = 0.9, alloc: FrameAlloc = HEAP_ALLOC, crc = true): Buffer | null {
  const room = Math.floor(bytes * maxRatio);
  if (room <= 0 || bytes > MAX_RAW) return null;
  const b = alloc.take(10 + room + TRAILER);
  b[4] = SFrame.RawZ;
  b[5] = algorithmId;
  b.writeUInt32BE(bytes, 6);
  const got = compress(b.subarray(10, 10 + room));
  if (got < 0 || got > room) {
    alloc.release(b);
    return null;
  }
  return seal(alloc.trim(b, 10 + got + TRAILER), crc);
}

export function decodeRawZ(f: Frame): { algorithmId: number; rawLength: number; packed: Buffer } {
  if (f.payload.length < 5) throw new ProtocolError(`RAW_Z frame of ${f.payload.length} bytes is too short`);
  const rawLength = f.payload.readUInt32BE(1);
  if (rawLength < 1 || rawLength > MAX_RAW) throw new ProtocolError(`RAW_Z frame says ${rawLength} bytes; 1..${MAX_RAW} allowed`);
  return { algorithmId: f.payload[0]!, rawLength, packed: f.payload.subarray(5) };
}

/** A RAW frame around several pieces, copied once; `crc` false: without its CRC (agreed inside TLS). */
export function rawFrame(pieces: Uint8Array[], bytes: number, alloc: FrameAlloc = HEAP_ALLOC, crc = true): Buffer {
  const b = alloc.take(FRAME_OVERHEAD + bytes);
  b[4] = SFrame.Raw;
  let o = 5;
  for (const p of pieces) {
    b.set(p, o);
    o += p.length;
  }
  return seal(b, crc);
}

/**
 * About how many bytes of QEMU's stream a data frame rebuilds to (stream-in's
 * work queued): a REFS frame's pages, a RAW_Z frame's raw length. Read before
 * the frame is decoded, so bounded here and checked when it is.
 */
export function rebuiltLength(f: Frame): number {
  const p = f.payload;
  if (f.type === SFrame.Refs) return p.length >= 8 ? Math.min(p.readUInt32BE(4), MAX_REFS) * (PAGE_BYTES + 9) : 0;
  if (f.type === SFrame.RawZ) return p.length >= 5 ? Math.min(p.readUInt32BE(1), MAX_RAW) : 0;
  return p.length;
}

export interface Ref {
  header: Buffer;
  block: number;
  hash: Buffer;
}

/** Builds a REFS frame incrementally (one buffer, grown as needed). */
export class RefsBuilder {
  private buf = Buffer.allocUnsafe(64 * 1024);
  private o = 13;
  count = 0;
  firstSeq = 0;

  add(seq: number, header: Uint8Array, block: number, hash: Uint8Array): void {
    if (this.count === 0) this.firstSeq = seq;
    if (header.length > 255) throw new RangeError("record header too long");
    const need = 1 + header.length + 4 + HASH_BYTES;
    if (this.o + need > this.buf.length) {
      const b = Buffer.allocUnsafe(this.buf.length * 2);
      this.buf.copy(b, 0, 0, this.o);
      this.buf = b;
    }
    const b = this.buf;
    let o = this.o;
    b[o] = header.length;
    b.set(header, o + 1);
    o += 1 + header.length;
    b.writeUInt32BE(block, o);
    b.set(hash, o + 4);
    this.o = o + 4 + HASH_BYTES;
    this.count++;
  }

  /** The finished frame (a copy; `crc` false: without its CRC); the builder is empty again. */
  take(alloc: FrameAlloc = HEAP_ALLOC, crc = true): Buffer {
    const b = this.buf;
    b[4] = SFrame.Refs;
    b.writeUInt32BE(this.firstSeq, 5);
    b.writeUInt32BE(this.count, 9);
    const out = alloc.take(this.o + TRAILER);
    b.copy(out, 0, 0, this.o);
    this.o = 13;
    this.count = 0;
    return seal(out, crc);
  }
}

export function decodeRefs(f: Frame): { firstSeq: number; refs: Ref[] } {
  const p = f.payload;
  if (p.length < 8) throw new ProtocolError(`REFS frame of ${p.length} bytes is too short`);
  const firstSeq = p.readUInt32BE(0);
  const count = p.readUInt32BE(4);
  const refs: Ref[] = [];
  let o = 8;
  for (let i = 0; i < count; i++) {
    if (o >= p.length) throw new ProtocolError(`REFS frame says ${count} references but ends after ${i}`);
    const hl = p[o]!;
    if (hl < 8 || o + 1 + hl + 4 + HASH_BYTES > p.length) throw new ProtocolError(`REFS entry ${i} is truncated or has a ${hl}-byte header`);
    refs.push({
      header: p.subarray(o + 1, o + 1 + hl),
      block: p.readUInt32BE(o + 1 + hl),
      hash: p.subarray(o + 5 + hl, o + 5 + hl + HASH_BYTES),
    });
    o += 1 + hl + 4 + HASH_BYTES;
  }
  if (o !== p.length) throw new ProtocolError(`REFS frame has ${p.length - o} bytes after its ${count} references`);
  return { firstSeq, refs };
}
