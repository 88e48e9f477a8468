// A real guest booted from a qcow2 overlay on its raw disk migrates in stream
// mode: the overlay's index comes from the backing file's, every twin is read
// through the overlay from the backing file, and the destination's RAM ends
// identical to the source's.
//
// The guest is stopped for the migration: QEMU's own live migration of this
// TCG guest leaves a few pages differing between the two RAM files even with
// no proxy in between (seen migrating QEMU to QEMU directly at ~100 MB/s), so
// byte equality is checked on a guest that does not write meanwhile. That it
// runs on is checked at the destination (the live path is stream.test.ts's).
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { QemuVm } from "../src/adapters/qemu/vm.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import { freePort, TEST_KEY } from "./helpers/stream.js";
import { guest, skipRealGuest } from "./helpers/guest.js";
import { qemuImg, skipNoQemuImg } from "./helpers/qemu-img.js";

const skip = skipRealGuest || skipNoQemuImg;

/** Offsets of the 4 KiB pages where the two files differ (read in 4 MiB pieces). */
function differingPages(a: string, b: string): number[] {
  assert.equal(fs.statSync(a).size, fs.statSync(b).size);
  const fa = fs.openSync(a, "r"), fb = fs.openSync(b, "r");
  const ba = Buffer.alloc(4 << 20), bb = Buffer.alloc(4 << 20);
  const diff: number[] = [];
  try {
    for (let at = 0; ; at += ba.length) {
      const n = fs.readSync(fa, ba, 0, ba.length, at);
      if (n === 0) return diff;
      assert.equal(fs.readSync(fb, bb, 0, n, at), n);
      for (let p = 0; p < n; p += 4096) if (!ba.subarray(p, p + 4096).equals(bb.subarray(p, p + 4096))) diff.push(at + p);
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

test("a guest on a qcow2 overlay migrates through stream-out/stream-in with twins from the backing file; RAM identical, the guest runs on", { skip, timeout: 300_000 }, async (t) => {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-qcow2-guest-"));
  const vms: QemuVm[] = [];
  t.after(async () => {
    for (const vm of vms) await vm.cleanup();
    fs.rmSync(work, { recursive: true, force: true });
  });
  const base = path.join(work, "base.raw");
  fs.copyFileSync(guest!.disk, base);
  const overlay = path.join(work, "vm.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay);

  const nas = await openNasIndex(overlay);
  try {
    const baseBlocks = fs.statSync(base).size / 4096;
    assert.equal(nas.image.format, "qcow2");
    assert.deepEqual(nas.image.chain, [overlay, base]);
    assert.equal(nas.hashed, baseBlocks, "the backing file hashed once; the overlay has no blocks of its own");
    for (let b = 0; b < nas.image.blocks; b += 97) assert.ok(nas.image.fromBacking(b), `block ${b} reads from the backing file`);
  } finally {
    nas.image.close();
  }

  const common = { ...guest!, disk: overlay, diskFormat: "qcow2" as const, memoryMiB: 256 };
  const srcMem = `/dev/shm/pt-qcow2-src-${process.pid}`, dstMem = `/dev/shm/pt-qcow2-dst-${process.pid}`;
  const src = await QemuVm.start({ ...common, memPath: srcMem, qmpSocket: path.join(work, "src.qmp"), serialLog: path.join(work, "src.log"), name: "pt-qcow2-src" });
  vms.push(src);
  await src.waitForSerial(/pagetwin-ready/, 240_000);
  await src.waitForSerial(/pagetwin-counter 2\b/, 30_000);
  const qport = await freePort();
  // -S: the destination stays paused after the migration, so its RAM can be compared with the stopped source's
  const dst = await QemuVm.start({ ...common, memPath: dstMem, qmpSocket: path.join(work, "dst.qmp"), serialLog: path.join(work, "dst.log"), name: "pt-qcow2-dst", incoming: `tcp:127.0.0.1:${qport}`, extraArgs: ["-S"] });
  vms.push(dst);

  const si = await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${qport}`, image: overlay, psk: TEST_KEY });
  const so = await streamOut({ listenPort: 0, to: `127.0.0.1:${si.port}`, image: overlay, psk: TEST_KEY });
  await src.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
  await src.qmp.execute("stop");
  await src.qmp.execute("migrate", { uri: `tcp:127.0.0.1:${so.port}` });
  let status = "";
  while (status !== "completed" && status !== "failed") {
    await new Promise((r) => setTimeout(r, 100));
    status = (await src.qmp.execute<{ status: string }>("query-migrate")).status;
  }
  assert.equal(status, "completed");
  const [o, i] = await Promise.all([so.done, si.done]);
  assert.equal(o.error, undefined);
  assert.equal(i.error, undefined);
  for (;;) {
    const s = await dst.qmp.execute<{ status: string }>("query-status");
    if (s.status !== "inmigrate") break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(o.twinsReplaced > 1000, `${o.twinsReplaced} twins`);
  assert.equal(i.twinsReplaced, o.twinsReplaced);
  assert.equal(o.resends, 0, "every twin read through the overlay verified");
  assert.equal(o.bytesFromQemu, i.bytesToQemu);
  const diff = differingPages(srcMem, dstMem);
  assert.deepEqual(diff.map((x) => `0x${x.toString(16)}`).slice(0, 20), [], `the destination's RAM differs from the source's in ${diff.length} pages`);

  await dst.qmp.execute("cont");
  const last = Math.max(...[...src.serialLog().matchAll(/pagetwin-counter (\d+)/g)].map((m) => Number(m[1])));
  const m = await dst.waitForSerial(new RegExp(`pagetwin-counter (${last + 1})\\b`), 30_000);
  t.diagnostic(`${o.pagesSeen} pages, ${o.twinsReplaced} twins from the backing file through the overlay, link ${o.bytesOutLink} B; counter ${last} -> ${m[1]}`);
});
