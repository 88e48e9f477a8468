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
import { qemuStream, freePort } from "./helpers/stream.js";
import { countingRelay, sinkQemu, sourceQemu, twoServices, type TwoServices } from "./helpers/serve.js";

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

test("two disks: twins from both travel as references, the stream arrives byte-identical, both services agree with the link's byte count", async () => {
  const { pages, fromA, fromB } = twoDiskPages();
  const data = qemuStream(pages);
  const sink = await sinkQemu();
  const relay = await countingRelay(svc.dst.peerPort);
  try {
    const ready = await outgoing(svc.srcClient, "two-disks", [diskA, diskB], sink.port, relay.port);
    assert.match(ready.migrateUri, /^tcp:127\.0\.0\.1:\d+$/);
    assert.deepEqual(ready.disks.map((d) => d.dedup), [true, true]);
    const inStatus = await svc.dstClient.request<MigrationStatus>("status", { migration: "two-disks" });
    assert.equal(inStatus.direction, "in");
    assert.equal(inStatus.state, "ready");
    const srcEnd = ended(svc.srcClient, "two-disks");
    const dstEnd = ended(svc.dstClient, "two-disks");
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
  } finally {
    sink.close();
    relay.close();
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
