// TwinIndex: 128-bit block hash -> block number, a bucketized open-addressing
// table in linear memory.
//
// The table is an array of 64-byte buckets, one cache line each (aligned to
// 64): 8 u32 tags (bits 32..63 of the hash, 0 meaning an empty slot, so a tag
// of 0 is stored as 1), then the 8 u32 block numbers of those slots. A hash's
// home bucket comes from its first 32 bits by multiply-shift range reduction
// (the bucket count need not be a power of two); a full bucket overflows into
// the next one (linear probing over buckets). Invariant: every entry sits in
// its home bucket or after a run of full buckets starting there, so a lookup
// stops at the first bucket that has a free slot. A bucket is searched with two
// SIMD compares of its tags (i32x4.eq, narrowed to one 8-bit mask; a scalar
// loop in the scalar build), and only a slot whose 32-bit tag matches costs a
// read of the block's 16-byte hash record, which decides on all 128 bits. A
// miss thus usually reads one cache line, a hit one line plus one record.
// Deletion shifts entries back over buckets (no tombstones).
//
// Memory per indexed block: 16 B for the block's hash (kept per block so an
// update can find and remove the old entry, and so a probe can check the full
// 128 bits) + 1 bit of presence + 8 B per slot / load factor. Load stays below
// MAX_LOAD (0.8); growth re-sizes to GROW_LOAD (0.52), a reserve from the known
// block count sizes to RESERVE_LOAD (0.55), so an index costs 26.1-31.5 B per
// block (30.7 B when reserved). The low reserve load is for speed: at 0.55
// about 9% of misses meet a full home bucket (and read the next one too), at
// 0.75 about 33%; lookups in a 4M-block index ran 19-20 vs 14 M/s here.
// When several blocks share one content, the first one indexed stands for all.

import { getBit, writeBit } from "./bits";

const SLOTS: u32 = 8;            // slots per bucket
const MAX_LOAD: f64 = 0.8;
const GROW_LOAD: f64 = 0.52;
const RESERVE_LOAD: f64 = 0.55;
const NO_BLOCK: u32 = 0xFFFFFFFF;

@unmanaged
export class TwinIndex {
  table: usize = 0;     // nb * 64 bytes, 64-aligned
  tableRaw: usize = 0;  // the allocation holding it
  nb: u32 = 0;          // buckets
  count: u32 = 0;       // slots in use
  hashes: usize = 0;    // blockCap * 16 bytes
  present: usize = 0;   // blockCap bits
  blockCap: u32 = 0;
  blocks: u32 = 0;      // highest block number set + 1
  zeroHash: usize = 0;  // hash that is never indexed (the zero page)
}

@inline function homeOf(h: usize, nb: u32): u32 {
  return <u32>((<u64>load<u32>(h) * <u64>nb) >> 32);
}

@inline function tagOf(h: usize): u32 {
  const t = load<u32>(h, 4);
  return select<u32>(t, 1, t != 0);
}

@inline function sameHash(a: usize, b: usize): bool {
  return load<u64>(a) == load<u64>(b) && load<u64>(a, 8) == load<u64>(b, 8);
}

/** Bit s set when tag slot s of the bucket at `b` equals `tag`. */
@inline function matchMask(b: usize, tag: u32): u32 {
  if (ASC_FEATURE_SIMD) {
    const q = i32x4.splat(tag);
    return i16x8.bitmask(i16x8.narrow_i32x4_s(i32x4.eq(v128.load(b), q), i32x4.eq(v128.load(b, 16), q)));
  } else {
    let m: u32 = 0;
    for (let s: u32 = 0; s < SLOTS; s++) m |= <u32>(load<u32>(b + (<usize>s << 2)) == tag) << s;
    return m;
  }
}

@inline function isFull(b: usize): bool {
  if (ASC_FEATURE_SIMD) {
    return i32x4.all_true(v128.load(b)) & i32x4.all_true(v128.load(b, 16));
  } else {
    return (load<u32>(b) != 0) & (load<u32>(b, 4) != 0) & (load<u32>(b, 8) != 0) & (load<u32>(b, 12) != 0)
      & (load<u32>(b, 16) != 0) & (load<u32>(b, 20) != 0) & (load<u32>(b, 24) != 0) & (load<u32>(b, 28) != 0);
  }
}

