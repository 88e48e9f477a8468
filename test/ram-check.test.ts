// The RAM comparison of bench/ram-check.ts: stale pages found page by page, sizes that differ refused, the table.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { compareFiles, diffRamFiles } from "../src/adapters/ram/ram-diff.js";
import { formatRamCheck, type Migration } from "../bench/ram-check.js";

test("diffRamFiles: counts the pages that differ, across read chunks, and keeps the first offsets", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-ramdiff-"));
  try {
    const pages = 2100; // more than one 8 MiB read
    const a = Buffer.alloc(pages * 4096, 7), b = Buffer.from(a);
    for (const p of [0, 5, 2047, 2048, 2099]) b[p * 4096 + (p % 4096)] ^= 1;
    fs.writeFileSync(path.join(dir, "a"), a);
    fs.writeFileSync(path.join(dir, "b"), b);
    const d = diffRamFiles(path.join(dir, "a"), path.join(dir, "b"), 3);
    assert.deepEqual(d, { pages, bytes: pages * 4096, differing: 5, offsets: [0, 5 * 4096, 2047 * 4096] });
    assert.deepEqual(diffRamFiles(path.join(dir, "a"), path.join(dir, "a")), { pages, bytes: pages * 4096, differing: 0, offsets: [] });
    // compareFiles: the bytes compared, or the first differing page named
    assert.equal(compareFiles(path.join(dir, "a"), path.join(dir, "a")), pages * 4096);
    assert.throws(() => compareFiles(path.join(dir, "a"), path.join(dir, "b")), /differ at byte 0 \(page 0; 5 of 2100 pages differ\)/);
    fs.writeFileSync(path.join(dir, "c"), a.subarray(0, a.length - 4096));
    assert.throws(() => diffRamFiles(path.join(dir, "a"), path.join(dir, "c")), /differ in size/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("formatRamCheck: per mode, migrations with stale pages, stale pages, guest failures, median source CPU", () => {
  const m = (mode: Migration["mode"], stalePages: number, guestOk: boolean, sourceCpuMs: number): Migration =>
    ({ mode, stalePages, staleOffsets: [], guestOk, sourceCpuMs, downtimeMs: 5 });
  const out = formatRamCheck(["exact", "padded"], [m("exact", 0, true, 100), m("exact", 3, false, 300), m("exact", 1, true, 200), m("padded", 0, true, 250)]);
  const [head, exact, padded] = out.split("\n");
  assert.match(head!, /^mode\s+migrations\s+with stale pages\s+stale pages\s+guest failures/);
  assert.deepEqual(exact!.split(/\s{2,}/), ["exact", "3", "2", "4", "1", "200 ms"]);
  assert.deepEqual(padded!.split(/\s{2,}/), ["padded", "1", "0", "0", "0", "250 ms"]);
});
