// Stream mode: the QEMU stream parser and the stream-out/stream-in proxies.
// Synthetic streams always; a real guest's stream (captured at test time with
// `migrate "exec:cat > FILE"`) and a real proxied migration when QEMU and the
// guest (scripts/build-guest.sh) are present.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { QemuStreamParser, StreamFormatError, RAM_FLAG, type Piece } from "../src/stream/qemu-stream.js";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import { throughProxies, freePort, qemuStream, TEST_KEY } from "./helpers/stream.js";
import { RefsBuilder, decodeRefs, SFrame, STREAM_FRAMES } from "../src/stream/frames.js";
import { FrameReader, frame } from "../src/wire/envelope.js";
import { QemuVm } from "../src/adapters/qemu/vm.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { NO_BLOCK, PAGE_SIZE } from "../src/core/engine.js";
import { guest, skipRealGuest } from "./helpers/guest.js";

// ------------------------------------------------------------ synthetic streams

function be32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; }
function be64(n: number): Buffer { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; }
function str8(s: string): Buffer { return Buffer.concat([Buffer.from([s.length]), Buffer.from(s, "latin1")]); }

/** A small but complete QEMU 7.2-shaped stream with two RAM blocks. */
function synthStream(opts: { compressed?: boolean; badBlock?: boolean } = {}): { bytes: Buffer; pages: number } {
  const parts: Buffer[] = [Buffer.from("QEVM"), be32(3), Buffer.from([0x07]), be32(13), Buffer.from("pc-i440fx-7.2")];
  parts.push(Buffer.from([0x01]), be32(2), str8("ram"), be32(0), be32(4));
  parts.push(be64((1 << 20) + 65536 + RAM_FLAG.MEM_SIZE), str8("mem"), be64(1 << 20), str8("pc.rom"), be64(65536));
  parts.push(be64(RAM_FLAG.EOS), Buffer.from([0x7e]), be32(2));
  let pages = 0;
  const page = (i: number) => Buffer.alloc(PAGE_SIZE, i & 0xff);
  parts.push(Buffer.from([0x02]), be32(2));
  parts.push(be64(0 + RAM_FLAG.PAGE), str8(opts.badBlock ? "nope" : "mem"), page(1)); pages++;
  parts.push(be64(4096 + RAM_FLAG.ZERO + RAM_FLAG.CONTINUE), Buffer.from([0]));
  parts.push(be64(8192 + RAM_FLAG.PAGE + RAM_FLAG.CONTINUE), page(2)); pages++;
  parts.push(be64(0 + RAM_FLAG.PAGE), str8("pc.rom"), page(3)); pages++;
  if (opts.compressed) parts.push(be64(12288 + RAM_FLAG.COMPRESS_PAGE + RAM_FLAG.CONTINUE), be32(3), Buffer.from([9, 9, 9]));
  parts.push(be64(RAM_FLAG.EOS), Buffer.from([0x7e]), be32(2));
  parts.push(Buffer.from([0x03]), be32(2), be64(16384 + RAM_FLAG.PAGE), str8("mem"), page(4), be64(RAM_FLAG.EOS), Buffer.from([0x7e]), be32(2));
  if (!opts.compressed) pages++;
  // device state (opaque to the parser), EOF
  parts.push(Buffer.from([0x04]), be32(3), str8("timer"), be32(0), be32(2), Buffer.alloc(24, 7), Buffer.from([0x7e]), be32(3), Buffer.from([0x05]));
  return { bytes: Buffer.concat(parts), pages };
}

function reassemble(pieces: Piece[]): Buffer {
  return Buffer.concat(pieces.flatMap((p) => (p.kind === "raw" ? [p.data] : [p.header, p.data])));
}

function feed(parser: QemuStreamParser, data: Buffer, cut: (i: number) => number): Piece[] {
  const out: Piece[] = [];
  for (let i = 0; i < data.length;) {
    const n = Math.max(1, cut(i));
    out.push(...parser.push(data.subarray(i, i + n)));
    i += n;
  }
  parser.finish();
  return out;
}

