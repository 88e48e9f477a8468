// Compression of the pages that travel in full (CompressedPages frames).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import zlib from "node:zlib";
import { createEngine } from "../src/index.js";
import { RamFile } from "../src/adapters/ram/ram-file.js";
import { DestinationAgent } from "../src/agent/destination.js";
import { migrateSource, MigrationError, type MigrationResult, type SourceOptions } from "../src/agent/source.js";
import { FrameType, encodePagesMaybeCompressed, decodeCompressedPages, MAX_COMPRESSED_PAGES, AGENT_FRAMES } from "../src/agent/protocol.js";
import { FrameReader, ProtocolError, frame } from "../src/wire/envelope.js";
import {
  ALGORITHM_ID, CompressionPolicy, availableAlgorithms, contiguousRuns, createCompressor, algorithmOfId, emptyCompressionStats, ZlibPages,
} from "../src/codec/compress.js";
import { RawDecoder } from "../src/stream/raw-codec.js";

const PAGE = 4096;

/** Pages that look like text/heap: words from a small vocabulary, a seeded PRNG. */
function textPages(n: number, seed = 1): Buffer {
  const words = ["page", "twin", "kernel", "struct", "0x7ffd", "migration", "cache", "inode", "dentry", "NULL", "return", "\n", "{", "}", "int", "static"];
  let x = seed >>> 0 || 1;
  const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) >>> 16) % words.length;
  const b = Buffer.alloc(n * PAGE);
  let at = 0;
  while (at < b.length) at += b.write(words[rnd()]! + " ", at);
  return b;
}

test("zstd and brotli round-trip a batch straight from scattered page views into the frame", () => {
  assert.ok(availableAlgorithms().includes("brotli"));
  assert.ok(availableAlgorithms().includes("zstd"), "zstd-napi loads here");
  const win = textPages(300);
  const pages = [3, 4, 5, 9, 10, 200, 201, 202, 299];
  const bytesOf = (i: number) => win.subarray(pages[i]! * PAGE, (pages[i]! + 1) * PAGE);
  assert.equal(contiguousRuns(pages.length, bytesOf).length, 4);
  for (const algo of availableAlgorithms()) {
    const c = createCompressor(algo);
    const { frame, compressed } = encodePagesMaybeCompressed(pages, bytesOf, ALGORITHM_ID[algo], (dst) => c.compressChunks(contiguousRuns(pages.length, bytesOf), dst));
    assert.ok(compressed > 0 && compressed < pages.length * PAGE * 0.5, `${algo}: ${compressed} bytes`);
    const [f] = new FrameReader(AGENT_FRAMES).push(frame);
    assert.equal(f!.type, FrameType.CompressedPages);
    const d = decodeCompressedPages(f!, 300);
    assert.equal(algorithmOfId(d.algorithmId), algo);
    assert.deepEqual(Array.from(d.pages), pages);
    const out = new Uint8Array(pages.length * PAGE);
    createCompressor(algo).decompressInto(d.packed, out);
    for (let i = 0; i < pages.length; i++) assert.deepEqual(out.subarray(i * PAGE, (i + 1) * PAGE), new Uint8Array(bytesOf(i)));
  }
});

test("incompressible batches come out as plain Pages frames", () => {
  const win = randomBytes(16 * PAGE);
  const bytesOf = (i: number) => win.subarray(i * PAGE, (i + 1) * PAGE);
  const pages = Array.from({ length: 16 }, (_, i) => i);
  const c = createCompressor("zstd");
  const { frame, compressed } = encodePagesMaybeCompressed(pages, bytesOf, ALGORITHM_ID.zstd, (dst) => c.compressChunks([win], dst));
  assert.equal(compressed, -1);
  assert.equal(new FrameReader(AGENT_FRAMES).push(frame)[0]!.type, FrameType.Pages);
  assert.equal(frame.length, 4 + 1 + 4 + 16 * 4 + 16 * PAGE + 4);
});

