// pagetwin core: everything works on linear memory given as (pointer, count);
// the host allocates regions with `alloc` and reads pages straight into them.

import { hashPage, initSeed, zeroHashPtr, PAGE_SIZE, HASH_SIZE } from "./xxh3";
import { writeBit } from "./bits";

export { bitsCombine, bitsPopcount, bitsExtract, bitsDiff, bitsFill, copyRecordsMasked } from "./bits";
export {
  indexCreate, indexCreateForLoad, indexFree, indexSetBlocks, indexLoad, indexReserve, indexLookup,
  indexCount, indexBlocks, indexHashesPtr, indexPresentPtr, indexBytes,
} from "./twin_index";
export { zeroHashPtr, currentSeed } from "./xxh3";

export const SIMD: bool = ASC_FEATURE_SIMD;

export function alloc(bytes: usize): usize {
  return heap.alloc(bytes);
}

export function free(ptr: usize): void {
  heap.free(ptr);
}

export function setSeed(seed: u64): void {
  initSeed(seed);
}

/**
 * Hashes `count` 4096-byte pages at `pages` into 16-byte canonical XXH3-128
 * digests at `out`; when `zeroBits` is not 0, bit i says whether page i is all
 * zero. Returns the number of zero pages.
 */
export function hashPages(pages: usize, count: u32, out: usize, zeroBits: usize): u32 {
  let zeros: u32 = 0;
  for (let i: u32 = 0; i < count; i++) {
    const z = hashPage(pages + <usize>i * PAGE_SIZE, out + <usize>i * HASH_SIZE);
    if (z) zeros++;
    if (zeroBits) writeBit(zeroBits, i, z);
  }
  return zeros;
}

initSeed(0);
