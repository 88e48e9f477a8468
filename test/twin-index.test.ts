import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createEngine, NO_BLOCK, HASH_SIZE, type CoreFlavor } from "../src/index.js";

const key = (h: Uint8Array, i: number) => Buffer.from(h.subarray(i * 16, i * 16 + 16)).toString("hex");

test("a million blocks: every lookup agrees with a Map model, and the index grows past its first capacity", async () => {
  const engine = await createEngine();
  const idx = engine.createIndex(1024);
  const n = 1_000_000;
  const hashes = new Uint8Array(randomBytes(n * HASH_SIZE));
  // some duplicate contents: block 2i+1 repeats block 2i for the first 1000 pairs
  for (let i = 0; i < 1000; i++) hashes.copyWithin((2 * i + 1) * 16, 2 * i * 16, 2 * i * 16 + 16);
  const model = new Map<string, number>();
  for (let i = 0; i < n; i++) if (!model.has(key(hashes, i))) model.set(key(hashes, i), i);
  for (let first = 0; first < n; first += 100_000) idx.setBlocks(hashes.subarray(first * 16, (first + 100_000) * 16), first);
  assert.equal(idx.size, model.size);
  assert.equal(idx.blocks, n);
  const got = idx.lookup(hashes);
  for (let i = 0; i < n; i++) {
    if (got[i] !== model.get(key(hashes, i))) assert.fail(`block ${i}: index says ${got[i]}, model ${model.get(key(hashes, i))}`);
  }
  const misses = idx.lookup(new Uint8Array(randomBytes(10_000 * 16)));
  assert.ok(misses.every((b) => b === NO_BLOCK));
  assert.ok(idx.bytes / n <= 32.5, `index costs ${(idx.bytes / n).toFixed(1)} bytes per block`);
});

test("hashes that collide in their probe bits and tags are told apart by the full 128 bits", async () => {
  const engine = await createEngine();
  const idx = engine.createIndex(64);
  const n = 5000;
  const hashes = new Uint8Array(n * 16);
  const dv = new DataView(hashes.buffer);
  for (let i = 0; i < n; i++) {
    dv.setUint32(i * 16, 0x12345678); // same probe position bits
    dv.setUint32(i * 16 + 4, i % 3); // only three tags
    dv.setUint32(i * 16 + 12, i + 1); // differ only in the last bytes
  }
  idx.setBlocks(hashes, 0);
  assert.equal(idx.size, n);
  const got = idx.lookup(hashes);
  for (let i = 0; i < n; i++) assert.equal(got[i], i);
});

test("updates: a rewritten block loses its old content and maps its new one; random updates agree with the model", async () => {
  const engine = await createEngine();
  const idx = engine.createIndex(10);
  const n = 20_000;
  const cur: Uint8Array[] = [];
  for (let i = 0; i < n; i++) cur.push(new Uint8Array(randomBytes(16)));
  const all = new Uint8Array(n * 16);
  cur.forEach((h, i) => all.set(h, i * 16));
  idx.setBlocks(all, 0);
  const old: Uint8Array[] = [];
  for (let r = 0; r < 5000; r++) {
    const b = Math.floor(Math.random() * n);
    old.push(cur[b]!);
    cur[b] = new Uint8Array(randomBytes(16));
    idx.setBlocks(cur[b]!, b);
  }
  const q = new Uint8Array(n * 16);
  cur.forEach((h, i) => q.set(h, i * 16));
  const got = idx.lookup(q);
  for (let i = 0; i < n; i++) assert.equal(got[i], i);
  const stale = new Uint8Array(old.length * 16);
  old.forEach((h, i) => stale.set(h, i * 16));
  // an old content is found only if some block still holds it (never, with random hashes)
  assert.ok(idx.lookup(stale).every((b) => b === NO_BLOCK));
  assert.equal(idx.size, n);
});

test("the zero page's hash is never indexed", async () => {
  const engine = await createEngine({ seed: 9n });
  const idx = engine.createIndex();
  idx.setBlocks(engine.zeroPageHash(), 0);
  assert.equal(idx.size, 0);
  assert.equal(idx.lookup(engine.zeroPageHash())[0], NO_BLOCK);
});

