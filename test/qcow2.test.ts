// qcow2 images made by qemu-img read back byte-identical to what
// `qemu-img convert -O raw` makes of them; features the reader does not
// handle are refused by name; an overlay's index takes its backing file's
// index, built once.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openDisk } from "../src/adapters/nas/disk.js";
import { defaultIndexPath, openNasIndex, readIndexHeader } from "../src/adapters/nas/index-file.js";
import { BlockVerifier } from "../src/adapters/nas/verify.js";
import { HASH_SIZE, NO_BLOCK, PAGE_SIZE } from "../src/core/engine.js";
import { zstdUnavailableReason } from "../src/codec/compress.js";
import { ImageFormatError, UnsupportedImageError } from "../src/errors.js";
import { qemuImg, qemuIo, skipNoQemuImg } from "./helpers/qemu-img.js";

const skip = skipNoQemuImg;
const K = 1024, M = 1024 * 1024;

function scratch(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-qcow2-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Deterministic bytes with random, zero and repetitive (compressible) stretches. */
function content(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  for (let at = 0; at < size; at += 8 * K) {
    const kind = (at / (8 * K) + seed) % 4;
    const end = Math.min(size, at + 8 * K);
    if (kind === 1) continue; // zeros
    for (let i = at; i < end; i++) {
      if (kind === 3) b[i] = "pagetwin qcow2 "[(i - at) % 15]!.charCodeAt(0);
      else { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; b[i] = x & 0xff; }
    }
  }
  return b;
}

/** The image's guest-visible bytes as qemu-img sees them. */
function qemuRaw(dir: string, image: string): Buffer {
  const out = join(dir, `expected-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg("convert", "-O", "raw", image, out);
  const b = readFileSync(out);
  rmSync(out);
  return b;
}

/** Reads the whole disk in one call and again in uneven runs of blocks; both must equal qemu-img's raw. */
function assertReadsLikeQemu(dir: string, image: string, what: string): void {
  const want = qemuRaw(dir, image);
  const disk = openDisk(image);
  try {
    assert.equal(disk.format, "qcow2", what);
    assert.equal(disk.size, want.length, `${what}: size`);
    const all = Buffer.alloc(disk.size);
    disk.readAt(0, all);
    assert.ok(all.equals(want), `${what}: readAt(0, whole disk) differs from qemu-img convert -O raw`);
    const buf = Buffer.alloc(37 * PAGE_SIZE);
    for (let first = 0, step = 1; first < disk.blocks; first += step, step = (step * 7) % 37 + 1) {
      const n = Math.min(step, disk.blocks - first);
      disk.readBlocks(first, n, buf);
      assert.ok(buf.subarray(0, n * PAGE_SIZE).equals(want.subarray(first * PAGE_SIZE, (first + n) * PAGE_SIZE)), `${what}: blocks ${first}..${first + n - 1}`);
    }
    assert.equal(disk.blocks, Math.floor(want.length / PAGE_SIZE));
  } finally {
    disk.close();
  }
}

// not a multiple of 4 KiB, of 64 KiB or of 2 MiB
const SIZE = 6 * M + 20 * K + 512;

test("plain qcow2 at 512 B, 4 KiB, 64 KiB and 2 MiB clusters, written over in place, reads as qemu-img reads it", { skip }, (t) => {
  const dir = scratch(t);
  const raw = join(dir, "src.raw");
  writeFileSync(raw, content(SIZE, 7));
  for (const cs of ["512", "4k", "64k", "2M"]) {
    const img = join(dir, `plain-${cs}.qcow2`);
    qemuImg("convert", "-O", "qcow2", "-o", `cluster_size=${cs}`, raw, img);
    assertReadsLikeQemu(dir, img, `cluster_size=${cs}`);
    // zero clusters (write -z), a cluster discarded, and writes across cluster boundaries
    qemuIo(img, "qcow2", "write -z 64k 192k", "write -P 0x5a 1000k 70k", "discard 2M 2M", "write -z 5M 3k", `write -P 0x77 ${SIZE - 1024} 1024`);
    assertReadsLikeQemu(dir, img, `cluster_size=${cs}, written over`);
  }
});

test("a qcow2 made empty reads as zeros; version 2 (compat=0.10) images read too", { skip }, (t) => {
  const dir = scratch(t);
  const empty = join(dir, "empty.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", empty, String(SIZE));
  assertReadsLikeQemu(dir, empty, "empty");
  const v2 = join(dir, "v2.qcow2");
  writeFileSync(join(dir, "src.raw"), content(SIZE, 3));
  qemuImg("convert", "-O", "qcow2", "-o", "compat=0.10", join(dir, "src.raw"), v2);
  qemuIo(v2, "qcow2", "write -z 128k 64k", "write -P 0x33 3M 5k");
  assertReadsLikeQemu(dir, v2, "version 2");
});

test("compressed clusters (zlib, and zstd) at 4 KiB, 64 KiB and 2 MiB clusters read back decompressed", { skip }, (t) => {
  const dir = scratch(t);
  const raw = join(dir, "src.raw");
  writeFileSync(raw, content(SIZE, 11));
  const types = zstdUnavailableReason() ? ["zlib"] : ["zlib", "zstd"];
  for (const type of types) {
    for (const cs of ["4k", "64k", "2M"]) {
      const img = join(dir, `c-${type}-${cs}.qcow2`);
      qemuImg("convert", "-c", "-O", "qcow2", "-o", `cluster_size=${cs},compression_type=${type}`, raw, img);
      const map = JSON.parse(qemuImg("map", "--output=json", img)) as { data: boolean; offset?: number }[];
      assert.ok(map.some((e) => e.data && e.offset === undefined), `${type} ${cs}: the image has compressed clusters (data without a host offset in qemu-img map)`);
      assertReadsLikeQemu(dir, img, `${type}, cluster_size=${cs}`);
      qemuIo(img, "qcow2", "write -P 0x42 192k 8k", "write -z 1M 64k"); // a compressed cluster rewritten, one zeroed
      assertReadsLikeQemu(dir, img, `${type}, cluster_size=${cs}, written over`);
    }
  }
});

test("backing chains: raw and qcow2 backing files, two levels, relative names, a backing file shorter than the overlay", { skip }, (t) => {
  const dir = scratch(t);
  const base = join(dir, "base.raw");
  writeFileSync(base, content(4 * M + 1536, 5)); // shorter than the overlays, not a multiple of 4 KiB
  const mid = join(dir, "mid.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", "base.raw", "-F", "raw", mid, String(SIZE));
  qemuIo(mid, "qcow2", "write -P 0x21 60k 10k", "write -z 256k 128k", "write -P 0x22 4090k 100k");
  assertReadsLikeQemu(dir, mid, "qcow2 over raw");
  const top = join(dir, "top.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2", top, String(SIZE + 64 * K));
  qemuIo(top, "qcow2", "write -P 0x31 8k 4k", "write -z 1M 8k", "write -P 0x32 300k 12k");
  assertReadsLikeQemu(dir, top, "qcow2 over qcow2 over raw");
  const disk = openDisk(top);
  try {
    assert.deepEqual(disk.chain, [top, mid, base]);
    assert.equal(disk.fromBacking(0), true);
    assert.equal(disk.fromBacking(2), false, "written in the top layer");
    assert.equal(disk.fromBacking(256), false, "zeroed in the top layer: zeros, not the backing file's data");
  } finally {
    disk.close();
  }
});

test("an overlay whose own clusters interleave with its backing file's, zero and compressed clusters, written out of guest order, reads as qemu-img reads it", { skip }, (t) => {
  // the reader reads own clusters adjacent in the file in one go wherever they land, and reads a
  // backing run over short gaps of own clusters before them: both must still put every byte in place
  const dir = scratch(t);
  const base = join(dir, "base.raw");
  writeFileSync(base, content(SIZE, 9));
  const top = join(dir, "top.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", "base.raw", "-F", "raw", top, String(SIZE));
  const writes: string[] = [];
  for (let c = 80; c >= 0; c -= 3) writes.push(`write -P ${c} ${c * 64}k 64k`); // every third cluster, last first: file order is not guest order
  for (let c = 2; c < 80; c += 12) writes.push(`write -z ${c * 64}k 64k`); // zeros inside the gaps
  qemuIo(top, "qcow2", ...writes);
  assertReadsLikeQemu(dir, top, "interleaved overlay, written backwards");
  const inOrder = join(dir, "in-order.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw", inOrder, String(SIZE));
  const forward: string[] = [];
  for (let c = 0; c < 1400; c += 2) forward.push(`write -P ${c & 0xff} ${c * 4}k 4k`); // over 1024 own clusters, adjacent in the file: more than one readv
  for (let c = 7; c < 1400; c += 50) forward.push(`write -z ${c * 4}k 4k`);
  qemuIo(inOrder, "qcow2", ...forward);
  assertReadsLikeQemu(dir, inOrder, "every other cluster its own, in order");
});

test("unsupported qcow2 features are refused with an error naming the feature", { skip }, (t) => {
  const dir = scratch(t);
  const img = (name: string) => join(dir, name);
  const refused = (path: string, feature: RegExp) => assert.throws(() => openDisk(path), (err: unknown) => {
    assert.ok(err instanceof UnsupportedImageError, `${path}: ${String(err)}`);
    assert.equal(err.code, "PAGETWIN_IMAGE_UNSUPPORTED");
    assert.match(err.feature, feature);
    assert.match(err.message, new RegExp(path.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")));
    return true;
  });
  const secret = ["--object", "secret,id=s0,data=abc"];
  qemuImg("create", "-q", "-f", "qcow2", ...secret, "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", img("luks.qcow2"), "1M");
  refused(img("luks.qcow2"), /encryption \(LUKS\)/);
  qemuImg("create", "-q", "-f", "qcow2", ...secret, "-o", "encrypt.format=aes,encrypt.key-secret=s0", img("aes.qcow2"), "1M");
  refused(img("aes.qcow2"), /encryption \(AES\)/);
  qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img("ext.qcow2"), "1M");
  refused(img("ext.qcow2"), /extended L2/);
  qemuImg("create", "-q", "-f", "qcow2", "-o", `data_file=${img("data.raw")}`, img("data.qcow2"), "1M");
  refused(img("data.qcow2"), /external data file/);
  qemuImg("create", "-q", "-f", "qcow", img("v1.qcow"), "1M");
  refused(img("v1.qcow"), /qcow version 1/);
  // an incompatible feature bit no qcow2 version defines yet
  qemuImg("create", "-q", "-f", "qcow2", img("future.qcow2"), "1M");
  patchByte(img("future.qcow2"), 72 + 7 - 1, 0x04); // bit 10 of incompatible_features (big-endian u64 at 72)
  refused(img("future.qcow2"), /incompatible feature bit 10/);
  // the corrupt bit: not a feature, the image needs repair first
  qemuImg("create", "-q", "-f", "qcow2", img("corrupt.qcow2"), "1M");
  patchByte(img("corrupt.qcow2"), 79, 0x02);
  assert.throws(() => openDisk(img("corrupt.qcow2")), (err: unknown) => err instanceof ImageFormatError && err.code === "PAGETWIN_IMAGE_FORMAT" && /marked corrupt/.test(err.message));
  // a backing chain that loops
  qemuImg("create", "-q", "-f", "qcow2", img("a.qcow2"), "1M");
  qemuImg("create", "-q", "-f", "qcow2", img("b.qcow2"), "1M");
  qemuImg("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", img("a.qcow2"));
  qemuImg("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", img("b.qcow2"));
  refused(img("a.qcow2"), /backing chain that loops/);
});

function patchByte(path: string, at: number, value: number): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, Buffer.from([value]), 0, 1, at);
  } finally {
    closeSync(fd);
  }
}

test("overlays share their backing file's index: built once, each overlay hashes only its own clusters, twins found in the backing file", { skip }, async (t) => {
  const dir = scratch(t);
  const base = join(dir, "base.raw");
  const baseBytes = content(4 * M, 9);
  writeFileSync(base, baseBytes);
  const overlays = ["a", "b"].map((n) => join(dir, `${n}.qcow2`));
  for (const o of overlays) qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", base, "-F", "raw", o, String(5 * M));
  qemuIo(overlays[0]!, "qcow2", "write -P 0x61 1M 64k", "write -P 0x62 2M 128k");
  qemuIo(overlays[1]!, "qcow2", "write -P 0x63 3M 64k");
  const baseBlocks = baseBytes.length / PAGE_SIZE;
  const pastBase = (5 * M - baseBytes.length) / PAGE_SIZE; // blocks the backing file does not have: the overlay's own (zeros)

  const a = await openNasIndex(overlays[0]!);
  const baseHeader = readIndexHeader(defaultIndexPath(base));
  try {
    assert.equal(a.built, true);
    assert.equal(a.hashed, baseBlocks + 3 * 16 + pastBase, "the backing file whole, then a's 3 clusters and its blocks past the backing file");
    assert.equal(a.header.seed, baseHeader.seed, "the overlay's index uses the backing index's seed");
    // a's index equals hashing a's guest-visible disk in full
    const whole = qemuRaw(dir, overlays[0]!);
    assert.ok(Buffer.from(a.index.blockHashes()).equals(Buffer.from(a.engine.hashPages(whole))), "overlay index differs from a full hash of its guest view");
    // a block only the backing file holds is found through the overlay, and verifies when read through it
    const blk = 100;
    const found = a.index.lookup(a.engine.hashPages(baseBytes.subarray(blk * PAGE_SIZE, (blk + 1) * PAGE_SIZE)))[0]!;
    assert.notEqual(found, NO_BLOCK);
    assert.ok(a.image.fromBacking(found));
    const v = new BlockVerifier(a.engine, a.image);
    const wanted = a.index.blockHashes().slice(found * HASH_SIZE, (found + 1) * HASH_SIZE);
    assert.deepEqual(v.verify([found], () => wanted), [true]);
    v.free();
  } finally {
    a.image.close();
  }

  const b = await openNasIndex(overlays[1]!);
  try {
    assert.equal(b.built, true);
    assert.equal(b.hashed, 16 + pastBase, "the backing index is reused: only b's own cluster and its blocks past the backing file are hashed");
    assert.equal(readIndexHeader(defaultIndexPath(base)).indexId, baseHeader.indexId, "the backing index was not rebuilt");
    assert.equal(b.header.seed, baseHeader.seed);
    assert.ok(Buffer.from(b.index.blockHashes()).equals(Buffer.from(b.engine.hashPages(qemuRaw(dir, overlays[1]!)))));
  } finally {
    b.image.close();
  }
  const again = await openNasIndex(overlays[1]!);
  again.image.close();
  assert.equal(again.built, false);
  assert.equal(again.hashed, 0);
});

test("a disk kept open sees clusters the image allocated after it was opened (its tables are read again when the file changed)", { skip }, async (t) => {
  const dir = scratch(t);
  const base = join(dir, "base.raw");
  writeFileSync(base, content(2 * M, 13));
  const top = join(dir, "top.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top);
  const disk = openDisk(top);
  try {
    const before = Buffer.alloc(disk.size);
    disk.readAt(0, before);
    assert.ok(before.equals(qemuRaw(dir, top)));
    qemuIo(top, "qcow2", "write -P 0x99 512k 64k", "write -z 1M 64k");
    await new Promise((r) => setTimeout(r, 120));
    const after = Buffer.alloc(disk.size);
    disk.readAt(0, after);
    assert.ok(after.equals(qemuRaw(dir, top)), "the open disk still reads the old mapping");
    assert.ok(!after.equals(before));
  } finally {
    disk.close();
  }
});
