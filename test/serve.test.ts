// `pagetwin serve`: two services on this machine (source and destination,
// their own control sockets and peer ports) with fake QEMUs on synthetic
// streams: the control interface, a migration of a two-disk VM whose twins
// come from both disks, the destination service down. The real guest's
// migrations through the services are in serve-qemu.test.ts.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { ServeClient } from "../src/serve/client.js";
import type { MigrationStatus, ServeEvent } from "../src/serve/migration.js";
import type { OutgoingReady } from "../src/serve/outgoing.js";
import { ServeError } from "../src/errors.js";
import { spawnSync } from "node:child_process";
import { serveSpec } from "../src/cli/commands/serve.js";
import { qemuStream, freePort } from "./helpers/stream.js";
import { TraceModel } from "../src/trace/model.js";
import type { TraceRecord } from "../src/trace/format.js";
import { QemuSockets } from "../src/serve/qemu-sockets.js";
import { countingRelay, sinkQemu, sourceQemu, twoServices, type TwoServices } from "./helpers/serve.js";
import { Shared } from "../src/serve/shared.js";

const PAGE = 4096;
let dir = "";
let diskA = "";
let diskB = "";
let svc: TwoServices;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-serve-"));
  diskA = path.join(dir, "a.img");
  diskB = path.join(dir, "b.img");
  fs.writeFileSync(diskA, randomBytes(512 * PAGE));
  fs.writeFileSync(diskB, randomBytes(256 * PAGE));
  for (const d of [diskA, diskB]) { const n = await openNasIndex(d); n.index.free(); n.image.close(); }
  svc = await twoServices(dir, process.env["PT_SERVE_LOG"] ? (m) => console.error(m) : undefined);
});

