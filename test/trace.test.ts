// The trace format (docs/TRACE.md): its page-map coding, the model that
// reads it back (cells for any guest size), and the traces agent mode
// (`send`) and the embedded demo write, whose totals must equal the
// commands' own results. Stream mode's trace and the page are tested in
// web-trace.test.ts.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { encodeRuns, forEachRun, PAGE_CLASS, TRACE_VERSION, type TraceRecord } from "../src/trace/format.js";
import { TraceModel, TraceFormatError, MAX_CELLS, type MigrationModel } from "../src/trace/model.js";
import { cliPath, jsonResult, startAndStop } from "./helpers/cli.js";
import { makeFixture } from "./helpers/ram-fixture.js";
import { freePort, throughProxies } from "./helpers/stream.js";
import { FileTraceSink } from "../src/trace/sink.js";
import { LiveTraceServer } from "../src/trace/live.js";

const tmp = () => mkdtempSync(join(tmpdir(), "pt-trace-"));

test("page maps: run-length coding round-trips any map", () => {
  const map = new Uint8Array(100_000);
  let x = 7;
  for (let i = 0; i < map.length;) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    const len = 1 + (x % 300), c = x % 5;
    map.fill(c, i, i + len);
    i += len;
  }
  const back = new Uint8Array(map.length);
  const n = forEachRun(encodeRuns(map), 0, (s, len, c) => back.fill(c, s, s + len));
  assert.equal(n, map.length);
  assert.deepEqual(back, map);
  const part = new Uint8Array(map.length);
  forEachRun(encodeRuns(map, 5000, 9000), 5000, (s, len, c) => part.fill(c, s, s + len));
  assert.deepEqual(part.subarray(5000, 9000), map.subarray(5000, 9000));
});

test("the model: a 16M-page guest's map in at most MAX_CELLS cells, counts per class exact", () => {
  const pages = 1 << 24;
  const id = "x";
  const model = new TraceModel();
  model.apply({ type: "start", format: "pagetwin-trace", version: TRACE_VERSION, id, mode: "stream", method: "pagetwin", label: "big", pages, startedAt: 0, baseline: "measured" });
  const map = new Uint8Array(1 << 20);
  let want = [0, 0, 0, 0, 0];
  for (let chunk = 0; chunk < 16; chunk++) {
    for (let i = 0; i < map.length; i++) map[i] = (i >> (chunk % 7)) % 5;
    for (const c of map) want[c]!++;
    model.apply({ type: "pages", id, iteration: 1, first: chunk << 20, count: map.length, runs: encodeRuns(map) });
  }
  const m = model.migrations.get(id)!;
  assert.ok(m.cellCount <= MAX_CELLS);
  assert.equal(m.cellPages, pages / MAX_CELLS);
  const r = m.rounds[0]!;
  const got = [0, 0, 0, 0, 0];
  for (let i = 0; i < r.cells.length; i++) got[i % 5]! += r.cells[i]!;
  want[0] = 0;
  assert.deepEqual(got, want);
  assert.equal(r.mapped, pages);
  // one cell: pages 0..255 of chunk 0 (class (i >> 0) % 5)
  assert.equal(r.cells[0 * 5 + PAGE_CLASS.twin], [...Array(256).keys()].filter((i) => i % 5 === 2).length);
});

test("the model refuses what is not a version 2 trace, and records before their start", () => {
  assert.throws(() => TraceModel.parse('{"format":"pagetwin-trace","version":1,"runs":[]}'), TraceFormatError);
  assert.throws(() => TraceModel.parse('{"type":"start","format":"pagetwin-trace","version":3,"id":"a"}'), /version 3/);
  assert.throws(() => TraceModel.parse('{"type":"round","id":"a","iteration":1}'), /before its start/);
});

