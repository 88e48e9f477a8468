// Twins across every disk of a migration. A reference's u32 block number
// counts in the disks' blocks laid end to end, in the order both ends agreed
// in the handshake: disk d's block b travels as offset(d) + b. With one disk
// the numbers are that disk's own (offset 0), so stream mode's REFS frame
// does not change. Each disk's index has its own hash seed, so a page is
// hashed once per disk it is looked up in, and a reference carries the hash
// under the seed of the disk it names; the destination checks it with that
// disk's engine.

import { HASH_SIZE, NO_BLOCK, PAGE_SIZE, type Engine, type TwinIndex } from "../core/engine.js";
import type { GuestDisk } from "../adapters/nas/image.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import { PageHasher, type Lookup, type PageLookup } from "./hasher.js";
import type { Piece } from "./qemu-stream.js";

/** Most blocks of all disks together a u32 reference can name (16 TiB of 4 KiB blocks). */
export const MAX_TOTAL_BLOCKS = NO_BLOCK;

/** Where each disk starts in the joint numbering; a disk that would not fit in a u32 gets -1 (no dedup). */
export function diskOffsets(blocks: readonly number[]): number[] {
  let at = 0;
  return blocks.map((n) => {
    if (at + n > MAX_TOTAL_BLOCKS) return -1;
    const o = at;
    at += n;
    return o;
  });
}

/** A source disk in the lookup: its index (and the engine of its seed) and where its blocks start. */
export interface SourceDisk {
  engine: Engine;
  index: TwinIndex;
  offset: number;
  /** Where its twins are counted in `found`. */
  slot: number;
}

/**
 * Looks each page up in every disk, in order; the first disk with a twin
 * names it. Counts the twins found per disk (`found`, shared by the
 * migration's sessions).
 */
export class MultiDiskHasher implements PageLookup {
  private readonly hashers: PageHasher[];
  private blocks = new Uint32Array(0);
  private hashes = new Uint8Array(0);

  constructor(private readonly disks: readonly SourceDisk[], private readonly found: number[]) {
    this.hashers = disks.map((d) => new PageHasher(d.engine, d.index));
  }

  lookup(pieces: readonly Piece[], count: number): Lookup {
    if (this.blocks.length < count) {
      this.blocks = new Uint32Array(count);
      this.hashes = new Uint8Array(count * HASH_SIZE);
    }
    const blocks = this.blocks.subarray(0, count).fill(NO_BLOCK);
    const hashes = this.hashes.subarray(0, count * HASH_SIZE);
    let missing = count;
    for (let d = 0; d < this.disks.length && missing > 0; d++) {
      const got = this.hashers[d]!.lookup(pieces, count);
      const off = this.disks[d]!.offset;
      for (let i = 0; i < count; i++) {
        const b = got.blocks[i]!;
        // the hash of a page without a twin is never read: only a twin's hash travels
        if (blocks[i] !== NO_BLOCK || b === NO_BLOCK) continue;
        blocks[i] = off + b;
        hashes.set(got.hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE), i * HASH_SIZE);
        const slot = this.disks[d]!.slot;
        this.found[slot] = (this.found[slot] ?? 0) + 1;
        missing--;
      }
    }
    return { blocks, hashes };
  }

  free(): void {
    for (const h of this.hashers) h.free();
  }
}

/** What stream-in needs of its block reads: BlockVerifier's shape. */
export interface PageVerifier {
  verify(blocks: ArrayLike<number>, wanted: (i: number) => Uint8Array): boolean[];
  slots(n: number): Uint8Array;
  /** `page`'s hash as a reference to `block` carries it (its disk's seed); null: `block` is in no disk with an index here. */
  hash(block: number, page: Uint8Array): Uint8Array | null;
  free(): void;
}

/** A destination disk: the image, the engine of its index's seed, where its blocks start (-1: no dedup on it). */
export interface DestDisk {
  engine: Engine;
  image: GuestDisk;
  offset: number;
  blocks: number;
}

/**
 * Verifies references into several disks: each block goes to its disk's
 * BlockVerifier (its own engine and buffers), and the pages are gathered in
 * order. A block in no disk (or in one without dedup) is reported bad, so
 * its page is asked for again. Counts the verified twins per disk (`used`).
 */
export class MultiDiskVerifier implements PageVerifier {
  private readonly verifiers: BlockVerifier[];
  private pages = Buffer.alloc(0);

  constructor(private readonly disks: readonly DestDisk[], private readonly used: number[]) {
    this.verifiers = disks.map((d) => new BlockVerifier(d.engine, d.image));
  }

  verify(blocks: ArrayLike<number>, wanted: (i: number) => Uint8Array): boolean[] {
    const n = blocks.length;
    if (this.pages.length < n * PAGE_SIZE) this.pages = Buffer.allocUnsafe(n * PAGE_SIZE);
    const ok = new Array<boolean>(n).fill(false);
    const byDisk = this.group(blocks);
    byDisk.forEach((slots, d) => {
      const disk = this.disks[d]!;
      const v = this.verifiers[d]!;
      const good = v.verify(slots.map((i) => blocks[i]! - disk.offset), (j) => wanted(slots[j]!));
      const pages = v.slots(slots.length);
      slots.forEach((i, j) => {
        ok[i] = good[j]!;
        if (!good[j]) return;
        this.pages.set(pages.subarray(j * PAGE_SIZE, (j + 1) * PAGE_SIZE), i * PAGE_SIZE);
        this.used[d] = (this.used[d] ?? 0) + 1;
      });
    });
    return ok;
  }

  slots(n: number): Uint8Array {
    return this.pages.subarray(0, n * PAGE_SIZE);
  }

  hash(block: number, page: Uint8Array): Uint8Array | null {
    const d = this.diskOf(block);
    return d < 0 ? null : this.verifiers[d]!.hash(block - this.disks[d]!.offset, page);
  }

  free(): void {
    for (const v of this.verifiers) v.free();
  }

  /** The slots of each disk's blocks, in order; blocks of no usable disk are left out (not verified). */
  private group(blocks: ArrayLike<number>): Map<number, number[]> {
    const m = new Map<number, number[]>();
    for (let i = 0; i < blocks.length; i++) {
      const d = this.diskOf(blocks[i]!);
      if (d < 0) continue;
      let s = m.get(d);
      if (!s) m.set(d, s = []);
      s.push(i);
    }
    return m;
  }

  private diskOf(block: number): number {
    for (let d = 0; d < this.disks.length; d++) {
      const { offset, blocks } = this.disks[d]!;
      if (offset >= 0 && block >= offset && block < offset + blocks) return d;
    }
    return -1;
  }
}
