// QEMU 7.2 multifd channels: the packet decoder/encoder, the incremental
// channel parser, MREFS frames, and synthetic multifd migrations through
// stream-out/stream-in (the main channel reaches the destination first).
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { randomBytes } from "node:crypto";
import {
  MULTIFD_FLAG, MULTIFD_PAGES_ALLOC, MULTIFD_PAGES_ALLOC_MAX, channelKind, decodeInit, decodePacket, decodePacketHead, encodeInit, encodePacket, offsetAt, packetHeaderBytes,
} from "../src/stream/multifd-format.js";
import { MultifdStreamParser } from "../src/stream/multifd-stream.js";
import { MultifdRefsBuilder, decodeMultifdRefs } from "../src/stream/multifd-frames.js";
import { SFrame, STREAM_FRAMES } from "../src/stream/frames.js";
import { FrameReader, ProtocolError } from "../src/wire/envelope.js";
import { StreamFormatError } from "../src/errors.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import type { Piece } from "../src/stream/qemu-stream.js";
import { TEST_KEY, qemuStream } from "./helpers/stream.js";
import { mixedPages, multifdChannel } from "./helpers/multifd.js";
import type { TraceSink } from "../src/trace/sink.js";
import type { TraceRecord } from "../src/trace/format.js";
import { TraceModel } from "../src/trace/model.js";
import { drained } from "../src/link/rate.js";

const PAGE = 4096;

function reassemble(pieces: Piece[]): Buffer {
  return Buffer.concat(pieces.flatMap((p) => (p.kind === "raw" ? [p.data] : [p.header, p.data])));
}

function feed(p: MultifdStreamParser, data: Buffer, step: (i: number) => number): Piece[] {
  const out: Piece[] = [];
  for (let i = 0; i < data.length;) {
    const n = Math.max(1, step(i));
    out.push(...p.push(data.subarray(i, i + n)));
    i += n;
  }
  p.finish();
  return out;
}

test("format: init and packet headers round trip, leftover offsets and reserved bytes kept", () => {
  const uuid = randomBytes(16);
  const init = encodeInit({ uuid, channel: 3 });
  assert.equal(init.length, 64);
  const d = decodeInit(init);
  assert.deepEqual([d.version, d.channel, d.uuid.equals(uuid)], [1, 3, true]);
  assert.ok(encodeInit(d).equals(init));
  const offsets = Array.from({ length: MULTIFD_PAGES_ALLOC }, (_, i) => BigInt(i * 8192 + 0x7000_0000));
  const pkt = encodePacket({ flags: MULTIFD_FLAG.SYNC, pagesAlloc: MULTIFD_PAGES_ALLOC, pagesUsed: 5, ramblock: "pc.ram", offsets, packetNum: 2n ** 40n, reserved: Buffer.alloc(32, 9) });
  assert.equal(pkt.length, packetHeaderBytes(MULTIFD_PAGES_ALLOC));
  assert.equal(pkt.length, 1344, "QEMU 7.2's packet_len for 4 KiB pages");
  const p = decodePacket(pkt);
  assert.deepEqual([p.flags, p.pagesUsed, p.ramblock, p.packetNum, p.nextPacketSize], [1, 5, "pc.ram", 2n ** 40n, 5 * PAGE]);
  assert.deepEqual(p.offsets, offsets, "all 128 offsets, also those past pages_used");
  assert.ok(encodePacket(p).equals(pkt), "encode(decode(bytes)) gives back the bytes");
  const far = [...offsets];
  far[1] = 2n ** 40n + 0x1234_5000n; // past 4 GiB: both halves of the be64 count
  const farPkt = encodePacket({ ...p, offsets: far });
  assert.deepEqual(decodePacketHead(farPkt), { version: 1, flags: 1, pagesAlloc: 128, pagesUsed: 5, nextPacketSize: 5 * PAGE, packetNum: 2n ** 40n, ramblock: "pc.ram" });
  assert.deepEqual([0, 1, 2, 127].map((i) => offsetAt(farPkt, i)), [0, 1, 2, 127].map((i) => Number(far[i]!)));
  assert.equal(channelKind(init), "multifd");
  assert.equal(channelKind(Buffer.from("QEVM\0\0\0\x03")), "main");
  assert.equal(channelKind(Buffer.from("QE")), "unknown");
});