@inline function firstFree(b: usize): u32 {
  return ctz(matchMask(b, 0));
}

function allocZeroed(bytes: usize): usize {
  const p = heap.alloc(bytes);
  memory.fill(p, 0, bytes);
  return p;
}

function bucketsFor(entries: f64, load: f64): u32 {
  return max<u32>(<u32>Math.ceil(entries / (load * <f64>SLOTS)), 2);
}

function setTable(idx: TwinIndex, nb: u32): void {
  const raw = heap.alloc((<usize>nb << 6) + 64);
  const t = (raw + 63) & ~<usize>63;
  memory.fill(t, 0, <usize>nb << 6);
  idx.tableRaw = raw;
  idx.table = t;
  idx.nb = nb;
}

export function indexCreate(blockCapacity: u32, zeroHash: usize): TwinIndex {
  return makeIndex(blockCapacity, zeroHash, 0);
}

/**
 * An empty index whose first `blocks` records are left as they are, not
 * zeroed: for a host that writes every one of them (an index file read
 * straight into indexHashesPtr) before indexLoad(idx, indexHashesPtr(idx),
 * blocks). A record is only read once its block is set (its present bit), so
 * its old bytes are never seen. Zeroing first would be a pass over memory the
 * host then writes again: where pages are slow to touch the first time, the
 * host's read into pages just zeroed costs more than into untouched ones.
 */
export function indexCreateForLoad(blocks: u32, zeroHash: usize): TwinIndex {
  return makeIndex(blocks, zeroHash, blocks);
}

function makeIndex(blockCapacity: u32, zeroHash: usize, unzeroed: u32): TwinIndex {
  const idx = changetype<TwinIndex>(heap.alloc(offsetof<TwinIndex>()));
  idx.count = 0;
  idx.blocks = 0;
  idx.zeroHash = zeroHash;
  const bc = max<u32>(blockCapacity, 64);
  idx.blockCap = bc;
  idx.hashes = heap.alloc(<usize>bc << 4);
  const skip = <usize>min<u32>(unzeroed, bc) << 4;
  memory.fill(idx.hashes + skip, 0, (<usize>bc << 4) - skip);
  idx.present = allocZeroed(((<usize>bc + 63) >> 6) << 3);
  setTable(idx, bucketsFor(<f64>bc, RESERVE_LOAD));
  return idx;
}

