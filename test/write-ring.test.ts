import { test } from "node:test";
import assert from "node:assert/strict";
import { PassThrough } from "node:stream";
import { WriteRing } from "../src/stream/write-ring.js";

test("write ring: carves in order, reuses memory once writes complete, wraps, and never hands out memory still in use", () => {
  const r = new WriteRing(1024);
  const a = r.take(200), b = r.take(200);
  assert.equal(a.buffer, b.buffer, "both from the ring");
  assert.equal(b.byteOffset - a.byteOffset, 200);
  a.fill(1);
  b.fill(2);
  // too big for the ring (over a quarter): a Buffer of its own
  assert.notEqual(r.take(300).buffer, a.buffer);
  // trimming the newest carve gives its end back
  const c = r.trim(r.take(250), 50);
  assert.equal(c.length, 50);
  assert.equal(r.inUse, 450);
  const d = r.take(250); // 450..700
  assert.equal(d.byteOffset - a.byteOffset, 450);
  const e = r.take(250); // 700..950
  // no room at the end, and the start is still in use: its own Buffer
  const f = r.take(250);
  assert.notEqual(f.buffer, a.buffer);
  // out of order: b done first frees nothing while a is in use
  r.release(b);
  assert.equal(r.inUse, 950);
  r.release(a);
  assert.equal(r.inUse, 550);
  // wraps to the start, below what is still in use
  const g = r.take(240);
  assert.equal(g.byteOffset, a.byteOffset);
  assert.equal(g.buffer, a.buffer);
  assert.equal(r.take(200).buffer === a.buffer, false, "would overrun c at 400");
  for (const x of [c, d, e, g]) r.release(x);
  assert.equal(r.inUse, 0);
});

test("write ring: a carve returns when the stream has taken its write, and only then", async () => {
  const r = new WriteRing(1024);
  const s = new PassThrough({ highWaterMark: 16 });
  const a = r.take(100).fill(7);
  r.write(s, a);
  assert.equal(r.inUse, 100, "the write has not completed");
  s.read();
  await new Promise((res) => setImmediate(res));
  assert.equal(r.inUse, 0);
  const got: Buffer[] = [];
  s.on("data", (x: Buffer) => got.push(x));
  r.write(s, Buffer.from("not from the ring"));
  await new Promise((res) => setImmediate(res));
  assert.equal(Buffer.concat(got).toString(), "not from the ring");
});
