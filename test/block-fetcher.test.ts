import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createEngine, HASH_SIZE, PAGE_SIZE } from "../src/core/engine.js";
import { BlockFetcher } from "../src/agent/block-fetcher.js";

const BLOCKS = 256;

test("the NAS reader thread: each block verified against its page hash, its bytes handed back; a wrong hash or a block past the end is not ok", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-fetcher-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const disk = randomBytes(BLOCKS * PAGE_SIZE);
  const path = join(dir, "disk.img");
  writeFileSync(path, disk);
  const seed = 77n;
  const engine = await createEngine({ seed });
  const block = (b: number) => disk.subarray(b * PAGE_SIZE, (b + 1) * PAGE_SIZE);
  const f = new BlockFetcher();
  t.after(() => f.terminate());
  await f.open(path, "raw", seed);

  const blocks = [200, 3, 4, 5, 3, 90, BLOCKS + 1, 17];
  const wrong = 5; // the guest rewrote that block since the source hashed its page
  const hashes = new Uint8Array(blocks.length * HASH_SIZE);
  blocks.forEach((b, i) => { if (b < BLOCKS && i !== wrong) hashes.set(engine.hashPages(block(b)), i * HASH_SIZE); });
  const got = await f.verify(Uint32Array.from(blocks), hashes);
  assert.deepEqual([...got.ok], blocks.map((b, i) => (b < BLOCKS && i !== wrong ? 1 : 0)));
  blocks.forEach((b, i) => {
    if (got.ok[i]) assert.ok(Buffer.from(got.pages.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)).equals(block(b)), `block ${b} in slot ${i}`);
  });

  // the buffer goes back and is filled again; a seed other than the index's verifies nothing
  f.give(got.pages);
  const again = await f.verify(Uint32Array.from([17]), engine.hashPages(block(17)));
  assert.deepEqual([...again.ok], [1]);
  await f.open(path, "raw", seed + 1n);
  assert.deepEqual([...(await f.verify(Uint32Array.from([17]), engine.hashPages(block(17)))).ok], [0]);

  await f.terminate();
  await assert.rejects(f.verify(Uint32Array.from([1]), new Uint8Array(HASH_SIZE)), /stopped/);
});

test("the NAS reader thread: an image it cannot open is refused", async (t) => {
  const f = new BlockFetcher();
  t.after(() => f.terminate());
  await assert.rejects(f.open(join(tmpdir(), "pagetwin-no-such-image.img"), "raw", 1n));
});