after(async () => {
  await svc?.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const block = (file: string, b: number) => { const buf = Buffer.alloc(PAGE); const fd = fs.openSync(file, "r"); fs.readSync(fd, buf, 0, PAGE, b * PAGE); fs.closeSync(fd); return buf; };

/** Pages of both disks (and some of neither), as a guest's RAM holding files of both. */
function twoDiskPages(): { pages: Buffer; fromA: number; fromB: number } {
  const parts: Buffer[] = [];
  let fromA = 0, fromB = 0;
  for (let i = 0; i < 300; i++) {
    if (i % 3 === 0) { parts.push(block(diskA, (i * 7) % 512)); fromA++; }
    else if (i % 3 === 1) { parts.push(block(diskB, (i * 5) % 256)); fromB++; }
    else parts.push(randomBytes(PAGE));
  }
  return { pages: Buffer.concat(parts), fromA, fromB };
}

async function outgoing(c: ServeClient, id: string, disks: string[], qemuPort: number, peerPort: number): Promise<OutgoingReady> {
  return c.request<OutgoingReady>("outgoing", { migration: id, disks, qemu: "127.0.0.1:0", destQemu: `127.0.0.1:${qemuPort}`, peer: `127.0.0.1:${peerPort}` });
}

/** Waits for migration `id`'s end event on `c`'s service. */
async function ended(c: ServeClient, id: string): Promise<Extract<ServeEvent, { event: "end" }>> {
  const w = await c.watch(id);
  try {
    const st = await c.request<MigrationStatus>("status", { migration: id });
    if (["completed", "failed", "cancelled"].includes(st.state)) return { event: "end", migration: id, direction: st.direction, ok: st.state === "completed", status: st };
    for await (const e of w) if (e.event === "end") return e;
    throw new Error("watch ended without an end event");
  } finally {
    await w.close();
  }
}

test("control socket: mode 0600, hello, unknown op and unknown migration give stable codes", async () => {
  for (const p of [svc.srcControl, svc.dstControl]) assert.equal(fs.statSync(p).mode & 0o777, 0o600, p);
  const h = await svc.srcClient.request<{ service: string; peerPort: number }>("hello");
  assert.equal(h.service, "pagetwin serve");
  assert.equal(h.peerPort, svc.src.peerPort);
  await assert.rejects(svc.srcClient.request("frobnicate"), (e: unknown) => e instanceof ServeError && e.code === "PAGETWIN_SERVE_UNKNOWN_OP");
  await assert.rejects(svc.srcClient.request("status", { migration: "nope" }), (e: unknown) => e instanceof ServeError && e.code === "PAGETWIN_SERVE_UNKNOWN_MIGRATION");
  await assert.rejects(svc.srcClient.request("outgoing", { migration: "x" }), (e: unknown) => e instanceof ServeError && e.code === "PAGETWIN_USAGE");
});

/** A migration of a two-disk VM through `svc`: byte-identical, twins per disk counted at both ends; both ends' status. */
async function twoDiskMigration(svc: TwoServices, id: string): Promise<{ s: MigrationStatus; d: MigrationStatus }> {
  const { pages, fromA, fromB } = twoDiskPages();
  const data = qemuStream(pages);
  const sink = await sinkQemu();
  const relay = await countingRelay(svc.dst.peerPort);
  try {
    const ready = await outgoing(svc.srcClient, id, [diskA, diskB], sink.port, relay.port);
    assert.match(ready.migrateUri, /^tcp:127\.0\.0\.1:\d+$/);
    assert.deepEqual(ready.disks.map((d) => d.dedup), [true, true]);
    const inStatus = await svc.dstClient.request<MigrationStatus>("status", { migration: id });
    assert.equal(inStatus.direction, "in");
    assert.equal(inStatus.state, "ready");
    const srcEnd = ended(svc.srcClient, id);
    const dstEnd = ended(svc.dstClient, id);
    assert.equal(await sourceQemu(ready.port, data), false, "the source QEMU was cut off");
    const [s, d] = await Promise.all([srcEnd, dstEnd]);
    assert.equal(s.ok, true, JSON.stringify(s.status.error));
    assert.equal(d.ok, true, JSON.stringify(d.status.error));
    assert.ok(sink.got().equals(data), "the destination QEMU got another stream");
    // the lookup spans both disks: each disk's pages found on it, verified from it at the destination
    assert.deepEqual(s.status.disks.map((x) => x.twins), [fromA, fromB]);
    assert.deepEqual(d.status.disks.map((x) => x.twins), [fromA, fromB]);
    assert.equal(s.status.stats.twinsReplaced, fromA + fromB);
    assert.equal(s.status.stats.verdict, "verified");
    // the source got the destination's stats; frame bytes agree both ways, and with what crossed the network (TLS adds a little)
    assert.equal(s.status.peerStats?.bytesInLink, s.status.stats.bytesOutLink);
    assert.equal(d.status.stats.bytesInLink, s.status.stats.bytesOutLink);
    assert.equal(d.status.stats.bytesOutLink, s.status.stats.bytesInLink);
    assert.ok(relay.up >= s.status.stats.bytesOutLink && relay.up < s.status.stats.bytesOutLink * 1.05 + 16384, `relay ${relay.up} B up, frames ${s.status.stats.bytesOutLink} B`);
    assert.ok(s.status.stats.bytesOutLink < data.length / 2, "references made the link lighter");
    return { s: s.status, d: d.status };
  } finally {
    sink.close();
    relay.close();
  }
}

test("two disks: twins from both travel as references, the stream arrives byte-identical, both services agree with the link's byte count", async () => {
  const { s, d } = await twoDiskMigration(svc, "two-disks");
  assert.deepEqual([s.stats.workers, d.stats.workers], [{ threads: 0, sessions: 0 }, { threads: 0, sessions: 0 }]);
});

test("--workers 2 on both services: each migration encodes and rebuilds on 2 worker threads over both disks' indexes and images, with the same result", async () => {
  const sub = fs.mkdtempSync(path.join(dir, "workers-"));
  const w = await twoServices(sub, process.env["PT_SERVE_LOG"] ? (m) => console.error(m) : undefined, { workers: 2 }, { workers: 2 });
  try {
    const { s, d } = await twoDiskMigration(w, "two-disks-workers");
    assert.deepEqual([s.stats.workers, d.stats.workers], [{ threads: 2, sessions: 1 }, { threads: 2, sessions: 1 }]);
    // one disk: its twins are still counted for it at both ends
    const data = qemuStream(Buffer.concat([block(diskA, 3), randomBytes(PAGE), block(diskA, 9), block(diskA, 27)]));
    const sink = await sinkQemu();
    try {
      const ready = await outgoing(w.srcClient, "one-disk-workers", [diskA], sink.port, w.dst.peerPort);
      const ends = [ended(w.srcClient, "one-disk-workers"), ended(w.dstClient, "one-disk-workers")];
      await sourceQemu(ready.port, data);
      const [s1, d1] = await Promise.all(ends);
      assert.ok(s1.ok && d1.ok && sink.got().equals(data), JSON.stringify(s1.status.error ?? d1.status.error));
      assert.deepEqual([s1.status.disks[0]!.twins, d1.status.disks[0]!.twins, s1.status.stats.twinsReplaced], [3, 3, 3]);
    } finally {
      sink.close();
    }
  } finally {
    await w.close();
  }
  await assert.rejects(twoServices(fs.mkdtempSync(path.join(dir, "bad-")), undefined, {}, { workers: 1.5 }), (e: unknown) => e instanceof Error && /workers must be a whole number/.test(e.message));
});

/** The live view's records, as a page gets them (Server-Sent Events at `url`'s events path). */
async function liveRecords(url: string, signal: AbortSignal): Promise<TraceRecord[]> {
  const res = await fetch(url.replace(/\?live$/, "events"), { signal });
  assert.equal(res.headers.get("content-type"), "text/event-stream");
  const records: TraceRecord[] = [];
  const reader = res.body!.getReader();
  const dec = new TextDecoder();
  let buf = "";
  void (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true });
      for (let i; (i = buf.indexOf("\n\n")) >= 0; buf = buf.slice(i + 2)) if (buf.startsWith("data: ")) records.push(JSON.parse(buf.slice(6, i)) as TraceRecord);
    }
  })().catch(() => {}); // aborted at the end
  return records;
}