test("format: corrupt or oversized headers are refused with a clear error", () => {
  const offsets = Array.from({ length: MULTIFD_PAGES_ALLOC }, () => 0n);
  const good = encodePacket({ flags: 0, pagesAlloc: MULTIFD_PAGES_ALLOC, pagesUsed: 1, ramblock: "pc.ram", offsets });
  const bad = (patch: (b: Buffer) => void, re: RegExp) => {
    const b = Buffer.from(good);
    patch(b);
    assert.throws(() => decodePacket(b), (e: unknown) => e instanceof StreamFormatError && re.test(e.message), re.source);
  };
  bad((b) => b.writeUInt32BE(0xdeadbeef, 0), /packet magic deadbeef, expected 11223344/);
  bad((b) => b.writeUInt32BE(2, 4), /packet version 2/);
  bad((b) => b.writeUInt32BE(MULTIFD_PAGES_ALLOC_MAX + 1, 12), /allocates 12801 pages; QEMU accepts 1\.\.12800/);
  bad((b) => b.writeUInt32BE(0, 12), /allocates 0 pages/);
  bad((b) => b.writeUInt32BE(129, 16), /holds 129 pages but allocates 128/);
  bad((b) => b.fill(0, 64, 320), /names no RAM block/);
  assert.throws(() => decodePacket(good.subarray(0, 1000)), /1000 bytes; it allocates 128 pages, so 1344 expected/);
  assert.throws(() => decodeInit(Buffer.alloc(64)), /initial packet magic 0/);
});

test("parser: a channel split at every size re-serializes identically; pages, blocks and offsets as sent", () => {
  const pages = Array.from({ length: 300 }, (_, i) => Buffer.alloc(PAGE, i & 0xff));
  const data = multifdChannel({ id: 1, pages, block: "pc.ram" });
  for (const step of [1, 7, 63, 64, 65, 1343, 1344, 4095, 4096, 4097, 65536]) {
    const p = new MultifdStreamParser();
    const pieces = feed(p, data, () => step);
    assert.ok(reassemble(pieces).equals(data), `step ${step}`);
    const got = pieces.filter((x) => x.kind === "page");
    assert.equal(got.length, 300);
    got.forEach((g, i) => {
      assert.ok(g.data.equals(pages[i]!), `page ${i} step ${step}`);
      assert.equal(g.kind === "page" && g.offset, i * PAGE);
      assert.equal(g.kind === "page" && g.block, "pc.ram");
    });
    assert.equal(p.channel, 1);
    assert.deepEqual([p.stats.packets, p.stats.syncs, p.stats.pages, p.mode], [5, 2, 300, "parsing"]);
  }
});

test("parser: input in one reused buffer, split pages in reused bridges: every page right when handed out, and only bridged ones inBridge()", () => {
  const pages = Array.from({ length: 300 }, (_, i) => Buffer.alloc(PAGE, (i * 13 + 1) & 0xff));
  const data = multifdChannel({ id: 2, pages, block: "pc.ram" });
  for (const step of [1, 100, 4095, 4097, 5000, 65536]) {
    const p = new MultifdStreamParser({ reuseBridges: true });
    const read = Buffer.alloc(step);
    let page = 0, bridged = 0;
    for (let i = 0; i < data.length; i += step) {
      const n = Math.min(step, data.length - i);
      data.copy(read, 0, i, i + n);
      for (const x of p.push(read.subarray(0, n))) {
        if (x.kind !== "page") continue;
        assert.ok(x.data.equals(pages[page]!), `page ${page} step ${step}`);
        const inRead = x.data.buffer === read.buffer;
        assert.equal(p.inBridge(x.data), !inRead, `page ${page} step ${step}: in the read buffer or a bridge`);
        if (!inRead) bridged++;
        page++;
      }
      read.fill(0xee); // the caller's next read overwrites it
    }
    p.finish();
    assert.equal(page, 300);
    assert.ok(step >= PAGE || bridged === 300, `step ${step}: every page is split when reads are smaller than a page`);
  }
});

