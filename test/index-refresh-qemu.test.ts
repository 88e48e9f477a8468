// The index kept fresh by QEMU's own write tracking, against a real guest:
// writes go through QEMU's block layer (qemu-io in the monitor), a dirty
// bitmap records them, and a refresh reads just those blocks over QEMU's NBD
// server. A migration started right after a write uses the stale index.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { QemuVm } from "../src/adapters/qemu/vm.js";
import { DirtyTracker, DirtyTrackerError } from "../src/adapters/qemu/dirty-tracker.js";
import { openTrackedIndex } from "../src/adapters/qemu/tracked-index.js";
import { openNasIndex, type NasIndex } from "../src/adapters/nas/index-file.js";
import { NO_BLOCK, PAGE_SIZE } from "../src/core/engine.js";
import { QemuStreamParser } from "../src/stream/qemu-stream.js";
import { guest, skipRealGuest } from "./helpers/guest.js";
import { throughProxies } from "./helpers/stream.js";
import { cliPath, jsonResult } from "./helpers/cli.js";
import { execFile } from "node:child_process";
import { promisify } from "node:util";

const KiB = 1024;
const MiB = 1024 * KiB;
let work = "";
let image = "";
let vm: QemuVm | null = null;
let tracker: DirtyTracker | null = null;
/** The same bitmap, its dirty blocks read through QEMU's NBD server instead of the file. */
let nbdTracker: DirtyTracker | null = null;

/** A write through QEMU's block layer, as the guest's own writes go (the dirty bitmap sees it). */
async function qemuWrite(pattern: number, offset: number, length: number): Promise<void> {
  const out = await vm!.qmp.execute<string>("human-monitor-command", { "command-line": `qemu-io virtio0 "write -P ${pattern} ${offset} ${length}"` });
  assert.doesNotMatch(out, /error|fail|not found|invalid/i, `qemu-io: ${out}`); // qemu-io prints its own report on QEMU's stdout
}

/** The hashes a full rebuild with this index's seed gives, read from the image now. */
function fullHashes(nas: NasIndex): Buffer {
  return Buffer.from(nas.engine.hashPages(fs.readFileSync(image).subarray(0, nas.header.blocks * PAGE_SIZE)));
}

async function withIndex<T>(fn: (nas: NasIndex) => Promise<T>): Promise<T> {
  const nas = await openNasIndex(image);
  try {
    return await fn(nas);
  } finally {
    nas.image.close();
  }
}

before(async () => {
  if (skipRealGuest) return;
  work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-refresh-"));
  image = path.join(work, "disk.img");
  fs.copyFileSync(guest!.disk, image);
  vm = await QemuVm.start({
    ...guest!, disk: image, diskReadOnly: false, memoryMiB: 256, memPath: `/dev/shm/pt-refresh-test-${process.pid}`,
    qmpSocket: path.join(work, "qmp.sock"), extraQmpSockets: [path.join(work, "cli.sock")], serialLog: path.join(work, "serial.log"), name: "pt-refresh",
  });
  await vm.waitForSerial(/pagetwin-ready/, 240_000);
  const nas = await openNasIndex(image, { rebuild: true });
  nas.image.close();
  tracker = await DirtyTracker.attach(vm.qmp, nas.header.indexId, { socketDir: work });
  nbdTracker = await DirtyTracker.attach(vm.qmp, nas.header.indexId, { socketDir: work, readVia: "nbd" });
});

