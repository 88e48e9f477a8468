// `pagetwin serve` with the real guest: two services on this machine, each
// a `pagetwin serve` process of its own (services A and B: their own
// control sockets and peer ports), migrating real QEMU guests in both
// directions, two at once, one of them with two disks; SIGTERM during a
// migration; the destination service gone. Skipped without QEMU or the guest.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { createInterface } from "node:readline";
import { QemuVm } from "../src/adapters/qemu/vm.js";
import { ServeClient } from "../src/serve/client.js";
import type { MigrationStatus, ServeEvent } from "../src/serve/migration.js";
import type { OutgoingReady } from "../src/serve/outgoing.js";
import { ServeError } from "../src/errors.js";
import { guest, skipRealGuest } from "./helpers/guest.js";
import { freePort, testKeyFile } from "./helpers/stream.js";
import { countingRelay } from "./helpers/serve.js";

const skip = skipRealGuest;
const CLI = path.resolve("dist/src/cli/main.js");
const MEM = 256;
let work = "";
let disk = "";
let part = "";
let key = "";
const vms: QemuVm[] = [];

/** A `pagetwin serve` process, its control socket, its peer port and a client. */
interface Svc {
  name: string;
  proc: ChildProcess;
  control: string;
  peerPort: number;
  client: ServeClient;
  exited: Promise<number | null>;
  log: string[];
}
const svcs: Record<string, Svc> = {};

async function startService(name: string, port = 0): Promise<Svc> {
  const control = path.join(work, `${name}.sock`);
  const proc = spawn(process.execPath, [CLI, "serve", "--control", control, "--peer-listen", `127.0.0.1:${port}`, "--psk-file", key, "--json", "--drain-timeout", "120"], { stdio: ["ignore", "pipe", "pipe"] });
  const log: string[] = [];
  proc.stderr!.on("data", (d: Buffer) => log.push(d.toString()));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  const lines = createInterface({ input: proc.stdout! });
  const peerPort = await new Promise<number>((resolve, reject) => {
    lines.on("line", (l) => { const j = JSON.parse(l) as { event: string; peerPort?: number }; if (j.event === "listening") resolve(j.peerPort!); });
    void exited.then((c) => reject(new Error(`pagetwin serve ${name} exited (${c}) before listening: ${log.join("")}`)));
  });
  const s: Svc = { name, proc, control, peerPort, client: await ServeClient.connect(control), exited, log };
  svcs[name] = s;
  return s;
}

before(async () => {
  if (skip) return;
  work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-serveq-"));
  fs.mkdirSync(path.join(work, "nas"));
  disk = path.join(work, "nas", "disk.img");
  fs.copyFileSync(guest!.disk, disk);
  const idx = `${guest!.disk}.pagetwin-index`;
  if (fs.existsSync(idx)) fs.copyFileSync(idx, `${disk}.pagetwin-index`);
  // the second disk: the first quarter of the first one's blocks, the rest zeros. The guest reads files from
  // vda only; listed first, this disk names the twins of the first quarter, vda those of the rest.
  part = path.join(work, "nas", "part.img");
  const size = fs.statSync(disk).size;
  const fd = fs.openSync(part, "w");
  const src = fs.openSync(disk, "r");
  const buf = Buffer.alloc(1 << 20);
  for (let o = 0; o < size / 4; o += buf.length) { const n = fs.readSync(src, buf, 0, buf.length, o); fs.writeSync(fd, buf, 0, n, o); }
  fs.ftruncateSync(fd, size);
  fs.closeSync(fd);
  fs.closeSync(src);
  key = testKeyFile(work);
  await Promise.all([startService("A"), startService("B")]);
});

