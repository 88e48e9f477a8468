// The index of an overlay (a qcow2 image on a backing file): the backing
// file's own index, built once beside it and shared by every overlay on it,
// gives the hashes of the blocks the overlay leaves to its backing file; only
// the overlay's own blocks are read and hashed. The overlay's index uses the
// backing index's seed, so those hashes are the overlay's too.

import { HASH_SIZE, type Engine, type TwinIndex } from "../../core/engine.js";
import { BLOCK_SIZE, type GuestDisk } from "./image.js";
import type { Progress } from "../../log.js";

export interface OverlayHashes {
  /** Every block's hash, 16 bytes each. */
  hashes: Uint8Array;
  /** Blocks read and hashed (the rest came from the backing index). */
  hashed: number;
}

/**
 * Hashes of `disk`'s blocks into `index`: block b from `below` (the backing
 * index's per-block hashes, `belowBlocks` of them) when it reads entirely from
 * the backing disk, read and hashed otherwise.
 */
export function hashOverlay(engine: Engine, disk: GuestDisk, index: TwinIndex, below: TwinIndex, batch: number, onProgress?: (p: Progress) => void): OverlayHashes {
  const total = disk.blocks;
  const belowHashes = below.blockHashes();
  const belowBlocks = below.blocks;
  const all = new Uint8Array(total * HASH_SIZE);
  const buf = engine.alloc(batch * BLOCK_SIZE);
  const out = engine.alloc(batch * HASH_SIZE);
  const inherited = (b: number) => b < belowBlocks && disk.fromBacking(b);
  let hashed = 0;
  try {
    for (let first = 0; first < total; first += batch) {
      const end = Math.min(total, first + batch);
      for (let i = first; i < end;) {
        const from = inherited(i);
        let j = i + 1;
        while (j < end && inherited(j) === from) j++;
        if (from) {
          all.set(belowHashes.subarray(i * HASH_SIZE, j * HASH_SIZE), i * HASH_SIZE);
        } else {
          disk.readBlocks(i, j - i, buf.view(0, (j - i) * BLOCK_SIZE));
          engine.hashPagesAt(buf.ptr, j - i, out.ptr);
          all.set(out.view(0, (j - i) * HASH_SIZE), i * HASH_SIZE);
          hashed += j - i;
        }
        i = j;
      }
      index.setBlocks(all.subarray(first * HASH_SIZE, end * HASH_SIZE), first);
      onProgress?.({ phase: "index", done: end, total, bytes: end * BLOCK_SIZE });
    }
  } finally {
    buf.free();
    out.free();
  }
  return { hashes: all, hashed };
}