after(async () => {
  await tracker?.detach().catch(() => undefined);
  await vm?.cleanup();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

test("a running guest's writes: a refresh through the dirty bitmap reads only the written blocks and the index equals a full rebuild", { skip: skipRealGuest, timeout: 120_000 }, async () => {
  assert.equal(tracker!.created, true);
  await qemuWrite(0x5a, 300 * MiB, 64 * KiB);
  await qemuWrite(0xa5, 310 * MiB + 12 * KiB, 8 * KiB);
  await withIndex(async (nas) => {
    assert.equal(nas.stale, true, "the image was written since indexing");
    assert.notDeepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas));
    const gen = nas.header.generation;
    const r = await nbdTracker!.refresh(nas);
    assert.equal(r.nbdBytes, 72 * KiB, "read exactly the 18 written blocks through NBD");
    assert.equal(r.blocksRead, 18);
    assert.equal(r.blocksChanged, 18);
    assert.equal(r.kind, "dirty-bitmap");
    assert.equal(r.generation, gen + 1);
    assert.deepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas), "the index equals a full rebuild");
  });
  // nothing written since: the next refresh reads nothing
  await withIndex(async (nas) => {
    assert.equal(nas.stale, false);
    const r = await nbdTracker!.refresh(nas);
    assert.equal(r.nbdBytes, 0);
    assert.equal(r.blocksRead, 0);
  });
});

test("writes that land during a refresh are caught by the next one", { skip: skipRealGuest, timeout: 120_000 }, async () => {
  await qemuWrite(0x21, 280 * MiB, 16 * KiB);
  await withIndex(async (nas) => {
    const r1 = await tracker!.refresh(nas, {
      afterSnapshot: async () => {
        await qemuWrite(0x22, 290 * MiB, 32 * KiB); // a new block range
        await qemuWrite(0x23, 280 * MiB, 4 * KiB); // one the refresh is about to read
      },
    });
    assert.equal(r1.blocksRead, 4, "the first refresh reads what was dirty when it began");
    const r2 = await tracker!.refresh(nas);
    assert.equal(r2.blocksRead, 9, "the next reads what was written meanwhile");
    assert.equal(r2.nbdBytes, 0, "read from the file");
    assert.equal(r2.generation, r1.generation + 1);
    assert.deepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas), "the index equals a full rebuild");
  });
});

test("a migration started right after the guest wrote uses the stale index, resends what changed, and arrives byte-identical; the next refresh reads that block", { skip: skipRealGuest, timeout: 240_000 }, async () => {
  const capture = path.join(work, "capture.bin");
  await vm!.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
  await vm!.qmp.execute("migrate", { uri: `exec:cat > ${capture}` });
  for (;;) {
    const s = await vm!.qmp.execute<{ status: string }>("query-migrate");
    if (s.status === "completed") break;
    assert.notEqual(s.status, "failed", "capture migration failed");
    await new Promise((r) => setTimeout(r, 100));
  }
  await vm!.qmp.execute("cont");
  const data = fs.readFileSync(capture);
  // a block that some page of the captured RAM is a copy of
  const block = await withIndex(async (nas) => {
    const p = new QemuStreamParser();
    for (let i = 0; i < data.length; i += MiB) {
      for (const pc of p.push(data.subarray(i, i + MiB))) {
        if (pc.kind !== "page") continue;
        const b = nas.index.lookup(nas.engine.hashPages(pc.data))[0]!;
        if (b !== NO_BLOCK) return b;
      }
    }
    return NO_BLOCK;
  });
  assert.notEqual(block, NO_BLOCK, "no twin page in the capture");
  await qemuWrite(0x33, block * PAGE_SIZE, 4 * KiB);
  const log: string[] = [];
  const { out, so, si } = await throughProxies({ data, image, out: { log: (m) => log.push(m) } });
  assert.equal(so.error, undefined);
  assert.equal(si.error, undefined);
  assert.ok(log.some((l) => /stale/.test(l)), `stream-out said nothing of a stale index: ${log.join(" | ")}`);
  assert.ok(so.resends >= 1, `resends ${so.resends}`);
  assert.equal(si.resends, so.resends);
  assert.ok(so.twinsReplaced > so.resends, "the rest of the index still served");
  assert.ok(out.equals(data), "the stream arrived byte-identical");
  await withIndex(async (nas) => {
    const r = await tracker!.refresh(nas);
    assert.equal(r.blocksRead, 1, "the refresh reads the one block written");
    assert.deepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas));
  });
});