test("--trace-dir and --ui on the source service: the migration's trace file has its stats' totals, and the live view streams the same records", async () => {
  const sub = fs.mkdtempSync(path.join(dir, "traced-"));
  const traceDir = path.join(sub, "traces");
  const two = await twoServices(sub, undefined, { traceDir, ui: { port: 0 } });
  const sink = await sinkQemu();
  const ac = new AbortController();
  try {
    const hello = await two.srcClient.request<{ ui: string | null }>("hello");
    assert.match(hello.ui ?? "", /^http:\/\/127\.0\.0\.1:\d+\/[0-9a-f]{32}\/\?live$/);
    const live = await liveRecords(hello.ui!, ac.signal);
    const data = qemuStream(twoDiskPages().pages);
    const ready = await outgoing(two.srcClient, "traced", [diskA, diskB], sink.port, two.dst.peerPort);
    const srcEnd = ended(two.srcClient, "traced");
    assert.equal(await sourceQemu(ready.port, data), false, "the source QEMU was cut off");
    const s = await srcEnd;
    assert.equal(s.ok, true, JSON.stringify(s.status.error));
    assert.deepEqual(fs.readdirSync(traceDir), ["traced.out.ndjson"]);
    const text = fs.readFileSync(path.join(traceDir, "traced.out.ndjson"), "utf8");
    const m = [...TraceModel.parse(text).migrations.values()];
    assert.equal(m.length, 1);
    const t = m[0]!, st = s.status.stats, e = t.end!;
    assert.equal(t.start.mode, "stream");
    assert.match(t.start.label, /migration traced \(out\)/);
    assert.equal(e.ok, true);
    assert.equal(e.transferredBytes, st.bytesOutLink);
    assert.equal(e.baselineBytes, st.bytesFromQemu);
    assert.equal(e.baselineBytes, data.length);
    assert.equal(e.pages.twin, st.twinsReplaced);
    assert.equal(e.pages.normal + e.pages.twin, st.pagesSeen);
    assert.equal(t.rounds.reduce((n, r) => n + r.transferredBytes, 0), st.bytesOutLink, "the rounds add up to the link's bytes");
    // the live view carried the same records (it writes them as they happen: the end may still be on its way)
    const want = text.trim().split("\n").map((l) => JSON.parse(l) as TraceRecord);
    for (let i = 0; i < 200 && !live.some((r) => r.type === "end"); i++) await new Promise((r) => setTimeout(r, 25));
    assert.deepEqual(live.filter((r) => r.id === t.start.id), want);
  } finally {
    ac.abort();
    sink.close();
    await two.close();
  }
});

