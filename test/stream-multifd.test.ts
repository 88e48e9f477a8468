// Stream mode with QEMU's multifd (compression none) on the real guest: one
// source guest migrated through stream-out/stream-in to a fresh destination
// with 1 (plain), 2 and 4 channels in turn (the source goes on after each).
// Skipped when QEMU or the guest (scripts/build-guest.sh) is missing.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import type { StreamStats } from "../src/stream/stats.js";
import { QemuVm } from "../src/adapters/qemu/vm.js";
import { freePort, TEST_KEY } from "./helpers/stream.js";
import { guest, skipRealGuest } from "./helpers/guest.js";
import type { TraceRecord } from "../src/trace/format.js";
import { TraceModel, type MigrationModel } from "../src/trace/model.js";

let work = "";
let nasImage = "";
let src: QemuVm | null = null;
let run = 0;

before(async () => {
  if (skipRealGuest) return;
  work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-multifd-"));
  nasImage = path.join(work, "nas", "disk.img");
  fs.mkdirSync(path.dirname(nasImage));
  fs.copyFileSync(guest!.disk, nasImage);
  src = await QemuVm.start({
    ...guest!, memoryMiB: 256, memPath: `/dev/shm/pt-multifd-src-${process.pid}`,
    qmpSocket: path.join(work, "src.qmp"), serialLog: path.join(work, "src.log"), name: "pt-multifd-src",
  });
  await src.waitForSerial(/pagetwin-ready/, 240_000);
  await src.waitForSerial(/pagetwin-counter 2\b/, 30_000);
  await src.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
});

