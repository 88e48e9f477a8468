import { test } from "node:test";
import assert from "node:assert/strict";
import { ReplayWindow } from "../src/stream/replay-window.js";

const PAGE = 4096;
const same = (a: Uint8Array, b: Uint8Array) => assert.equal(Buffer.compare(a, b), 0);

test("replay window: pages held as views of their chunk, counted once per chunk, copied past the budget, let go on ack", () => {
  const w = new ReplayWindow(8, 3 * 16 * PAGE);
  const chunks = Array.from({ length: 4 }, (_, c) => Buffer.alloc(16 * PAGE, c + 1));
  // two pages of chunk 0: one buffer held, no copy
  w.hold(0, chunks[0]!.subarray(0, PAGE));
  w.hold(1, chunks[0]!.subarray(PAGE, 2 * PAGE));
  assert.equal(w.retainedBytes, 16 * PAGE);
  assert.equal(w.get(1).buffer, chunks[0]!.buffer, "a view, not a copy");
  w.hold(2, chunks[1]!.subarray(0, PAGE));
  w.hold(3, chunks[2]!.subarray(0, PAGE));
  assert.equal(w.retainedBytes, 3 * 16 * PAGE);
  // a fourth chunk would pass the budget: that page is copied, and only its 4 KiB count
  w.hold(4, chunks[3]!.subarray(0, PAGE));
  assert.notEqual(w.get(4).buffer, chunks[3]!.buffer);
  same(w.get(4), chunks[3]!.subarray(0, PAGE));
  assert.equal(w.retainedBytes, 3 * 16 * PAGE + PAGE);
  // acks let go: chunk 0 only when both its pages are acknowledged
  w.release(0, 1);
  assert.equal(w.retainedBytes, 3 * 16 * PAGE + PAGE);
  w.release(1, 3);
  assert.equal(w.retainedBytes, 16 * PAGE + PAGE);
  assert.throws(() => w.get(0), /not in the replay window/);
  same(w.get(3), chunks[2]!.subarray(0, PAGE));
  w.release(3, 5);
  assert.equal(w.retainedBytes, 0);
  // slots are reused modulo the size
  w.hold(9, chunks[1]!.subarray(PAGE, 2 * PAGE));
  same(w.get(9), chunks[1]!.subarray(PAGE, 2 * PAGE));
});

test("replay window: a slot still held is never overwritten, and a slot answers only for its own reference", () => {
  const w = new ReplayWindow(4);
  const page = (v: number) => Buffer.alloc(PAGE, v);
  for (let s = 0; s < 4; s++) w.hold(s, page(s));
  // reference #4 would take #0's slot while #0 is unacknowledged: refused, #0 kept
  assert.throws(() => w.hold(4, page(4)), /replay window \(4 pages\) is full: page #4 would overwrite #0/);
  same(w.get(0), page(0));
  // acknowledged: the slot is free for #4, and #0 is gone (the slot does not answer for it with #4's page)
  w.release(0, 1);
  w.hold(4, page(4));
  same(w.get(4), page(4));
  assert.throws(() => w.get(0), /page #0 is not in the replay window/);
  assert.throws(() => w.get(8), /page #8 is not in the replay window/);
  // releasing an old range again lets go of nothing newer
  w.release(0, 1);
  same(w.get(4), page(4));
  w.release(1, 5);
  assert.equal(w.retainedBytes, 0);
  // the default budget (twice the pages' own bytes, 32 KiB here) keeps a view of a 2-page chunk
  const chunk = Buffer.alloc(2 * PAGE, 9);
  w.hold(5, chunk.subarray(0, PAGE));
  assert.equal(w.get(5).buffer, chunk.buffer, "a view within the default budget");
});

test("replay window: holdCopy keeps its own copy (the owner may reuse its memory) and frees its slot on ack", () => {
  const w = new ReplayWindow(4);
  const chunk = Buffer.alloc(2 * PAGE, 5);
  w.holdCopy(0, chunk.subarray(0, PAGE));
  w.hold(1, chunk.subarray(PAGE, 2 * PAGE));
  chunk.fill(6, 0, PAGE); // the read buffer reused
  same(w.get(0), Buffer.alloc(PAGE, 5));
  assert.notEqual(w.get(0).buffer, chunk.buffer);
  assert.equal(w.retainedBytes, 2 * PAGE, "only the view counts against the budget");
  assert.throws(() => w.holdCopy(4, chunk.subarray(0, PAGE)), /is full: page #4 would overwrite #0/);
  const mem = w.get(0);
  w.release(0, 2);
  assert.equal(w.retainedBytes, 0);
  w.holdCopy(4, Buffer.alloc(PAGE, 7));
  same(w.get(4), Buffer.alloc(PAGE, 7));
  assert.ok(w.get(4).buffer === mem.buffer && w.get(4).byteOffset === mem.byteOffset, "an acknowledged copy's memory is reused first");
});