test("the destination's trace (--trace-dir: MIGRATION.in.ndjson) shows what arrived; a control client that asks gets the source's trace as watch events, with the stats' totals", async () => {
  const sub = fs.mkdtempSync(path.join(dir, "traced-in-"));
  const traceDir = path.join(sub, "traces");
  const two = await twoServices(sub, undefined, {}, { traceDir });
  const sink = await sinkQemu();
  try {
    const data = qemuStream(twoDiskPages().pages);
    const events: TraceRecord[] = [];
    const plain: ServeEvent[] = [];
    const traced = await two.srcClient.watch("asked", { trace: true });
    const untraced = await two.srcClient.watch("asked");
    const collect = (async () => { for await (const e of traced) { if (e.event === "trace") events.push(e.record); if (e.event === "end") return; } })();
    const collectPlain = (async () => { for await (const e of untraced) { plain.push(e); if (e.event === "end") return; } })();
    const ready = await two.srcClient.request<OutgoingReady>("outgoing", {
      migration: "asked", disks: [diskA, diskB], qemu: "127.0.0.1:0", destQemu: `127.0.0.1:${sink.port}`, peer: `127.0.0.1:${two.dst.peerPort}`, trace: true,
    });
    const dstEnd = ended(two.dstClient, "asked");
    await sourceQemu(ready.port, data);
    await collect;
    await collectPlain;
    const s = (await dstEnd).status;
    await Promise.all([traced.close(), untraced.close()]);
    const out = await two.srcClient.request<MigrationStatus>("status", { migration: "asked" });
    assert.equal(out.state, "completed");
    assert.ok(!plain.some((e) => e.event === "trace"), "a watch that did not ask gets no trace records");

    // the source's trace, as events: one migration with the source service's totals
    const model = new TraceModel();
    for (const r of events) model.apply(r);
    const [src] = [...model.migrations.values()];
    assert.equal(model.migrations.size, 1);
    assert.match(src!.start.label, /migration asked \(out\)/);
    assert.equal(src!.end!.transferredBytes, out.stats.bytesOutLink);
    assert.equal(src!.end!.baselineBytes, out.stats.bytesFromQemu);
    assert.equal(src!.end!.pages.twin, out.stats.twinsReplaced);

    // the destination's: what it got on the link, the references it verified, the stream it handed its QEMU
    assert.deepEqual(fs.readdirSync(traceDir), ["asked.in.ndjson"]);
    const [d] = [...TraceModel.parse(fs.readFileSync(path.join(traceDir, "asked.in.ndjson"), "utf8")).migrations.values()];
    assert.match(d!.start.label, /migration asked \(in\)/);
    const e = d!.end!;
    assert.equal(e.ok, true);
    assert.equal(e.verified, true);
    assert.equal(e.transferredBytes, s.stats.bytesInLink);
    assert.equal(e.transferredBytes, out.stats.bytesOutLink);
    assert.equal(e.baselineBytes, s.stats.bytesToQemu);
    assert.equal(e.baselineBytes, data.length);
    assert.equal(e.pages.twin - e.pages.resent, s.stats.twinsReplaced);
    assert.equal(e.pages.normal + e.pages.twin, out.stats.pagesSeen);
    assert.deepEqual(d!.rounds.map((r) => r.pages), src!.rounds.map((r) => r.pages), "the same rounds and pages on both sides");
  } finally {
    sink.close();
    await two.close();
  }
});

test("destination service down: outgoing fails with PAGETWIN_PEER_UNREACHABLE and leaves nothing behind", async () => {
  const dead = await freePort();
  const sink = await sinkQemu();
  try {
    await assert.rejects(outgoing(svc.srcClient, "no-dest", [diskA], sink.port, dead),
      (e: unknown) => e instanceof ServeError && e.code === "PAGETWIN_PEER_UNREACHABLE" && /destination pagetwin serve/.test(e.message));
    const st = await svc.srcClient.request<MigrationStatus>("status", { migration: "no-dest" });
    assert.equal(st.state, "failed");
    const { indexes } = await svc.srcClient.request<{ indexes: Record<string, number> }>("list");
    assert.equal(indexes[diskA], undefined, "the index was released");
  } finally {
    sink.close();
  }
});

