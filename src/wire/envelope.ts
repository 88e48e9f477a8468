// The one frame envelope of both modes (agent mode's frames and stream mode's):
// u32 BE length of what follows, u8 type, payload, u32 BE CRC-32 of type and
// payload. The channel underneath (TLS) authenticates every byte; the CRC
// catches a corrupt link with --insecure. Inside TLS the peers of both modes
// agree in their handshake to leave the data frames' CRC out (zero, not
// checked: TLS already refuses a changed record), which spares a pass over
// every byte on both sides. Socket-free: the reader takes chunks as they
// arrive and hands out whole frames.

import { crc32 } from "node:zlib";

/** The CRC-32 after each frame's payload. */
export const TRAILER = 4;
/** Bytes of a frame besides its payload: length, type, CRC. */
export const FRAME_OVERHEAD = 5 + TRAILER;

/** Frame types both modes share, with the same numbers. */
export const Control = { Hello: 1, HelloAck: 2, Abort: 10 } as const;

/** Largest frame a peer may send before the handshake has ended (a HELLO). */
export const HANDSHAKE_FRAME_MAX = 64 * 1024;

export { ProtocolError } from "../errors.js";
import { ProtocolError } from "../errors.js";

export interface Frame {
  type: number;
  payload: Buffer;
  /** The memory the reader's `alloc` gave this frame (the payload is a view of it), for the owner to reuse once done with the frame; absent when the payload is a view of a pushed chunk. */
  mem?: Buffer;
}

/** Writes the length and the CRC of a frame built in `b` (type at 4, payload after, 4 spare bytes at the end); `crc` false: zero there (agreed inside TLS). */
export function seal(b: Buffer, crc = true): Buffer {
  b.writeUInt32BE(b.length - 4, 0);
  b.writeUInt32BE(crc ? crc32(b.subarray(4, b.length - TRAILER)) : 0, b.length - TRAILER);
  return b;
}

export function frame(type: number, payload: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(FRAME_OVERHEAD + payload.length);
  b[4] = type;
  b.set(payload, 5);
  return seal(b);
}

export function jsonFrame(type: number, value: unknown): Buffer {
  return frame(type, Buffer.from(JSON.stringify(value), "utf8"));
}

export function u32Frame(type: number, v: number): Buffer {
  const b = Buffer.allocUnsafe(FRAME_OVERHEAD + 4);
  b[4] = type;
  b.writeUInt32BE(v >>> 0, 5);
  return seal(b);
}

/** A frame's JSON object; `name` says which frame in the error. */
export function parseJson<T>(f: Frame, name = `type ${f.type}`): T {
  try {
    const v = JSON.parse(f.payload.toString("utf8"));
    if (v === null || typeof v !== "object") throw new Error("not an object");
    return v as T;
  } catch (err) {
    throw new ProtocolError(`${name} frame does not hold a JSON object: ${(err as Error).message}`);
  }
}

export function readU32(f: Frame, name: string): number {
  if (f.payload.length !== 4) throw new ProtocolError(`${name} frame of ${f.payload.length} bytes (want 4)`);
  return f.payload.readUInt32BE(0);
}

/**
 * A string from the peer, safe for a log line: control characters (newlines,
 * terminal escapes) shown as escapes, and cut to `max` characters.
 */
export function printable(s: string, max = 300): string {
  // eslint-disable-next-line no-control-regex
  const clean = s.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
  return clean.length > max ? `${clean.slice(0, max)}…` : clean;
}

/** The reason an Abort frame gives, made printable (it may be garbled: the link is failing). */
export function abortReason(f: Frame): string {
  try {
    const r = (JSON.parse(f.payload.toString("utf8")) as { reason?: unknown }).reason;
    return typeof r === "string" ? printable(r) : "no reason given";
  } catch {
    return "no reason given";
  }
}

export interface ReaderOptions {
  /** Largest frame body (type + payload + CRC) once the handshake is over. */
  maxFrame: number;
  /** Whether a type byte names a frame of this protocol. */
  known: (type: number) => boolean;
  /** Largest body before `handshakeDone()` (a link passes HANDSHAKE_FRAME_MAX; default: maxFrame). */
  handshakeMax?: number;
  /** Where a frame that arrived in several chunks is joined (default Buffer.allocUnsafe), given its size and its (unchecked) type byte: a pool the reader's owner refills. */
  alloc?: (size: number, type: number) => Buffer;
  /**
   * Each chunk is overwritten once push() returns (a socket read into one reused buffer, link/read-buffer.ts):
   * every frame is then copied into `alloc`'s memory as its bytes come, and nothing of a chunk is kept.
   */
  inputReused?: boolean;
}

