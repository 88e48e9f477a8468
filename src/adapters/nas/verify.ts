// NAS blocks fetched and checked before anything uses them, in both modes:
// a RAM page travels as a reference to its twin block, and the destination
// uses the block only if it still hashes to the page's hash. The image may
// have been rewritten, truncated or be failing since it was indexed; such a
// block is reported bad and its page is asked for again, never guessed.

import { HASH_SIZE, PAGE_SIZE, type Engine, type Region } from "../../core/engine.js";
import type { GuestDisk } from "./image.js";

/**
 * Blocks between two wanted ones that a read goes through rather than split
 * in two: on these hosts a read's system call costs about what copying 30
 * more blocks from the page cache does (measured: 1 block ~6 us of CPU, 32
 * blocks ~10 us), and a guest's page cache is often scattered over the disk.
 */
export const MAX_GAP_BLOCKS = 24;
/** Most blocks one read covers (the span buffer: 1 MiB). */
const SPAN_BLOCKS = 256;

/** One reader's block buffers in the core's memory: nothing else ever writes them. */
export class BlockVerifier {
  private pages: Region | null = null;
  private hashes: Region | null = null;
  private span: Region | null = null;
  private capacity = 0;
  /** System calls' worth of reads made (spans and single blocks), for tests and profiles. */
  reads = 0;

  constructor(private readonly engine: Engine, private readonly image: GuestDisk) {}

  /**
   * Reads block `blocks[i]` into slot i, hashes every slot, and compares with
   * `wanted(i)`. The blocks are read in block order, nearby ones in one read
   * (gaps up to MAX_GAP_BLOCKS read through and dropped); a read that fails
   * is made again block by block, so the readable ones still count. ok[i] is
   * true only for a block read whole whose hash matches.
   */
  verify(blocks: ArrayLike<number>, wanted: (i: number) => Uint8Array): boolean[] {
    const n = blocks.length;
    this.reserve(n);
    const readOk = new Array<boolean>(n).fill(true);
    const order = byBlock(blocks);
    for (let s = 0; s < n;) {
      const first = blocks[order[s]!]!;
      let e = s + 1;
      while (e < n && blocks[order[e]!]! - blocks[order[e - 1]!]! <= MAX_GAP_BLOCKS + 1 && blocks[order[e]!]! - first < SPAN_BLOCKS) e++;
      this.readSpan(blocks, order.subarray(s, e), readOk);
      s = e;
    }
    this.engine.hashPagesAt(this.pages!.ptr, n, this.hashes!.ptr, 0);
    const got = this.hashes!.view(0, n * HASH_SIZE);
    const ok = new Array<boolean>(n);
    for (let i = 0; i < n; i++) ok[i] = readOk[i]! && sameHash(got, i * HASH_SIZE, wanted(i));
    return ok;
  }

  /** The blocks the last verify() read, slot i at i * PAGE_SIZE; valid until the next call. */
  slots(n: number): Uint8Array {
    return this.pages!.view(0, n * PAGE_SIZE);
  }

  /** `page`'s hash under this index's seed (a resent page's, for the end-to-end check); `block` is not needed with one disk. */
  hash(_block: number, page: Uint8Array): Uint8Array {
    return this.engine.hashPages(page);
  }

  free(): void {
    this.pages?.free();
    this.hashes?.free();
    this.span?.free();
    this.pages = this.hashes = this.span = null;
    this.capacity = 0;
  }

  /**
   * The slots `idx` (in block order, within SPAN_BLOCKS) in one read: straight
   * into the slots when they are consecutive blocks in consecutive slots, else
   * through the span buffer, each wanted block copied to its slot.
   */
  private readSpan(blocks: ArrayLike<number>, idx: Uint32Array, readOk: boolean[]): void {
    const first = blocks[idx[0]!]!, count = blocks[idx[idx.length - 1]!]! - first + 1;
    let straight = count === idx.length;
    for (let k = 1; straight && k < idx.length; k++) straight = idx[k] === idx[0]! + k;
    if (straight) {
      if (!this.read(first, count, this.pages!, idx[0]!)) for (const i of idx) readOk[i] = this.read(blocks[i]!, 1, this.pages!, i);
      return;
    }
    if (!this.read(first, count, this.span!, 0)) {
      for (const i of idx) readOk[i] = this.read(blocks[i]!, 1, this.pages!, i);
      return;
    }
    const mem = this.engine.u8(), from = this.span!.ptr, to = this.pages!.ptr;
    for (const i of idx) {
      const at = from + (blocks[i]! - first) * PAGE_SIZE;
      mem.copyWithin(to + i * PAGE_SIZE, at, at + PAGE_SIZE);
    }
  }

  /** Blocks first..first+count-1 into `into` from slot `slot`; false if any is past the image's end or unreadable. */
  private read(first: number, count: number, into: Region, slot: number): boolean {
    if (first + count > this.image.blocks) return false;
    this.reads++;
    try {
      this.image.readBlocks(first, count, into.view(slot * PAGE_SIZE, count * PAGE_SIZE));
      return true;
    } catch {
      return false;
    }
  }

  private reserve(n: number): void {
    if (this.pages && this.capacity >= n) return;
    this.free();
    this.capacity = Math.max(n, 256);
    this.pages = this.engine.alloc(this.capacity * PAGE_SIZE);
    this.hashes = this.engine.alloc(this.capacity * HASH_SIZE);
    this.span = this.engine.alloc(SPAN_BLOCKS * PAGE_SIZE);
  }
}

/** Slot numbers 0..n-1 in the order of their blocks (ties in slot order); sorted as numbers, natively. */
function byBlock(blocks: ArrayLike<number>): Uint32Array {
  const n = blocks.length;
  const order = new Uint32Array(n);
  let sorted = true;
  for (let i = 0; i < n; i++) {
    order[i] = i;
    if (i > 0 && blocks[i]! < blocks[i - 1]!) sorted = false;
  }
  if (sorted) return order;
  // block * 2^21 + slot is exact in a double for 32-bit blocks and up to 2^21 slots
  if (n > 2 ** 21) return order.sort((a, b) => blocks[a]! - blocks[b]! || a - b);
  const keys = new Float64Array(n);
  for (let i = 0; i < n; i++) keys[i] = blocks[i]! * 2 ** 21 + i;
  keys.sort();
  for (let i = 0; i < n; i++) order[i] = keys[i]! % 2 ** 21;
  return order;
}

/** got[at..at+16) equals want: compared in place (a view per block costs more than the compare). */
function sameHash(got: Uint8Array, at: number, want: Uint8Array): boolean {
  for (let b = 0; b < HASH_SIZE; b++) if (got[at + b] !== want[b]) return false;
  return true;
}
