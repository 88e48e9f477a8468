// Buffers for what a proxy writes to one socket, carved in order from one
// ring and given back when the socket has taken the write. A fresh Buffer per
// frame (or per rebuilt batch of pages) made the proxies fault in and collect
// new memory for every byte they wrote: in the stream replay (bench/stream-replay.ts)
// that cost more than the copies themselves. Writes to one socket complete in
// order, so the ring frees from its tail. A request the ring has no room for
// gets a Buffer of its own.

import type { Writable } from "node:stream";

interface Carve { start: number; end: number; done: boolean }

/** Where frames get their memory: take() n bytes, trim() the last to what was used, release() unwritten. */
export interface FrameAlloc {
  take(n: number): Buffer;
  trim(buf: Buffer, used: number): Buffer;
  release(buf: Buffer): void;
}

/** A new Buffer each time (the garbage collector frees it). */
export const HEAP_ALLOC: FrameAlloc = {
  take: (n) => Buffer.allocUnsafe(n),
  trim: (buf, used) => buf.subarray(0, used),
  release: () => {},
};

export class WriteRing implements FrameAlloc {
  private readonly ring: Buffer;
  private head = 0;
  private readonly carves: Carve[] = [];
  private readonly byStart = new Map<number, Carve>();

  /** `size` bytes of ring; requests over a quarter of it get their own Buffer. */
  constructor(readonly size = 16 * 1024 * 1024) {
    this.ring = Buffer.allocUnsafeSlow(size);
  }

  /** `n` bytes to fill and then write(); nothing else may keep them. */
  take(n: number): Buffer {
    const at = n <= this.size / 4 ? this.place(n) : -1;
    if (at < 0) return Buffer.allocUnsafe(n);
    const c: Carve = { start: at, end: at + n, done: false };
    this.carves.push(c);
    this.byStart.set(at, c);
    this.head = c.end;
    return this.ring.subarray(at, at + n);
  }

  /** The first `used` bytes of `buf`, the last take(): the rest goes back to the ring. */
  trim(buf: Buffer, used: number): Buffer {
    const c = this.carveOf(buf);
    const last = this.carves[this.carves.length - 1];
    if (c && c === last) this.head = c.end = c.start + used;
    return buf.subarray(0, used);
  }

  /** Gives back `buf` unwritten. */
  release(buf: Buffer): void {
    const c = this.carveOf(buf);
    if (!c) return;
    c.done = true;
    while (this.carves.length && this.carves[0]!.done) {
      const gone = this.carves.shift()!;
      // a carve trimmed to nothing shares its start with the next one
      if (this.byStart.get(gone.start) === gone) this.byStart.delete(gone.start);
    }
    if (!this.carves.length) this.head = 0;
  }

  /** Writes `buf` (from take(), a view of `from` from take(), or any Buffer) to `sock`; ring space returns when the write completes. */
  write(sock: Writable, buf: Buffer, from = buf): boolean {
    return this.carveOf(from) ? sock.write(buf, () => this.release(from)) : sock.write(buf);
  }

  /** Bytes of the ring in use. */
  get inUse(): number {
    if (!this.carves.length) return 0;
    const tail = this.carves[0]!.start;
    return this.head > tail ? this.head - tail : this.size - tail + this.head;
  }

  private carveOf(buf: Buffer): Carve | undefined {
    return buf.buffer === this.ring.buffer ? this.byStart.get(buf.byteOffset - this.ring.byteOffset) : undefined;
  }

  /** Where `n` bytes fit without overrunning what is still in use; -1 if nowhere. */
  private place(n: number): number {
    if (!this.carves.length) return 0;
    const tail = this.carves[0]!.start;
    if (this.head > tail || (this.head === tail && this.head === 0)) {
      if (this.head + n <= this.size) return this.head;
      return n < tail ? 0 : -1; // wrap (strictly below the tail: head === tail means empty)
    }
    return this.head + n < tail ? this.head : -1;
  }
}