test("pagetwin index --qmp refreshes a running VM's stale index from the bitmap this suite's tracker started", { skip: skipRealGuest, timeout: 120_000 }, async () => {
  await qemuWrite(0x44, 200 * MiB, 20 * KiB);
  const { stdout } = await promisify(execFile)(process.execPath, [cliPath, "index", "--image", image, "--qmp", path.join(work, "cli.sock"), "--drive", "virtio0", "--json"]);
  const r = jsonResult(stdout) as { built: boolean; stale: boolean; refresh: { kind: string; blocksRead: number; blocksChanged: number } };
  assert.equal(r.built, false);
  assert.equal(r.refresh.kind, "dirty-bitmap");
  assert.equal(r.refresh.blocksRead, 5);
  assert.equal(r.refresh.blocksChanged, 5);
  await withIndex(async (nas) => assert.deepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas)));
});

test("a write that lands after the build read its block, before the index's bitmap is added, is caught (tracking starts before the build)", { skip: skipRealGuest, timeout: 120_000 }, async () => {
  const indexPath = path.join(work, "tracked.idx");
  const { nas, tracker: t, refreshed } = await openTrackedIndex(vm!.qmp, () => openNasIndex(image, { indexPath }), {
    socketDir: work,
    afterBuild: () => qemuWrite(0x61, 4 * MiB, 8 * KiB), // the build has read these blocks already
  });
  try {
    assert.equal(nas.built, true);
    assert.ok(refreshed, "the image was written during the build: refreshed from the bitmap");
    assert.ok(refreshed.blocksRead >= 2 && refreshed.blocksChanged >= 2, `read ${refreshed.blocksRead}, changed ${refreshed.blocksChanged}`);
    assert.deepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas), "the index equals a full rebuild");
    const names = (await vm!.qmp.execute<Array<{ inserted?: { "dirty-bitmaps"?: Array<{ name: string }> } }>>("query-block"))
      .flatMap((d) => d.inserted?.["dirty-bitmaps"] ?? []).map((b) => b.name);
    assert.ok(names.includes(t.bitmap), "the index's bitmap tracks on");
    assert.ok(!names.some((n) => n.startsWith("pagetwin-pending-")), `the build's bitmap is gone: ${names.join(", ")}`);
  } finally {
    nas.image.close();
    await t.detach();
  }
});

test("a QEMU already running an NBD server: the refresh says to give its address (--nbd), and with it adds and removes its own export, leaving the server running", { skip: skipRealGuest, timeout: 120_000 }, async () => {
  const sock = path.join(work, "their-nbd.sock");
  await vm!.qmp.execute("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
  try {
    await qemuWrite(0x71, 8 * MiB, 4 * KiB);
    await withIndex(async (nas) => {
      await assert.rejects(tracker!.refresh(nas), (err: Error) => err instanceof DirtyTrackerError && /already runs an NBD server.*--nbd/.test(err.message));
      const shared = await DirtyTracker.attach(vm!.qmp, nas.header.indexId, { nbdServer: { path: sock }, readVia: "nbd" });
      const r = await shared.refresh(nas);
      assert.ok(r.blocksRead >= 1 && r.nbdReads >= 1, `read ${r.blocksRead} blocks through ${r.nbdReads} NBD reads`);
      assert.deepEqual(Buffer.from(nas.index.blockHashes()), fullHashes(nas), "the failed refresh gave its blocks back: the index equals a full rebuild");
    });
    const exports = await vm!.qmp.execute<Array<{ id: string }>>("query-block-exports");
    assert.deepEqual(exports.filter((e) => e.id.startsWith("pagetwin-")), [], "pagetwin's export is removed");
    await assert.rejects(vm!.qmp.execute("nbd-server-start", { addr: { type: "unix", data: { path: `${sock}.2` } } }), /already running/, "the server still runs");
  } finally {
    await vm!.qmp.execute("nbd-server-stop").catch(() => undefined);
  }
});