test("parser: a synthetic stream split at every byte position re-serializes identically", () => {
  const { bytes, pages } = synthStream();
  for (let cutAt = 1; cutAt < bytes.length; cutAt += 41) {
    const p = new QemuStreamParser();
    const pieces = feed(p, bytes, (i) => (i === 0 ? cutAt : bytes.length));
    assert.ok(reassemble(pieces).equals(bytes), `cut at ${cutAt}`);
    assert.equal(pieces.filter((x) => x.kind === "page").length, pages);
    assert.equal(p.mode, "done");
    assert.equal(p.stats.zeroPages, 1);
  }
  const p = new QemuStreamParser();
  const pieces = feed(p, bytes, () => 1); // one byte at a time
  assert.ok(reassemble(pieces).equals(bytes));
  const pg = pieces.filter((x) => x.kind === "page");
  assert.deepEqual(pg.map((x) => [x.block, x.offset, x.header.length]), [["mem", 0, 12], ["mem", 8192, 8], ["pc.rom", 0, 15], ["mem", 16384, 12]]);
  assert.equal(p.machine, "pc-i440fx-7.2");
});

test("parser with reused bridges: each push's pieces, taken before the next push, re-serialize identically; pieces in a bridge say so", () => {
  const { bytes, pages } = synthStream();
  for (const size of [1, 7, 100, 4099, 4200, 9000]) {
    const p = new QemuStreamParser({ reuseBridges: true });
    const out: Buffer[] = [];
    let bridged = 0;
    let seen = 0;
    for (let i = 0; i < bytes.length; i += size) {
      const pieces = p.push(bytes.subarray(i, i + size));
      // a copy now: a bridge's bytes are written again by a later push
      out.push(Buffer.from(reassemble(pieces)));
      for (const x of pieces) {
        if (x.kind !== "page") continue;
        seen++;
        if (p.inBridge(x.data)) bridged++;
        else assert.ok(x.data.buffer === bytes.buffer, `size ${size}: a page outside the bridges is a view of the input`);
      }
    }
    p.finish();
    assert.ok(Buffer.concat(out).equals(bytes), `size ${size}`);
    assert.equal(seen, pages);
    // pages split across pushes are completed in a bridge
    if (size < 4096) assert.ok(bridged > 0, `size ${size}: pages completed in a bridge`);
  }
});

test("parser: records of QEMU's multithreaded compression switch to pass-through with a warning, bytes unchanged", () => {
  const { bytes } = synthStream({ compressed: true });
  const p = new QemuStreamParser();
  const pieces = feed(p, bytes, () => 100);
  assert.ok(reassemble(pieces).equals(bytes));
  assert.equal(p.mode, "passthrough");
  assert.match(p.passthroughReason ?? "", /COMPRESS_PAGE/);
  assert.equal(p.takeWarnings().length, 1);
});

test("parser: not a QEMU stream, or another version, passes through", () => {
  for (const head of [Buffer.from([0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]), Buffer.concat([Buffer.from("QEVM"), be32(2)])]) {
    const data = Buffer.concat([head, Buffer.alloc(5000, 1)]);
    const p = new QemuStreamParser();
    assert.ok(reassemble(feed(p, data, () => 3)).equals(data));
    assert.equal(p.mode, "passthrough");
  }
});

test("parser: malformed streams fail with a clear error", () => {
  assert.throws(() => feed(new QemuStreamParser(), synthStream({ badBlock: true }).bytes, () => 64), (e: unknown) => e instanceof StreamFormatError && /unknown block "nope"/.test(e.message));
  const { bytes } = synthStream();
  assert.throws(() => feed(new QemuStreamParser(), bytes.subarray(0, 200), () => 64), /ended inside a record/);
  const bad = Buffer.from(bytes);
  bad.writeUInt32BE(9, bytes.indexOf(Buffer.from([0x7e, 0, 0, 0, 2])) + 1); // footer of another section
  assert.throws(() => feed(new QemuStreamParser(), bad, () => 64), /footer names section 9/);
});

