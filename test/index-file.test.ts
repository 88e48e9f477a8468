import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defaultIndexPath, openNasIndex } from "../src/adapters/nas/index-file.js";

const VICTIM = "victim: must stay as it is\n";

/** A directory with a small image in it; removed after the test. */
function scratch(t: { after(fn: () => void): void }): { dir: string; image: string; index: string } {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-index-file-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, "disk.img");
  writeFileSync(image, randomBytes(16 * 4096));
  return { dir, image, index: defaultIndexPath(image) };
}

async function buildIndex(image: string): Promise<void> {
  const idx = await openNasIndex(image, { rebuild: true });
  idx.image.close();
}

function assertPrivateRegularFile(path: string): void {
  const st = lstatSync(path);
  assert.ok(st.isFile(), `${path} should be a regular file`);
  assert.equal(st.mode & 0o777, 0o600, `${path} mode ${(st.mode & 0o777).toString(8)}`);
}

test("a symlink planted at the old predictable temp name is not followed", async (t) => {
  const { dir, image, index } = scratch(t);
  const victim = join(dir, "victim.conf");
  writeFileSync(victim, VICTIM);
  symlinkSync(victim, `${index}.tmp-${process.pid}`);
  await buildIndex(image);
  assert.equal(readFileSync(victim, "utf8"), VICTIM);
  assertPrivateRegularFile(index);
  assert.equal(readFileSync(index).toString("latin1", 0, 8), "PTWINIX1");
});

test("a 0644 file planted at the old temp name does not make the index readable by others", async (t) => {
  const { image, index } = scratch(t);
  writeFileSync(`${index}.tmp-${process.pid}`, "", { mode: 0o644 });
  await buildIndex(image);
  assertPrivateRegularFile(index);
});

test("the index replaces an existing 0644 file at its path and ends up 0600", async (t) => {
  const { image, index } = scratch(t);
  writeFileSync(index, "old index, readable by all", { mode: 0o644 });
  await buildIndex(image);
  assertPrivateRegularFile(index);
});

test("no temp file is left behind when the index cannot be put in place", async (t) => {
  const { dir, image, index } = scratch(t);
  mkdirSync(index);
  writeFileSync(join(index, "keep"), "a directory in the way");
  await assert.rejects(buildIndex(image), /cannot replace the index/);
  assert.deepEqual(readdirSync(dir).filter((name) => name.includes(".tmp-")), []);
});

test("a truncated index file is an error that leaves none of the index's memory behind in the engine given", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-index-file-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, "disk.img");
  writeFileSync(image, "");
  truncateSync(image, 64 << 20); // 16384 blocks: about 0.5 MiB of index memory per open
  const built = await openNasIndex(image, { rebuild: true });
  built.image.close();
  built.index.free();
  const index = defaultIndexPath(image);
  truncateSync(index, statSync(index).size - 4096);
  const engine = built.engine;
  const before = engine.core.memory.buffer.byteLength;
  // each failed open would keep its records and table (20 MiB in all) if it did not free them
  for (let i = 0; i < 40; i++) await assert.rejects(openNasIndex(image, { engine }), /truncated/);
  assert.equal(engine.core.memory.buffer.byteLength, before, "the engine's memory grew: failed opens left their index behind");
});
