import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createEngine, PAGE_SIZE } from "../src/index.js";
import { EnginePool, shards } from "../src/pool/pool.js";
import { PoolWorkerError } from "../src/errors.js";

test("the pool's digests equal the single engine's on random data, for 1, 2 and 3 workers", async () => {
  const data = new Uint8Array(randomBytes(1000 * PAGE_SIZE));
  data.fill(0, 0, PAGE_SIZE);
  const engine = await createEngine({ seed: 77n });
  const want = engine.hashPages(data);
  for (const size of [1, 2, 3]) {
    const pool = await EnginePool.create({ size, seed: 77n });
    try {
      assert.equal(pool.size, size);
      assert.deepEqual(await pool.hashPages(data), want);
    } finally {
      await pool.close();
    }
  }
});

test("scanFile: workers read their share of a file; hashes, zero bits and the kept page bytes are right", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-pool-"));
  const pool = await EnginePool.create({ size: 2, seed: 5n });
  try {
    const pages = 1000;
    const data = new Uint8Array(randomBytes(pages * PAGE_SIZE));
    for (const z of [0, 63, 64, 500, 999]) data.fill(0, z * PAGE_SIZE, (z + 1) * PAGE_SIZE);
    const path = join(dir, "ram");
    writeFileSync(path, data);
    const engine = await createEngine({ seed: 5n });
    const first = 128, count = 800;
    const scans = pool.session();
    const r = await scans.scanFile(path, first, count);
    assert.deepEqual(r.hashes, engine.hashPages(data.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE)));
    for (let i = 0; i < count; i++) {
      const zero = ((r.zeroBits[i >> 3]! >> (i & 7)) & 1) === 1;
      assert.equal(zero, [500].includes(first + i), `zero bit of page ${first + i}`);
    }
    const want = Uint32Array.from([128, 129, 527, 528, 927]);
    const bytes = await scans.pagesOf(want);
    want.forEach((p, k) => assert.deepEqual(bytes.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE), data.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)));
    await assert.rejects(scans.pagesOf(Uint32Array.from([5])), /not in (this worker.s|this session.s) last scan/);
  } finally {
    await pool.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a worker that dies fails the call with a clear error instead of hanging", async () => {
  const pool = await EnginePool.create({ size: 2 });
  try {
    const data = new Uint8Array(randomBytes(4096 * PAGE_SIZE));
    const call = pool.hashPages(data);
    await (await pool.workers())[1]!.terminate();
    await assert.rejects(call, (e: Error) => e instanceof PoolWorkerError && e.code === "PAGETWIN_POOL_WORKER" && /worker 1 exited/.test(e.message));
  } finally {
    await pool.close();
  }
});

test("shards are multiples of 64 pages and cover the range", () => {
  assert.deepEqual(shards(64, 200, 2), [{ first: 64, count: 128 }, { first: 192, count: 72 }]);
  assert.deepEqual(shards(0, 10, 4), [{ first: 0, count: 10 }]);
});

test("an index built by the pool equals one built on this thread", async () => {
  const { openNasIndex } = await import("../src/adapters/nas/index-file.js");
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-pool-index-"));
  try {
    const image = join(dir, "disk.img");
    const data = new Uint8Array(randomBytes(3000 * PAGE_SIZE));
    data.fill(0, 5 * PAGE_SIZE, 6 * PAGE_SIZE);
    writeFileSync(image, data);
    const a = await openNasIndex(image, { rebuild: true });
    const b = await openNasIndex(image, { rebuild: true, workers: 2, indexPath: join(dir, "other-index") });
    // different random seeds: compare what each says about the image's own blocks
    const probe = (nas: typeof a) => Array.from(nas.index.lookup(nas.engine.hashPages(data)));
    assert.deepEqual(probe(b), probe(a));
    assert.equal(b.index.size, a.index.size);
    a.image.close();
    b.image.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