/** Incremental frame parser: a frame may be split anywhere across reads. */
export class FrameReader {
  private chunks: Buffer[] = [];
  /** Bytes pending: in `chunks`, or (inputReused) copied into `head` and then `part`. */
  private have = 0;
  /** inputReused: the frame being copied (length, type, payload, CRC), once its first 5 bytes came into `head`. */
  private part: Buffer | null = null;
  private readonly head = Buffer.allocUnsafe(5);
  private limit: number;
  /** Whether frames carry a CRC to check (until the handshake agrees otherwise, they do). */
  private crc = true;
  /** Whole frames read so far (to say which one was corrupt). */
  frames = 0;

  constructor(private readonly o: ReaderOptions) {
    this.limit = Math.min(o.handshakeMax ?? o.maxFrame, o.maxFrame);
  }

  /** Lifts the small limit of the handshake: the peer is known now. `crc` false: its frames' CRC is not checked from here on (agreed inside TLS). */
  handshakeDone(o: { crc?: boolean } = {}): void {
    this.limit = this.o.maxFrame;
    this.crc = o.crc ?? true;
  }

  push(chunk: Buffer): Frame[] {
    if (this.o.inputReused) return this.pushCopying(chunk);
    this.chunks.push(chunk);
    this.have += chunk.length;
    const out: Frame[] = [];
    while (this.have >= 5) {
      let first = this.chunks[0]!;
      if (first.length < 5) first = this.gather(5, Buffer.allocUnsafe(5));
      const len = this.checkLength(first.readUInt32BE(0));
      if (this.have < 4 + len) break;
      let mem: Buffer | undefined;
      if (first.length < 4 + len) first = mem = this.gather(4 + len, this.alloc(4 + len, first[4]!));
      out.push(this.finish(first, len, mem));
      if (first.length === 4 + len) this.chunks.shift();
      else this.chunks[0] = first.subarray(4 + len);
      this.have -= 4 + len;
    }
    return out;
  }

  /** push() of a chunk that is overwritten afterwards: each frame's bytes go into its own memory as they come. */
  private pushCopying(chunk: Buffer): Frame[] {
    const out: Frame[] = [];
    let at = 0;
    while (at < chunk.length) {
      if (!this.part) {
        // the length and the type first: they say how much memory the frame needs
        const n = chunk.copy(this.head, this.have, at, at + 5 - this.have);
        at += n;
        this.have += n;
        if (this.have < 5) break;
        const len = this.checkLength(this.head.readUInt32BE(0));
        this.part = this.alloc(4 + len, this.head[4]!);
        this.head.copy(this.part, 0, 0, 5);
      }
      const p = this.part;
      const n = chunk.copy(p, this.have, at, at + p.length - this.have);
      at += n;
      this.have += n;
      if (this.have < p.length) break;
      this.part = null;
      this.have = 0;
      out.push(this.finish(p, p.length - 4, p));
    }
    return out;
  }

  private alloc(size: number, type: number): Buffer {
    return this.o.alloc ? this.o.alloc(size, type) : Buffer.allocUnsafe(size);
  }

  private checkLength(len: number): number {
    if (len < 1 + TRAILER || len > this.limit) {
      throw new ProtocolError(`frame length ${len} is outside ${1 + TRAILER}..${this.limit}: corrupt link or not a pagetwin peer`);
    }
    return len;
  }

  /** The frame at the start of `b` (its body `len` bytes), checked. */
  private finish(b: Buffer, len: number, mem: Buffer | undefined): Frame {
    // the CRC first: a corrupt frame is refused whatever its type says
    const body = b.subarray(4, 4 + len - TRAILER);
    if (this.crc && crc32(body) !== b.readUInt32BE(4 + len - TRAILER)) {
      throw new ProtocolError(`frame ${this.frames} (${len} bytes) fails its CRC-32: the link corrupted it; nothing of it was used`);
    }
    const type = b[4]!;
    if (!this.o.known(type)) throw new ProtocolError(`unknown frame type ${type}`);
    this.frames++;
    const payload = b.subarray(5, 4 + len - TRAILER);
    return mem ? { type, payload, mem } : { type, payload };
  }

  /**
   * Joins the first `n` pending bytes into `whole`, put at the head of the
   * queue; the rest stays where it arrived (joining everything pending would
   * copy a frame's tail again with the next frame).
   */
  private gather(n: number, whole: Buffer): Buffer {
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

  /** Bytes held that do not yet make a whole frame. */
  get pending(): number {
    return this.have;
  }
}
