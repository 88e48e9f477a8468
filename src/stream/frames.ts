// Stream-mode link protocol between `stream-out` (source host) and
// `stream-in` (destination host), version 2. Every frame: u32 BE length of
// what follows (type byte + payload + CRC), u8 type, payload, u32 BE CRC-32 of
// type and payload (a flipped bit is caught before anything reaches QEMU).
// Binary fields are big-endian.
//
//   HELLO      1 out->in  JSON {v, indexId, channel, compression, verify?, auth, nonce}
//   HELLO_ACK  2 in->out  JSON {ready, dedup, reason?, compression}, or with a
//                         pre-shared key first {ready: false, nonce, proof}
//   RAW        3 out->in  bytes of QEMU's stream, to forward unchanged
//   REFS       4 out->in  u32 first seq, u32 count, then per page:
//                         u8 header length, header (QEMU's record header: be64
//                         offset|flags [+ idstr]), u32 block, 16-byte hash
//   RESEND     5 out->in  u32 seq, 4096 page bytes (answer to NEED)
//   NEED       6 in->out  u32 seq: the block did not match, send the page
//   ACK        7 in->out  u32 seq: every reference below seq is in QEMU's stream
//   RETURN     8 in->out  bytes of the destination QEMU's return path
//   END        9 out->in  JSON {stats, and with verify: streamBytes, crc32 of the
//                         whole stream}: the source QEMU closed its stream
//   ABORT     10 either   JSON {reason}
//   RETURN_END 11 in->out JSON {}: the destination QEMU closed its side
//   RAW_Z     12 out->in  u8 algorithm (1 zstd, 2 brotli), u32 raw length
//                         (1..4 MiB), compressed bytes: a RAW frame compressed
//                         (only with an algorithm agreed in HELLO/HELLO_ACK)
//   AUTH      13 out->in  JSON {proof}: stream-out's answer to the challenge

import { crc32 } from "node:zlib";

export const STREAM_PROTOCOL_VERSION = 2;
/** Largest frame body (type + payload + CRC). */
export const MAX_STREAM_FRAME = 4 * 1024 * 1024 + 64;
/** Largest RAW or RAW_Z data (decompressed). */
export const MAX_RAW = 4 * 1024 * 1024;
/** The CRC-32 after each frame's payload. */
const TRAILER = 4;
/** Bytes of a RAW_Z frame besides the compressed data: length, type, algorithm, raw length, CRC. */
export const RAW_Z_OVERHEAD = 10 + TRAILER;
export const HASH_BYTES = 16;

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
  Auth = 13,
}

/** Writes the length and the CRC of a frame built in `b` (type at 4, payload after, 4 spare bytes at the end). */
function seal(b: Buffer): Buffer {
  b.writeUInt32BE(b.length - 4, 0);
  b.writeUInt32BE(crc32(b.subarray(4, b.length - TRAILER)), b.length - TRAILER);
  return b;
}

/**
 * A RAW_Z frame around `pieces` (`bytes` in all): `compress(dst)` writes the
 * compressed bytes straight into the frame (returns their length, or -1 when
 * they do not fit in maxRatio x bytes); null when it did not pay.
 */
export function compressedRawFrame(bytes: number, algorithmId: number, compress: (dst: Uint8Array) => number, maxRatio = 0.9): Buffer | null {
  const room = Math.floor(bytes * maxRatio);
  if (room <= 0 || bytes > MAX_RAW) return null;
  const b = Buffer.allocUnsafe(10 + room + TRAILER);
  b[4] = SFrame.RawZ;
  b[5] = algorithmId;
  b.writeUInt32BE(bytes, 6);
  const got = compress(b.subarray(10, 10 + room));
  if (got < 0 || got > room) return null;
  return seal(b.subarray(0, 10 + got + TRAILER));
}

export function decodeRawZ(f: StreamFrame): { algorithmId: number; rawLength: number; packed: Buffer } {
  if (f.payload.length < 5) throw new StreamProtocolError(`RAW_Z frame of ${f.payload.length} bytes is too short`);
  const rawLength = f.payload.readUInt32BE(1);
  if (rawLength < 1 || rawLength > MAX_RAW) throw new StreamProtocolError(`RAW_Z frame says ${rawLength} bytes; 1..${MAX_RAW} allowed`);
  return { algorithmId: f.payload[0]!, rawLength, packed: f.payload.subarray(5) };
}

/** The reason an ABORT frame gives (it may be garbled: the link is failing). */
export function abortReason(f: StreamFrame): string {
  try {
    const r = parseJson<{ reason?: unknown }>(f).reason;
    return typeof r === "string" ? r : "no reason given";
  } catch {
    return "no reason given";
  }
}

export class StreamProtocolError extends Error {
  override name = "StreamProtocolError";
}

export interface StreamFrame {
  type: SFrame;
  payload: Buffer;
}

export function frame(type: SFrame, payload: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(5 + payload.length + TRAILER);
  b[4] = type;
  b.set(payload, 5);
  return seal(b);
}

/** A RAW frame around several pieces, copied once. */
export function rawFrame(pieces: Uint8Array[], bytes: number): Buffer {
  const b = Buffer.allocUnsafe(5 + bytes + TRAILER);
  b[4] = SFrame.Raw;
  let o = 5;
  for (const p of pieces) {
    b.set(p, o);
    o += p.length;
  }
  return seal(b);
}

export function jsonFrame(type: SFrame, value: unknown): Buffer {
  return frame(type, Buffer.from(JSON.stringify(value), "utf8"));
}