export function indexFree(idx: TwinIndex): void {
  heap.free(idx.tableRaw);
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

/** Puts (tag, block) into the first bucket from `home` with a free slot. */
@inline function place(table: usize, nb: u32, home: u32, tag: u32, block: u32): void {
  let i = home;
  let b = table + (<usize>i << 6);
  while (isFull(b)) {
    i = i + 1 == nb ? 0 : i + 1;
    b = table + (<usize>i << 6);
  }
  const s = <usize>firstFree(b) << 2;
  store<u32>(b + s, tag);
  store<u32>(b + s, block, 32);
}

function rehash(idx: TwinIndex, newNb: u32): void {
  const oldTable = idx.table, oldRaw = idx.tableRaw, oldNb = idx.nb, recs = idx.hashes;
  setTable(idx, newNb);
  const table = idx.table;
  for (let i: u32 = 0; i < oldNb; i++) {
    const b = oldTable + (<usize>i << 6);
    for (let s: usize = 0; s < <usize>SLOTS; s++) {
      const tag = load<u32>(b + (s << 2));
      if (tag == 0) continue;
      const blk = load<u32>(b + (s << 2), 32);
      place(table, newNb, homeOf(recs + (<usize>blk << 4), newNb), tag, blk);
    }
  }
  heap.free(oldRaw);
}

/** Address of the tag of the slot holding `h` (its block at +32), or 0. */
@inline function findIn(table: usize, nb: u32, recs: usize, b: usize, h: usize): usize {
  const tag = tagOf(h);
  while (true) {
    let m = matchMask(b, tag);
    while (m) {
      const s = <usize>ctz(m) << 2;
      if (sameHash(recs + (<usize>load<u32>(b + s, 32) << 4), h)) return b + s;
      m &= m - 1;
    }
    if (!isFull(b)) return 0;
    b += 64;
    if (b == table + (<usize>nb << 6)) b = table;
  }
}

function findSlot(idx: TwinIndex, h: usize): usize {
  const table = idx.table, nb = idx.nb;
  return findIn(table, nb, idx.hashes, table + (<usize>homeOf(h, nb) << 6), h);
}

function insert(idx: TwinIndex, h: usize, block: u32): void {
  if (findSlot(idx, h)) return; // an earlier block with this content stands for it
  if (<f64>(idx.count + 1) > <f64>idx.nb * <f64>SLOTS * MAX_LOAD) {
    rehash(idx, bucketsFor(<f64>(idx.count + 1), GROW_LOAD));
  }
  place(idx.table, idx.nb, homeOf(h, idx.nb), tagOf(h), block);
  idx.count++;
}

// Backward shift over buckets: after a slot of bucket i is freed, an entry of a
// later bucket j (reached through full buckets only) whose home is not in
// (i, j] would no longer be found; the first such entry moves into the hole,
// and the hole moves to j. A bucket that was not full ends the scan, since no
// entry past it probed through it.
function removeSlot(idx: TwinIndex, slot: usize): void {
  const table = idx.table, nb = idx.nb, recs = idx.hashes;
  let hole = slot;
  let i = <u32>((slot - table) >> 6);
  const wasFull = isFull(table + (<usize>i << 6));
  store<u32>(hole, 0);
  store<u32>(hole, 0, 32);
  idx.count--;
  if (!wasFull) return;
  let j = i;
  while (true) {
    j = j + 1 == nb ? 0 : j + 1;
    const bj = table + (<usize>j << 6);
    const full = isFull(bj);
    for (let s: usize = 0; s < <usize>SLOTS; s++) {
      const tag = load<u32>(bj + (s << 2));
      if (tag == 0) continue;
      const blk = load<u32>(bj + (s << 2), 32);
      const k = homeOf(recs + (<usize>blk << 4), nb);
      const inRange = i <= j ? (k > i && k <= j) : (k > i || k <= j);
      if (!inRange) {
        store<u32>(hole, tag);
        store<u32>(hole, blk, 32);
        hole = bj + (s << 2);
        store<u32>(hole, 0);
        store<u32>(hole, 0, 32);
        i = j;
        break;
      }
    }
    if (!full) break;
  }
}

// Build and lookup go in groups: the home buckets of a group are read first
// with no branches between the loads, so their cache misses overlap (wasm has
// no prefetch instruction; a load whose value feeds SINK does the same job).
const GROUP: u32 = 32;
const SINK = memory.data(8, 8);

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
  let sink: u32 = 0;
  for (let g: u32 = 0; g < count; g += GROUP) {
    const gend = min<u32>(g + GROUP, count);
    const table = idx.table, nb = idx.nb;
    for (let n = g; n < gend; n++) {
      sink += load<u32>(table + (<usize>homeOf(hashes + (<usize>n << 4), nb) << 6));
    }
    for (let n = g; n < gend; n++) {
      const b = first + n;
      const h = hashes + (<usize>n << 4);
      const rec = idx.hashes + (<usize>b << 4);
      if (getBit(idx.present, b)) {
        if (sameHash(rec, h)) continue;
        const s = findSlot(idx, rec);
        if (s != 0 && load<u32>(s, 32) == b) removeSlot(idx, s);
      }
      store<u64>(rec, load<u64>(h));
      store<u64>(rec, load<u64>(h, 8), 8);
      writeBit(idx.present, b, true);
      if (!sameHash(h, idx.zeroHash)) insert(idx, rec, b);
    }
  }
  store<u32>(SINK, sink);
}

// A bulk load inserts in groups like indexSetBlocks (home buckets touched
// first so their cache misses overlap), without its per-block work for blocks
// that had a hash before, and without copying: an index file is read straight
// into the records. Blocks go in ascending order, so the first block indexed
// still stands for the others of equal content.
const LOAD_GROUP: u32 = 64;
const LOAD_HOME = memory.data(LOAD_GROUP << 2, 64); // home bucket of each block of the group