test("two migrations of one image share its open index; cancel ends both halves and releases it; a second migration with a taken id is refused", async () => {
  const sink = await sinkQemu();
  try {
    await outgoing(svc.srcClient, "share-1", [diskA], sink.port, svc.dst.peerPort);
    await outgoing(svc.srcClient, "share-2", [diskA, diskB], sink.port, svc.dst.peerPort);
    await assert.rejects(outgoing(svc.srcClient, "share-1", [diskB], sink.port, svc.dst.peerPort),
      (e: unknown) => e instanceof ServeError && e.code === "PAGETWIN_SERVE_DUPLICATE");
    const { indexes } = await svc.srcClient.request<{ indexes: Record<string, number> }>("list");
    assert.equal(indexes[diskA], 2, "one open index, two users");
    assert.equal(indexes[diskB], 1);
    const inEnd = ended(svc.dstClient, "share-1");
    const st = await svc.srcClient.request<MigrationStatus>("cancel", { migration: "share-1" });
    assert.equal(st.state, "cancelled");
    assert.equal(st.error?.code, "PAGETWIN_SERVE_CANCELLED");
    // the destination dropped its half when the lease ended
    const d = await inEnd;
    assert.equal(d.status.state, "cancelled");
    assert.equal((await svc.srcClient.request<{ indexes: Record<string, number> }>("list")).indexes[diskA], 1);
    await svc.srcClient.request("cancel", { migration: "share-2" });
    const after = (await svc.srcClient.request<{ indexes: Record<string, number> }>("list")).indexes;
    assert.deepEqual([after[diskA], after[diskB]], [undefined, undefined], "released when the last user ended");
    assert.equal(sink.connections, 0, "no destination QEMU was ever connected to");
  } finally {
    sink.close();
  }
});

test("unix sockets at both QEMUs: the source QEMU migrates to unix:PATH (0600), the destination service writes to the destination QEMU's unix socket", async () => {
  const { pages } = twoDiskPages();
  const data = qemuStream(pages);
  const sinkPath = path.join(dir, "dst-qemu.sock");
  const sink = await sinkQemu(sinkPath);
  const srcPath = path.join(dir, "src-qemu.sock");
  try {
    const ready = await svc.srcClient.request<OutgoingReady>("outgoing", { migration: "unix", disks: [diskA, diskB], qemu: `unix:${srcPath}`, destQemu: `unix:${sinkPath}`, peer: `127.0.0.1:${svc.dst.peerPort}` });
    assert.equal(ready.migrateUri, `unix:${srcPath}`);
    assert.equal(ready.libvirtMigrateUri, undefined);
    assert.equal(fs.statSync(srcPath).mode & 0o777, 0o600);
    const end = ended(svc.srcClient, "unix");
    assert.equal(await sourceQemu(srcPath, data), false);
    assert.equal((await end).ok, true);
    assert.ok(sink.got().equals(data));
  } finally {
    sink.close();
  }
});

test("\"unix\": the source service's socket in its QEMU socket directory (0770 or 0700, the socket QEMU's group's), the destination's directory made ready, its QEMU's socket removed after", async () => {
  const group = process.getuid?.() === 0 ? process.getgid!() : null;
  const srcDir = path.join(dir, "src-qemu"), dstDir = path.join(dir, "dst-qemu");
  const pair = await twoServices(fs.mkdtempSync(path.join(dir, "pair-")), undefined, { qemuSockets: new QemuSockets(srcDir, group) }, { qemuSockets: new QemuSockets(dstDir, null) });
  fs.mkdirSync(dstDir, { mode: 0o755 });
  const sinkPath = path.join(dstDir, "sockets.sock");
  const sink = await sinkQemu(sinkPath);
  try {
    const { pages } = twoDiskPages();
    const data = qemuStream(pages);
    const ready = await pair.srcClient.request<OutgoingReady>("outgoing", { migration: "sockets", disks: [diskA], qemu: "unix", destQemu: `unix:${sinkPath}`, peer: `127.0.0.1:${pair.dst.peerPort}` });
    const srcPath = path.join(srcDir, "sockets.sock");
    assert.equal(ready.migrateUri, `unix:${srcPath}`);
    assert.equal(ready.libvirtMigrateUri, undefined, "the two paths differ: no single unix:// URI for libvirt");
    assert.equal(fs.statSync(srcDir).mode & 0o777, group === null ? 0o700 : 0o770);
    assert.equal(fs.statSync(dstDir).mode & 0o777, 0o700, "the destination made its directory ready at PREPARE");
    if (group !== null) {
      assert.equal(fs.statSync(srcPath).mode & 0o777, 0o660);
      assert.equal(fs.statSync(srcPath).gid, group);
    }
    const end = ended(pair.srcClient, "sockets");
    assert.equal(await sourceQemu(srcPath, data), false);
    assert.equal((await end).ok, true);
    assert.ok(sink.got().equals(data));
    await ended(pair.dstClient, "sockets");
    assert.equal(fs.existsSync(sinkPath), false, "the destination QEMU's socket is removed after the migration");
    assert.equal(fs.existsSync(srcPath), false, "the source service's socket is gone with its migration");
    await assert.rejects(pair.srcClient.request("outgoing", { migration: "bad", disks: [diskA], qemu: "127.0.0.1:0", destQemu: "unix", peer: `127.0.0.1:${pair.dst.peerPort}` }), /destQemu "unix"/);
  } finally {
    sink.close();
    await pair.close();
  }
});

