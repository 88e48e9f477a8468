import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createEngine, NO_BLOCK, HASH_SIZE } from "../src/index.js";

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