test("a decompression bomb, corrupt data, a short result or a huge page count give a clear ProtocolError", () => {
  const bomb = { zstd: null as Uint8Array | null, brotli: zlib.brotliCompressSync(Buffer.alloc(64 << 20)) };
  // 64 MiB of zeros in a few KiB of zstd
  const z = createCompressor("zstd");
  const big = Buffer.alloc(64 << 20);
  const dst = Buffer.alloc(1 << 20);
  const n = z.compressInto(big, dst);
  assert.ok(n > 0 && n < 1 << 20);
  bomb.zstd = dst.subarray(0, n);
  for (const algo of ["zstd", "brotli"] as const) {
    const d = createCompressor(algo);
    const out = new Uint8Array(2 * PAGE);
    assert.throws(() => d.decompressInto(bomb[algo]!, out), (e: Error) => e instanceof ProtocolError && /does not decompress into 8192 bytes/.test(e.message), algo);
    const good = Buffer.alloc(2 * PAGE + 100);
    const packed = Buffer.from(good.subarray(0, d.compressInto(textPages(2), good)));
    packed[Math.floor(packed.length / 2)] ^= 0xff;
    packed[packed.length - 3] ^= 0x55;
    assert.throws(() => d.decompressInto(packed, out), ProtocolError, algo);
    const one = Buffer.alloc(2 * PAGE);
    const short = one.subarray(0, d.compressInto(textPages(1), one));
    assert.throws(() => d.decompressInto(short, out), /want exactly 8192|does not decompress/, algo);
  }
  const payload = Buffer.alloc(5 + 8);
  payload[0] = 1;
  payload.writeUInt32BE(MAX_COMPRESSED_PAGES + 1, 1);
  assert.throws(() => decodeCompressedPages({ type: FrameType.CompressedPages, payload }, 10), /1\.\.2048 allowed/);
});

test("the policy compresses only when the compressor outruns the link and the data compresses", () => {
  const fast = new CompressionPolicy({ mode: "auto", bandwidth: 125e6 });
  assert.equal(fast.decide(), "compress"); // the first frame measures the compressor
  fast.recordCompress(1 << 20, 300_000, 2.5); // 420 MB/s, ratio 0.29
  assert.equal(fast.decide(), "compress");
  // the link not measured yet (stream mode's first frames): nothing says it outruns the compressor
  const unmeasured = new CompressionPolicy({ mode: "auto", bandwidth: 0, probeEvery: 1000, probeSlowEvery: 1000 });
  for (let i = 0; i < 8; i++) unmeasured.recordCompress(1 << 20, 300_000, 2.5);
  for (let i = 0; i < 3; i++) unmeasured.recordSend(1 << 20, 0.2);
  assert.equal(unmeasured.decide(), "compress", "3 MiB of backlog is not a measurement yet");
  // a fast link, timed: the compressor (420 MB/s) is slower, once it has been timed on 4 frames (the first runs cold)
  const slowHost = new CompressionPolicy({ mode: "auto", bandwidth: 0, probeEvery: 1000, probeSlowEvery: 1000 });
  for (let i = 0; i < 10; i++) slowHost.recordSend(1 << 20, 0.2); // the link takes 5 GB/s
  for (let i = 0; i < 3; i++) slowHost.recordCompress(1 << 20, 300_000, 2.5);
  assert.equal(slowHost.decide(), "compress", "3 frames do not time the compressor yet");
  slowHost.recordCompress(1 << 20, 300_000, 2.5);
  assert.equal(slowHost.decide(), "slow");
  // a link measured at 131 MB/s: a 420 MB/s compressor outruns it
  const saturated = new CompressionPolicy({ mode: "auto", bandwidth: 0, probeEvery: 1000, probeSlowEvery: 1000 });
  for (let i = 0; i < 4; i++) saturated.recordCompress(1 << 20, 300_000, 2.5);
  for (let i = 0; i < 10; i++) saturated.recordSend(1 << 20, 8);
  assert.equal(saturated.decide(), "compress");
  assert.ok(saturated.linkRate < 140e6 && saturated.linkRate > 120e6);
  const always = new CompressionPolicy({ mode: "always", bandwidth: 0, probeEvery: 1000 });
  always.recordCompress(1 << 20, 300_000, 2.5);
  for (let i = 0; i < 10; i++) always.recordSend(1 << 20, 0.2);
  assert.equal(always.decide(), "compress");
  const random = new CompressionPolicy({ mode: "auto", bandwidth: 125e6, probeEvery: 4 });
  random.recordCompress(1 << 20, 1 << 20, 1);
  const seen = Array.from({ length: 8 }, () => random.decide());
  assert.equal(seen.filter((v) => v === "poor").length, 6);
  assert.equal(seen.filter((v) => v === "compress").length, 2, "it still probes now and then");
  // by default, a stretch of random data (a poor ratio) keeps the data after it raw for at most 3 frames
  const local = new CompressionPolicy({ mode: "auto", bandwidth: 125e6 });
  for (let i = 0; i < 3; i++) local.recordCompress(1 << 20, 1 << 20, 0.5);
  const next = Array.from({ length: 4 }, () => local.decide());
  assert.deepEqual(next, ["poor", "poor", "poor", "compress"], "the fourth frame is tried");
  local.recordCompress(1 << 20, 100_000, 2); // page cache: 10:1
  assert.equal(local.decide(), "compress", "one good frame brings the ratio under the limit");
});

