// TwinIndex: 128-bit block hash -> block number, open addressing (linear
// probing) in linear memory.
//
// Memory per indexed block: 16 B for the block's hash (kept per block so an
// update can find and remove the old entry, and so a probe can check the full
// 128 bits) + 8 B per slot (u32 tag, u32 block+1) / load factor + 1 bit of
// presence. Load is kept in [0.5, 0.8] (growth re-sizes to load 0.5; a reserve
// from the known block count sizes to load 0.75), so an index costs 26-32 B per
// block. Slot positions use multiply-shift range reduction, so the table size
// need not be a power of two.
// When several blocks share one content, the first one indexed stands for all.

import { getBit, writeBit } from "./bits";

const EMPTY: u32 = 0;
const MAX_LOAD: f64 = 0.8;
const GROW_LOAD: f64 = 0.5;
const RESERVE_LOAD: f64 = 0.75;
const NO_BLOCK: u32 = 0xFFFFFFFF;

@unmanaged
export class TwinIndex {
  slots: usize = 0;     // cap * 8 bytes: u32 tag, u32 block + 1 (0 = empty)
  cap: u32 = 0;
  count: u32 = 0;       // slots in use
  hashes: usize = 0;    // blockCap * 16 bytes
  present: usize = 0;   // blockCap bits
  blockCap: u32 = 0;
  blocks: u32 = 0;      // highest block number set + 1
  zeroHash: usize = 0;  // hash that is never indexed (the zero page)
}

@inline function probeStart(h: usize, cap: u32): u32 {
  return <u32>((<u64>load<u32>(h) * <u64>cap) >> 32);
}

@inline function tagOf(h: usize): u32 {
  return load<u32>(h, 4);
}

@inline function sameHash(a: usize, b: usize): bool {
  return load<u64>(a) == load<u64>(b) && load<u64>(a, 8) == load<u64>(b, 8);
}

function allocZeroed(bytes: usize): usize {
  const p = heap.alloc(bytes);
  memory.fill(p, 0, bytes);
  return p;
}

export function indexCreate(blockCapacity: u32, zeroHash: usize): TwinIndex {
  const idx = changetype<TwinIndex>(heap.alloc(offsetof<TwinIndex>()));
  idx.count = 0;
  idx.blocks = 0;
  idx.zeroHash = zeroHash;
  const bc = max<u32>(blockCapacity, 64);
  idx.blockCap = bc;
  idx.hashes = allocZeroed(<usize>bc << 4);
  idx.present = allocZeroed(((<usize>bc + 63) >> 6) << 3);
  idx.cap = max<u32>(<u32>Math.ceil(<f64>bc / RESERVE_LOAD), 16);
  idx.slots = allocZeroed(<usize>idx.cap << 3);
  return idx;
}

export function indexFree(idx: TwinIndex): void {
  heap.free(idx.slots);
  heap.free(idx.hashes);
  heap.free(idx.present);
  heap.free(changetype<usize>(idx));
}

function growBlocks(idx: TwinIndex, need: u32): void {
  let bc = idx.blockCap;
  while (bc < need) bc = bc > 0x7FFFFFFF ? 0xFFFFFFFE : bc * 2;
  const hashes = allocZeroed(<usize>bc << 4);
  memory.copy(hashes, idx.hashes, <usize>idx.blockCap << 4);
  const present = allocZeroed(((<usize>bc + 63) >> 6) << 3);
  memory.copy(present, idx.present, ((<usize>idx.blockCap + 63) >> 6) << 3);
  heap.free(idx.hashes);
  heap.free(idx.present);
  idx.hashes = hashes;
  idx.present = present;
  idx.blockCap = bc;
}

function placeSlot(slots: usize, cap: u32, h: usize, block: u32): void {
  let i = probeStart(h, cap);
  while (load<u32>(slots + (<usize>i << 3), 4) != EMPTY) {
    i = i + 1 == cap ? 0 : i + 1;
  }
  store<u32>(slots + (<usize>i << 3), tagOf(h));
  store<u32>(slots + (<usize>i << 3), block + 1, 4);
}

function rehash(idx: TwinIndex, newCap: u32): void {
  const slots = allocZeroed(<usize>newCap << 3);
  for (let i: u32 = 0; i < idx.cap; i++) {
    const b = load<u32>(idx.slots + (<usize>i << 3), 4);
    if (b != EMPTY) placeSlot(slots, newCap, idx.hashes + (<usize>(b - 1) << 4), b - 1);
  }
  heap.free(idx.slots);
  idx.slots = slots;
  idx.cap = newCap;
}

/** Slot index holding `h`, or -1. */
function findSlot(idx: TwinIndex, h: usize): i64 {
  const slots = idx.slots, cap = idx.cap, tag = tagOf(h);
  let i = probeStart(h, cap);
  while (true) {
    const s = slots + (<usize>i << 3);
    const b = load<u32>(s, 4);
    if (b == EMPTY) return -1;
    if (load<u32>(s) == tag && sameHash(idx.hashes + (<usize>(b - 1) << 4), h)) return i;
    i = i + 1 == cap ? 0 : i + 1;
  }
}

function insert(idx: TwinIndex, h: usize, block: u32): void {
  if (findSlot(idx, h) >= 0) return; // an earlier block with this content stands for it
  if (<f64>(idx.count + 1) > <f64>idx.cap * MAX_LOAD) {
    rehash(idx, <u32>Math.ceil(<f64>(idx.count + 1) / GROW_LOAD));
  }
  placeSlot(idx.slots, idx.cap, h, block);
  idx.count++;
}