test("parser: a SYNC packet is handed out as soon as it is whole (nothing of it held back)", () => {
  const data = multifdChannel({ id: 0, pages: [] }); // init + SYNC + SYNC
  const p = new MultifdStreamParser();
  const first = p.push(data.subarray(0, 64 + 1344));
  assert.equal(reassemble(first).length, 64 + 1344);
  assert.equal(p.pending, 0);
  assert.equal(p.stats.syncs, 1);
});

test("parser: QEMU's own compression (zstd, zlib) passes through untouched with a warning", () => {
  for (const [flag, name] of [[MULTIFD_FLAG.ZSTD, "zstd"], [MULTIFD_FLAG.ZLIB, "zlib"]] as const) {
    const data = multifdChannel({ id: 2, pages: [randomBytes(PAGE)], flags: flag });
    const p = new MultifdStreamParser();
    const pieces = feed(p, data, () => 100);
    assert.ok(reassemble(pieces).equals(data));
    assert.ok(pieces.every((x) => x.kind === "raw"));
    assert.equal(p.mode, "passthrough");
    assert.match(p.passthroughReason ?? "", new RegExp(`multifd channel 2 uses QEMU's own ${name} compression`));
    assert.match(p.takeWarnings()[0] ?? "", /passes through unchanged/);
  }
});

test("parser: corrupt input mid-channel, and a channel cut inside a page, fail with StreamFormatError", () => {
  const data = multifdChannel({ id: 0, pages: [Buffer.alloc(PAGE, 1), Buffer.alloc(PAGE, 2)] });
  const corrupt = Buffer.from(data);
  corrupt.writeUInt32BE(MULTIFD_PAGES_ALLOC_MAX * 2, 64 + 1344 + 12); // the data packet's pages_alloc
  assert.throws(() => feed(new MultifdStreamParser(), corrupt, () => 333), (e: unknown) => e instanceof StreamFormatError && /allocates 25600 pages/.test(e.message) && /stream byte/.test(e.message));
  const cut = data.subarray(0, 64 + 2 * 1344 + PAGE + 100);
  assert.throws(() => feed(new MultifdStreamParser(), cut, () => 5000), /ended inside page 2 of 2/);
  assert.throws(() => feed(new MultifdStreamParser(), data.subarray(0, 30), () => 10), /ended inside the initial packet/);
});

test("MREFS: round trip through a frame reader; wrong lengths and counts refused", () => {
  const b = new MultifdRefsBuilder(() => 3);
  const hashes = [randomBytes(16), randomBytes(16)];
  b.add(10, Buffer.alloc(0), 77, hashes[0]!);
  b.add(11, Buffer.alloc(0), 78, hashes[1]!);
  const sealed = b.take();
  assert.equal(b.count, 0);
  const [f] = new FrameReader(STREAM_FRAMES).push(sealed);
  assert.equal(f!.type, SFrame.MultifdRefs);
  const d = decodeMultifdRefs(f!);
  assert.deepEqual([d.channel, d.firstSeq, d.refs.length, d.refs[1]!.block], [3, 10, 2, 78]);
  assert.ok(d.refs[0]!.hash.equals(hashes[0]!) && d.refs[0]!.header.length === 0);
  assert.throws(() => decodeMultifdRefs({ type: SFrame.MultifdRefs, payload: f!.payload.subarray(0, f!.payload.length - 1) }), (e: unknown) => e instanceof ProtocolError && /for 2 references/.test((e as Error).message));
  const many = Buffer.from(f!.payload);
  many.writeUInt32BE(5000, 5);
  assert.throws(() => decodeMultifdRefs({ type: SFrame.MultifdRefs, payload: many }), /5000 references; at most 4096/);
  assert.throws(() => b.add(1, Buffer.alloc(8), 1, hashes[0]!), /no record header/);
});