test("frames: REFS round trip and a reader fed one byte at a time", () => {
  const rb = new RefsBuilder();
  rb.add(7, Buffer.alloc(8, 1), 42, Buffer.alloc(16, 2));
  rb.add(8, Buffer.alloc(12, 3), 43, Buffer.alloc(16, 4));
  const f = rb.take();
  const r = new FrameReader(STREAM_FRAMES);
  const got = [];
  for (const b of f) got.push(...r.push(Buffer.from([b])));
  assert.equal(got.length, 1);
  assert.equal(got[0]!.type, SFrame.Refs);
  const d = decodeRefs(got[0]!);
  assert.equal(d.firstSeq, 7);
  assert.deepEqual(d.refs.map((x) => [x.header.length, x.block, x.hash[0]]), [[8, 42, 2], [12, 43, 4]]);
});

test("frames: a reader fed frames of many sizes cut anywhere gives them back whole; a builder is reused after take()", () => {
  const rb = new RefsBuilder();
  const frames: Buffer[] = [];
  let seed = 12345;
  const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
  for (let i = 0; i < 40; i++) {
    if (i % 3 === 0) {
      for (let k = 0; k <= i % 5; k++) rb.add(i * 10 + k, Buffer.alloc(8, i), 1000 + i + k, Buffer.alloc(16, k));
      frames.push(rb.take());
    } else {
      const payload = Buffer.alloc(1 + rand(200_000));
      for (let j = 0; j < payload.length; j += 997) payload[j] = (i + j) & 0xff;
      frames.push(frame(SFrame.Raw, payload));
    }
  }
  const all = Buffer.concat(frames);
  const r = new FrameReader(STREAM_FRAMES);
  const got: { type: SFrame; payload: Buffer }[] = [];
  for (let o = 0; o < all.length;) {
    const n = 1 + rand(rand(4) === 0 ? 7 : 150_000); // tiny cuts too, inside length fields
    got.push(...r.push(all.subarray(o, o + n)));
    o += n;
  }
  assert.equal(got.length, frames.length);
  assert.equal(r.pending, 0);
  for (let i = 0; i < frames.length; i++) {
    assert.equal(got[i]!.type, frames[i]![4], `frame ${i}'s type`);
    assert.ok(got[i]!.payload.equals(frames[i]!.subarray(5, frames[i]!.length - 4)), `frame ${i}'s payload`);
    if (got[i]!.type === SFrame.Refs) {
      const d = decodeRefs(got[i]!);
      assert.equal(d.firstSeq, i * 10);
      assert.deepEqual(d.refs.map((x) => x.block), Array.from({ length: (i % 5) + 1 }, (_, k) => 1000 + i + k));
    }
  }
});

// ------------------------------------------------------------ real guest

const skipReal = skipRealGuest;

let work = "";
let capture = "";
let nasImage = "";
let vm: QemuVm | null = null;

/** Feeds `data` to stream-out as a QEMU would (split anywhere); collects what stream-in sends its QEMU. */
function proxyCapture(data: Buffer, image: string, nas?: Awaited<ReturnType<typeof openNasIndex>>, workers = 0) {
  return throughProxies({ data, image, ...(nas ? { nas } : {}), split: "random", out: { workers }, in: { workers } });
}

before(async () => {
  if (skipReal) return;
  work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-stream-"));
  nasImage = path.join(work, "nas", "disk.img");
  fs.mkdirSync(path.dirname(nasImage));
  fs.copyFileSync(guest!.disk, nasImage);
  capture = path.join(work, "capture.bin");
  vm = await QemuVm.start({
    ...guest!, memoryMiB: 256, memPath: `/dev/shm/pt-stream-test-${process.pid}`,
    qmpSocket: path.join(work, "src.qmp"), serialLog: path.join(work, "src.log"), name: "pt-stream-src",
    extraQmpSockets: [path.join(work, "src-proxy.qmp")], // stream-out's --qmp
  });
  await vm.waitForSerial(/pagetwin-ready/, 240_000);
  await vm.waitForSerial(/pagetwin-counter 2\b/, 30_000);
  await vm.qmp.execute("migrate-set-parameters", { "max-bandwidth": 10_000_000_000 });
  await vm.qmp.execute("migrate", { uri: `exec:cat > ${capture}` });
  for (;;) {
    const s = await vm.qmp.execute<{ status: string }>("query-migrate");
    if (s.status === "completed") break;
    if (s.status === "failed") throw new Error("capture migration failed");
    await new Promise((r) => setTimeout(r, 100));
  }
  await vm.qmp.execute("cont"); // the same guest is migrated for real below
});