/** Totals of a migration from its rounds, and from its end record. */
function roundSums(m: MigrationModel) {
  const s = { normal: 0, twin: 0, zero: 0, resent: 0, transferredBytes: 0, baselineBytes: 0 };
  for (const r of m.rounds) {
    assert.ok(r.done, `round ${r.iteration} has its record`);
    s.normal += r.pages.normal; s.twin += r.pages.twin; s.zero += r.pages.zero; s.resent += r.pages.resent;
    s.transferredBytes += r.transferredBytes; s.baselineBytes += r.baselineBytes;
  }
  return s;
}

function keyFile(dir: string): string {
  const p = join(dir, "key");
  writeFileSync(p, randomBytes(32));
  chmodSync(p, 0o600);
  return p;
}

test("agent mode: `send --trace` writes a trace whose totals equal send's result, and `--ui` serves it live", { timeout: 120_000 }, async () => {
  const dir = tmp();
  try {
    const f = makeFixture(dir, 16);
    const key = keyFile(dir);
    const port = await freePort();
    const l = spawn(process.execPath, [cliPath, "listen", "--ram", join(dir, "dst.bin"), "--create-ram", "--image", f.image, "--port", String(port), "--psk-file", key, "--once", "--json"], { stdio: ["ignore", "pipe", "ignore"] });
    try {
      await new Promise<void>((resolve, reject) => {
        let out = "";
        l.stdout!.on("data", (d: Buffer) => { out += d; if (/"listening"/.test(out)) resolve(); });
        l.once("exit", (c) => reject(new Error(`listen exited ${c}`)));
      });
      const trace = join(dir, "send.ndjson");
      const s = spawnSync(process.execPath, [cliPath, "send", "--ram", f.ram, "--image", f.image, "--to", `127.0.0.1:${port}`, "--psk-file", key, "--bandwidth", "0", "--json", "--trace", trace, "--ui"], { encoding: "utf8" });
      assert.equal(s.status, 0, s.stderr);
      assert.match(s.stderr, /live view: http:\/\/127\.0\.0\.1:\d+\/[0-9a-f]{32}\/\?live/);
      const r = jsonResult(s.stdout);
      const model = TraceModel.parse(readFileSync(trace, "utf8"));
      assert.equal(model.migrations.size, 1);
      const m = [...model.migrations.values()][0]!;
      assert.equal(m.start.mode, "agent");
      assert.equal(m.pages, 16 * 256);
      const e = m.end!;
      assert.ok(e.ok && e.verified);
      const sums = roundSums(m);
      assert.equal(e.transferredBytes, r.ram.transferred);
      // the rounds' bytes add up to the result's but for the handshake and the closing frames
      assert.ok(sums.transferredBytes <= r.ram.transferred && r.ram.transferred - sums.transferredBytes < 1024, `${sums.transferredBytes} of ${r.ram.transferred}`);
      assert.equal(e.iterations, r.ram["dirty-sync-count"]);
      assert.equal(m.rounds.length, e.iterations);
      assert.equal(sums.twin, r.ram.twin);
      assert.equal(sums.zero, r.ram.duplicate);
      assert.equal(sums.resent, r.ram.resent);
      assert.equal(sums.baselineBytes, e.baselineBytes);
      assert.ok(m.switchover && m.rounds.at(-1)!.final);
      // the first round's map covers every page, with the fixture's twins where they are (2 of every 5 pages)
      const first = m.rounds[0]!;
      assert.equal(first.mapped, m.pages);
      let twins = 0;
      for (let c = 0; c < m.cellCount; c++) twins += first.cells[c * 5 + PAGE_CLASS.twin]!;
      assert.equal(twins, first.pages.twin);
      assert.equal(twins, [...Array(16 * 256).keys()].filter((p) => p % 5 < 2).length);
    } finally {
      if (l.exitCode === null) l.kill("SIGKILL");
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the embedded demo's trace: both runs, each with the totals the demo printed", { timeout: 300_000 }, () => {
  const dir = tmp();
  try {
    const trace = join(dir, "demo.ndjson");
    const d = spawnSync(process.execPath, [cliPath, "demo", "--ram-mib", "8", "--json", "--trace", trace], { encoding: "utf8" });
    assert.equal(d.status, 0, d.stderr);
    const r = jsonResult(d.stdout);
    const model = TraceModel.parse(readFileSync(trace, "utf8"));
    const ms = [...model.migrations.values()];
    assert.deepEqual(ms.map((m) => [m.start.mode, m.start.method]), [["embedded", "baseline"], ["embedded", "pagetwin"]]);
    for (const m of ms) {
      const run = (r.runs as Record<string, any>[]).find((x) => x.mode === m.start.method)!;
      const sums = roundSums(m);
      assert.equal(m.end!.transferredBytes, run.ram.transferred);
      assert.ok(sums.transferredBytes <= run.ram.transferred && run.ram.transferred - sums.transferredBytes < 1024);
      assert.equal(m.rounds.length, run.ram["dirty-sync-count"]);
      assert.equal(sums.twin, run.ram.twin);
      assert.equal(sums.zero, run.ram.duplicate);
      assert.equal(sums.resent, run.ram.resent);
      assert.equal(m.end!.verified, true);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the live view: token in every path, loopback Host only, events replayed to a late page, unix-socket mode", async () => {
  const dir = tmp();
  const live = await LiveTraceServer.start({ webRoot: dir });
  try {
    writeFileSync(join(dir, "index.html"), "<p>page</p>");
    const rec: TraceRecord = { type: "start", format: "pagetwin-trace", version: TRACE_VERSION, id: "m1", mode: "stream", method: "pagetwin", label: "x", pages: 1, startedAt: 0, baseline: "measured" };
    live.write(rec);
    const base = live.url.replace(/\?live$/, "");
    const origin = new URL(base).origin;
    assert.equal((await fetch(base)).status, 200);
    assert.equal(await (await fetch(base)).text(), "<p>page</p>");
    assert.equal((await fetch(`${origin}/`)).status, 404, "no token");
    assert.equal((await fetch(`${origin}/${"0".repeat(32)}/`)).status, 404, "a wrong token");
    assert.equal((await fetch(`${base}../key`)).status, 404);
    const rebound = await new Promise<number>((resolve) => {
      import("node:http").then(({ get }) => get(base, { headers: { host: "evil.example" } }, (res) => { res.resume(); resolve(res.statusCode!); }));
    });
    assert.equal(rebound, 404, "a foreign Host (DNS rebinding) is refused");
    const ac = new AbortController();
    const res = await fetch(`${base}events`, { signal: ac.signal });
    assert.equal(res.headers.get("content-type"), "text/event-stream");
    const reader = res.body!.getReader();
    const first = new TextDecoder().decode((await reader.read()).value);
    assert.equal(first, `data: ${JSON.stringify(rec)}\n\n`);
    ac.abort();
  } finally {
    await live.close();
  }
  const sock = join(dir, "live.sock");
  const u = await LiveTraceServer.start({ socketPath: sock, webRoot: dir });
  try {
    assert.equal(u.url, `unix:${sock}`);
    const { request } = await import("node:http");
    const status = await new Promise<number>((resolve, reject) => {
      request({ socketPath: sock, path: "/" }, (res) => { res.resume(); resolve(res.statusCode!); }).on("error", reject).end();
    });
    assert.equal(status, 200);
  } finally {
    await u.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---- stream mode on a synthetic QEMU stream ---------------------------------------------

const be32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
const be64 = (n: number) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; };
const str8 = (s: string) => Buffer.concat([Buffer.from([s.length]), Buffer.from(s, "latin1")]);

/** A QEMU-shaped stream of sweeps over `pages` pages: each sweep's records (page -> contents, or null: ZERO), the last in the RAM END section. */
function sweepsStream(pages: number, sweeps: Map<number, Buffer | null>[]): Buffer {
  const parts: Buffer[] = [Buffer.from("QEVM"), be32(3), Buffer.from([0x07]), be32(13), Buffer.from("pc-i440fx-7.2")];
  parts.push(Buffer.from([0x01]), be32(2), str8("ram"), be32(0), be32(4), be64(pages * 4096 + 0x04), str8("mem"), be64(pages * 4096), be64(0x10), Buffer.from([0x7e]), be32(2));
  sweeps.forEach((sweep, k) => {
    parts.push(Buffer.from([k === sweeps.length - 1 ? 0x03 : 0x02]), be32(2));
    let first = true;
    for (const [p, data] of [...sweep].sort((a, b) => a[0] - b[0])) {
      const flags = (data ? 0x08 : 0x02) + (first ? 0 : 0x20);
      parts.push(be64(p * 4096 + flags), ...(first ? [str8("mem")] : []), data ?? Buffer.from([0]));
      first = false;
    }
    parts.push(be64(0x10), Buffer.from([0x7e]), be32(2));
  });
  parts.push(Buffer.from([0x04]), be32(3), str8("timer"), be32(0), be32(2), Buffer.alloc(24, 7), Buffer.from([0x7e]), be32(3), Buffer.from([0x05]));
  return Buffer.concat(parts);
}

test("stream mode: stream-out's trace has QEMU's sweeps as rounds in stream order, the final one in the RAM END section, and the proxy's totals; stream-in's the same pages as they arrived", { timeout: 60_000 }, async () => {
  const dir = tmp();
  try {
    const pages = 3000;
    const image = join(dir, "disk.img");
    const img = randomBytes(pages * 4096);
    writeFileSync(image, img);
    const block = (b: number) => img.subarray(b * 4096, (b + 1) * 4096);
    // sweep 1: every page (a third twins, a third zero, a third unique); sweep 2: 500 pages from 1000 on; final: 40 pages
    const s1 = new Map<number, Buffer | null>(), s2 = new Map<number, Buffer | null>(), s3 = new Map<number, Buffer | null>();
    for (let p = 0; p < pages; p++) s1.set(p, p % 3 === 0 ? block(p) : p % 3 === 1 ? null : randomBytes(4096));
    for (let p = 1000; p < 1500; p++) s2.set(p, p % 2 ? block(p) : randomBytes(4096));
    for (let p = 0; p < 40; p++) s3.set(p * 7, randomBytes(4096));
    const data = sweepsStream(pages, [s1, s2, s3]);
    // block 3 rewritten after indexing: its twin, page 3, is resent
    const nas = await openNasIndex(image);
    const fd = openSync(image, "r+");
    writeSync(fd, Buffer.alloc(4096, 0xa5), 0, 4096, 3 * 4096);
    closeSync(fd);
    const file = new FileTraceSink(join(dir, "stream.ndjson"));
    const fileIn = new FileTraceSink(join(dir, "stream-in.ndjson"));
    let so, si;
    try {
      ({ so, si } = await throughProxies({ data, image, nas, split: "random", out: { trace: [file] }, in: { trace: [fileIn] } }));
    } finally {
      nas.image.close();
    }
    await file.close();
    await fileIn.close();
    assert.equal(so.resends, 1);
    assert.equal(so.error, undefined);
    const model = TraceModel.parse(readFileSync(join(dir, "stream.ndjson"), "utf8"));
    const m = [...model.migrations.values()][0]!;
    assert.equal(m.start.mode, "stream");
    assert.equal(m.pages, pages);
    assert.deepEqual(m.rounds.map((r) => [r.iteration, r.final, r.pages.normal, r.pages.twin, r.pages.zero]), [
      [1, false, 1000, 1000, 1000], [2, false, 250, 250, 0], [3, true, 40, 0, 0],
    ]);
    const e = m.end!;
    assert.equal(e.transferredBytes, so.bytesOutLink);
    assert.equal(e.baselineBytes, so.bytesFromQemu);
    assert.equal(e.baselineBytes, data.length);
    const sums = roundSums(m);
    assert.equal(sums.transferredBytes, so.bytesOutLink, "the rounds add up to the link's bytes");
    assert.equal(sums.baselineBytes, so.bytesFromQemu);
    assert.equal(sums.normal + sums.twin, so.pagesSeen);
    assert.equal(sums.twin, so.twinsReplaced);
    assert.equal(sums.zero, so.zeroPages);
    assert.equal(sums.resent, 1);
    assert.ok(m.rounds.some((r) => r.cells[3 * 5 + PAGE_CLASS.resent] === 1), "page 3 is marked resent");
    assert.ok(m.switchover && m.switchover.iteration === 3);
    // the maps: where each page went
    const cls = (r: number, p: number) => { const c = m.rounds[r]!.cells; for (let k = 1; k < 5; k++) if (c[p * 5 + k]) return k; return 0; };
    assert.equal(m.cellPages, 1);
    assert.deepEqual([0, 1, 2, 3].map((p) => cls(0, p)), [PAGE_CLASS.twin, PAGE_CLASS.zero, PAGE_CLASS.sent, PAGE_CLASS.twin]);
    assert.deepEqual([999, 1000, 1001, 1500].map((p) => cls(1, p)), [0, PAGE_CLASS.sent, PAGE_CLASS.twin, 0]);
    assert.deepEqual([0, 7, 8].map((p) => cls(2, p)), [PAGE_CLASS.sent, PAGE_CLASS.sent, 0]);

    // the destination's view: the same rounds and pages, as they arrived (references verified, page 3 resent), its own byte counters
    const dm = [...TraceModel.parse(readFileSync(join(dir, "stream-in.ndjson"), "utf8")).migrations.values()];
    assert.equal(dm.length, 1);
    const d = dm[0]!;
    assert.deepEqual(d.rounds.map((r) => [r.iteration, r.final, r.pages.normal, r.pages.twin, r.pages.zero, r.pages.resent]),
      m.rounds.map((r) => [r.iteration, r.final, r.pages.normal, r.pages.twin, r.pages.zero, r.pages.resent]));
    assert.equal(d.end!.transferredBytes, si.bytesInLink);
    assert.equal(d.end!.transferredBytes, so.bytesOutLink, "what arrived is what left");
    assert.equal(d.end!.baselineBytes, si.bytesToQemu);
    assert.equal(d.end!.baselineBytes, data.length);
    assert.equal(d.end!.verified, true);
    assert.ok(d.rounds.some((r) => r.cells[3 * 5 + PAGE_CLASS.resent] === 1), "page 3 arrived resent");
    const dsums = roundSums(d);
    assert.equal(dsums.transferredBytes, si.bytesInLink);
    assert.equal(dsums.twin - dsums.resent, si.twinsReplaced, "references verified at the destination");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream-out and stream-in --ui serve the live view (the URL on stderr, with its token), and --trace with a bare --ui parses", async () => {
  const dir = tmp();
  try {
    const f = makeFixture(dir, 1);
    const err = await startAndStop([cliPath, "stream-out", "--to", "127.0.0.1:1", "--image", f.image, "--insecure", "--listen", "0", "--ui", "--trace", join(dir, "t.ndjson")], /listening/);
    assert.match(err, /live view: http:\/\/127\.0\.0\.1:\d+\/[0-9a-f]{32}\/\?live/);
    const errIn = await startAndStop([cliPath, "stream-in", "--qemu", "127.0.0.1:1", "--image", f.image, "--insecure", "--listen", "0", "--ui", "--trace", join(dir, "in.ndjson")], /listening/);
    assert.match(errIn, /live view: http:\/\/127\.0\.0\.1:\d+\/[0-9a-f]{32}\/\?live/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
