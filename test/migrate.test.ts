import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, readFileSync, openSync, writeSync, closeSync } from "node:fs";
import { createHash, randomBytes } from "node:crypto";
import { createServer, connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runEmbeddedMigration } from "../src/demo/embedded-run.js";
import type { MigrationResult } from "../src/agent/source.js";
import { assertStatsInvariants } from "./helpers/invariants.js";

const tmp = () => mkdtempSync(join(tmpdir(), "pagetwin-test-"));
const sha = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");
const invariants = (r: MigrationResult) => assertStatsInvariants(r.iterationLog, {
  pages: r.pages.total, normal: r.pages.normal, twin: r.pages.twin, duplicate: r.pages.zero, totalTimeMs: r.totalTimeMs, setupTimeMs: r.setupTimeMs,
});

test("a live-dirtying migration over TCP ends with byte-identical RAM, and only unique pages travel in full", async () => {
  const dir = tmp();
  try {
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 400e6, warmupMs: 200,
      vm: { dir, ramMiB: 32, twinShare: 0.5, zeroShare: 0.2, dirtyPagesPerSecond: 3000, rewriteBlocksPerSecond: 0 },
    });
    assert.equal(r.status, "completed", r.error);
    assert.equal(r.verified, true);
    assert.equal(r.bytesCompared, 32 << 20);
    assert.equal(r.destination?.status, "completed");
    assert.ok(r.guest.written > 0, "the guest wrote pages during the migration");
    const first = r.iterationLog[0]!;
    assert.ok(first.pages.twin >= 0.95 * 32 * 256 * 0.5, `first round mapped ${first.pages.twin} twins`);
    // QEMU's duplicate: the first round counts the zero pages the destination holds already (nothing sent for them)
    assert.ok(first.pages.zero >= 0.95 * 32 * 256 * 0.2, `first round found ${first.pages.zero} zero pages`);
    invariants(r);
    // the bytes that crossed the wire: full pages plus at most 32 bytes per page handled, plus control frames
    const full = r.pages.normal + r.pages.resent;
    const handled = full + r.pages.twin + r.pages.zero;
    assert.ok(r.transferredBytes >= full * 4096);
    assert.ok(r.transferredBytes <= full * 4096 + handled * 32 + 64 * 1024, `${r.transferredBytes} bytes for ${full} full pages`);
    assert.ok(r.iterations >= 2);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("plain pre-copy sends every non-zero page in full and also ends identical", async () => {
  const dir = tmp();
  try {
    const r = await runEmbeddedMigration({
      mode: "baseline", bandwidth: 0, destination: "inproc",
      vm: { dir, ramMiB: 16, twinShare: 0.5, zeroShare: 0.25, dirtyPagesPerSecond: 1000, rewriteBlocksPerSecond: 0 },
    });
    assert.equal(r.status, "completed", r.error);
    assert.equal(r.verified, true);
    assert.equal(r.pages.twin, 0);
    assert.equal(r.iterationLog[0]!.pages.normal, 16 * 256 * 0.75);
    assert.equal(r.iterationLog[0]!.pages.zero, 16 * 256 * 0.25, "every zero page counts as duplicate in the first round");
    invariants(r);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("NAS blocks rewritten after indexing are refetched from the source, and RAM is still identical", async () => {
  const dir = tmp();
  try {
    let rewritten = 0;
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 0, destination: "inproc",
      vm: { dir, ramMiB: 16, twinShare: 0.6, zeroShare: 0.1, dirtyPagesPerSecond: 0, rewriteBlocksPerSecond: 0 },
      beforeConnect: async (_port, vm) => {
        // the guest writes 50 cached blocks on disk after the index was built
        const fd = openSync(vm.layout.imagePath, "r+");
        for (const b of vm.cachedBlocks.slice(0, 50)) {
          writeSync(fd, randomBytes(4096), 0, 4096, b * 4096);
          rewritten++;
        }
        closeSync(fd);
      },
    });
    assert.equal(rewritten, 50);
    assert.equal(r.status, "completed", r.error);
    assert.equal(r.pages.resent, 50, "each stale twin was resent once");
    assert.equal(r.destination?.twinsRejected, 50);
    assert.equal(r.verified, true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a connection torn mid-iteration fails with a clear message; the source VM runs on, its RAM untouched", async () => {
  const dir = tmp();
  let before = "";
  const sockets: Socket[] = [];
  const proxy = createServer();
  try {
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 200e6, destination: "inproc",
      vm: { dir, ramMiB: 32, twinShare: 0.3, zeroShare: 0.1, dirtyPagesPerSecond: 0, rewriteBlocksPerSecond: 0 },
      beforeConnect: async (port, vm) => {
        before = sha(vm.layout.ramPath);
        // a proxy that cuts the link after 8 MB, in the middle of the first iteration
        proxy.on("connection", (c) => {
          const up = connect(port, "127.0.0.1");
          sockets.push(c, up);
          let n = 0;
          c.on("data", (d) => {
            n += d.length;
            if (n > 8e6) { c.destroy(); up.destroy(); return; }
            up.write(d);
          });
          up.on("data", (d) => c.write(d));
          up.on("error", () => c.destroy());
          c.on("error", () => up.destroy());
        });
        await new Promise<void>((res) => proxy.listen(0, "127.0.0.1", res));
        return { host: "127.0.0.1", port: (proxy.address() as { port: number }).port };
      },
    });
    assert.equal(r.status, "failed");
    assert.match(r.error ?? "", /connection to destination agent .* (closed|failed)/);
    assert.equal(r.iterationLog.length, 0, "it failed inside the first iteration");
    assert.equal(r.sourceRunningAfter, true, "the source guest was never stopped");
    assert.equal(sha(r.ramPath), before, "source RAM untouched");
    assert.equal(r.verified, false);
  } finally {
    for (const s of sockets) s.destroy();
    proxy.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("with a pool of worker threads hashing the RAM, the migration is the same: identical RAM, twins found", async () => {
  const dir = tmp();
  try {
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 0, destination: "inproc", workers: 2,
      vm: { dir, ramMiB: 16, twinShare: 0.5, zeroShare: 0.2, dirtyPagesPerSecond: 2000, rewriteBlocksPerSecond: 0 },
    });
    assert.equal(r.status, "completed", r.error);
    assert.equal(r.verified, true);
    assert.ok(r.iterationLog[0]!.pages.twin >= 0.95 * 16 * 256 * 0.5);
    for (const it of r.iterationLog) assert.equal(it.hashWorkers, 2);
    invariants(r); // the workers' zero bits count the same
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("workers only at switchover: the live passes hash on the agent's thread, the final pass (guest stopped) on the pool; RAM identical", async () => {
  const dir = tmp();
  try {
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 0, destination: "inproc", workers: 2, workersWhen: "switchover",
      vm: { dir, ramMiB: 16, twinShare: 0.5, zeroShare: 0.2, dirtyPagesPerSecond: 2000, rewriteBlocksPerSecond: 0 },
    });
    assert.equal(r.status, "completed", r.error);
    assert.equal(r.verified, true);
    assert.ok(r.iterationLog.length >= 2);
    for (const it of r.iterationLog) assert.equal(it.hashWorkers, it.final ? 2 : 0, `iteration ${it.iteration}${it.final ? " (final)" : ""}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
