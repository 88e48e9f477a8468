// stream-out's replay window: the pages it sent as references, kept until
// stream-in acknowledges them, so that a page whose NAS block no longer
// matches can be sent again. A page is kept as a view of the chunk of QEMU's
// stream it arrived in (each socket read is a buffer of its own), not copied:
// copying every twin page into fresh memory cost stream-out about a sixth of
// its time. Views keep whole chunks alive, so the bytes of distinct chunks
// held are counted, and past a budget a page is copied instead. A page whose
// memory its owner reuses (a read buffer, a parser's bridge) is copied into
// the window's own memory, reused once acknowledged (holdCopy).

import { PAGE_SIZE } from "../core/engine.js";

/** Copies get their memory in slabs of this many pages (1 MiB). */
const SLAB_PAGES = 256;

export class ReplayWindow {
  private readonly pages: (Uint8Array | undefined)[];
  /** The reference number each slot holds: a slot reused too early must never answer for an older reference. */
  private readonly seqs: Float64Array;
  /** Pages held per underlying buffer. */
  private readonly holders = new Map<ArrayBufferLike, number>();
  /** Bytes of the distinct buffers held. */
  retainedBytes = 0;
  /** Which slots hold a copy (holdCopy) rather than a view. */
  private readonly copied: Uint8Array;
  /** Memory for copies, free (the window's own, never a caller's). */
  private readonly spare: Uint8Array[] = [];

  /** `size` pages at most; `budget` bytes of buffers held at most (default: twice the pages' own bytes). */
  constructor(readonly size: number, readonly budget = 2 * size * PAGE_SIZE) {
    this.pages = new Array<Uint8Array | undefined>(size);
    this.seqs = new Float64Array(size);
    this.copied = new Uint8Array(size);
  }

  /** Keeps `page` (4096 bytes, not changed afterwards by its owner) as reference #seq. */
  hold(seq: number, page: Uint8Array): void {
    const slot = this.slot(seq);
    let p = page;
    // a copy of its own (not Buffer#slice, which is a view)
    if (!this.holders.has(p.buffer) && this.retainedBytes + p.buffer.byteLength > this.budget) p = new Uint8Array(p);
    const n = this.holders.get(p.buffer) ?? 0;
    if (n === 0) this.retainedBytes += p.buffer.byteLength;
    this.holders.set(p.buffer, n + 1);
    this.pages[slot] = p;
    this.seqs[slot] = seq;
  }

  /** Keeps a copy of `page` (its owner reuses its memory) as reference #seq, in the window's own memory. */
  holdCopy(seq: number, page: Uint8Array): void {
    const slot = this.slot(seq);
    // memory given back on ack is reused first: it is still mapped and in cache,
    // and a fresh copy per page cost more in page faults than the copy itself
    if (!this.spare.length) {
      const slab = Buffer.allocUnsafeSlow(SLAB_PAGES * PAGE_SIZE);
      for (let i = SLAB_PAGES - 1; i >= 0; i--) this.spare.push(slab.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
    }
    const p = this.spare.pop()!;
    p.set(page);
    this.pages[slot] = p;
    this.seqs[slot] = seq;
    this.copied[slot] = 1;
  }

  private slot(seq: number): number {
    const slot = seq % this.size;
    // the caller sends a page raw when the window is full; overwriting an unacknowledged page would lose it
    if (this.pages[slot]) throw new RangeError(`pagetwin stream-out: the replay window (${this.size} pages) is full: page #${seq} would overwrite #${this.seqs[slot]}`);
    return slot;
  }

  /** Reference #seq's page (it must be held). */
  get(seq: number): Uint8Array {
    const i = seq % this.size;
    const p = this.pages[i];
    if (!p || this.seqs[i] !== seq) throw new RangeError(`pagetwin stream-out: page #${seq} is not in the replay window`);
    return p;
  }

  /** Lets go of references from..to-1 (acknowledged by stream-in). */
  release(from: number, to: number): void {
    for (let s = from; s < to; s++) {
      const i = s % this.size;
      const p = this.pages[i];
      if (!p || this.seqs[i] !== s) continue;
      this.pages[i] = undefined;
      if (this.copied[i]) {
        this.copied[i] = 0;
        this.spare.push(p);
        continue;
      }
      const n = this.holders.get(p.buffer)! - 1;
      if (n === 0) {
        this.holders.delete(p.buffer);
        this.retainedBytes -= p.buffer.byteLength;
      } else this.holders.set(p.buffer, n);
    }
  }
}