// Backward-shift deletion keeps probe chains intact without tombstones.
function removeSlot(idx: TwinIndex, slot: u32): void {
  const slots = idx.slots, cap = idx.cap;
  let i = slot;
  let j = slot;
  while (true) {
    j = j + 1 == cap ? 0 : j + 1;
    const sj = slots + (<usize>j << 3);
    const b = load<u32>(sj, 4);
    if (b == EMPTY) break;
    const k = probeStart(idx.hashes + (<usize>(b - 1) << 4), cap);
    // move j back to i unless its home k lies cyclically in (i, j]
    const inRange = i <= j ? (k > i && k <= j) : (k > i || k <= j);
    if (!inRange) {
      store<u64>(slots + (<usize>i << 3), load<u64>(sj));
      i = j;
    }
  }
  store<u64>(slots + (<usize>i << 3), 0);
  idx.count--;
}

/**
 * Records the hashes of blocks first..first+count-1 (16 bytes each at `hashes`).
 * A block whose content changed loses its old entry; zero blocks are kept per
 * block but never indexed (zero pages are handled on their own).
 */
export function indexSetBlocks(idx: TwinIndex, hashes: usize, first: u32, count: u32): void {
  if (count == 0) return;
  const end = first + count;
  if (end > idx.blockCap) growBlocks(idx, end);
  if (end > idx.blocks) idx.blocks = end;
  for (let n: u32 = 0; n < count; n++) {
    const b = first + n;
    const h = hashes + (<usize>n << 4);
    const rec = idx.hashes + (<usize>b << 4);
    if (getBit(idx.present, b)) {
      if (sameHash(rec, h)) continue;
      const s = findSlot(idx, rec);
      if (s >= 0 && load<u32>(idx.slots + (<usize>s << 3), 4) == b + 1) removeSlot(idx, <u32>s);
    }
    store<u64>(rec, load<u64>(h));
    store<u64>(rec, load<u64>(h, 8), 8);
    writeBit(idx.present, b, true);
    if (!sameHash(h, idx.zeroHash)) insert(idx, rec, b);
  }
}

// Lookups go in groups of LOOKUP_GROUP: the group's home slots, then the hash
// records those slots point at (when the tag matches), are loaded first with no
// branches between the loads, so their cache misses overlap; the probes that
// follow find them in cache. A miss scans ~8.5 slots at load 0.75, so the
// cache line after the home slot is touched too. (Wasm has no prefetch instruction; a load whose
// value feeds LOOKUP_SINK does the same job.)
const LOOKUP_GROUP: u32 = 32;
const LOOKUP_SINK = memory.data(8, 8);

/**
 * For each of `count` hashes whose bit is set in `candidates` (or all, when
 * candidates is 0): the block holding that content into outBlocks[i] (u32,
 * 0xFFFFFFFF when none) and bit i of outBits. Returns the number found.
 */
export function indexLookup(idx: TwinIndex, hashes: usize, count: u32, candidates: usize,
                            outBlocks: usize, outBits: usize): u32 {
  const slots = idx.slots, cap = idx.cap, recs = idx.hashes;
  const lastSlot = slots + (<usize>(cap - 1) << 3);
  let found: u32 = 0;
  let sink: u32 = 0;
  for (let g: u32 = 0; g < count; g += LOOKUP_GROUP) {
    const end = min<u32>(g + LOOKUP_GROUP, count);
    // 1. touch each home slot
    for (let i = g; i < end; i++) {
      const h = hashes + (<usize>i << 4);
      const s = slots + (<usize>probeStart(h, cap) << 3);
      sink += load<u32>(s, 4) + load<u32>(min<usize>(s + 64, lastSlot), 4);
    }
    // 2. touch the record a home slot points at when its tag matches
    for (let i = g; i < end; i++) {
      const h = hashes + (<usize>i << 4);
      const s = slots + (<usize>probeStart(h, cap) << 3);
      const b = load<u32>(s, 4);
      const hit = (load<u32>(s) == tagOf(h)) & (b != EMPTY);
      sink += load<u32>(select<usize>(recs + (<usize>(b - 1) << 4), h, hit));
    }
    // 3. the lookups themselves
    for (let i = g; i < end; i++) {
      let block = NO_BLOCK;
      if (candidates == 0 || getBit(candidates, i)) {
        const s = findSlot(idx, hashes + (<usize>i << 4));
        if (s >= 0) block = load<u32>(slots + (<usize>s << 3), 4) - 1;
      }
      if (outBlocks) store<u32>(outBlocks + (<usize>i << 2), block);
      if (outBits) writeBit(outBits, i, block != NO_BLOCK);
      if (block != NO_BLOCK) found++;
    }
  }
  store<u32>(LOOKUP_SINK, sink);
  return found;
}

export function indexCount(idx: TwinIndex): u32 { return idx.count; }
export function indexBlocks(idx: TwinIndex): u32 { return idx.blocks; }
export function indexHashesPtr(idx: TwinIndex): usize { return idx.hashes; }
export function indexPresentPtr(idx: TwinIndex): usize { return idx.present; }
export function indexBytes(idx: TwinIndex): usize {
  return (<usize>idx.cap << 3) + (<usize>idx.blockCap << 4) + (((<usize>idx.blockCap + 63) >> 6) << 3);
}