after(async () => {
  for (const s of Object.values(svcs)) { s.client.close(); if (s.proc.exitCode === null) s.proc.kill("SIGKILL"); await s.exited; }
  for (const vm of vms) await vm.cleanup();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

const secondDisk = () => ["-drive", `file=${part},if=virtio,format=raw,readonly=on,cache=writeback`];

async function vm(name: string, o: { incoming?: string; twoDisks?: boolean } = {}): Promise<QemuVm> {
  const v = await QemuVm.start({
    ...guest!, disk, memoryMiB: MEM, memPath: `/dev/shm/pt-serveq-${name}-${process.pid}`, qmpSocket: path.join(work, `${name}.qmp`),
    serialLog: path.join(work, `${name}.log`), name: `pt-serveq-${name}`, ...(o.incoming ? { incoming: o.incoming } : {}),
    ...(o.twoDisks ? { extraArgs: secondDisk() } : {}),
  });
  vms.push(v);
  return v;
}

async function booted(v: QemuVm): Promise<void> {
  await v.waitForSerial(/pagetwin-ready/, 300_000);
  await v.waitForSerial(/pagetwin-counter 2\b/, 60_000);
  await v.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
}

/** Source QEMU migrates to the service; resolves with QEMU's final status. */
async function qemuMigrate(src: QemuVm, uri: string): Promise<string> {
  await src.qmp.execute("migrate", { uri });
  for (;;) {
    const s = await src.qmp.execute<{ status: string }>("query-migrate");
    if (s.status === "completed" || s.status === "failed" || s.status === "cancelled") return s.status;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The destination guest counts on from where the source stopped. */
async function counterGoesOn(src: QemuVm, dst: QemuVm): Promise<string> {
  const last = Math.max(...[...src.serialLog().matchAll(/pagetwin-counter (\d+)/g)].map((m) => Number(m[1])));
  const m = await dst.waitForSerial(new RegExp(`pagetwin-counter (${last + 1}|${last + 2})\\b`), 60_000);
  return `${last} -> ${m[1]}`;
}

/** The end event of `id` on a service (or its status, if it ended already). */
async function endOf(c: ServeClient, id: string, direction: "out" | "in"): Promise<Extract<ServeEvent, { event: "end" }>> {
  const w = await c.watch(id);
  try {
    const st = await c.request<MigrationStatus>("status", { migration: id, direction });
    if (["completed", "failed", "cancelled"].includes(st.state)) return { event: "end", migration: id, direction, ok: st.state === "completed", status: st };
    for await (const e of w) if (e.event === "end" && e.direction === direction) return e;
    throw new Error("the watch ended before the migration did");
  } finally {
    await w.close();
  }
}

function prepare(from: Svc, to: Svc | number, id: string, disks: string[], destPort: number): Promise<OutgoingReady> {
  const peer = typeof to === "number" ? to : to.peerPort;
  return from.client.request<OutgoingReady>("outgoing", { migration: id, disks, qemu: "127.0.0.1:0", destQemu: `127.0.0.1:${destPort}`, peer: `127.0.0.1:${peer}` });
}

/** One migration A -> B of `src` into a new destination VM, checked end to end; returns the destination VM. */
async function migrateOne(t: { diagnostic(s: string): void }, from: Svc, to: Svc, src: QemuVm, id: string, o: { twoDisks?: boolean; relayTo?: number } = {}): Promise<{ dst: QemuVm; out: MigrationStatus; in: MigrationStatus }> {
  const qport = await freePort();
  const dst = await vm(`${id}-dst`, { incoming: `tcp:127.0.0.1:${qport}`, ...(o.twoDisks ? { twoDisks: true } : {}) });
  const ready = await prepare(from, o.relayTo ?? to, id, o.twoDisks ? [part, disk] : [disk], qport);
  const outEnd = endOf(from.client, id, "out");
  const inEnd = endOf(to.client, id, "in");
  assert.equal(await qemuMigrate(src, ready.migrateUri), "completed");
  const [out, inn] = await Promise.all([outEnd, inEnd]);
  assert.equal(out.ok, true, JSON.stringify(out.status.error));
  assert.equal(inn.ok, true, JSON.stringify(inn.status.error));
  const counter = await counterGoesOn(src, dst);
  await src.quit();
  const s = out.status.stats;
  assert.equal(s.verdict, "verified");
  assert.ok(s.twinsReplaced > 0, "pages travelled as references");
  assert.equal(s.bytesFromQemu, inn.status.stats.bytesToQemu);
  assert.equal(out.status.peerStats?.bytesInLink, s.bytesOutLink, "the source has the destination's own count");
  t.diagnostic(`${id}: counter ${counter}; ${s.pagesSeen} pages, ${s.twinsReplaced} twins (${out.status.disks.map((d) => `${path.basename(d.path)} ${d.twins}`).join(", ")}); ` +
    `${s.bytesFromQemu} B from QEMU, ${s.bytesOutLink} B on the link`);
  return { dst, out: out.status, in: inn.status };
}

let s1: QemuVm, s2: QemuVm, d1: QemuVm, e1: QemuVm | undefined, e2: QemuVm | undefined;

test("serve: a real guest migrates A -> B through two services; its counter goes on; the stats agree with the link's byte count", { skip, timeout: 600_000 }, async (t) => {
  const A = svcs["A"]!, B = svcs["B"]!;
  for (const s of [A, B]) assert.equal(fs.statSync(s.control).mode & 0o777, 0o600, "the control socket is 0600");
  [s1, s2] = await Promise.all([vm("s1"), vm("s2", { twoDisks: true })]);
  await Promise.all([booted(s1), booted(s2)]);
  const relay = await countingRelay(B.peerPort);
  try {
    const r = await migrateOne(t, A, B, s1, "vm1", { relayTo: relay.port });
    d1 = r.dst;
    const frames = r.out.stats.bytesOutLink;
    // what crossed the network: the sessions' frames plus the lease, inside TLS (a few % at most)
    assert.ok(relay.up >= frames && relay.up < frames * 1.03 + 65536, `relay ${relay.up} B up, frames ${frames} B`);
    assert.ok(relay.down >= r.in.stats.bytesOutLink && relay.down < r.in.stats.bytesOutLink * 1.03 + 65536, `relay ${relay.down} B down`);
  } finally {
    relay.close();
  }
});

test("serve: two migrations at once through the same services, in both directions; one has two disks and twins from both", { skip, timeout: 600_000 }, async (t) => {
  assert.ok(d1 && s2, "the first test ran");
  const A = svcs["A"]!, B = svcs["B"]!;
  await d1.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
  const [back, two] = await Promise.all([
    migrateOne(t, B, A, d1, "vm1-back"),
    migrateOne(t, A, B, s2, "vm2", { twoDisks: true }),
  ]);
  e1 = back.dst;
  e2 = two.dst;
  // pages travelled as references to both disks, and the destination verified them from both
  assert.ok(two.out.disks.every((d) => d.dedup && d.twins > 0), JSON.stringify(two.out.disks));
  assert.deepEqual(two.in.disks.map((d) => d.twins), two.out.disks.map((d) => d.twins));
  assert.ok(new Date(back.out.startedAt) < new Date(two.out.endedAt!) && new Date(two.out.startedAt) < new Date(back.out.endedAt!), "the two overlapped");
});

test("serve: SIGTERM to the source service during a migration: it takes no new one, the running one finishes, then it exits 0", { skip, timeout: 600_000 }, async (t) => {
  assert.ok(e1, "the earlier tests ran");
  const A = svcs["A"]!, B = svcs["B"]!;
  await e1.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
  const qport = await freePort();
  const dst = await vm("vm1-term-dst", { incoming: `tcp:127.0.0.1:${qport}` });
  const ready = await prepare(A, B, "vm1-term", [disk], qport);
  const w = await A.client.watch("vm1-term");
  const migrating = qemuMigrate(e1, ready.migrateUri);
  for await (const e of w) if (e.event === "state" && e.state === "running") break;
  A.proc.kill("SIGTERM");
  await new Promise((r) => setTimeout(r, 200));
  await assert.rejects(prepare(A, B, "late", [disk], qport), (e: unknown) => e instanceof ServeError && e.code === "PAGETWIN_SERVE_SHUTTING_DOWN");
  assert.equal(fs.existsSync(A.control), false, "the control socket is gone");
  assert.equal(await migrating, "completed");
  let end: ServeEvent | undefined;
  for await (const e of w) if (e.event === "end") { end = e; break; }
  assert.equal(end?.event === "end" && end.ok, true, JSON.stringify(end));
  t.diagnostic(`counter ${await counterGoesOn(e1, dst)}`);
  assert.equal(await A.exited, 0, A.log.join(""));
  await e1.quit();
  e1 = dst;
  A.client.close();
  await startService("A", A.peerPort);
});

test("serve: destination service down: outgoing fails with a clear code; a service killed after preparing fails the migration and the source guest runs on", { skip, timeout: 600_000 }, async (t) => {
  assert.ok(e2, "the earlier tests ran");
  const A = svcs["A"]!, B = svcs["B"]!;
  const dead = await freePort();
  await assert.rejects(prepare(B, dead, "nowhere", [disk, part], 4444),
    (e: unknown) => e instanceof ServeError && e.code === "PAGETWIN_PEER_UNREACHABLE" && /destination pagetwin serve/.test(e.message));
  const qport = await freePort();
  const ready = await prepare(B, A, "vm2-lost", [part, disk], qport);
  const out = endOf(B.client, "vm2-lost", "out");
  A.proc.kill("SIGKILL");
  await A.exited;
  const end = await out;
  assert.equal(end.ok, false);
  assert.equal(end.status.error?.code, "PAGETWIN_PEER_LOST", JSON.stringify(end.status.error));
  await e2.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
  assert.equal(await qemuMigrate(e2, ready.migrateUri), "failed");
  const st = await e2.qmp.execute<{ status: string }>("query-status");
  assert.equal(st.status, "running");
  const before = e2.serialLog().length;
  await e2.waitForSerial(/pagetwin-counter \d+/, 30_000, before);
  t.diagnostic(`source guest still ${st.status}, counting`);
});
