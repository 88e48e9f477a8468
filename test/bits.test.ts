import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { createEngine, bitBytes, type BitOp } from "../src/index.js";

const bit = (b: Uint8Array, i: number) => (b[i >> 3]! >> (i & 7)) & 1;

test("and / and-not / or / popcount / extract agree with naive JavaScript, and bits past the end are kept", async () => {
  const engine = await createEngine();
  for (const nbits of [1, 7, 63, 64, 65, 1000, 4096 + 13]) {
    const bytes = bitBytes(nbits) + 8;
    const a = engine.alloc(bytes), b = engine.alloc(bytes), o = engine.alloc(bytes), list = engine.alloc(nbits * 4);
    const av = new Uint8Array(randomBytes(bytes)), bv = new Uint8Array(randomBytes(bytes));
    a.view().set(av);
    b.view().set(bv);
    for (const op of ["and", "andNot", "or", "copy"] as BitOp[]) {
      const before = new Uint8Array(randomBytes(bytes));
      o.view().set(before);
      engine.bitsCombine(op, o.ptr, a.ptr, b.ptr, nbits);
      const ov = o.view();
      for (let i = 0; i < bytes * 8; i++) {
        const x = bit(av, i), y = bit(bv, i);
        const want = i >= nbits ? bit(before, i) : op === "and" ? x & y : op === "andNot" ? x & (1 - y) : op === "or" ? x | y : x;
        assert.equal(bit(ov, i), want, `${op} nbits=${nbits} bit ${i}`);
      }
    }
    let pop = 0;
    const set: number[] = [];
    for (let i = 0; i < nbits; i++) if (bit(av, i)) { pop++; set.push(1000 + i); }
    assert.equal(engine.popcount(a.ptr, nbits), pop);
    const n = engine.extractBits(a.ptr, nbits, list.ptr, 1000);
    assert.deepEqual(Array.from(engine.u32(list.ptr, n)), set);
  }
});

test("diffBits marks the records that differ; copyRecordsMasked copies only those", async () => {
  const engine = await createEngine();
  const n = 777;
  const a = engine.alloc(n * 16), b = engine.alloc(n * 16), bits = engine.allocZeroed(bitBytes(n));
  const av = new Uint8Array(randomBytes(n * 16));
  a.view().set(av);
  b.view().set(av);
  const changed = new Set<number>();
  for (let k = 0; k < 100; k++) {
    const i = randomInt(n);
    if (changed.has(i)) continue; // a second flip could undo the first
    changed.add(i);
    b.view()[i * 16 + randomInt(16)] ^= 1 << randomInt(8);
  }
  assert.equal(engine.diffBits(bits.ptr, a.ptr, b.ptr, n), changed.size);
  for (let i = 0; i < n; i++) assert.equal(bit(bits.view(), i), changed.has(i) ? 1 : 0);
  engine.copyRecordsMasked(b.ptr, a.ptr, bits.ptr, n);
  assert.deepEqual(b.view(), a.view());
});
