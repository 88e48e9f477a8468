// A pool shared by concurrent callers: each session gets its own hashes and
// bytes, a crashed worker is replaced, close() makes every call fail with
// PoolClosedError, an aborted scan rejects with an AbortError.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createEngine, PAGE_SIZE, HASH_SIZE } from "../src/index.js";
import { EnginePool } from "../src/pool/pool.js";
import { AbortError, PoolClosedError, PoolWorkerError } from "../src/errors.js";

function files(n: number, pages: number) {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-pool-shared-"));
  const out = Array.from({ length: n }, (_, i) => {
    const data = new Uint8Array(randomBytes(pages * PAGE_SIZE));
    const path = join(dir, `ram${i}`);
    writeFileSync(path, data);
    return { path, data };
  });
  return { dir, files: out };
}

const page = (data: Uint8Array, p: number) => data.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);

test("concurrent sessions on one pool each get their own hashes and page bytes", async () => {
  const { dir, files: fs } = files(3, 512);
  const pool = await EnginePool.create({ size: 2, seed: 9n });
  const engine = await createEngine({ seed: 9n });
  try {
    const want = Uint32Array.from([2, 100, 300, 511]);
    // interleave: every session scans before any asks for its pages, several rounds
    for (let round = 0; round < 3; round++) {
      const sessions = fs.map(() => pool.session());
      const scans = await Promise.all(sessions.map((s, i) => s.scanFile(fs[i]!.path, 0, 512)));
      const bytes = await Promise.all(sessions.map((s) => s.pagesOf(want)));
      fs.forEach((f, i) => {
        assert.deepEqual(scans[i]!.hashes, engine.hashPages(f.data), `session ${i}'s hashes`);
        want.forEach((p, k) => assert.deepEqual(page(bytes[i]!, k), page(f.data, p), `session ${i}, page ${p}`));
      });
      await Promise.all(sessions.map((s) => s.close()));
    }
  } finally {
    await pool.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("sessions with other seeds share the workers and hash with their own seed", async () => {
  const { dir, files: fs } = files(2, 128);
  const pool = await EnginePool.create({ size: 2, seed: 1n });
  try {
    const [a, b] = [pool.session({ seed: 11n }), pool.session({ seed: 22n })];
    const [ra, rb] = await Promise.all([a.scanFile(fs[0]!.path, 0, 128), b.scanFile(fs[1]!.path, 0, 128)]);
    assert.deepEqual(ra.hashes, (await createEngine({ seed: 11n })).hashPages(fs[0]!.data));
    assert.deepEqual(rb.hashes, (await createEngine({ seed: 22n })).hashPages(fs[1]!.data));
    assert.equal(ra.hashes.length, 128 * HASH_SIZE);
  } finally {
    await pool.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a crashed worker is replaced: the call on it fails with PoolWorkerError, later calls work", async () => {
  const { dir, files: fs } = files(1, 256);
  const warnings: string[] = [];
  const pool = await EnginePool.create({ size: 2, seed: 3n, log: { warn: (m) => warnings.push(m) } });
  const engine = await createEngine({ seed: 3n });
  try {
    const s = pool.session();
    await s.scanFile(fs[0]!.path, 0, 256);
    const call = pool.hashPages(new Uint8Array(randomBytes(8192 * PAGE_SIZE)));
    await (await pool.workers())[1]!.terminate();
    await assert.rejects(call, (e: Error) => e instanceof PoolWorkerError && e.code === "PAGETWIN_POOL_WORKER");
    // the replaced worker lost this session's bytes: said so, not other bytes
    await assert.rejects(s.pagesOf(Uint32Array.from([200])), (e: Error) => e instanceof PoolWorkerError && /replaced/.test(e.message));
    const again = await s.scanFile(fs[0]!.path, 0, 256);
    assert.deepEqual(again.hashes, engine.hashPages(fs[0]!.data));
    assert.deepEqual(await s.pagesOf(Uint32Array.from([200])), page(fs[0]!.data, 200));
    const data = new Uint8Array(randomBytes(256 * PAGE_SIZE));
    assert.deepEqual(await pool.hashPages(data), engine.hashPages(data));
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /worker 1 exited/);
  } finally {
    await pool.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("after close() every call, and a call in flight, fails with PoolClosedError", async () => {
  const pool = await EnginePool.create({ size: 2 });
  const s = pool.session();
  const inFlight = pool.hashPages(new Uint8Array(randomBytes(16384 * PAGE_SIZE)));
  inFlight.catch(() => {}); // checked below, after close
  await pool.close();
  const closed = (e: Error) => e instanceof PoolClosedError && e.code === "PAGETWIN_POOL_CLOSED";
  await assert.rejects(inFlight, closed);
  await assert.rejects(pool.hashPages(new Uint8Array(PAGE_SIZE)), closed);
  await assert.rejects(s.scanFile("/nonexistent", 0, 64), closed);
  assert.throws(() => pool.session(), closed);
  assert.equal(pool.closed, true);
});

test("an aborted scan rejects with an AbortError; the session scans again afterwards", async () => {
  const { dir, files: fs } = files(1, 4096);
  const pool = await EnginePool.create({ size: 2, seed: 4n });
  try {
    const s = pool.session();
    const ac = new AbortController();
    const scan = s.scanFile(fs[0]!.path, 0, 4096, { signal: ac.signal });
    ac.abort(new Error("client went away"));
    await assert.rejects(scan, (e: Error) => e instanceof AbortError && e.name === "AbortError" && (e as AbortError).code === "ABORT_ERR" && (e.cause as Error).message === "client went away");
    await assert.rejects(s.pagesOf(Uint32Array.from([1])), /no finished scan/);
    const r = await s.scanFile(fs[0]!.path, 0, 64);
    assert.deepEqual(r.hashes, (await createEngine({ seed: 4n })).hashPages(fs[0]!.data.subarray(0, 64 * PAGE_SIZE)));
    await assert.rejects(s.scanFile(fs[0]!.path, 0, 64, { signal: AbortSignal.abort() }), (e: Error) => e.name === "AbortError");
  } finally {
    await pool.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("workerUrl: the worker entry can be given (as a bundled service does)", async () => {
  const url = new URL("../src/pool/node-worker.js", import.meta.url);
  const pool = await EnginePool.create({ size: 1, workerUrl: url, seed: 2n });
  try {
    const data = new Uint8Array(randomBytes(64 * PAGE_SIZE));
    assert.deepEqual(await pool.hashPages(data), (await createEngine({ seed: 2n })).hashPages(data));
  } finally {
    await pool.close();
  }
  await assert.rejects(EnginePool.create({ size: 1, workerUrl: new URL("./no-such-worker.js", import.meta.url) }), /no-such-worker|Cannot find/);
});