test("the link probe: raw frames the peer takes without a backlog show a link faster than the sender, and compression stops; a backlog times the link", () => {
  const probe = (backlog: boolean) => {
    const p = new CompressionPolicy({ mode: "auto", bandwidth: 0, probeEvery: 1000, probeSlowEvery: 1000, linkProbeFrames: 8 });
    let sent = 0;
    // compressed frames, acknowledged as fast as they go: they tell nothing of the link
    for (let i = 0; i < 4; i++) {
      assert.equal(p.decide(), "compress");
      p.recordCompress(1 << 20, 300_000, 2.5); // 420 MB/s
      p.recordFrame((sent += 300_000));
      p.recordAcked(sent);
    }
    // the compressor is timed and the link is not: 8 raw frames probe it
    for (let i = 0; i < 8; i++) {
      assert.equal(p.decide(), "slow", `probe frame ${i}`);
      p.recordFrame((sent += 1 << 20));
      if (backlog && i >= 4) p.recordSend(1 << 20, 20); // acknowledged behind a backlog: the link took 1 MiB in 20 ms, 52 MB/s
    }
    return { p, sent };
  };
  const { p: fast, sent } = probe(false);
  assert.equal(fast.decide(), "slow", "the probe's frames are not acknowledged yet: raw until they are");
  assert.equal(fast.linkOutruns, false);
  fast.recordAcked(sent);
  assert.equal(fast.decide(), "slow", "the peer took them all with no backlog: the link outruns this sender even raw");
  assert.equal(fast.linkOutruns, true);
  const { p: slow } = probe(true);
  assert.equal(slow.decide(), "compress", "the acknowledgements timed the link at 52 MB/s; the compressor outruns it");
  assert.equal(slow.linkOutruns, false);
  assert.ok(slow.measuredLinkRate > 40e6 && slow.measuredLinkRate < 60e6, String(slow.measuredLinkRate));
  // without the probe (stream mode's policy), an unmeasured link keeps compression on
  const none = new CompressionPolicy({ mode: "auto", bandwidth: 0, probeEvery: 1000, probeSlowEvery: 1000 });
  for (let i = 0; i < 12; i++) {
    assert.equal(none.decide(), "compress");
    none.recordCompress(1 << 20, 300_000, 2.5);
  }
});

