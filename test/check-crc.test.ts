// The end-to-end check's CRC: the same number however the bytes come in
// (adjacent views, small ones gathered, large ones summed in place), and
// what is added after a flush() may reuse the memory of what came before.
import { test } from "node:test";
import assert from "node:assert/strict";
import { crc32 } from "node:zlib";
import { randomBytes } from "node:crypto";
import { CheckCrc } from "../src/stream/check-crc.js";

test("check CRC: equals zlib's CRC-32 of the bytes in order, for views of any size, adjacent or not", () => {
  const data = randomBytes(300_000);
  for (const seed of [1, 2, 3]) {
    const c = new CheckCrc();
    const other = Buffer.from(data); // the same bytes in another buffer: views alternate between the two
    let x = seed;
    for (let o = 0; o < data.length;) {
      x = (x * 1103515245 + 12345) >>> 0;
      const n = Math.min(data.length - o, [1, 8, 16, 63, 64, 65, 4096, 70_000][x % 8]!);
      c.add(((x >> 8) & 1 ? data : other).subarray(o, o + n));
      if ((x >> 9) % 7 === 0) c.flush();
      o += n;
    }
    assert.equal(c.value, crc32(data), `seed ${seed}`);
  }
  assert.equal(new CheckCrc().value, 0, "nothing added: the CRC of nothing");
});

test("check CRC: a view's memory may change once flushed, not before", () => {
  const buf = Buffer.alloc(8192, 1);
  const c = new CheckCrc();
  c.add(buf.subarray(0, 4096));
  c.add(Buffer.from("a small one, gathered"));
  c.flush();
  buf.fill(2); // reused after the flush: no effect
  c.add(buf.subarray(0, 100));
  const want = crc32(Buffer.concat([Buffer.alloc(4096, 1), Buffer.from("a small one, gathered"), Buffer.alloc(100, 2)]));
  assert.equal(c.value, want);
});