/**
 * Sets blocks 0..count-1 of an EMPTY index (no block set yet) from `count`
 * hashes at `hashes`, which may be the index's own records (the pointer
 * indexReserve(idx, count) returns) so a host reads an index file straight
 * into them. The result answers lookups as indexSetBlocks would. A non-empty index takes
 * the hashes through indexSetBlocks.
 */
export function indexLoad(idx: TwinIndex, hashes: usize, count: u32): void {
  if (count == 0) return;
  if (idx.blocks != 0 || idx.count != 0) {
    indexSetBlocks(idx, hashes, 0, count);
    return;
  }
  const own = hashes == idx.hashes; // then count is within indexReserve's room
  if (count > idx.blockCap) growBlocks(idx, count);
  if (!own) memory.copy(idx.hashes, hashes, <usize>count << 4);
  fillPresent(idx.present, count);
  idx.blocks = count;
  if (<f64>count > <f64>idx.nb * <f64>SLOTS * MAX_LOAD) {
    heap.free(idx.tableRaw);
    setTable(idx, bucketsFor(<f64>count, RESERVE_LOAD));
  }
  const table = idx.table, nb = idx.nb, recs = idx.hashes, zero = idx.zeroHash;
  let added: u32 = 0, sink: u32 = 0;
  for (let g: u32 = 0; g < count; g += LOAD_GROUP) {
    const n = min<u32>(LOAD_GROUP, count - g);
    const hg = recs + (<usize>g << 4);
    for (let i: u32 = 0; i < n; i++) {
      const home = homeOf(hg + (<usize>i << 4), nb);
      store<u32>(LOAD_HOME + (<usize>i << 2), home);
      sink += load<u32>(table + (<usize>home << 6));
    }
    for (let i: u32 = 0; i < n; i++) {
      const h = hg + (<usize>i << 4);
      const home = load<u32>(LOAD_HOME + (<usize>i << 2));
      if (sameHash(h, zero) || findIn(table, nb, recs, table + (<usize>home << 6), h)) continue;
      place(table, nb, home, tagOf(h), g + i);
      added++;
    }
  }
  store<u32>(SINK, sink);
  idx.count = added;
}

/** Bits 0..count-1 set. */
function fillPresent(present: usize, count: u32): void {
  memory.fill(present, 0xFF, <usize>(count >> 3));
  for (let i = count & ~7; i < count; i++) writeBit(present, i, true);
}

/** Makes room for `blocks` block records (indexLoad reads them from indexHashesPtr); returns that pointer. */
export function indexReserve(idx: TwinIndex, blocks: u32): usize {
  if (blocks > idx.blockCap) growBlocks(idx, blocks);
  return idx.hashes;
}

// Lookups go in groups of LOOKUP_GROUP hashes, in passes. A pass that waits on
// memory does little else, so many of its loads are in flight at once (how
// many is bounded by the core's reorder window, not by the work between them):
//   1. the home bucket of each hash is read (one line each, all independent);
//   2a. its tags are compared (buckets now in cache); the hashes with a tag
//       match go on a list with the record of their first match, the misses
//       whose home bucket is full on another;
//   2b. those records, and the buckets after the full ones, are read: a tight
//       loop of independent loads;
//   3. every answer is set to "none", then the first list is verified against
//      the full 128 bits, and the rare hashes whose probe goes on (a tag match
//      that is not the hash, with more matches or a full bucket; a miss in a
//      full bucket) take the general findIn. Only about half the hashes come
//      here and the branches go the usual way, so few are mispredicted.
// Scratch per group: LOOKUP_GROUP * 4 bytes per list.
const LOOKUP_GROUP: u32 = 128;
const L_HOME = memory.data(LOOKUP_GROUP << 2, 64);  // home bucket of each hash of the group
const L_REC = memory.data(LOOKUP_GROUP << 2, 64);   // record of the first tag match, per listed hash
const L_MATCH = memory.data(LOOKUP_GROUP << 2, 64); // listed hash: index in group | (probe may go on) << 31
const L_FULL = memory.data(LOOKUP_GROUP << 2, 64);  // misses whose home bucket is full: index in group
const L_BITS = memory.data(LOOKUP_GROUP >> 3, 64);  // hits of the group, one bit each

