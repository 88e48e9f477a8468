import { test } from "node:test";
import assert from "node:assert/strict";
import { createEngine, Region } from "../src/index.js";

test("alloc refuses sizes the core's u32 would wrap, naming the size", async () => {
  const engine = await createEngine();
  for (const bytes of [2 ** 32, 2 ** 32 + 64, 2 ** 40]) {
    assert.throws(() => engine.alloc(bytes), (err: Error) => err instanceof RangeError && err.message.includes(String(bytes)), `alloc(${bytes})`);
  }
  // Nothing was handed out by the refused calls: the next allocations do not overlap.
  const a = engine.alloc(64);
  const b = engine.alloc(64);
  assert.ok(a.ptr + 64 <= b.ptr || b.ptr + 64 <= a.ptr);
});

test("alloc refuses sizes that are not a whole number of bytes, 0 or more", async () => {
  const engine = await createEngine();
  for (const bytes of [-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY]) {
    assert.throws(() => engine.alloc(bytes), (err: Error) => err instanceof RangeError && err.message.includes(String(bytes)), `alloc(${bytes})`);
  }
  assert.equal(engine.alloc(0).view().length, 0);
});

test("view refuses to reach past the region instead of clamping", async () => {
  const engine = await createEngine();
  const r = engine.alloc(100);
  assert.equal(r.view(90, 10).length, 10);
  assert.throws(() => r.view(90, 11), RangeError);
  assert.throws(() => r.view(-1, 1), RangeError);
  assert.throws(() => r.view(Number.NaN, 1), RangeError);
  assert.throws(() => r.view(0, 0.5), RangeError);
});

test("view refuses to reach past the core's memory instead of clamping", async () => {
  const engine = await createEngine();
  const size = engine.u8().length;
  // A region claiming more than the memory holds, as a wrapped allocation would.
  const bogus = new Region(engine, size - 64, 128);
  assert.equal(bogus.view(0, 64).length, 64);
  assert.throws(() => bogus.view(), (err: Error) => err instanceof RangeError && /past the core's memory/.test(err.message));
  assert.throws(() => bogus.view(60, 8), RangeError);
});
