// A stale index is used, not thrown away; a refresh brings it up to date as
// the next generation; version 1 files still read.

import { toLog } from "../src/log.js";
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { closeSync, lstatSync, mkdtempSync, openSync, readFileSync, rmSync, utimesSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defaultIndexPath, openNasIndex, readIndexHeader, type NasIndex } from "../src/adapters/nas/index-file.js";
import { BackgroundRefresh, refreshByReread } from "../src/adapters/nas/refresh.js";
import { indexStatus } from "../src/adapters/nas/index-status.js";
import { execFileSync } from "node:child_process";
import { cliPath, jsonResult } from "./helpers/cli.js";

function scratch(t: { after(fn: () => void): void }, blocks = 64): { image: string; index: string } {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-index-stale-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, "disk.img");
  writeFileSync(image, randomBytes(blocks * 4096));
  return { image, index: defaultIndexPath(image) };
}

/** The hashes a full rebuild with this index's seed gives, read from the file now. */
function fullHashes(nas: NasIndex): Buffer {
  return Buffer.from(nas.engine.hashPages(readFileSync(nas.image.path).subarray(0, nas.header.blocks * 4096)));
}

function rewrite(image: string, blocks: number[]): void {
  const fd = openSync(image, "r+");
  for (const b of blocks) writeSync(fd, randomBytes(4096), 0, 4096, b * 4096);
  closeSync(fd);
}

test("an image touched or written since indexing: the index is used as it is (stale), with its id and generation", async (t) => {
  const { image } = scratch(t);
  const first = await openNasIndex(image);
  first.image.close();
  assert.equal(first.built, true);
  assert.equal(first.header.generation, 0);
  assert.equal(first.header.format, "raw");
  assert.deepEqual(first.header.chain, [image]);
  utimesSync(image, new Date(), new Date(Date.now() + 5000));
  const touched = await openNasIndex(image);
  touched.image.close();
  assert.equal(touched.built, false, "not re-hashed");
  assert.equal(touched.stale, true);
  assert.equal(touched.header.indexId, first.header.indexId);
  assert.equal(touched.header.generation, 0);
  const rebuilt = await openNasIndex(image, { stale: "rebuild" });
  rebuilt.image.close();
  assert.equal(rebuilt.built, true, "stale: rebuild re-hashes");
  assert.equal(rebuilt.stale, false);
});

test("a re-read refresh: only the rewritten blocks change, the index equals a full rebuild, generation + 1, 0600, not stale after", async (t) => {
  const { image, index } = scratch(t);
  (await openNasIndex(image)).image.close();
  rewrite(image, [3, 4, 40, 63]);
  const nas = await openNasIndex(image);
  try {
    assert.equal(nas.stale, true);
    assert.notDeepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas), "stale before the refresh");
    const r = await refreshByReread(nas);
    assert.equal(r.blocksRead, 64);
    assert.equal(r.blocksChanged, 4);
    assert.equal(r.generation, 1);
    assert.equal(r.kind, "re-read");
    assert.deepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas), "the index equals a full rebuild");
    assert.equal(nas.stale, false);
    assert.equal(lstatSync(index).mode & 0o777, 0o600);
    const h = readIndexHeader(index);
    assert.equal(h.version, 2);
    assert.equal(h.generation, 1);
    assert.equal(h.refreshedBy, "re-read");
    assert.equal(h.indexId, nas.header.indexId);
  } finally {
    nas.image.close();
  }
  const again = await openNasIndex(image);
  again.image.close();
  assert.equal(again.stale, false, "the refreshed index is current");
  assert.equal(again.header.generation, 1);
  // the new lookups find the rewritten blocks' new content
  const b40 = readFileSync(image).subarray(40 * 4096, 41 * 4096);
  assert.equal(again.index.lookup(again.engine.hashPages(b40))[0], 40);
});

