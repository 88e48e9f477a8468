// Buffers for large frames, used again once their frame is done with (the
// socket wrote it, or the receiver took its pages). A fresh 1 MiB buffer per
// frame cost several times the copy of the pages into it (the kernel maps and
// zeroes its pages, the GC frees them): 5-25x the CPU of refilling a buffer
// already touched, measured on these 2-core machines.

export class FrameBuffers {
  private readonly spare: ArrayBuffer[] = [];
  /** Every buffer this pool made: give() takes back only these. */
  private readonly own = new WeakSet<ArrayBuffer>();

  /**
   * `capacity`: bytes of each buffer; sizes from half of it up to it are
   * served from the pool, others get a buffer of their own. At most `keep`
   * are kept spare.
   */
  constructor(readonly capacity: number, private readonly keep = 16) {}

  /** A buffer of `size` bytes (contents undefined). */
  take(size: number): Buffer {
    if (size > this.capacity || size * 2 < this.capacity) return Buffer.allocUnsafe(size);
    let ab = this.spare.pop();
    if (!ab) {
      ab = new ArrayBuffer(this.capacity);
      this.own.add(ab);
    }
    return Buffer.from(ab, 0, size);
  }

  /** Gives back a buffer from take() (or a view of one) once nothing reads it any more; anything else is ignored. */
  give(buf: Uint8Array): void {
    const ab = buf.buffer;
    if (ab instanceof ArrayBuffer && this.own.has(ab) && this.spare.length < this.keep && !this.spare.includes(ab)) this.spare.push(ab);
  }

  /** Spare buffers held now. */
  get spareCount(): number {
    return this.spare.length;
  }
}