after(async () => {
  await src?.cleanup();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

interface Outcome {
  o: StreamStats; i: StreamStats; last: number; next: number; traces: { out: TraceRecord[]; in: TraceRecord[] };
  /** The source's query-migrate once completed. */
  info: { "xbzrle-cache"?: { pages: number } };
}

interface MigrateOptions {
  compression?: "none" | "zstd";
  workers?: number;
  /**
   * "advise": QEMU's postcopy-ram capability on at both ends (as libvirt's --postcopy sets it), the migration
   * completing in pre-copy; "start": also switched to postcopy partway (migrate-start-postcopy, QEMU's rate capped
   * so that there is a partway).
   */
  postcopy?: "advise" | "start";
  /** QEMU's xbzrle capability on at both ends (libvirt's --compressed). */
  xbzrle?: boolean;
}

/** A side's trace: one migration, whatever the channels, with that side's stats as its totals. */
function oneMigration(records: TraceRecord[], s: StreamStats, side: "out" | "in", pagesSeen: number, twins: number): MigrationModel {
  const model = new TraceModel();
  for (const r of records) model.apply(r);
  assert.equal(model.migrations.size, 1, `${side}: the main channel and the multifd channels are one migration`);
  const m = [...model.migrations.values()][0]!, e = m.end!;
  assert.ok(e && e.ok, `${side}: ended ok`);
  assert.equal(e.transferredBytes, side === "out" ? s.bytesOutLink : s.bytesInLink, `${side}: link bytes`);
  assert.equal(e.baselineBytes, side === "out" ? s.bytesFromQemu : s.bytesToQemu, `${side}: QEMU's bytes`);
  assert.equal(e.pages.normal + e.pages.twin, pagesSeen, `${side}: pages of every channel`);
  assert.equal(e.pages.twin, twins, `${side}: references`);
  assert.equal(m.rounds.reduce((n, r) => n + r.transferredBytes, 0), e.transferredBytes, `${side}: the rounds add up`);
  assert.ok(m.rounds.at(-1)!.final, `${side}: the last round is the final one`);
  return m;
}

/** Migrates the source guest through the proxies to a new destination (`channels` 0: without multifd); the source runs again afterwards, except after a postcopy. */
async function migrate(channels: number, opts: MigrateOptions = {}): Promise<Outcome> {
  const { compression = "none", workers = 0, postcopy = null, xbzrle = false } = opts;
  const n = run++;
  const qport = await freePort();
  const dst = await QemuVm.start({
    ...guest!, memoryMiB: 256, memPath: `/dev/shm/pt-multifd-dst-${process.pid}-${n}`,
    qmpSocket: path.join(work, `dst${n}.qmp`), serialLog: path.join(work, `dst${n}.log`), name: `pt-multifd-dst${n}`, incoming: "defer",
  });
  try {
    for (const vm of [src!, dst]) {
      // one call: QEMU 7.2 refuses postcopy-ram with multifd on, whichever is set first
      await vm.qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "multifd", state: false }, { capability: "postcopy-ram", state: postcopy !== null }, { capability: "xbzrle", state: xbzrle }] });
      if (channels) await vm.useMultifd(channels, compression);
    }
    if (postcopy === "start") await src!.qmp.execute("migrate-set-parameters", { "max-bandwidth": 40_000_000 });
    // XBZRLE deltas come from the third pass on (the second fills QEMU's cache), of pages the guest writes again:
    // a slow second pass (it writes some meanwhile), and no switchover before the fourth
    if (xbzrle) await src!.qmp.execute("migrate-set-parameters", { "downtime-limit": 1, "max-bandwidth": 40_000_000 });
    await dst.qmp.execute("migrate-incoming", { uri: `tcp:127.0.0.1:${qport}` });
    const traces = { out: [] as TraceRecord[], in: [] as TraceRecord[] };
    const si = await streamIn({ listenPort: 0, qemu: `127.0.0.1:${qport}`, image: nasImage, psk: TEST_KEY, workers, trace: [{ write: (r) => traces.in.push(r) }] });
    // compression fixed: "auto" weighs the measured link rate, and the comparison below is of bytes, not timing
    // a trace follows each page on the main thread: with workers, stream-out goes without one
    const so = await streamOut({
      listenPort: 0, to: `127.0.0.1:${si.port}`, image: nasImage, psk: TEST_KEY, compress: "zstd", workers, ...(workers ? {} : { trace: [{ write: (r: TraceRecord) => traces.out.push(r) }] }),
    });
    const before = src!.serialLog().length;
    await src!.waitForSerial(/pagetwin-counter \d+/, 10_000, before);
    const resumed = dst.qmp.waitForEvent("RESUME", 180_000);
    await src!.qmp.execute("migrate", { uri: `tcp:127.0.0.1:${so.port}` });
    let info: { status: string; "error-desc"?: string; ram?: { transferred: number; "dirty-sync-count": number }; "xbzrle-cache"?: { pages: number } };
    const statuses = new Set<string>();
    for (;;) {
      info = await src!.qmp.execute("query-migrate");
      statuses.add(info.status);
      if (info.status === "completed" || info.status === "failed") break;
      // partway: past the first 20 MB of RAM (the guest's page cache comes later in its RAM)
      if (postcopy === "start" && info.status === "active" && (info.ram?.transferred ?? 0) > 20e6) await src!.qmp.execute("migrate-start-postcopy");
      const syncs = info.ram?.["dirty-sync-count"] ?? 0;
      if (xbzrle && syncs >= 2 && syncs < 4) await src!.qmp.execute("migrate-set-parameters", { "max-bandwidth": 4_000_000 });
      if (xbzrle && syncs >= 4) await src!.qmp.execute("migrate-set-parameters", { "downtime-limit": 300, "max-bandwidth": 10_000_000_000 });
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(info.status, "completed", info["error-desc"]);
    if (postcopy === "start") assert.ok(statuses.has("postcopy-active"), `went through ${[...statuses].join(", ")}`);
    await resumed;
    const [o, i] = await Promise.all([so.done, si.done]);
    const last = Math.max(...[...src!.serialLog().matchAll(/pagetwin-counter (\d+)/g)].map((m) => Number(m[1])));
    const m = await dst.waitForSerial(new RegExp(`pagetwin-counter (${last + 1}|${last + 2})\\b`), 30_000);
    // after a postcopy the destination has pages the source never sent again: the source stays stopped
    if (postcopy !== "start") await src!.qmp.execute("cont");
    return { o, i, last, next: Number(m[1]), traces, info };
  } finally {
    if (postcopy === "start") await src!.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
    if (xbzrle) await src!.qmp.execute("migrate-set-parameters", { "downtime-limit": 300, "max-bandwidth": 10_000_000_000 });
    await dst.cleanup();
  }
}

