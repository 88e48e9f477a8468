// Stream-mode link protocol between `stream-out` (source host) and
// `stream-in` (destination host). Every frame: u32 BE length of what follows
// (type byte + payload), u8 type, payload. Binary fields are big-endian.
//
//   HELLO      1 out->in  JSON {v, indexId, channel}
//   HELLO_ACK  2 in->out  JSON {dedup, reason?}
//   RAW        3 out->in  bytes of QEMU's stream, to forward unchanged
//   REFS       4 out->in  u32 first seq, u32 count, then per page:
//                         u8 header length, header (QEMU's record header: be64
//                         offset|flags [+ idstr]), u32 block, 16-byte hash
//   RESEND     5 out->in  u32 seq, 4096 page bytes (answer to NEED)
//   NEED       6 in->out  u32 seq: the block did not match, send the page
//   ACK        7 in->out  u32 seq: every reference below seq is in QEMU's stream
//   RETURN     8 in->out  bytes of the destination QEMU's return path
//   END        9 out->in  JSON {stats}: the source QEMU closed its stream
//   ABORT     10 either   JSON {reason}
//   RETURN_END 11 in->out JSON {}: the destination QEMU closed its side
//   RAW_Z     12 out->in  u8 algorithm (1 zstd, 2 brotli), u32 raw length
//                         (1..4 MiB), compressed bytes: a RAW frame compressed
//                         (only with an algorithm agreed in HELLO/HELLO_ACK)

export const STREAM_PROTOCOL_VERSION = 1;
export const MAX_STREAM_FRAME = 4 * 1024 * 1024;
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
}

/**
 * A RAW_Z frame around `pieces` (`bytes` in all): `compress(dst)` writes the
 * compressed bytes straight into the frame (returns their length, or -1 when
 * they do not fit in maxRatio x bytes); null when it did not pay.
 */
export function compressedRawFrame(bytes: number, algorithmId: number, compress: (dst: Uint8Array) => number, maxRatio = 0.9): Buffer | null {
  const room = Math.floor(bytes * maxRatio);
  if (room <= 0 || bytes > MAX_STREAM_FRAME) return null;
  const b = Buffer.allocUnsafe(10 + room);
  b[4] = SFrame.RawZ;
  b[5] = algorithmId;
  b.writeUInt32BE(bytes, 6);
  const got = compress(b.subarray(10));
  if (got < 0 || got > room) return null;
  b.writeUInt32BE(6 + got, 0);
  return b.subarray(0, 10 + got);
}

export function decodeRawZ(f: StreamFrame): { algorithmId: number; rawLength: number; packed: Buffer } {
  if (f.payload.length < 5) throw new StreamProtocolError(`RAW_Z frame of ${f.payload.length} bytes is too short`);
  const rawLength = f.payload.readUInt32BE(1);
  if (rawLength < 1 || rawLength > MAX_STREAM_FRAME) throw new StreamProtocolError(`RAW_Z frame says ${rawLength} bytes; 1..${MAX_STREAM_FRAME} allowed`);
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
  const b = Buffer.allocUnsafe(5 + payload.length);
  b.writeUInt32BE(payload.length + 1, 0);
  b[4] = type;
  b.set(payload, 5);
  return b;
}

/** A RAW frame around several pieces, copied once. */
export function rawFrame(pieces: Uint8Array[], bytes: number): Buffer {
  const b = Buffer.allocUnsafe(5 + bytes);
  b.writeUInt32BE(bytes + 1, 0);
  b[4] = SFrame.Raw;
  let o = 5;
  for (const p of pieces) {
    b.set(p, o);
    o += p.length;
  }
  return b;
}

export function jsonFrame(type: SFrame, value: unknown): Buffer {
  return frame(type, Buffer.from(JSON.stringify(value), "utf8"));
}

export function u32Frame(type: SFrame, v: number): Buffer {
  const b = Buffer.allocUnsafe(9);
  b.writeUInt32BE(5, 0);
  b[4] = type;
  b.writeUInt32BE(v >>> 0, 5);
  return b;
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
    b.writeUInt32BE(this.o - 4, 0);
    b[4] = SFrame.Refs;
    b.writeUInt32BE(this.firstSeq, 5);
    b.writeUInt32BE(this.count, 9);
    const out = Buffer.from(b.subarray(0, this.o));
    this.o = 13;
    this.count = 0;
    return out;
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

/** Incremental frame parser (a frame may be split anywhere across reads). */
export class StreamFrameReader {
  private chunks: Buffer[] = [];
  private have = 0;

  push(chunk: Buffer): StreamFrame[] {
    this.chunks.push(chunk);
    this.have += chunk.length;
    const out: StreamFrame[] = [];
    while (this.have >= 5) {
      let first = this.chunks[0]!;
      if (first.length < 5) {
        first = Buffer.concat(this.chunks);
        this.chunks = [first];
      }
      const len = first.readUInt32BE(0);
      if (len < 1 || len > MAX_STREAM_FRAME) {
        throw new StreamProtocolError(`frame length ${len} is outside 1..${MAX_STREAM_FRAME}: corrupt link or not a pagetwin stream peer`);
      }
      if (this.have < 4 + len) break;
      if (first.length < 4 + len) {
        first = Buffer.concat(this.chunks);
        this.chunks = [first];
      }
      const type = first[4]!;
      if (!(type in SFrame)) throw new StreamProtocolError(`unknown stream frame type ${type}`);
      out.push({ type: type as SFrame, payload: first.subarray(5, 4 + len) });
      if (first.length === 4 + len) this.chunks.shift();
      else this.chunks[0] = first.subarray(4 + len);
      this.have -= 4 + len;
    }
    return out;
  }

  get pending(): number {
    return this.have;
  }
}
