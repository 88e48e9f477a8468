import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { xxhash128 } from "hash-wasm";
import { createEngine, PAGE_SIZE, HASH_SIZE, bitBytes } from "../src/index.js";

const SEEDS = [0n, 1n, 42n, 0xffffffffn, 0x100000000n, 0xdeadbeefcafebaben, (1n << 64n) - 1n];

function pagesUnderTest(): Uint8Array {
  const n = 12;
  const data = new Uint8Array(randomBytes(n * PAGE_SIZE));
  data.fill(0, 0, PAGE_SIZE); // all zero
  data.fill(0xff, PAGE_SIZE, 2 * PAGE_SIZE); // all 0xFF
  data.fill(0, 2 * PAGE_SIZE, 3 * PAGE_SIZE);
  data[3 * PAGE_SIZE - 1] = 1; // zero but for the very last byte
  return data;
}

for (const flavor of ["simd", "scalar"] as const) {
  test(`${flavor}: every digest equals hash-wasm xxhash128 for several seeds`, async () => {
    const data = pagesUnderTest();
    for (const seed of SEEDS) {
      const engine = await createEngine({ seed, flavor });
      assert.equal(engine.flavor, flavor);
      const got = engine.hashPages(data);
      assert.equal(got.length, (data.length / PAGE_SIZE) * HASH_SIZE);
      for (let i = 0; i < data.length / PAGE_SIZE; i++) {
        const want = await xxhash128(data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), Number(seed & 0xffffffffn), Number(seed >> 32n));
        assert.equal(Buffer.from(got.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE)).toString("hex"), want, `page ${i} seed ${seed}`);
      }
    }
  });

  test(`${flavor}: zero bits come from the same pass`, async () => {
    const engine = await createEngine({ flavor });
    const data = pagesUnderTest();
    const n = data.length / PAGE_SIZE;
    const pages = engine.alloc(data.length);
    const out = engine.alloc(n * HASH_SIZE);
    const bits = engine.allocZeroed(bitBytes(n));
    pages.view().set(data);
    const zeros = engine.hashPagesAt(pages.ptr, n, out.ptr, bits.ptr);
    assert.equal(zeros, 1);
    assert.equal(bits.view()[0], 0b1);
    assert.deepEqual(out.view(), engine.hashPages(data));
  });
}

test("the default build is SIMD here, and both builds agree on 1000 random pages", async () => {
  const simd = await createEngine({ seed: 7n });
  const scalar = await createEngine({ seed: 7n, flavor: "scalar" });
  assert.equal(simd.simd, true);
  const data = new Uint8Array(randomBytes(1000 * PAGE_SIZE));
  assert.deepEqual(simd.hashPages(data), scalar.hashPages(data));
});

test("hashPages rejects data that is not whole pages, with a clear error", async () => {
  const engine = await createEngine();
  assert.throws(() => engine.hashPages(new Uint8Array(4097)), /whole 4096-byte pages; got 4097 bytes/);
  assert.throws(() => engine.hashPages(new Uint8Array(100)), /whole 4096-byte pages/);
  assert.equal(engine.hashPages(new Uint8Array(0)).length, 0);
});

test("createEngine rejects a seed outside 64 bits", async () => {
  await assert.rejects(createEngine({ seed: 1n << 64n }), /seed must be a bigint/);
  await assert.rejects(createEngine({ seed: -1n }), /seed must be a bigint/);
});

test("hashPages through the scratch region handles more than one chunk", async () => {
  const engine = await createEngine({ seed: 3n });
  const data = new Uint8Array(randomBytes(2500 * PAGE_SIZE));
  const got = engine.hashPages(data);
  for (const i of [0, 1023, 1024, 2047, 2048, 2499]) {
    const want = await xxhash128(data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), 3, 0);
    assert.equal(Buffer.from(got.subarray(i * 16, i * 16 + 16)).toString("hex"), want);
  }
});
