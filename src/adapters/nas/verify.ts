// NAS blocks fetched and checked before anything uses them, in both modes:
// a RAM page travels as a reference to its twin block, and the destination
// uses the block only if it still hashes to the page's hash. The image may
// have been rewritten, truncated or be failing since it was indexed; such a
// block is reported bad and its page is asked for again, never guessed.

import { HASH_SIZE, PAGE_SIZE, type Engine, type Region } from "../../core/engine.js";
import type { GuestDisk } from "./image.js";

/** One reader's block buffers in the core's memory: nothing else ever writes them. */
export class BlockVerifier {
  private pages: Region | null = null;
  private hashes: Region | null = null;
  private capacity = 0;

  constructor(private readonly engine: Engine, private readonly image: GuestDisk) {}

  /**
   * Reads block `blocks[i]` into slot i (runs of consecutive blocks in one
   * read; a run that fails is read again block by block, so the readable
   * ones still count), hashes every slot, and compares with `wanted(i)`.
   * ok[i] is true only for a block read whole whose hash matches.
   */
  verify(blocks: ArrayLike<number>, wanted: (i: number) => Uint8Array): boolean[] {
    const n = blocks.length;
    this.reserve(n);
    const readOk = new Array<boolean>(n).fill(true);
    for (let i = 0; i < n;) {
      let j = i + 1;
      while (j < n && blocks[j] === blocks[j - 1]! + 1) j++;
      if (!this.read(blocks[i]!, i, j - i)) for (let k = i; k < j; k++) readOk[k] = this.read(blocks[k]!, k, 1);
      i = j;
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
    this.pages = this.hashes = null;
    this.capacity = 0;
  }

  /** Blocks first..first+count-1 into slots slot..; false if any is past the image's end or unreadable. */
  private read(first: number, slot: number, count: number): boolean {
    if (first + count > this.image.blocks) return false;
    try {
      this.image.readBlocks(first, count, this.pages!.view(slot * PAGE_SIZE, count * PAGE_SIZE));
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
  }
}

/** got[at..at+16) equals want: compared in place (a view per block costs more than the compare). */
function sameHash(got: Uint8Array, at: number, want: Uint8Array): boolean {
  for (let b = 0; b < HASH_SIZE; b++) if (got[at + b] !== want[b]) return false;
  return true;
}