@inline function differs(a: usize, b: usize): bool {
  if (ASC_FEATURE_SIMD) {
    return v128.any_true(v128.xor(v128.load(a), v128.load(b)));
  } else {
    return ((load<u64>(a) ^ load<u64>(b)) | (load<u64>(a, 8) ^ load<u64>(b, 8))) != 0;
  }
}

@inline function setHit(i: u32): void {
  const w = L_BITS + (<usize>(i >> 6) << 3);
  store<u64>(w, load<u64>(w) | (<u64>1 << <u64>(i & 63)));
}

/**
 * For each of `count` hashes whose bit is set in `candidates` (or all, when
 * candidates is 0): the block holding that content into outBlocks[i] (u32,
 * 0xFFFFFFFF when none) and bit i of outBits. Returns the number found.
 */
export function indexLookup(idx: TwinIndex, hashes: usize, count: u32, candidates: usize,
                            outBlocks: usize, outBits: usize): u32 {
  const table = idx.table, nb = idx.nb, recs = idx.hashes;
  const last = table + (<usize>(nb - 1) << 6);
  let found: u32 = 0;
  let sink: u32 = 0;
  for (let g: u32 = 0; g < count; g += LOOKUP_GROUP) {
    const n = min<u32>(LOOKUP_GROUP, count - g);
    const hg = hashes + (<usize>g << 4);
    // 1. home buckets (bucket 0 for hashes that are not candidates)
    if (candidates == 0) {
      // unrolled: fewer instructions per load, so more loads fit the reorder window
      let i: u32 = 0;
      for (; i + 4 <= n; i += 4) {
        const h = hg + (<usize>i << 4), o = L_HOME + (<usize>i << 2);
        const b0 = table + (<usize>homeOf(h + 0, nb) << 6);
        store<usize>(o, b0, 0);
        const b1 = table + (<usize>homeOf(h + 16, nb) << 6);
        store<usize>(o, b1, 4);
        const b2 = table + (<usize>homeOf(h + 32, nb) << 6);
        store<usize>(o, b2, 8);
        const b3 = table + (<usize>homeOf(h + 48, nb) << 6);
        store<usize>(o, b3, 12);
        sink += load<u32>(b0) + load<u32>(b1) + load<u32>(b2) + load<u32>(b3);
      }
      for (; i < n; i++) {
        const b = table + (<usize>homeOf(hg + (<usize>i << 4), nb) << 6);
        store<usize>(L_HOME + (<usize>i << 2), b);
        sink += load<u32>(b);
      }
    } else {
      let i: u32 = 0;
      for (; i + 4 <= n; i += 4) {
        const h = hg + (<usize>i << 4), o = L_HOME + (<usize>i << 2), c = g + i;
        const b0 = select<usize>(table + (<usize>homeOf(h + 0, nb) << 6), table, getBit(candidates, c));
        store<usize>(o, b0, 0);
        const b1 = select<usize>(table + (<usize>homeOf(h + 16, nb) << 6), table, getBit(candidates, c + 1));
        store<usize>(o, b1, 4);
        const b2 = select<usize>(table + (<usize>homeOf(h + 32, nb) << 6), table, getBit(candidates, c + 2));
        store<usize>(o, b2, 8);
        const b3 = select<usize>(table + (<usize>homeOf(h + 48, nb) << 6), table, getBit(candidates, c + 3));
        store<usize>(o, b3, 12);
        sink += load<u32>(b0) + load<u32>(b1) + load<u32>(b2) + load<u32>(b3);
      }
      for (; i < n; i++) {
        const b = select<usize>(table + (<usize>homeOf(hg + (<usize>i << 4), nb) << 6), table, getBit(candidates, g + i));
        store<usize>(L_HOME + (<usize>i << 2), b);
        sink += load<u32>(b);
      }
    }
    // 2a. tags, no branches: both lists are written every time, their lengths
    // grow only when the entry belongs
    let nm: usize = 0, nf: usize = 0;
    for (let i: u32 = 0; i < n; i++) {
      const h = hg + (<usize>i << 4);
      const b = load<usize>(L_HOME + (<usize>i << 2));
      let m = matchMask(b, tagOf(h));
      let full = <u32>isFull(b);
      if (candidates != 0) {
        const c = <u32>getBit(candidates, g + i);
        m &= -c;
        full &= c;
      }
      const blk = load<u32>(b + (<usize>(ctz(m) & 7) << 2), 32);
      const more = <u32>(((m & (m - 1)) | full) != 0);
      store<u32>(L_MATCH + (nm << 2), i | (more << 31));
      store<usize>(L_REC + (nm << 2), recs + (<usize>blk << 4));
      nm += <usize>(m != 0);
      store<u32>(L_FULL + (nf << 2), i);
      nf += <usize>((m == 0) & (full != 0));
    }
    // 2b. the records of the matches, the buckets after the full ones
    for (let j: usize = 0; j < nm; j++) sink += load<u32>(load<usize>(L_REC + (j << 2)));
    for (let j: usize = 0; j < nf; j++) {
      const b = load<usize>(L_HOME + (<usize>load<u32>(L_FULL + (j << 2)) << 2));
      sink += load<u32>(min<usize>(b + 64, last));
    }
    // 3. answers
    const words = (n + 63) >> 6;
    for (let w: u32 = 0; w < words; w++) store<u64>(L_BITS + (<usize>w << 3), 0);
    const ob = outBlocks + (<usize>g << 2);
    if (outBlocks) {
      for (let i: u32 = 0; i < n; i++) store<u32>(ob + (<usize>i << 2), NO_BLOCK);
    }
    for (let j: usize = 0; j < nm; j++) {
      const x = load<u32>(L_MATCH + (j << 2));
      const i = x & 0x7FFFFFFF;
      const h = hg + (<usize>i << 4);
      const r = load<usize>(L_REC + (j << 2));
      let blk: u32;
      if (!differs(r, h)) {
        blk = <u32>((r - recs) >> 4); // r = recs + blk * 16, no wrap: the records fit in memory
      } else {
        if ((x >> 31) == 0) continue;
        const s = findIn(table, nb, recs, load<usize>(L_HOME + (<usize>i << 2)), h);
        if (s == 0) continue;
        blk = load<u32>(s, 32);
      }
      if (outBlocks) store<u32>(ob + (<usize>i << 2), blk);
      setHit(i);
      found++;
    }
    for (let j: usize = 0; j < nf; j++) {
      const i = load<u32>(L_FULL + (j << 2));
      const s = findIn(table, nb, recs, load<usize>(L_HOME + (<usize>i << 2)), hg + (<usize>i << 4));
      if (s == 0) continue;
      if (outBlocks) store<u32>(ob + (<usize>i << 2), load<u32>(s, 32));
      setHit(i);
      found++;
    }
    if (outBits) {
      if ((n & 63) == 0) {
        // whole words: g is a multiple of 64, so these are whole bytes of outBits
        for (let w: u32 = 0; w < words; w++) store<u64>(outBits + (<usize>g >> 3) + (<usize>w << 3), load<u64>(L_BITS + (<usize>w << 3)));
      } else {
        for (let i: u32 = 0; i < n; i++) writeBit(outBits, g + i, getBit(L_BITS, i));
      }
    }
  }
  store<u32>(SINK, sink);
  return found;
}

export function indexCount(idx: TwinIndex): u32 { return idx.count; }
export function indexBlocks(idx: TwinIndex): u32 { return idx.blocks; }
export function indexHashesPtr(idx: TwinIndex): usize { return idx.hashes; }
export function indexPresentPtr(idx: TwinIndex): usize { return idx.present; }
export function indexBytes(idx: TwinIndex): usize {
  return (<usize>idx.nb << 6) + 64 + (<usize>idx.blockCap << 4) + (((<usize>idx.blockCap + 63) >> 6) << 3);
}