// ------------------------------------------------------------ through the proxies

interface Conn { first: string; data: Buffer }

/**
 * A migration of a main channel and multifd channels through both proxies into
 * a fake destination QEMU that records its connections in the order it accepted them.
 */
async function migrate(image: string, channels: { data: Buffer; delayMs: number; oneWrite?: boolean }[], o: { trace?: { out: TraceSink[]; in: TraceSink[] }; workers?: number } = {}) {
  const { trace } = o;
  const conns: Conn[] = [];
  // As QEMU 7.2's destination, which loads the migration only once every multifd channel has connected
  // (migration_has_all_channels), the main channel is finished (closed) no sooner.
  const multifd = channels.filter((ch) => channelKind(ch.data) === "multifd").length;
  let connected = 0;
  const waiting: (() => void)[] = [];
  const allConnected = () => new Promise<void>((r) => { if (connected >= multifd) r(); else waiting.push(r); });
  const sink = net.createServer({ allowHalfOpen: true }, (s) => {
    const got: Buffer[] = [];
    const c: Conn = { first: "", data: Buffer.alloc(0) };
    conns.push(c);
    s.on("data", (d: Buffer) => {
      got.push(d);
      c.data = Buffer.concat(got);
      if (c.first || c.data.length < 4) return;
      c.first = channelKind(c.data);
      if (c.first === "multifd" && ++connected >= multifd) for (const w of waiting.splice(0)) w();
    });
    s.on("end", () => { if (c.first === "main") void allConnected().then(() => s.end()); else s.end(); });
    s.on("error", () => {});
  });
  await new Promise<void>((r) => sink.listen(0, "127.0.0.1", r));
  const si = await streamIn({ listenPort: 0, qemu: `127.0.0.1:${(sink.address() as net.AddressInfo).port}`, image, psk: TEST_KEY, workers: o.workers ?? 0, ...(trace ? { trace: trace.in } : {}) });
  const so = await streamOut({ listenPort: 0, to: `127.0.0.1:${si.port}`, image, psk: TEST_KEY, workers: o.workers ?? 0, ...(trace ? { trace: trace.out } : {}) });
  try {
    await Promise.all(channels.map(async (ch) => {
      await new Promise((r) => setTimeout(r, ch.delayMs));
      const q = net.connect(so.port, "127.0.0.1");
      q.on("error", () => {});
      q.on("data", () => {});
      await new Promise<void>((r) => q.once("connect", r));
      if (ch.oneWrite) { q.end(ch.data); return; }
      let rnd = ch.data.length;
      for (let i = 0; i < ch.data.length;) {
        rnd = (rnd * 1103515245 + 12345) & 0x7fffffff;
        const n = 1 + (rnd % 70_000);
        if (!q.write(ch.data.subarray(i, i + n))) await drained(q);
        i += n;
      }
      q.end();
    }));
    const [o, i] = await Promise.all([so.done, si.done]);
    return { so: o, si: i, conns };
  } finally {
    await so.close();
    await si.close();
    sink.close();
  }
}