test("QemuSockets: a socket per migration id, short and safe; ids that are not file names or too long get a hash", () => {
  const q = new QemuSockets("/run/pagetwin-qemu", null);
  assert.equal(q.pathFor("web1"), "/run/pagetwin-qemu/web1.sock");
  assert.match(q.pathFor("a:b@c"), /^\/run\/pagetwin-qemu\/m-[0-9a-f]{20}\.sock$/);
  assert.notEqual(q.pathFor("a:b"), q.pathFor("a+b"));
  assert.ok(q.pathFor("x".repeat(128)).length <= 107);
  assert.ok(q.owns("/run/pagetwin-qemu/web1.sock") && !q.owns("/tmp/web1.sock"));
  assert.throws(() => new QemuSockets("relative", null), /absolute/);
  assert.throws(() => QemuSockets.resolve("/x", "no-such-group-here"), /no group/);
  assert.equal(QemuSockets.resolve("/x", "none").group, null);
  assert.equal(QemuSockets.resolve("/x", "4242").group, 4242);
});

test("the destination service stops: a migration it had prepared is called off on the source too (no URI left open), with the code saying why", async () => {
  const pair = await twoServices(fs.mkdtempSync(path.join(dir, "pair-")));
  const sink = await sinkQemu();
  try {
    const ready = await outgoing(pair.srcClient, "called-off", [diskA], sink.port, pair.dst.peerPort);
    const end = ended(pair.srcClient, "called-off");
    await pair.dst.shutdown(60_000);
    const e = await end;
    assert.equal(e.status.state, "failed");
    assert.equal(e.status.error?.code, "PAGETWIN_SERVE_SHUTTING_DOWN", JSON.stringify(e.status.error));
    // the source QEMU would find nobody listening: its migration fails at once and its VM runs on
    assert.equal(await sourceQemu(ready.port, Buffer.alloc(16)), true);
    assert.equal(sink.connections, 0);
  } finally {
    sink.close();
    await pair.close();
  }
});

test("the systemd unit runs pagetwin serve with options it has, and systemd-analyze accepts it (when installed)", () => {
  const unit = fs.readFileSync("scripts/systemd/pagetwin.service", "utf8");
  const exec = /^ExecStart=(.*)$/m.exec(unit)?.[1] ?? "";
  assert.match(exec, /\bpagetwin serve\b/);
  const flags = [...exec.matchAll(/--([a-z-]+)/g)].map((m) => m[1]!);
  assert.ok(flags.length >= 3);
  for (const f of flags) assert.ok(f in serveSpec.options, `--${f} is an option of pagetwin serve`);
  assert.match(unit, /^KillSignal=SIGTERM$/m);
  const analyze = spawnSync("systemd-analyze", ["verify", path.resolve("scripts/systemd/pagetwin.service")], { encoding: "utf8" });
  if (analyze.error) return; // not installed
  assert.equal(analyze.status, 0, analyze.stderr);
});

test("Shared: a value released by its last user stays open for idleMs and is handed out again; one no longer current is opened anew; closeIdle closes it", async () => {
  let opened = 0;
  const closed: number[] = [];
  let current = true;
  const sh = new Shared<number>(async () => ++opened, (v) => closed.push(v), { idleMs: 60_000, current: () => current });
  assert.equal(await sh.acquire("k"), 1);
  sh.release("k");
  assert.deepEqual(sh.users(), { k: 0 }, "open, unused");
  assert.equal(await sh.acquire("k"), 1, "the same value again, not opened a second time");
  sh.release("k");
  current = false;
  assert.equal(await sh.acquire("k"), 2, "its file changed: opened again");
  assert.deepEqual(closed, [1]);
  sh.release("k");
  sh.release("k"); // a release too many changes nothing
  sh.closeIdle();
  await new Promise((r) => setImmediate(r)); // a value is closed once its open has settled
  assert.deepEqual(closed, [1, 2]);
  assert.deepEqual(sh.users(), {});
  const now = new Shared<number>(async () => 7, (v) => closed.push(v));
  await now.acquire("x");
  now.release("x");
  assert.deepEqual(now.users(), {}, "idleMs 0: closed at once");
});
