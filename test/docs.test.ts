// The quick starts of docs/AGENT-MODE.md and docs/STREAM.md run as written:
// the docs are this test's input, so they cannot drift from the CLI.

import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { quickStart, runQuickStart, docLines, exitOf, stopAll, type Started } from "./helpers/quickstart.js";
import { fakeQemu } from "./helpers/fake-qemu.js";
import { makeFixture } from "./helpers/ram-fixture.js";
import { freePort, qemuStream } from "./helpers/stream.js";

test("AGENT-MODE.md's quick start migrates as written (QEMUs stood in for by fake QMP servers)", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pt-docs-agent-"));
  const src = await fakeQemu("source"), dst = await fakeQemu("destination");
  let services: Started[] = [];
  try {
    const f = makeFixture(dir, 8);
    const dstRam = join(dir, "dst-ram.bin");
    writeFileSync(dstRam, Buffer.alloc(f.pages * 4096));
    const qs = quickStart("AGENT-MODE.md", "agent mode");
    assert.ok(qs.commands.some((c) => /--psk-file/.test(c) && /pagetwin migrate/.test(c)), "the quick start's migrate has a key");
    assert.ok(qs.commands.some((c) => /head -c 32 \/dev\/urandom/.test(c)), "the quick start makes the key");
    services = await runQuickStart(qs, dir, {
      IMAGE: f.image, SRC_RAM: f.ram, DST_RAM: dstRam, SRC_QMP: src.qmp, DST_QMP: dst.qmp, DST: "127.0.0.1", PORT: String(await freePort()),
    });
    for (const s of services) assert.equal(await exitOf(s), 0, `${s.line}: ${s.stderr}`);
    assert.ok(readFileSync(dstRam).equals(readFileSync(f.ram)), "the destination RAM file equals the source's");
    assert.equal(dst.status, "running", "the destination got cont");
    assert.equal(src.status, "postmigrate");
  } finally {
    stopAll(services);
    await src.close();
    await dst.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("STREAM.md's quick start carries a QEMU stream through both proxies as written, byte for byte", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pt-docs-stream-"));
  const got: Buffer[] = [];
  let services: Started[] = [];
  const sink = net.createServer({ allowHalfOpen: true }, (s) => { s.on("data", (d: Buffer) => got.push(d)); s.on("end", () => s.end()); s.on("error", () => {}); });
  try {
    const f = makeFixture(dir, 4);
    const qs = quickStart("STREAM.md", "stream mode");
    const socks = join(dir, "socks");
    mkdirSync(socks); // the destination QEMU's socket is there before the quick start runs
    await new Promise<void>((r) => sink.listen(join(socks, "qemu.sock"), r));
    services = await runQuickStart(qs, dir, { IMAGE: f.image, DEST: "127.0.0.1", IN_PORT: String(await freePort()), SOCK_DIR: socks });
    // the monitor block: its migrate goes to stream-out's documented socket
    const monitor = docLines("STREAM.md", "(qemu) ");
    assert.ok(monitor.some((l) => /downtime-limit/.test(l)), "the quick start sets downtime-limit");
    const uri = /^\(qemu\) migrate unix:(.+)$/.exec(monitor.find((l) => /^\(qemu\) migrate /.test(l))!)!;
    assert.equal(uri[1], `${qs.vars.get("SOCK_DIR")}/out.sock`, "QEMU migrates to stream-out's socket");
    const stream = qemuStream(readFileSync(f.ram));
    const q = net.connect(join(socks, "out.sock"));
    q.on("data", () => {});
    await new Promise<void>((r) => q.once("connect", r));
    q.end(stream);
    for (const s of services) assert.equal(await exitOf(s), 0, `${s.line}: ${s.stderr}`);
    assert.ok(Buffer.concat(got).equals(stream), "the destination QEMU got the source's stream");
    assert.match(services[0]!.stdout, /twins replaced [1-9]/);
  } finally {
    stopAll(services);
    sink.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