export function u32Frame(type: SFrame, v: number): Buffer {
  const b = Buffer.allocUnsafe(9 + TRAILER);
  b[4] = type;
  b.writeUInt32BE(v >>> 0, 5);
  return seal(b);
}

export function parseJson<T>(f: StreamFrame): T {
  try {
    const v = JSON.parse(f.payload.toString("utf8"));
    if (v === null || typeof v !== "object") throw new Error("not an object");
    return v as T;
  } catch (err) {
    throw new StreamProtocolError(`${SFrame[f.type]} frame does not hold a JSON object: ${(err as Error).message}`);
  }
}

export function readU32(f: StreamFrame, what: string): number {
  if (f.payload.length !== 4) throw new StreamProtocolError(`${what} frame of ${f.payload.length} bytes (want 4)`);
  return f.payload.readUInt32BE(0);
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

  /** The finished frame (a copy); the builder is empty again. */
  take(): Buffer {
    const b = this.buf;
    b[4] = SFrame.Refs;
    b.writeUInt32BE(this.firstSeq, 5);
    b.writeUInt32BE(this.count, 9);
    const out = Buffer.allocUnsafe(this.o + TRAILER);
    b.copy(out, 0, 0, this.o);
    this.o = 13;
    this.count = 0;
    return seal(out);
  }
}

export function decodeRefs(f: StreamFrame): { firstSeq: number; refs: Ref[] } {
  const p = f.payload;
  if (p.length < 8) throw new StreamProtocolError(`REFS frame of ${p.length} bytes is too short`);
  const firstSeq = p.readUInt32BE(0);
  const count = p.readUInt32BE(4);
  const refs: Ref[] = [];
  let o = 8;
  for (let i = 0; i < count; i++) {
    if (o >= p.length) throw new StreamProtocolError(`REFS frame says ${count} references but ends after ${i}`);
    const hl = p[o]!;
    if (hl < 8 || o + 1 + hl + 4 + HASH_BYTES > p.length) throw new StreamProtocolError(`REFS entry ${i} is truncated or has a ${hl}-byte header`);
    refs.push({
      header: p.subarray(o + 1, o + 1 + hl),
      block: p.readUInt32BE(o + 1 + hl),
      hash: p.subarray(o + 5 + hl, o + 5 + hl + HASH_BYTES),
    });
    o += 1 + hl + 4 + HASH_BYTES;
  }
  if (o !== p.length) throw new StreamProtocolError(`REFS frame has ${p.length - o} bytes after its ${count} references`);
  return { firstSeq, refs };
}

/** A first frame whose whole payload is JSON: version 1 (no CRC) sent it. */
function olderPeer(payload: Buffer): boolean {
  try {
    const v = JSON.parse(payload.toString("utf8"));
    return v !== null && typeof v === "object";
  } catch {
    return false;
  }
}

/** Incremental frame parser (a frame may be split anywhere across reads). */
export class StreamFrameReader {
  private chunks: Buffer[] = [];
  private have = 0;
  /** Frames read so far (to say which one was corrupt). */
  frames = 0;

  push(chunk: Buffer): StreamFrame[] {
    this.chunks.push(chunk);
    this.have += chunk.length;
    const out: StreamFrame[] = [];
    while (this.have >= 5) {
      let first = this.chunks[0]!;
      if (first.length < 5) first = this.gather(5);
      const len = first.readUInt32BE(0);
      if (len < 1 + TRAILER || len > MAX_STREAM_FRAME) {
        throw new StreamProtocolError(`frame length ${len} is outside ${1 + TRAILER}..${MAX_STREAM_FRAME}: corrupt link or not a pagetwin stream peer`);
      }
      if (this.have < 4 + len) break;
      if (first.length < 4 + len) first = this.gather(4 + len);
      // the CRC first: a corrupt frame is refused whatever its type says
      const body = first.subarray(4, 4 + len - TRAILER);
      const want = first.readUInt32BE(4 + len - TRAILER);
      if (crc32(body) !== want) {
        if (this.frames === 0 && olderPeer(first.subarray(5, 4 + len))) {
          throw new StreamProtocolError("the peer speaks stream protocol 1 (frames without a CRC): run the same pagetwin version on both hosts");
        }
        throw new StreamProtocolError(`frame ${this.frames} (${len} bytes) fails its CRC-32: the link corrupted it; nothing of it was passed on`);
      }
      const type = first[4]!;
      if (!(type in SFrame)) throw new StreamProtocolError(`unknown stream frame type ${type}`);
      out.push({ type: type as SFrame, payload: first.subarray(5, 4 + len - TRAILER) });
      this.frames++;
      if (first.length === 4 + len) this.chunks.shift();
      else this.chunks[0] = first.subarray(4 + len);
      this.have -= 4 + len;
    }
    return out;
  }

  /**
   * Joins the first `n` pending bytes into one buffer at the head of the
   * queue; the rest stays where it arrived (joining everything pending would
   * copy a frame's tail again with the next frame).
   */
  private gather(n: number): Buffer {
    const whole = Buffer.allocUnsafe(n);
    let o = 0;
    while (o < n) {
      const c = this.chunks[0]!;
      const take = Math.min(c.length, n - o);
      whole.set(take === c.length ? c : c.subarray(0, take), o);
      o += take;
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
    }
    this.chunks.unshift(whole);
    return whole;
  }

  get pending(): number {
    return this.have;
  }
}