test("auto with no bandwidth given, through a 125 MB/s relay (1 Gbit/s): the destination's acknowledgements time the link, not the sockets' buffers; the compressor outruns it", { timeout: 120_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-compress-"));
  try {
    // 24 MB in full: the size the sockets' buffers (megabytes at each end) made read as a link several times faster
    const content = Buffer.concat([textPages(3000), randomBytes(100 * PAGE), textPages(3000, 7)]);
    const m = await migrate(dir, content, { compress: "auto" }, undefined, (port) => relay(port, { rate: 125e6 }));
    assert.equal(m.r.status, "completed", m.r.error);
    assert.deepEqual(readFileSync(m.dstRam), readFileSync(m.srcRam));
    const c = m.r.compression;
    // the raw probe frames build a backlog at the relay; the credits for them time it at 125 MB/s at most
    // (slower when this host is busy), never at what the sockets' buffers took
    assert.ok(c.linkMBs > 0 && c.linkMBs < 1.25 * 125, `the link measured at ${c.linkMBs} MB/s: ${JSON.stringify(c)}`);
    assert.ok(c.compressMBs < 1.25 * c.linkMBs || c.framesCompressed > c.framesRaw, JSON.stringify(c));
    assert.ok(m.r.transferredBytes < content.length * 0.6, `${m.r.transferredBytes} bytes on the link`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** Rewrites a source → destination frame (null: as it was). */
type Rewrite = (type: FrameType, payload: Uint8Array) => Uint8Array | null;

async function migrate(dir: string, content: Buffer, src: Partial<SourceOptions>, via?: Rewrite, through?: (port: number) => Promise<Relay>) {
  const srcRam = join(dir, "src-ram"), dstRam = join(dir, "dst-ram");
  writeFileSync(srcRam, content);
  // a link a test reframes runs in the clear; otherwise TLS-PSK
  const link = via ? { insecure: true } : { psk: TEST_KEY };
  const agent = new DestinationAgent({ ramPath: dstRam, createRam: true, ...link });
  const port = await agent.listen();
  const proxy = via
    ? await tamperProxy(port, frameTamper((type, sealed, payload) => { const p = via(type as number as FrameType, payload); return p ? Buffer.from(frame(type, p)) : sealed; }, AGENT_FRAMES))
    : through ? await through(port) : null;
  const ram = RamFile.open(srcRam);
  const vm = { running: true, pauses: 0 };
  const dstResult = agent.nextResult();
  try {
    const r: MigrationResult = await migrateSource({
      engine: await createEngine(), index: null, indexId: null, ram,
      vm: { pause: async () => { vm.running = false; vm.pauses++; }, resume: async () => { vm.running = true; } },
      host: "127.0.0.1", port: proxy?.port ?? port, bandwidth: 0, ...link, ...src,
    }).catch((e) => { if (e instanceof MigrationError) return e.result; throw e; });
    return { r, dst: await dstResult, vm, srcRam, dstRam };
  } finally {
    ram.close();
    agent.close();
    proxy?.close();
  }
}

test("a compressed migration ends byte-identical and shows what it compressed", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-compress-"));
  try {
    const content = Buffer.concat([textPages(600), Buffer.alloc(100 * PAGE), randomBytes(100 * PAGE), textPages(224, 7)]);
    for (const compress of ["zstd", "brotli"] as const) {
      const { r, dst, srcRam, dstRam } = await migrate(dir, content, { compress });
      assert.equal(r.status, "completed", r.error);
      assert.deepEqual(readFileSync(dstRam), readFileSync(srcRam));
      const c = r.compression;
      assert.equal(c.algorithm, compress);
      assert.ok(c.framesCompressed >= 3, JSON.stringify(c));
      assert.ok(c.bytesAfter < c.bytesBefore * 0.5, JSON.stringify(c));
      assert.equal(dst.pagesDecompressed, c.bytesBefore / PAGE);
      assert.ok(r.transferredBytes < (924 * PAGE) * 0.5, `${r.transferredBytes} bytes on the link`);
    }
    // auto on a slow link (20 MB/s): the compressor outruns it, so it compresses
    const auto = await migrate(dir, content, { compress: "auto", bandwidth: 20e6 });
    assert.equal(auto.r.status, "completed", auto.r.error);
    assert.deepEqual(readFileSync(auto.dstRam), readFileSync(auto.srcRam));
    assert.equal(auto.r.compression.algorithm, "zstd");
    assert.ok(auto.r.compression.framesCompressed >= 3, JSON.stringify(auto.r.compression));
    // off: nothing compressed, the same bytes arrive
    const off = await migrate(dir, content, { compress: "off" });
    assert.equal(off.r.status, "completed", off.r.error);
    assert.deepEqual(readFileSync(off.dstRam), readFileSync(off.srcRam));
    assert.equal(off.r.compression.algorithm, null);
    assert.equal(off.r.compression.framesCompressed, 0);
    assert.ok(off.r.compression.framesRaw >= 3);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("incompressible pages travel raw, and the stats say why", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-compress-"));
  try {
    const { r, dstRam, srcRam } = await migrate(dir, randomBytes(1024 * PAGE), { compress: "auto", bandwidth: 50e6 });
    assert.equal(r.status, "completed", r.error);
    assert.deepEqual(readFileSync(dstRam), readFileSync(srcRam));
    const c = r.compression;
    assert.equal(c.framesCompressed, 0, JSON.stringify(c));
    assert.ok(c.framesRaw >= 4);
    assert.ok(c.rawPoorRatio >= 1 && c.rawPoorRatio + c.rawSlow <= c.framesRaw, JSON.stringify(c));
    assert.ok(r.transferredBytes >= 1024 * PAGE);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a bomb or corrupt CompressedPages frame (with a valid CRC) stops the migration with a clear error; the source runs on", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-compress-"));
  try {
    const z = createCompressor("zstd");
    const dst = Buffer.alloc(1 << 20);
    const bomb = dst.subarray(0, z.compressInto(Buffer.alloc(256 << 20), dst));
    for (const kind of ["bomb", "corrupt"] as const) {
      let done = false;
      const { r, dst: d, vm } = await migrate(dir, textPages(512), { compress: "zstd" }, (type, payload) => {
        if (type !== FrameType.CompressedPages || done) return null;
        done = true;
        const n = Buffer.from(payload.buffer, payload.byteOffset, payload.length).readUInt32BE(1);
        const head = payload.subarray(0, 5 + 4 * n);
        if (kind === "bomb") return Buffer.concat([head, bomb]);
        const p = Buffer.from(payload);
        for (let i = 5 + 4 * n + 20; i < p.length; i += 97) p[i] ^= 0x5a;
        return p;
      });
      assert.ok(done, "a CompressedPages frame went through the proxy");
      assert.equal(r.status, "failed");
      assert.match(r.error!, /aborted the migration: CompressedPages frame: zstd data (does not decompress|decompresses to)/, kind);
      assert.equal(d.status, "failed");
      assert.match(d.error!, /CompressedPages frame/);
      assert.equal(vm.running, true, "the source VM runs on");
      assert.equal(vm.pauses, 0);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------- stream mode

import { SFrame } from "../src/stream/frames.js";
import { frame as sframe } from "../src/wire/envelope.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { qemuStream, throughProxies as proxyRun, frameTamper, tamperProxy, TEST_KEY } from "./helpers/stream.js";
import { relay, type Relay } from "./helpers/relay.js";

/** Through both proxies, with an optional rewrite of stream-out's frames on the link (re-sealed, so their CRC holds). */
function throughProxies(data: Buffer, image: string, compress: "auto" | "off" | "zstd" | "brotli", rewrite?: (type: SFrame, payload: Buffer) => Buffer | null) {
  return proxyRun({
    data, image, out: { compress },
    ...(rewrite ? { via: frameTamper((type, sealed, payload) => { const p = rewrite(type, payload); return p ? sframe(type, p) : sealed; }) } : {}),
  });
}

test("stream mode: RAW data travels compressed, the destination QEMU gets the stream byte-identical; bombs and corrupt frames stop it clearly", { timeout: 90_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-compress-stream-"));
  try {
    const image = join(dir, "disk.img");
    const blocks = randomBytes(256 * PAGE);
    writeFileSync(image, blocks);
    (await openNasIndex(image, { rebuild: true })).image.close();
    // 512 text pages (no twin), 64 twins of image blocks, 64 random pages
    const pages = Buffer.concat([textPages(256, 3), blocks.subarray(0, 64 * PAGE), randomBytes(64 * PAGE), textPages(256, 9)]);
    const stream = qemuStream(pages);
    const z = await throughProxies(stream, image, "zstd");
    assert.equal(z.so.error, undefined);
    assert.ok(z.out.equals(stream), "stream rebuilt byte-identical");
    assert.equal(z.so.twinsReplaced, 64);
    assert.equal(z.so.compression.algorithm, "zstd");
    assert.ok(z.so.compression.framesCompressed > 0, JSON.stringify(z.so.compression));
    assert.ok(z.so.compression.rawPoorRatio > 0, "the random pages went raw");
    assert.equal(z.si.compression.framesCompressed, z.so.compression.framesCompressed);
    const off = await throughProxies(stream, image, "off");
    assert.ok(off.out.equals(stream));
    assert.equal(off.so.compression.framesCompressed, 0);
    assert.ok(z.so.bytesOutLink < off.so.bytesOutLink * 0.5, `${z.so.bytesOutLink} vs ${off.so.bytesOutLink} bytes on the link`);

    const zc = createCompressor("zstd");
    const tmp = Buffer.alloc(1 << 20);
    const bomb = tmp.subarray(0, zc.compressInto(Buffer.alloc(512 << 20), tmp));
    for (const kind of ["bomb", "corrupt"] as const) {
      let done = false;
      const r = await throughProxies(stream, image, "zstd", (type, payload) => {
        if (type !== SFrame.RawZ || done) return null;
        done = true;
        if (kind === "bomb") return Buffer.concat([payload.subarray(0, 5), bomb]);
        const p = Buffer.from(payload);
        for (let i = 25; i < p.length; i += 97) p[i] ^= 0x5a;
        return p;
      });
      assert.ok(done);
      assert.match(r.si.error ?? "", /RAW_Z frame: zstd data (does not decompress|decompresses to)/, kind);
      assert.match(r.so.error ?? "", /stream-in aborted the migration: RAW_Z frame/, kind);
      assert.ok(!r.out.equals(stream), "the destination QEMU did not get a complete stream");
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("one zstd compressor, batches of many pieces and of falling size: each round-trips exactly", () => {
  const win = textPages(64);
  const c = createCompressor("zstd");
  const header = Buffer.from([0, 0, 0, 0, 0x12, 0x34, 0x50, 0x28]);
  for (const n of [40, 17, 3, 1]) {
    // QEMU stream-style pieces: a header, then its page
    const pieces: Uint8Array[] = [];
    for (let i = 0; i < n; i++) pieces.push(header, win.subarray(i * PAGE, (i + 1) * PAGE));
    const plain = Buffer.concat(pieces);
    const dst = Buffer.alloc(plain.length + 1024);
    const got = c.compressChunks(pieces, dst);
    assert.ok(got > 0 && got < plain.length, `${n} pages: ${got} bytes`);
    const out = Buffer.alloc(plain.length);
    createCompressor("zstd").decompressInto(dst.subarray(0, got), out);
    assert.ok(out.equals(plain), `${n} pages: the bytes differ after the round trip`);
  }
});

test("a peer without zstd agrees brotli only and refuses a zstd frame it did not agree, saying so", () => {
  const pages = textPages(4);
  const dst = Buffer.alloc(pages.length + 1024);
  const packed = dst.subarray(0, createCompressor("zstd").compressInto(pages, dst));
  const payload = Buffer.alloc(5 + packed.length);
  payload[0] = ALGORITHM_ID.zstd;
  payload.writeUInt32BE(pages.length, 1);
  payload.set(packed, 5);
  const frame = { type: SFrame.RawZ, payload };
  assert.throws(() => new RawDecoder(["brotli"], emptyCompressionStats("auto")).unpack(frame), (e: Error) =>
    e instanceof ProtocolError && /RAW_Z frame uses algorithm zstd, which was not agreed \(agreed: brotli\)/.test(e.message));
  assert.deepEqual(new RawDecoder(["zstd"], emptyCompressionStats("auto")).unpack(frame), pages);
});

test("node:zlib's zstd (Node >= 22.15) and zstd-napi read each other's frames", (t) => {
  const nz = zlib as unknown as { zstdCompressSync?: (b: Uint8Array) => Buffer; zstdDecompressSync?: (b: Uint8Array) => Buffer };
  if (typeof nz.zstdCompressSync !== "function" || typeof nz.zstdDecompressSync !== "function") {
    return t.skip(`this Node (${process.version}) has no zlib zstd`);
  }
  const pages = textPages(8);
  const dst = Buffer.alloc(pages.length + 1024);
  const fromNapi = Buffer.from(dst.subarray(0, createCompressor("zstd").compressInto(pages, dst)));
  assert.deepEqual(nz.zstdDecompressSync(fromNapi), pages);
  const viaZlib = new ZlibPages("zstd", {
    compress: (src) => nz.zstdCompressSync!(src),
    decompress: (src) => nz.zstdDecompressSync!(src),
  });
  const fromZlib = Buffer.from(dst.subarray(0, viaZlib.compressInto(pages, dst)));
  const out = Buffer.alloc(pages.length);
  createCompressor("zstd").decompressInto(fromZlib, out);
  assert.deepEqual(out, pages);
  viaZlib.decompressInto(fromNapi, out);
  assert.deepEqual(out, pages);
});

test("stream mode, auto: a destination slower than the link gets RAW frames (stream-in busy), a link slower than the destination gets them compressed", { timeout: 90_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-compress-busy-"));
  try {
    const image = join(dir, "disk.img");
    writeFileSync(image, randomBytes(64 * PAGE));
    (await openNasIndex(image, { rebuild: true })).image.close();
    // 16 MiB that compress about 2:1 (each page half random, half zeros), no twins
    const pages = Buffer.alloc(4096 * PAGE);
    for (let p = 0; p < 4096; p++) randomBytes(PAGE / 2).copy(pages, p * PAGE);
    const stream = qemuStream(pages);
    // a fake destination QEMU taking 25 MB/s over loopback: stream-in seldom waits for the link
    const busy = await proxyRun({ data: stream, image, out: { compress: "auto" }, qemuRate: 25e6 });
    assert.ok(busy.out.equals(stream));
    const b = busy.so.compression;
    assert.ok(b.rawReceiverBusy >= 8 && b.rawReceiverBusy === b.framesRaw, `frames raw because stream-in was busy: ${JSON.stringify(b)}`);
    assert.ok(busy.si.linkWaitMs < busy.si.ms / 4, `stream-in waited ${busy.si.linkWaitMs} of ${busy.si.ms} ms for the link`);
    // the same stream over a 25 MB/s link into a fast destination: stream-in waits for the link, frames compress
    const slow = await proxyRun({ data: stream, image, out: { compress: "auto" }, linkRate: 25e6 });
    assert.ok(slow.out.equals(stream));
    const s = slow.so.compression;
    assert.equal(s.rawReceiverBusy, 0, JSON.stringify(s));
    assert.ok(s.framesCompressed > s.framesRaw, JSON.stringify(s));
    assert.ok(slow.si.linkWaitMs > slow.si.ms / 4, `stream-in waited ${slow.si.linkWaitMs} of ${slow.si.ms} ms for the link`);
    // the pages compress about 2:1; how many of the busy run's first frames compressed depends on scheduling,
    // so the slow run's bytes are weighed against the stream, not against the busy run
    assert.ok(slow.so.bytesOutLink < stream.length * 0.6, `${slow.so.bytesOutLink} bytes on the link for ${stream.length}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