test("a version 1 index still reads (generation 0, raw, stale-able) and a refresh writes version 2", async (t) => {
  const { image, index } = scratch(t);
  const nas = await openNasIndex(image);
  nas.image.close();
  const v2 = readFileSync(index);
  const h = readIndexHeader(index);
  const v1 = Buffer.concat([v2.subarray(0, 64), v2.subarray(h.hashesAt)]);
  v1.writeUInt32LE(1, 8);
  writeFileSync(index, v1, { mode: 0o600 });
  rewrite(image, [7]);
  const old = await openNasIndex(image);
  try {
    assert.equal(old.header.version, 1);
    assert.equal(old.header.generation, 0);
    assert.equal(old.header.format, "raw");
    assert.equal(old.stale, true);
    assert.deepEqual(Buffer.from(old.index.blockHashes()).subarray(0, 7 * 16), fullHashes(old).subarray(0, 7 * 16), "v1 hashes read at offset 64");
    const r = await refreshByReread(old);
    assert.equal(r.blocksChanged, 1);
  } finally {
    old.image.close();
  }
  assert.equal(readIndexHeader(index).version, 2);
});

test("a background re-read keeps to its rate; index --status says fresh or stale", async (t) => {
  const { image, index } = scratch(t, 1024); // 4 MiB
  (await openNasIndex(image)).image.close();
  assert.equal(indexStatus(image, index).state, "fresh");
  rewrite(image, [100]);
  const s = indexStatus(image, index);
  assert.equal(s.state, "stale");
  assert.equal(s.generation, 0);
  assert.equal(s.blocks, 1024);
  const nas = await openNasIndex(image);
  try {
    const r = await refreshByReread(nas, { rateBytesPerSec: 4 << 20, batchBlocks: 64 });
    // 4 MiB at 4 MiB/s, 256 KiB at a time with a 256 KiB burst: at least ~875 ms
    assert.ok(r.ms >= 800, `took ${r.ms.toFixed(0)} ms`);
  } finally {
    nas.image.close();
  }
  const f = indexStatus(image, index);
  assert.equal(f.state, "fresh");
  assert.equal(f.generation, 1);
});

test("pagetwin index --status [--json] says fresh or stale; pagetwin index on a stale index refreshes it (generation + 1)", async (t) => {
  const { image } = scratch(t);
  const cli = (...args: string[]) => execFileSync(process.execPath, [cliPath, "index", "--image", image, ...args], { encoding: "utf8" });
  assert.match(cli("--status"), /^no index/);
  jsonResult(cli("--json"));
  const fresh = jsonResult(cli("--status", "--json"));
  assert.equal(fresh.state, "fresh");
  assert.equal(fresh.generation, 0);
  assert.equal(fresh.format, "raw");
  assert.deepEqual(fresh.chain, [image]);
  rewrite(image, [9, 10]);
  assert.match(cli("--status"), /^stale since .*generation 0, 64 blocks, raw/);
  const r = jsonResult(cli("--json"));
  assert.equal(r.built, false);
  assert.equal(r.refresh.kind, "re-read");
  assert.equal(r.refresh.blocksChanged, 2);
  assert.equal(r.generation, 1);
  assert.match(cli("--status"), /^fresh: .*generation 1/);
});

test("a background refresh brings a stale index up to date on its own, and stop() ends one early without writing", async (t) => {
  const { image, index } = scratch(t, 1024);
  (await openNasIndex(image)).image.close();
  rewrite(image, [1, 500]);
  const nas = await openNasIndex(image);
  const log: string[] = [];
  try {
    const done = await new BackgroundRefresh(nas, 1 << 30, toLog((m) => log.push(m))).done;
    assert.equal(done?.blocksChanged, 2);
    assert.equal(readIndexHeader(index).generation, 1);
    assert.match(log.join("\n"), /refreshed in the background: generation 1, 2 of 1024 blocks changed/);
    rewrite(image, [2]);
    const slow = new BackgroundRefresh(nas, 256 << 10, toLog((m) => log.push(m))); // 4 MiB at 256 KiB/s: ~16 s
    await new Promise((r) => setTimeout(r, 100));
    await slow.stop();
    assert.equal(await slow.done, null, "stopped");
    assert.equal(readIndexHeader(index).generation, 1, "a stopped refresh writes nothing");
  } finally {
    nas.image.close();
  }
});