/** Both proxies ended without error, stream-in verified the stream against stream-out's, and the guest counts on at the destination. */
function arrived(r: Pick<Outcome, "o" | "i" | "last" | "next">): void {
  assert.equal(r.o.error, undefined);
  assert.equal(r.i.error, undefined);
  assert.ok(r.next > r.last, `counter ${r.last} -> ${r.next}`);
  assert.equal(r.o.verdict, "verified");
}

const results = new Map<number, Outcome>();

for (const channels of [0, 2, 4]) {
  const what = channels ? `multifd with ${channels} channels` : "without multifd (the baseline)";
  test(`real guest through the proxies, ${what}: counter goes on, every channel identical at both ends`, { skip: skipRealGuest, timeout: 240_000 }, async (t) => {
    const r = await migrate(channels);
    const { o, i } = r;
    assert.equal(o.error, undefined);
    assert.equal(i.error, undefined);
    assert.ok(r.next > r.last);
    assert.equal(o.sessions, channels + 1, "a main channel and one per multifd channel");
    // every session's stream was checked at stream-in (length and CRC-32) against the source's
    assert.equal(o.verdict, "verified");
    assert.equal(i.streamsVerified, channels + 1);
    assert.equal(o.streamsVerified, channels + 1);
    assert.equal(o.bytesFromQemu, i.bytesToQemu);
    assert.equal(o.multifd.channels, channels);
    assert.equal(i.multifd.channels, channels);
    if (channels) {
      assert.ok(o.multifd.twins > 0.3 * o.multifd.pages, `${o.multifd.twins} twins of ${o.multifd.pages} multifd pages`);
      assert.equal(i.multifd.twins, o.multifd.twins);
      assert.ok(o.multifd.syncs >= channels, `${o.multifd.syncs} SYNC packets`);
      assert.deepEqual(o.passthrough, []);
    }
    const mo = oneMigration(r.traces.out, o, "out", o.pagesSeen, o.twinsReplaced);
    oneMigration(r.traces.in, i, "in", o.pagesSeen, i.twinsReplaced + i.resends);
    results.set(channels, r);
    t.diagnostic(`trace: ${mo.rounds.length} rounds, ${mo.rounds.map((x) => x.pages.normal + x.pages.twin + x.pages.zero).join("/")} pages`);
    t.diagnostic(`${o.sessions} sessions; ${o.pagesSeen} pages (${o.multifd.pages} on multifd), ${o.twinsReplaced} twins (${o.multifd.twins} on multifd); ` +
      `QEMU stream ${o.bytesFromQemu} B, link ${o.bytesOutLink} B (${(o.bytesOutLink / o.bytesFromQemu).toFixed(3)}x); counter ${r.last} -> ${r.next}`);
  });
}

test("real guest through the proxies, multifd with 2 channels on 2 workers each side: counter goes on, every channel identical at both ends", { skip: skipRealGuest, timeout: 240_000 }, async (t) => {
  const { o, i, last, next } = await migrate(2, { workers: 2 });
  arrived({ o, i, last, next });
  assert.deepEqual([o.sessions, o.streamsVerified, i.streamsVerified, o.multifd.channels], [3, 3, 3, 2]);
  assert.deepEqual([o.workers, i.workers], [{ threads: 2, sessions: 3 }, { threads: 2, sessions: 3 }]);
  assert.equal(o.bytesFromQemu, i.bytesToQemu);
  assert.ok(o.multifd.twins > 0.3 * o.multifd.pages, `${o.multifd.twins} twins of ${o.multifd.pages} multifd pages`);
  assert.equal(i.multifd.twins, o.multifd.twins);
  assert.ok(o.multifd.syncs >= 2, `${o.multifd.syncs} SYNC packets`);
  t.diagnostic(`${o.pagesSeen} pages, ${o.twinsReplaced} twins; link ${(o.bytesOutLink / o.bytesFromQemu).toFixed(3)}x of QEMU's stream; counter ${last} -> ${next}`);
});