// lookupAt with a candidate mask and a hit-bit vector, in batches that are not
// a multiple of the lookup group (128), against a Map model; the bits past the
// batch in the last byte of the hit vector are kept.
async function checkBatch(indexed: Uint8Array, queries: Uint8Array, candBits: Uint8Array | null, flavor: CoreFlavor) {
  const engine = await createEngine({ flavor });
  const idx = engine.createIndex(64);
  idx.setBlocks(indexed, 0);
  const model = new Map<string, number>();
  for (let i = 0; i < indexed.length / 16; i++) if (!model.has(key(indexed, i))) model.set(key(indexed, i), i);
  const n = queries.length / 16;
  const nbytes = Math.ceil(n / 8) + 8;
  const q = engine.alloc(queries.length), ob = engine.alloc(n * 4), bits = engine.alloc(nbytes);
  const cand = candBits ? engine.alloc(candBits.length) : null;
  engine.u8().set(queries, q.ptr);
  if (cand) engine.u8().set(candBits!, cand.ptr);
  engine.u8().fill(0xa5, bits.ptr, bits.ptr + nbytes);
  const found = idx.lookupAt(q.ptr, n, cand ? cand.ptr : 0, ob.ptr, bits.ptr);
  const blocks = engine.u32(ob.ptr, n), b = engine.u8().subarray(bits.ptr, bits.ptr + nbytes);
  let want = 0;
  for (let i = 0; i < n; i++) {
    const isCand = !candBits || ((candBits[i >> 3]! >> (i & 7)) & 1) === 1;
    const w = isCand ? model.get(key(queries, i)) ?? NO_BLOCK : NO_BLOCK;
    if (w !== NO_BLOCK) want++;
    if (blocks[i] !== w) assert.fail(`query ${i} of ${n}: index says ${blocks[i]}, model ${w}`);
    assert.equal((b[i >> 3]! >> (i & 7)) & 1, w === NO_BLOCK ? 0 : 1, `hit bit ${i}`);
  }
  assert.equal(found, want);
  for (let i = n; i < nbytes * 8; i++) assert.equal((b[i >> 3]! >> (i & 7)) & 1, (0xa5 >> (i & 7)) & 1, `bit ${i} past the batch`);
  return want;
}

function shuffled(records: Uint8Array): Uint8Array {
  const n = records.length / 16, out = new Uint8Array(records.length);
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) { const j = Math.floor(Math.random() * (i + 1)); [order[i], order[j]] = [order[j]!, order[i]!]; }
  order.forEach((from, to) => out.set(records.subarray(from * 16, from * 16 + 16), to * 16));
  return out;
}

test("batch lookups: hits, misses and non-candidates, batch sizes off the group size, hit bits past the batch kept", async () => {
  const indexed = new Uint8Array(randomBytes(20_000 * 16));
  for (const n of [1, 7, 127, 128, 129, 1000, 4133]) {
    // half copies of indexed hashes, half fresh ones
    const qs = new Uint8Array(randomBytes(n * 16));
    for (let i = 0; i < n; i += 2) { const b = Math.floor(Math.random() * 20_000); qs.set(indexed.subarray(b * 16, b * 16 + 16), i * 16); }
    const cand = new Uint8Array(randomBytes(Math.ceil(n / 8)));
    for (const flavor of ["simd", "scalar"] as const) {
      const hits = await checkBatch(indexed, qs, null, flavor);
      assert.ok(n < 2 || hits > 0);
      await checkBatch(indexed, qs, cand, flavor);
    }
  }
});

