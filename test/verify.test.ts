import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createEngine, HASH_SIZE, PAGE_SIZE } from "../src/core/engine.js";
import { DiskImage } from "../src/adapters/nas/image.js";
import { BlockVerifier, MAX_GAP_BLOCKS } from "../src/adapters/nas/verify.js";

const BLOCKS = 2048;

async function setup(t: { after(fn: () => void): void }) {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-verify-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const bytes = randomBytes(BLOCKS * PAGE_SIZE);
  const path = join(dir, "disk.img");
  writeFileSync(path, bytes);
  const engine = await createEngine({ seed: 3n });
  const image = DiskImage.open(path);
  t.after(() => image.close());
  const block = (b: number) => bytes.subarray(b * PAGE_SIZE, (b + 1) * PAGE_SIZE);
  return { engine, image, block, hashOf: (b: number) => engine.hashPages(block(b)) };
}

test("verify: scattered, repeated and out-of-range blocks land in their own slots, nearby ones in one read", async (t) => {
  const { engine, image, block, hashOf } = await setup(t);
  const v = new BlockVerifier(engine, image);
  t.after(() => v.free());
  // unsorted, gaps below and above the limit, a repeat, a run, and a block past the image's end
  const blocks = [900, 5, 7, 5, 40, 41, 42, 7 + MAX_GAP_BLOCKS + 1, 2000, BLOCKS + 3, 1200, 1200 + MAX_GAP_BLOCKS + 2];
  const stale = 4; // slot whose wanted hash is not its block's: rewritten since indexing
  const want = blocks.map((b, i) => (i === stale || b >= BLOCKS ? new Uint8Array(HASH_SIZE) : hashOf(b)));
  const ok = v.verify(blocks, (i) => want[i]!);
  assert.deepEqual(ok, blocks.map((b, i) => i !== stale && b < BLOCKS));
  const slots = v.slots(blocks.length);
  blocks.forEach((b, i) => {
    if (b < BLOCKS) assert.ok(Buffer.from(slots.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)).equals(block(b)), `slot ${i} holds block ${b}`);
  });
  // 5, 5, 7, 32, 40..42 in one read; 900; 1200; 1226 (a gap past the limit); 2000; the block past the end is never read
  assert.equal(v.reads, 5);
});

test("verify: a run of consecutive blocks in slot order is one read, straight into the slots", async (t) => {
  const { engine, image, hashOf } = await setup(t);
  const v = new BlockVerifier(engine, image);
  t.after(() => v.free());
  const blocks = Array.from({ length: 200 }, (_, i) => 100 + i);
  assert.ok(v.verify(blocks, (i) => hashOf(blocks[i]!)).every(Boolean));
  assert.equal(v.reads, 1);
});

test("verify: a span that cannot be read is read block by block (the readable ones still count)", async (t) => {
  const { engine, image, hashOf } = await setup(t);
  const v = new BlockVerifier(engine, image);
  t.after(() => v.free());
  const blocks = [BLOCKS - 2, BLOCKS - 1, BLOCKS + 1];
  const want = blocks.map((b) => (b < BLOCKS ? hashOf(b) : new Uint8Array(HASH_SIZE)));
  assert.deepEqual(v.verify(blocks, (i) => want[i]!), [true, true, false]);
});