after(async () => {
  await vm?.cleanup();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

test("parser: a real guest's stream, split at random points, re-serializes byte-identical", { skip: skipReal, timeout: 120_000 }, () => {
  const data = fs.readFileSync(capture);
  const p = new QemuStreamParser();
  let rnd = 99;
  const out: Buffer[] = [];
  let pages = 0;
  for (let i = 0; i < data.length;) {
    rnd = (rnd * 1103515245 + 12345) & 0x7fffffff;
    const n = 1 + (rnd % 20_000);
    for (const pc of p.push(data.subarray(i, i + n))) {
      if (pc.kind === "raw") out.push(pc.data);
      else { out.push(pc.header, pc.data); pages++; }
    }
    i += n;
  }
  p.finish();
  assert.ok(Buffer.concat(out).equals(data));
  assert.equal(p.mode, "done", p.passthroughReason);
  assert.ok(pages > 1000, `${pages} pages`);
  assert.equal(p.stats.pages, pages);
  assert.equal(p.machine, "pc-i440fx-7.2");
});

for (const workers of [0, 1]) test(`proxies${workers ? ", a worker each" : ""}: stream-out -> stream-in rebuilds the captured stream byte-identical, most pages as references`, { skip: skipReal, timeout: 180_000 }, async (t) => {
  const data = fs.readFileSync(capture);
  const { out, so, si } = await proxyCapture(data, nasImage, undefined, workers);
  assert.equal(so.error, undefined);
  assert.equal(si.error, undefined);
  assert.ok(out.equals(data), "rebuilt stream differs");
  assert.ok(so.twinsReplaced > 0.3 * so.pagesSeen, `${so.twinsReplaced} of ${so.pagesSeen}`);
  assert.equal(si.twinsReplaced, so.twinsReplaced);
  assert.equal(so.resends, 0);
  assert.ok(so.bytesOutLink < 0.6 * data.length);
  t.diagnostic(`${so.pagesSeen} pages, ${so.twinsReplaced} twins; link ${so.bytesOutLink} B for ${data.length} B of stream (${(so.bytesOutLink / data.length).toFixed(3)}x)`);
});

test("the replay bench on a capture and disk given to it (--stream, --image): output identical, pages as references, CPU per GB of each hop", { skip: skipReal, timeout: 180_000 }, (t) => {
  const bench = fileURLToPath(new URL("../bench/stream-replay.js", import.meta.url));
  const run = (args: string[]) => spawnSync(process.execPath, [bench, ...args], { encoding: "utf8", timeout: 150_000 });
  const r = run(["--stream", capture, "--image", nasImage, "--rounds", "1", "--only", "relays,proxies", "--json"]);
  assert.equal(r.status, 0, r.stderr);
  const res = JSON.parse(r.stdout.trim().split("\n").pop()!) as { streamBytes: number; twinsReplaced: number; linkBytes: number; sPerGB: Record<string, { first: number; second: number }>; ratios: Record<string, { first: number }> };
  assert.equal(res.streamBytes, fs.statSync(capture).size);
  assert.ok(res.twinsReplaced > 1000, `${res.twinsReplaced} twins`);
  assert.ok(res.linkBytes < 0.6 * res.streamBytes, `link ${res.linkBytes} of ${res.streamBytes}`);
  for (const v of ["relays", "proxies"]) assert.ok(res.sPerGB[v]!.first > 0 && res.sPerGB[v]!.second > 0, JSON.stringify(res.sPerGB));
  assert.ok(res.ratios["proxies"]!.first > 0);
  // where stream-out's time went: busy (it rewrote the stream), and waits that cannot exceed the replay
  const so = (res as unknown as { streamOut: { busyMs: number; drainWaitMs: number; windowWaitMs: number } }).streamOut;
  assert.ok(so.busyMs > 0 && so.drainWaitMs >= 0 && so.windowWaitMs >= 0, JSON.stringify(so));
  t.diagnostic(`proxies over relays: ${res.ratios["proxies"]!.first.toFixed(2)}x (first hop)`);
  // not a capture: refused with a clear error before anything starts; a capture without its disk: a usage error
  const notQemu = run(["--stream", nasImage, "--image", nasImage, "--only", "proxies"]);
  assert.equal(notQemu.status, 1);
  assert.match(notQemu.stderr, /is not a QEMU migration stream/);
  const noDisk = run(["--stream", capture]);
  assert.equal(noDisk.status, 2);
  assert.match(noDisk.stderr, /--stream FILE and --image DISK go together/);
  // --mem sizes the test guest only, and only in whole MiB
  const memOfCapture = run(["--stream", capture, "--image", nasImage, "--mem", "1024"]);
  assert.equal(memOfCapture.status, 2);
  assert.match(memOfCapture.stderr, /--mem sizes the test guest/);
  const badMem = run(["--mem", "0.5"]);
  assert.equal(badMem.status, 2);
  assert.match(badMem.stderr, /--mem 0\.5: a whole number of MiB/);
});

for (const workers of [0, 1]) test(`proxies${workers ? ", a worker each" : ""}: a NAS block rewritten after indexing takes the resend path, stream still byte-identical`, { skip: skipReal, timeout: 180_000 }, async () => {
  const data = fs.readFileSync(capture);
  const img = path.join(work, `nas2-${workers}`, "disk.img");
  fs.mkdirSync(path.dirname(img));
  fs.copyFileSync(nasImage, img);
  const nas = await openNasIndex(img);
  try {
    // Find a block that some captured page twins.
    const p = new QemuStreamParser();
    let block = NO_BLOCK;
    for (let i = 0; i < data.length && block === NO_BLOCK; i += 1 << 20) {
      for (const pc of p.push(data.subarray(i, i + (1 << 20)))) {
        if (pc.kind !== "page" || block !== NO_BLOCK) continue;
        const b = nas.index.lookup(nas.engine.hashPages(pc.data))[0]!;
        if (b !== NO_BLOCK) block = b;
      }
    }
    assert.notEqual(block, NO_BLOCK, "no twin page in the capture");
    const fd = fs.openSync(img, "r+");
    fs.writeSync(fd, Buffer.alloc(PAGE_SIZE, 0xa5), 0, PAGE_SIZE, block * PAGE_SIZE);
    fs.closeSync(fd);
    const { out, so, si } = await proxyCapture(data, img, nas, workers); // nas: the index from before the rewrite
    assert.equal(so.error, undefined);
    assert.ok(si.resends >= 1, `resends ${si.resends}`);
    assert.deepEqual([so.workers.sessions, si.workers.sessions], [workers, workers]);
    assert.equal(so.resends, si.resends);
    assert.ok(out.equals(data), "rebuilt stream differs");
  } finally {
    nas.image.close();
  }
});

test("proxies: a real guest migrates through stream-out/stream-in and its counter goes on", { skip: skipReal, timeout: 240_000 }, async (t) => {
  const qport = await freePort();
  const dst = await QemuVm.start({
    ...guest!, memoryMiB: 256, memPath: `/dev/shm/pt-stream-test-dst-${process.pid}`,
    qmpSocket: path.join(work, "dst.qmp"), serialLog: path.join(work, "dst.log"), name: "pt-stream-dst", incoming: `tcp:127.0.0.1:${qport}`,
    extraQmpSockets: [path.join(work, "dst-proxy.qmp")], // stream-in's --qmp
  });
  try {
    const si = await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${qport}`, image: nasImage, psk: TEST_KEY, qmp: path.join(work, "dst-proxy.qmp") });
    const so = await streamOut({ listenPort: 0, to: `127.0.0.1:${si.port}`, image: nasImage, psk: TEST_KEY, qmp: path.join(work, "src-proxy.qmp") });
    // stream-out runs in this process: its times and these share one clock
    const outDoneAt = so.done.then(() => performance.now());
    const src = vm!;
    const before = src.serialLog().length;
    await src.waitForSerial(/pagetwin-counter \d+/, 10_000, before); // running again after the capture
    const resumed = dst.qmp.waitForEvent("RESUME", 180_000);
    const migrateAt = performance.now();
    await src.qmp.execute("migrate", { uri: `tcp:127.0.0.1:${so.port}` });
    let info: { status: string; "total-time"?: number; downtime?: number; ram?: { transferred: number; normal: number } };
    for (;;) {
      info = await src.qmp.execute("query-migrate");
      if (info.status === "completed" || info.status === "failed") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(info.status, "completed");
    await resumed;
    const [o, i] = await Promise.all([so.done, si.done]);
    assert.equal(o.error, undefined);
    assert.equal(i.error, undefined);
    const last = Math.max(...[...src.serialLog().matchAll(/pagetwin-counter (\d+)/g)].map((m) => Number(m[1])));
    const m = await dst.waitForSerial(new RegExp(`pagetwin-counter (${last + 1}|${last + 2})\\b`), 30_000);
    assert.ok(Number(m[1]) > last);
    assert.ok(o.twinsReplaced > 0);
    assert.equal(o.bytesFromQemu, i.bytesToQemu);
    // the end-to-end verdict reaches stream-out; each side times what it sees, on its own clock
    assert.equal(o.verdict, "verified");
    assert.equal(i.verdict, "verified");
    assert.ok(o.streamsVerified >= 1 && o.streamsVerified === i.streamsVerified);
    const { streamToVerdictMs: sv, stopToVerdictMs: stv } = o;
    const { streamToEndMs: se, endToResumeMs: er, streamToResumeMs: sr } = i;
    assert.ok(sv !== null && stv !== null && se !== null && er !== null && sr !== null, JSON.stringify({ sv, stv, se, er, sr }));
    assert.ok(stv > 0 && stv < sv, "the source stopped after its stream began and before the verdict");
    assert.ok(se > 0 && er >= 0 && Math.abs(sr - (se + er)) < 1, "stream-in: first byte -> end -> RESUME");
    // first byte -> verdict fits within migrate -> stream-out's end only if the first byte came after migrate
    const sinceMigrate = (await outDoneAt) - migrateAt;
    assert.ok(sv <= sinceMigrate, `stream-out's first byte came after QEMU's migrate began: ${sv.toFixed(0)} ms to the verdict, ${sinceMigrate.toFixed(0)} ms since migrate`);
    t.diagnostic(`QEMU: total ${info["total-time"]} ms, downtime ${info.downtime} ms, ${info.ram!.transferred} B, ${info.ram!.normal} pages; ` +
      `proxies: ${o.pagesSeen} pages, ${o.twinsReplaced} twins, link ${o.bytesOutLink} B; counter ${last} -> ${m[1]}; ` +
      `stream-out: stream->verdict ${sv.toFixed(0)} ms, STOP->verdict ${stv.toFixed(0)} ms; stream-in: stream->end ${se.toFixed(0)} ms, end->RESUME ${er.toFixed(0)} ms`);
  } finally {
    await dst.cleanup();
  }
});

test("proxies: a page whose record header is longer than a REFS entry holds (a 250-character RAM block name) travels raw; the rest still as references", { timeout: 60_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-longname-"));
  try {
    const image = path.join(dir, "disk.img");
    const blocks = Buffer.alloc(128 * PAGE_SIZE);
    for (let i = 0; i < 128; i++) blocks.fill(i + 1, i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
    fs.writeFileSync(image, blocks);
    (await openNasIndex(image, { rebuild: true })).image.close();
    // every page is a twin; the first page of each PART section names the block (header 8 + 1 + 250 bytes)
    const data = qemuStream(blocks, "b".repeat(250));
    const r = await throughProxies({ data, image });
    assert.equal(r.so.error, undefined);
    assert.equal(r.si.error, undefined);
    assert.ok(r.out.equals(data), "stream rebuilt byte-identical");
    assert.equal(r.so.pagesSeen, 128);
    assert.equal(r.so.twinsReplaced, 126, "two pages (one per PART section of 64) went raw, the rest as references");
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