/** An indexed image of 256 random blocks; a main channel of 16 of its pages; multifd channels 0 and 1 of 400 pages each, twins among them. */
async function mainAndTwoChannels(dir: string): Promise<{ image: string; main: Buffer; mf: Buffer[] }> {
  const image = path.join(dir, "disk.img");
  const blocks = randomBytes(256 * PAGE);
  fs.writeFileSync(image, blocks);
  (await openNasIndex(image, { rebuild: true })).image.close();
  const main = qemuStream(blocks.subarray(0, 16 * PAGE), "pc.ram");
  return { image, main, mf: [0, 1].map((id) => multifdChannel({ id, pages: mixedPages(blocks, 400) })) };
}

for (const workers of [0, 2]) test(`proxies${workers ? `, ${workers} workers each` : ""}: multifd channels deduplicated per channel, rebuilt byte-identical; the main channel reaches the destination first`, { timeout: 60_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-multifd-"));
  try {
    const { image, main, mf } = await mainAndTwoChannels(dir);
    // the multifd channels connect before the main one: stream-in must still hand the main channel to QEMU first
    const { so, si, conns } = await migrate(image, [{ data: mf[1]!, delayMs: 0 }, { data: mf[0]!, delayMs: 20 }, { data: main, delayMs: 300 }], { workers });
    assert.equal(so.error, undefined);
    assert.equal(si.error, undefined);
    assert.deepEqual(conns.map((c) => c.first), ["main", "multifd", "multifd"]);
    const byId = (id: number) => conns.find((c) => c.first === "multifd" && c.data[24] === id)!.data;
    assert.ok(conns[0]!.data.equals(main), "main channel byte-identical");
    assert.ok(byId(0).equals(mf[0]!) && byId(1).equals(mf[1]!), "each multifd channel byte-identical");
    assert.deepEqual([so.multifd.channels, so.multifd.pages, so.multifd.twins, so.multifd.syncs], [2, 800, 400, 4]);
    assert.deepEqual([si.multifd.channels, si.multifd.twins], [2, 400]);
    assert.deepEqual([so.workers, si.workers], [{ threads: workers, sessions: workers ? 3 : 0 }, { threads: workers, sessions: workers ? 3 : 0 }]);
    assert.equal(so.streamsVerified, 3);
    assert.equal(si.streamsVerified, 3);
    const raw = main.length + mf[0]!.length + mf[1]!.length;
    assert.ok(so.bytesOutLink < 0.6 * raw, `link ${so.bytesOutLink} B for ${raw} B`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("trace: a migration with multifd channels is one migration on each side, its pages from every channel, the proxies' totals", { timeout: 60_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-multifd-trace-"));
  try {
    const { image, main, mf } = await mainAndTwoChannels(dir);
    const out: TraceRecord[] = [], inn: TraceRecord[] = [];
    // a multifd channel first, as QEMU may connect them
    const { so, si } = await migrate(image, [{ data: mf[0]!, delayMs: 0 }, { data: main, delayMs: 50 }, { data: mf[1]!, delayMs: 100 }],
      { trace: { out: [{ write: (r) => out.push(r) }], in: [{ write: (r) => inn.push(r) }] } });
    assert.equal(so.error, undefined);
    for (const [side, recs, stats, link, qemu] of [["out", out, so, so.bytesOutLink, so.bytesFromQemu], ["in", inn, si, si.bytesInLink, si.bytesToQemu]] as const) {
      const model = new TraceModel();
      for (const r of recs) model.apply(r);
      assert.equal(model.migrations.size, 1, `${side}: one migration for the three connections`);
      const m = [...model.migrations.values()][0]!;
      const e = m.end!;
      assert.ok(e, `${side}: the migration ended`);
      assert.equal(e.ok, true);
      assert.equal(e.transferredBytes, link, `${side}: link bytes`);
      assert.equal(e.baselineBytes, qemu, `${side}: QEMU's bytes`);
      assert.equal(e.pages.normal + e.pages.twin, so.pagesSeen, `${side}: every channel's pages`);
      assert.equal(e.pages.twin - e.pages.resent, stats === so ? so.twinsReplaced : si.twinsReplaced, `${side}: references`);
      assert.equal(e.pages.zero, so.zeroPages, `${side}: zero pages`);
      assert.equal(m.pages, 16, `${side}: the main channel's RAM block`);
    }
    assert.equal(so.multifd.twins, 400);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

for (const workers of [0, 1]) test(`proxies${workers ? ", a worker each" : ""}: a multifd channel with QEMU's own zstd passes through byte-identical, with the reason in the stats and the log`, { timeout: 60_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-multifd-z-"));
  try {
    const image = path.join(dir, "disk.img");
    const blocks = randomBytes(64 * PAGE);
    fs.writeFileSync(image, blocks);
    (await openNasIndex(image, { rebuild: true })).image.close();
    const main = qemuStream(blocks.subarray(0, 4 * PAGE), "pc.ram");
    // a zstd channel's data is not pages; what follows its header is opaque here, so any bytes do
    const z = multifdChannel({ id: 0, pages: mixedPages(blocks, 200), flags: MULTIFD_FLAG.ZSTD });
    const { so, si, conns } = await migrate(image, [{ data: z, delayMs: 0 }, { data: main, delayMs: 300 }], { workers });
    assert.equal(so.error, undefined);
    assert.equal(si.error, undefined);
    assert.deepEqual(conns.map((c) => c.first), ["main", "multifd"]);
    assert.ok(conns[1]!.data.equals(z));
    assert.deepEqual([so.multifd.channels, so.multifd.twins], [1, 0]);
    assert.match(so.passthrough.join("; "), /multifd channel 0 uses QEMU's own zstd compression/);
    assert.match(so.warnings.join("; "), /passes through unchanged/);
    assert.equal(si.streamsVerified, 2);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("proxies: a short stream whose end comes with its first bytes (read while stream-out tells the kind) still ends and verifies", { timeout: 30_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-multifd-e-"));
  try {
    const image = path.join(dir, "disk.img");
    const blocks = randomBytes(16 * PAGE);
    fs.writeFileSync(image, blocks);
    (await openNasIndex(image, { rebuild: true })).image.close();
    const main = qemuStream(blocks.subarray(0, 4 * PAGE), "pc.ram");
    const { so, si, conns } = await migrate(image, [{ data: main, delayMs: 0, oneWrite: true }]);
    assert.equal(so.error, undefined);
    assert.equal(so.verdict, "verified");
    assert.equal(si.streamsVerified, 1);
    assert.ok(conns[0]!.data.equals(main));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("proxies, a worker each: a multifd channel corrupt mid-stream fails the migration with the parser's error", { timeout: 30_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-multifd-c-"));
  try {
    const { image, mf } = await mainAndTwoChannels(dir);
    const corrupt = Buffer.from(mf[0]!);
    corrupt.writeUInt32BE(MULTIFD_PAGES_ALLOC_MAX * 2, 64 + 1344 + 12); // the second packet's pages_alloc
    const { so } = await migrate(image, [{ data: corrupt, delayMs: 0 }], { workers: 1 });
    assert.match(so.error ?? "", /allocates 25600 pages/);
    assert.notEqual(so.verdict, "verified");
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("stream-out with workers and a trace: the trace's sessions encode on the main thread, so no worker starts, and the log says so", { timeout: 30_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-multifd-w-"));
  try {
    const image = path.join(dir, "disk.img");
    fs.writeFileSync(image, randomBytes(16 * PAGE));
    const said: string[] = [];
    const so = await streamOut({ listenPort: 0, to: "127.0.0.1:9", image, psk: TEST_KEY, workers: 2, trace: [{ write: () => {} }], log: (m: string) => said.push(m) });
    await so.close();
    assert.match(said.join("\n"), /the 2 encoder workers asked for are not started/);
    await assert.rejects(streamOut({ listenPort: 0, to: "127.0.0.1:9", image, psk: TEST_KEY, workers: 1.5 }), /workers must be a whole number/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