test("real guest: bytes on the link with multifd are close to those without", { skip: skipRealGuest }, (t) => {
  const base = results.get(0), two = results.get(2), four = results.get(4);
  assert.ok(base && two && four, "the migrations above ran");
  // each migration sends what the guest has at that moment; compare the link's share of QEMU's stream
  const ratio = (r: Outcome) => r.o.bytesOutLink / r.o.bytesFromQemu;
  // The same source guest migrates again and again here, finding fewer twins each time (link/stream for 0, 2, 4 channels:
  // 0.097, 0.109, 0.119 run in that order; 0.118, 0.111, 0.104 run in the order 4, 2, 0): the bound catches multifd pages going
  // undeduplicated (then the link carries ~3x), not that drift. docs/STREAM.md has the fair comparison.
  for (const r of [two, four]) assert.ok(ratio(r) < ratio(base) * 1.6 + 0.01, `link/stream ${ratio(r).toFixed(3)} against ${ratio(base).toFixed(3)} without multifd`);
  t.diagnostic(`link/stream: ${ratio(base).toFixed(3)} (1 channel), ${ratio(two).toFixed(3)} (multifd 2), ${ratio(four).toFixed(3)} (multifd 4)`);
});

test("real guest: multifd with QEMU's own zstd passes through untouched (each channel says why), the guest goes on", { skip: skipRealGuest, timeout: 240_000 }, async (t) => {
  const { o, i, last, next } = await migrate(2, { compression: "zstd" });
  arrived({ o, i, last, next });
  assert.equal(o.multifd.channels, 2);
  assert.equal(o.multifd.twins, 0);
  assert.equal(o.passthrough.filter((p) => /multifd channel [01] uses QEMU's own zstd compression/.test(p)).length, 2, o.passthrough.join("; "));
  t.diagnostic(`passthrough: ${o.passthrough.join("; ")}; link ${o.bytesOutLink} B for ${o.bytesFromQemu} B`);
});

test("real guest with QEMU's postcopy-ram capability on (libvirt's --postcopy), completing in pre-copy: deduplicated as without it", { skip: skipRealGuest, timeout: 240_000 }, async (t) => {
  const { o, i, last, next } = await migrate(0, { postcopy: "advise" });
  arrived({ o, i, last, next });
  assert.deepEqual(o.passthrough, [], "the ADVISE command before the RAM section is not a reason to stop rewriting");
  assert.ok(o.twinsReplaced > 0.3 * o.pagesSeen, `${o.twinsReplaced} twins of ${o.pagesSeen} pages`);
  assert.equal(o.bytesFromQemu, i.bytesToQemu);
  t.diagnostic(`${o.pagesSeen} pages, ${o.twinsReplaced} twins; link ${(o.bytesOutLink / o.bytesFromQemu).toFixed(3)}x of QEMU's stream; counter ${last} -> ${next}`);
});

test("real guest with QEMU's xbzrle capability on (libvirt's --compressed): the deltas go on raw, the pages around them deduplicated", { skip: skipRealGuest, timeout: 240_000 }, async (t) => {
  const { o, i, last, next, info } = await migrate(0, { xbzrle: true });
  arrived({ o, i, last, next });
  const deltas = info["xbzrle-cache"]?.pages ?? 0;
  assert.ok(deltas > 0, "QEMU sent pages as XBZRLE deltas (the pages the guest wrote again after the first pass)");
  assert.deepEqual(o.passthrough, [], "an XBZRLE record is not a reason to stop rewriting");
  assert.ok(o.twinsReplaced > 0.3 * o.pagesSeen, `${o.twinsReplaced} twins of ${o.pagesSeen} pages`);
  assert.equal(o.bytesFromQemu, i.bytesToQemu);
  t.diagnostic(`${deltas} XBZRLE pages; ${o.pagesSeen} pages, ${o.twinsReplaced} twins; counter ${last} -> ${next}`);
});

// last in this file: the source stays stopped after it
test("real guest switched to postcopy partway: the pre-copy part deduplicated, the rest passed through (named), the guest goes on at the destination", { skip: skipRealGuest, timeout: 240_000 }, async (t) => {
  const { o, i, last, next } = await migrate(0, { postcopy: "start" });
  arrived({ o, i, last, next });
  assert.ok(o.passthrough.some((p) => /migration command POSTCOPY_/.test(p)), o.passthrough.join("; "));
  assert.ok(o.twinsReplaced > 0, "twins before the switch");
  assert.equal(i.twinsReplaced + i.resends, o.twinsReplaced);
  assert.equal(o.bytesFromQemu, i.bytesToQemu);
  t.diagnostic(`passthrough: ${o.passthrough.join("; ")}; ${o.pagesSeen} pages, ${o.twinsReplaced} twins; link ${o.bytesOutLink} B for ${o.bytesFromQemu} B`);
});