test("batch lookups far along a probe: one home bucket, shared tags, misses that match a tag or meet full buckets", async () => {
  const n = 3000;
  const indexed = new Uint8Array(n * 16);
  const dv = new DataView(indexed.buffer);
  for (let i = 0; i < n; i++) {
    dv.setUint32(i * 16, 7, true); // one home bucket, bucket 0 (where non-candidates are sent): a run of full buckets hundreds long
    dv.setUint32(i * 16 + 4, i % 5); // five tags
    dv.setUint32(i * 16 + 8, i * 2654435761);
    dv.setUint32(i * 16 + 12, i);
  }
  const misses = new Uint8Array(n * 16);
  const mv = new DataView(misses.buffer);
  for (let i = 0; i < n; i++) {
    mv.setUint32(i * 16, 7, true);
    mv.setUint32(i * 16 + 4, i % 2 ? i % 5 : 1000 + i); // a tag in use, or a tag never used
    mv.setUint32(i * 16 + 8, i * 2654435761);
    mv.setUint32(i * 16 + 12, n + i);
  }
  const qs = new Uint8Array(2 * n * 16 + 3 * 16);
  qs.set(indexed, 0);
  qs.set(misses, n * 16);
  qs.set(new Uint8Array(randomBytes(3 * 16)), 2 * n * 16); // and three elsewhere
  const all = shuffled(qs);
  const cand = new Uint8Array(randomBytes(Math.ceil(all.length / 16 / 8)));
  for (const flavor of ["simd", "scalar"] as const) {
    assert.equal(await checkBatch(indexed, all, null, flavor), n);
    await checkBatch(indexed, all, cand, flavor);
  }
});

test("a bulk load (hashes written into the index's own records) answers as block-by-block inserts, in both core builds", async () => {
  for (const flavor of ["simd", "scalar"] as CoreFlavor[]) {
    const engine = await createEngine({ flavor, seed: 9n });
    const n = 300_000;
    const hashes = new Uint8Array(randomBytes(n * HASH_SIZE));
    for (let i = 0; i < 500; i++) hashes.copyWithin((n - 1 - i) * 16, i * 16, i * 16 + 16); // last blocks repeat the first
    hashes.set(engine.hashPages(new Uint8Array(4096)), 7 * 16); // a zero block
    const one = engine.createIndex(n);
    one.setBlocks(hashes, 0);
    const bulk = engine.createIndex(16); // reserved too small: recordsFor makes room
    const recs = bulk.recordsFor(n);
    engine.u8().set(hashes, recs);
    bulk.loadAt(recs, n);
    assert.equal(bulk.size, one.size, flavor);
    assert.equal(bulk.blocks, n);
    assert.deepEqual(bulk.lookup(hashes), one.lookup(hashes), flavor);
    assert.equal(bulk.lookup(hashes.subarray((n - 1) * 16))[0], 0, "a repeated content maps to its first block");
    assert.equal(bulk.lookup(hashes.subarray(7 * 16, 8 * 16))[0], NO_BLOCK, "the zero block is not indexed");
    assert.deepEqual(Buffer.from(bulk.blockHashes()), Buffer.from(hashes));
    one.free();
    bulk.free();
  }
});

test("an index made for a load over memory that held other bytes: the load answers as inserts; records past the loaded ones read as unset", async () => {
  for (const flavor of ["simd", "scalar"] as CoreFlavor[]) {
    const engine = await createEngine({ flavor, seed: 11n });
    const n = 50_000;
    const hashes = new Uint8Array(randomBytes(n * HASH_SIZE));
    const dirty = () => { const r = engine.alloc(8 << 20); engine.u8().fill(0xab, r.ptr, r.ptr + r.bytes); r.free(); };
    dirty(); // the index below takes this memory back, with its bytes
    const loaded = engine.createIndexForLoad(n);
    const recs = loaded.recordsFor(n);
    engine.u8().set(hashes, recs);
    loaded.loadAt(recs, n);
    const one = engine.createIndex(n);
    one.setBlocks(hashes, 0);
    assert.deepEqual(loaded.lookup(hashes), one.lookup(hashes), flavor);
    assert.equal(loaded.size, n);
    loaded.free();
    one.free();
    dirty();
    const small = engine.createIndexForLoad(10); // room for 64: the 54 past the load must read as unset
    const srecs = small.recordsFor(10);
    engine.u8().set(hashes.subarray(0, 10 * HASH_SIZE), srecs);
    small.loadAt(srecs, 10);
    small.setBlocks(hashes.subarray(20 * HASH_SIZE, 21 * HASH_SIZE), 20);
    const got = Buffer.from(small.blockHashes());
    assert.equal(got.length, 21 * HASH_SIZE);
    assert.deepEqual(got.subarray(10 * HASH_SIZE, 20 * HASH_SIZE), Buffer.alloc(10 * HASH_SIZE), `${flavor}: blocks 10..19 were never set`);
    assert.deepEqual(small.lookup(hashes.subarray(20 * HASH_SIZE, 21 * HASH_SIZE))[0], 20);
    small.free();
  }
});
