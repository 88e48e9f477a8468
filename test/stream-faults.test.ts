// The fault matrix for stream mode: the link between the proxies torn, bits
// flipped on it, stream-in killed, the NAS image truncated mid-stream. Every
// case ends with nothing lost: the destination QEMU got a clean prefix of the
// stream (never a corrupt byte) or all of it, and a real source VM runs on.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync, writeFileSync, writeSync } from "node:fs";
import { randomBytes } from "node:crypto";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { SFrame } from "../src/stream/frames.js";
import { frame } from "../src/wire/envelope.js";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import type { StreamStats } from "../src/stream/stats.js";
import { exitStatus } from "../src/cli/commands/stream.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { QemuVm } from "../src/adapters/qemu/vm.js";
import { freePort, frameTamper, qemuStream, tamperProxy, throughProxies, TEST_KEY, testKeyFile, type ProxyRun } from "./helpers/stream.js";
import { guest, skipRealGuest } from "./helpers/guest.js";

const PAGE = 4096;

/** Lengths of the runs of consecutive twins in the "runs" layout, in turn: single twins, runs across REFS frames and QEMU chunks. */
const RUNS = [1, 7, 33, 64, 100, 3, 250, 2, 500];

/**
 * An image of `blocks` random blocks, indexed, and a stream of its pages:
 * "alternate": a random page (no twin), block i (a twin), for each i: every
 * REFS frame then holds one reference; "runs": runs of consecutive blocks
 * (lengths RUNS, in turn) between random pages: REFS frames hold many
 * references, read from the image as one run, rebuilt in slot order.
 */
/** Blocks of the fixture of the tests that assert a clean prefix: a 32 MiB stream. */
const FAULT_BLOCKS = 4096;

async function fixture(dir: string, blocks: number, layout: "alternate" | "runs" = "alternate"): Promise<{ image: string; data: Buffer }> {
  const image = join(dir, "disk.img");
  const img = randomBytes(blocks * PAGE);
  writeFileSync(image, img);
  (await openNasIndex(image, { rebuild: true })).image.close();
  const pages: Buffer[] = [];
  const block = (i: number) => img.subarray(i * PAGE, (i + 1) * PAGE);
  if (layout === "alternate") for (let i = 0; i < blocks; i++) pages.push(randomBytes(PAGE), block(i));
  else {
    for (let i = 0, r = 0; i < blocks; r++) {
      pages.push(randomBytes(PAGE));
      for (const end = Math.min(blocks, i + RUNS[r % RUNS.length]!); i < end; i++) pages.push(block(i));
    }
  }
  return { image, data: qemuStream(Buffer.concat(pages)) };
}

/**
 * The destination QEMU got a strict prefix of the stream: nothing corrupt, nothing invented, not all of it. The
 * stream is to be several times what stream-out may take ahead of stream-in (its pacer's floors), so that the
 * source is still writing when the fault is found, as a real source QEMU in pre-copy is.
 */
function assertCleanPrefix(r: ProxyRun, data: Buffer): void {
  assert.ok(r.out.length < data.length, `the destination QEMU got all ${r.out.length} bytes`);
  assert.ok(data.subarray(0, r.out.length).equals(r.out), "the destination QEMU got bytes that are not the source's");
  assert.ok(r.sourceCut, "the source QEMU's connection was closed (its migration fails, the VM runs on)");
}

/** Calls `act` once, on the first stream-out -> stream-in frame of `type` after `after` bytes of frames. */
function onFrameAfter(after: number, type: SFrame | null, act: (sealed: Buffer) => Buffer | "cut") {
  let seen = 0;
  let done = false;
  return frameTamper((t, sealed) => {
    seen += sealed.length;
    if (done || seen < after || (type !== null && t !== type)) return sealed;
    done = true;
    return act(sealed);
  });
}

/** A man in the middle that tears the link once `after` bytes went up (it reads no frames: the link may be TLS). */
function cutAfter(after: number) {
  let seen = 0;
  return (dir: "up" | "down", chunk: Buffer, cut: () => void): Buffer | null => {
    if (dir === "up" && (seen += chunk.length) >= after) { cut(); return null; }
    return chunk;
  };
}

test("stream fault: the link torn mid-stream: both proxies say so, the source QEMU's connection is closed, its destination got a clean prefix", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const { image, data } = await fixture(dir, FAULT_BLOCKS);
    const r = await throughProxies({ data, image, out: { compress: "off" }, via: onFrameAfter(1 << 20, null, () => "cut") });
    assert.match(r.so.error ?? "", /link to stream-in (closed|failed)/);
    assert.match(r.si.error ?? "", /link from stream-out (closed|failed)/);
    assert.ok(r.inEnded, "stream-in saw the end of its link by itself");
    assertCleanPrefix(r, data);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream fault: a flipped bit in a RAW or REFS frame: stream-in refuses the frame by its CRC and never writes it", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const { image, data } = await fixture(dir, FAULT_BLOCKS);
    for (const type of [SFrame.Raw, SFrame.Refs]) {
      const r = await throughProxies({
        data, image, out: { compress: "off" },
        via: onFrameAfter(1 << 20, type, (sealed) => { sealed[sealed.length >> 1]! ^= 0x10; return sealed; }),
      });
      assert.match(r.si.error ?? "", /frame \d+ \(\d+ bytes\) fails its CRC-32: the link corrupted it/, SFrame[type]);
      // stream-out hears stream-in's Abort, or (when it was writing as stream-in closed the link) its write fails first
      assert.match(r.so.error ?? "", /stream-in aborted the migration: frame \d+ .* fails its CRC-32|link to stream-in (failed|closed)/, SFrame[type]);
      assertCleanPrefix(r, data);
    }
    // a REFS frame of many references (runs of twins): the first one struck. The stream is mostly references, so
    // QEMU may have written all of it by then, and stream-out may see the closed link before stream-in's Abort.
    const runs = await fixture(mkdtempSync(join(dir, "runs-")), 1024, "runs");
    const r = await throughProxies({
      data: runs.data, image: runs.image, out: { compress: "off" }, split: 1 << 20,
      via: onFrameAfter(0, SFrame.Refs, (sealed) => { sealed[sealed.length >> 1]! ^= 0x10; return sealed; }),
    });
    assert.match(r.si.error ?? "", /frame \d+ \(\d+ bytes\) fails its CRC-32: the link corrupted it/);
    assert.match(r.so.error ?? "", /stream-in aborted the migration|link to stream-in (failed|closed)/);
    assert.ok(r.out.length < runs.data.length && runs.data.subarray(0, r.out.length).equals(r.out), "the destination QEMU got a clean prefix");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream checked end to end, always: a clean stream is confirmed; a RAW frame rewritten with a valid frame CRC (what a proxy bug would do) fails the session", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const { image, data } = await fixture(dir, 1024);
    const clean = await throughProxies({ data, image, split: "random" });
    assert.equal(clean.si.error, undefined);
    assert.ok(clean.out.equals(data));
    assert.equal(clean.si.streamsVerified, 1);
    // stream-out hears stream-in's verdict, and exits 0 on it
    assert.equal(clean.so.error, undefined);
    assert.equal(clean.so.streamsVerified, 1);
    assert.equal(clean.so.verdict, "verified");
    assert.equal(clean.si.verdict, "verified");
    assert.equal(exitStatus(clean.so), 0);
    assert.ok((clean.so.streamToVerdictMs ?? -1) > 0, "stream-out times first byte to verdict");
    assert.ok((clean.si.streamToEndMs ?? -1) > 0, "stream-in times first byte to end");
    assert.equal(clean.so.stopToVerdictMs, null, "no QMP given: no STOP observed");
    assert.equal(clean.si.endToResumeMs, null, "no QMP given: no RESUME observed");
    // one byte of QEMU's stream changed inside a RAW frame, the frame resealed: its CRC holds, the stream does not
    const rewrite = onFrameAfter(1 << 20, SFrame.Raw, (sealed) => {
      const payload = Buffer.from(sealed.subarray(5, sealed.length - 4));
      payload[payload.length >> 1] ^= 0x40;
      return frame(SFrame.Raw, payload);
    });
    const changed = await throughProxies({ data, image, out: { compress: "off" }, via: rewrite });
    assert.match(changed.si.error ?? "", /not the one the source QEMU sent \(here \d+ bytes, CRC-32 [0-9a-f]{8}; at the source \d+ bytes, CRC-32 [0-9a-f]{8}\)/);
    assert.match(changed.so.error ?? "", /stream-in's end-to-end check failed: the stream rebuilt for the destination QEMU is not the one the source QEMU sent/);
    assert.equal(changed.si.streamsVerified, 0);
    assert.equal(changed.si.streamsFailed, 1);
    // stream-out, where the operator is, learns the failed verdict and exits nonzero
    assert.equal(changed.so.streamsFailed, 1);
    assert.equal(changed.so.streamsVerified, 0);
    assert.equal(changed.so.verdict, "failed");
    assert.equal(exitStatus(changed.so), 1);
    // a stream-in that never answers (the link cut once END went by): the verdict is unknown, the exit status nonzero
    let ended = false;
    const watchEnd = frameTamper((type, sealed) => {
      if (type === SFrame.End) ended = true;
      return sealed;
    });
    const silent = await throughProxies({ data, image, via: (dir, chunk, cut) => (dir === "down" && ended ? (cut(), null) : watchEnd(dir, chunk, cut)) });
    assert.equal(silent.so.verdict, "unknown");
    assert.match(silent.so.error ?? "", /verdict on the stream never came|closed before the migration ended/);
    assert.equal(exitStatus(silent.so), 1);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream fault: the NAS image truncated mid-stream: the twins it lost are resent, the stream arrives byte-identical", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const blocks = 2048;
    const { image, data } = await fixture(dir, blocks);
    // Twins of blocks 0..511 come in the first ~2 MB of frames; cut the image to those once 1 MB went by.
    let truncatedAt = 0;
    const r = await throughProxies({
      data, image, out: { compress: "off" },
      via: onFrameAfter(1 << 20, null, (sealed) => { truncateSync(image, 512 * PAGE); truncatedAt = Date.now(); return sealed; }),
    });
    assert.ok(truncatedAt > 0, "the image was truncated during the stream");
    assert.equal(r.so.error, undefined);
    assert.equal(r.si.error, undefined);
    assert.ok(r.out.equals(data), "stream rebuilt byte-identical");
    assert.equal(r.so.twinsReplaced, blocks);
    assert.equal(r.si.resends, blocks - 512, "every twin past the new end was resent, no other");
    assert.equal(r.so.resends, r.si.resends);
    assert.equal(r.si.twinsReplaced, 512);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("runs of consecutive twins (REFS frames of many references, blocks read as one run): rebuilt byte-identical in slot order, whatever QEMU's write sizes", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const blocks = 2048;
    const { image, data } = await fixture(dir, blocks, "runs");
    for (const split of [1 << 20, "random"] as const) {
      const r = await throughProxies({ data, image, out: { compress: "off" }, split });
      assert.equal(r.si.error, undefined, `${split}: ${r.si.error}`);
      assert.ok(r.out.equals(data), `${split}: stream rebuilt byte-identical`);
      assert.equal(r.si.streamsVerified, 1);
      assert.equal(r.so.twinsReplaced, blocks, `${split}: every twin went as a reference`);
      assert.equal(r.si.twinsReplaced, blocks);
      assert.equal(r.si.multifd.twins, 0, "no multifd channel: none of its twins");
      assert.equal(r.si.resends, 0);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("runs of twins under faults: the image truncated inside a run and a block rewritten inside another: exactly those twins resent, the stream byte-identical", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const blocks = 2048;
    const { image, data } = await fixture(dir, blocks, "runs");
    // block 512 lies inside the run of blocks 460..959, block 300 inside the run 208..457
    let struck = false;
    const r = await throughProxies({
      data, image, out: { compress: "off" }, split: 1 << 20,
      via: onFrameAfter(0, null, (sealed) => {
        truncateSync(image, 512 * PAGE);
        const fd = openSync(image, "r+");
        writeSync(fd, randomBytes(PAGE), 0, PAGE, 300 * PAGE);
        closeSync(fd);
        struck = true;
        return sealed;
      }),
    });
    assert.ok(struck);
    assert.equal(r.so.error, undefined, r.so.error);
    assert.equal(r.si.error, undefined, r.si.error);
    assert.ok(r.out.equals(data), "stream rebuilt byte-identical");
    assert.equal(r.si.resends, blocks - 512 + 1, "the twins past the new end and the rewritten one, no other");
    assert.equal(r.so.resends, r.si.resends);
    assert.equal(r.si.twinsReplaced, 512 - 1);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a small replay window (8 pages), every page a twin, every reference NEEDed: the stream completes byte-identical, each NEED answered with its own page", { timeout: 20_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const blocks = 1024;
    const image = join(dir, "disk.img");
    const img = randomBytes(blocks * PAGE);
    writeFileSync(image, img);
    (await openNasIndex(image, { rebuild: true })).image.close();
    const data = qemuStream(Buffer.from(img)); // one run of twins: QEMU's chunks bring far more than the window holds
    const r = await throughProxies({
      data, image, out: { compress: "off", windowPages: 8 }, split: 1 << 20,
      via: onFrameAfter(0, null, (sealed) => { truncateSync(image, 0); return sealed; }),
    });
    assert.equal(r.so.error, undefined, r.so.error);
    assert.equal(r.si.error, undefined, r.si.error);
    assert.ok(r.out.equals(data), "stream rebuilt byte-identical");
    assert.ok(r.so.twinsReplaced > 8, `references went beyond one window (${r.so.twinsReplaced})`);
    assert.ok(r.so.twinsReplaced < blocks, "the full window sent pages raw");
    assert.equal(r.si.resends, r.so.twinsReplaced, "every reference was NEEDed and RESENT");
    assert.equal(r.si.twinsReplaced, 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * A small "alternate" fixture (64 blocks) through the proxies, the first stream-out -> stream-in frame of `type`
 * rewritten (into one or more frames, resealed) or the link cut there (`rewrite` returns null to pass a frame); with `truncate`, the image is emptied at
 * HELLO; with `layout: "runs"`, 256 blocks in runs of twins.
 */
async function withFrameRewritten(dir: string, type: SFrame, rewrite: (payload: Buffer) => Buffer | Buffer[] | "cut" | null, o: { truncate?: boolean; layout?: "runs" } = {}): Promise<{ r: ProxyRun; data: Buffer }> {
  const { image, data } = await fixture(mkdtempSync(join(dir, "f-")), o.layout ? 256 : 64, o.layout);
  let truncated = !o.truncate, done = false;
  const via = frameTamper((t, sealed, payload) => {
    if (!truncated) { truncateSync(image, 0); truncated = true; } // at HELLO: every reference is NEEDed
    if (t !== type || done) return sealed;
    const x = rewrite(Buffer.from(payload));
    if (x === null) return sealed; // not this one
    done = true;
    if (x === "cut") return x;
    return Buffer.concat((Array.isArray(x) ? x : [x]).map((b) => frame(t, b)));
  });
  return { r: await throughProxies({ data, image, out: { compress: "off" }, via }), data };
}

const editEnd = (edit: (e: Record<string, unknown>) => void) => (p: Buffer) => {
  const e = JSON.parse(p.toString("utf8")) as Record<string, unknown>;
  edit(e);
  return Buffer.from(JSON.stringify(e), "utf8");
};

test("stream-in's END check: END's own counts are taken, an END that is not JSON, a missing or different length or CRC-32 fails with both shown in full", { timeout: 20_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const [notJson, counts, noLength, noCrc, crc, length] = await Promise.all([
      withFrameRewritten(dir, SFrame.End, () => Buffer.from("null")),
      // END twice: the session ends at the first (nothing after END is taken, no second verdict)
      withFrameRewritten(dir, SFrame.End, (p) => [editEnd((e) => { e.pages = 7; e.zeroPages = 5; })(p), p]),
      withFrameRewritten(dir, SFrame.End, editEnd((e) => { delete e.streamBytes; })),
      withFrameRewritten(dir, SFrame.End, editEnd((e) => { delete e.crc32; })),
      withFrameRewritten(dir, SFrame.End, editEnd((e) => { e.crc32 = 0xabcd; })),
      withFrameRewritten(dir, SFrame.End, editEnd((e) => { e.streamBytes = (e.streamBytes as number) + 1; })),
    ]);
    assert.equal(counts.r.si.error, undefined, counts.r.si.error);
    assert.ok(counts.r.out.equals(counts.data));
    assert.deepEqual([counts.r.si.pagesSeen, counts.r.si.zeroPages, counts.r.si.streamsVerified], [7, 5, 1]);
    assert.deepEqual([counts.r.so.error, counts.r.so.verdict], [undefined, "verified"]);
    assert.match(notJson.r.si.error ?? "", /END frame does not hold a JSON object/);
    for (const { r } of [noLength, noCrc]) {
      assert.match(r.si.error ?? "", /END frame has no stream length and CRC-32: the stream cannot be checked end to end/);
      assert.deepEqual([r.si.streamsVerified, r.si.streamsFailed, r.so.verdict], [0, 1, "failed"]);
    }
    const n = crc.data.length;
    assert.match(crc.r.si.error ?? "", new RegExp(`here ${n} bytes, CRC-32 [0-9a-f]{8}; at the source ${n} bytes, CRC-32 0000abcd\\): a pagetwin bug, please report it\\. ` +
      `Do not resume the destination VM; the source VM is paused and goes on with "cont"$`));
    assert.match(length.r.si.error ?? "", new RegExp(`here ${n} bytes, CRC-32 ([0-9a-f]{8}); at the source ${n + 1} bytes, CRC-32 \\1\\)`));
    for (const { r } of [crc, length]) assert.deepEqual([r.si.streamsVerified, r.si.streamsFailed, r.so.verdict], [0, 1, "failed"]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a RESEND whose page differs from the page referenced reaches QEMU, and the END check fails: a resent page counts by the hash of its own bytes", { timeout: 20_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    // the right size, the page asked for: only the end-to-end check can tell
    const { r } = await withFrameRewritten(dir, SFrame.Resend, (p) => { p[4 + 100]! ^= 1; return p; }, { truncate: true });
    assert.ok(r.si.resends > 0);
    assert.match(r.si.error ?? "", /the stream rebuilt for the destination QEMU is not the one the source QEMU sent/);
    assert.deepEqual([r.si.streamsVerified, r.si.streamsFailed, r.so.verdict], [0, 1, "failed"]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream-in's NEED/RESEND: a RESEND of another size, of a page not asked for, or twice fails the session; a REFS frame over MAX_REFS too (one of exactly MAX_REFS is taken)", { timeout: 30_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    const refs = (n: number) => {
      const p = Buffer.alloc(8 + n * (1 + 8 + 4 + 16));
      p.writeUInt32BE(n, 4);
      for (let i = 0, o = 8; i < n; i++, o += 29) p[o] = 8;
      return p;
    };
    // a REFS frame's first reference repeated `n` times (at MAX_REFS: taken, its pages rebuilt; what follows is not the stream)
    const repeated = (n: number) => (p: Buffer) => {
      const one = p.subarray(8, 8 + 1 + p[8]! + 4 + 16);
      const q = Buffer.concat([p.subarray(0, 8), ...Array.from({ length: n }, () => one)]);
      q.writeUInt32BE(n, 4);
      return q;
    };
    const [short, other, twice, many] = await Promise.all([
      withFrameRewritten(dir, SFrame.Resend, (p) => p.subarray(0, p.length - 1), { truncate: true }),
      withFrameRewritten(dir, SFrame.Resend, (p) => { p.writeUInt32BE(p.readUInt32BE(0) + 2, 0); return p; }, { truncate: true }),
      withFrameRewritten(dir, SFrame.Resend, (p) => [p, p], { truncate: true }),
      withFrameRewritten(dir, SFrame.Refs, () => refs(4097)),
    ]);
    assert.match(short.r.si.error ?? "", /RESEND frame of 4099 bytes/);
    assert.match(other.r.si.error ?? "", /RESEND of page #\d+, which this stream-in did not ask for/);
    assert.match(twice.r.si.error ?? "", /RESEND of page #\d+, which this stream-in did not ask for/);
    assert.match(many.r.si.error ?? "", /a REFS frame holds 4097 references; at most 4096/);
    for (const { r, data } of [short, other, twice, many]) {
      assert.match(r.so.error ?? "", /stream-in aborted the migration/);
      assert.ok(r.out.length < data.length && data.subarray(0, r.out.length).equals(r.out), "the destination QEMU got a clean prefix");
    }
    // alone: beside the others, its 4096 pages rebuilt slow them enough that a refused session's stream-out may see its
    // write fail before it reads stream-in's abort
    const most = await withFrameRewritten(dir, SFrame.Refs, repeated(4096));
    assert.equal(most.r.si.twinsReplaced >= 4096, true, "the 4096 references were taken and rebuilt");
    assert.doesNotMatch(most.r.si.error ?? "", /references; at most/);
    assert.match(most.r.so.error ?? "", /stream-in acknowledged up to #4096/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// in the target's last stage (it waits 6 s): its name starts as that stage's pattern wants
test("stream checked end to end, then closed: the destination QEMU closing its socket after END is no failure (nothing logged as an error, even past the close wait)", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  const errors: string[] = [];
  let qemuPort = 0;
  const qemu = net.createServer({ allowHalfOpen: true }, (c) => { c.on("data", () => {}); c.on("end", () => c.end()); c.on("error", () => {}); });
  await new Promise<void>((r) => qemu.listen(0, "127.0.0.1", () => { qemuPort = (qemu.address() as net.AddressInfo).port; r(); }));
  const { image, data } = await fixture(dir, 64);
  const si = await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${qemuPort}`, image, psk: TEST_KEY, log: { error: (m: string) => errors.push(m) } });
  try {
    const r = await throughProxies({ data, image, streamIn: si });
    assert.deepEqual([r.si.error, r.so.error, r.so.verdict], [undefined, undefined, "verified"]);
    await new Promise((res) => setTimeout(res, 6_000)); // past TIMEOUTS.closeWaitMs (5 s), when a close not after END fails
    assert.deepEqual(errors, []);
  } finally {
    await si.close();
    qemu.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream-in's destination QEMU closing its socket cleanly mid-stream (no reset): the session fails at the next write to it, the source's connection closed", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  // a destination QEMU that takes 1 MiB of the stream, then ends its side (FIN, not RST) and reads on
  let got = 0;
  const qemu = net.createServer((c) => {
    c.on("data", (d: Buffer) => { if ((got += d.length) >= 1 << 20 && !c.writableEnded) c.end(); });
    c.on("error", () => {});
  });
  await new Promise<void>((r) => qemu.listen(0, "127.0.0.1", r));
  const { image, data } = await fixture(dir, FAULT_BLOCKS);
  const si = await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${(qemu.address() as net.AddressInfo).port}`, image, psk: TEST_KEY });
  try {
    const r = await throughProxies({ data, image, streamIn: si });
    assert.match(r.si.error ?? "", /^stream-in: the destination QEMU connection is closed$/);
    assert.match(r.so.error ?? "", /stream-in aborted the migration: stream-in: the destination QEMU connection is closed$/);
    assert.ok(r.sourceCut, "the source QEMU's connection was closed (its migration fails, the VM runs on)");
  } finally {
    await si.close();
    qemu.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

// stream-out sends ahead of the rebuild: END may be in stream-in's queue before the cut (a FIN after END), or not
test("stream-in's NEED/RESEND: the link cut while a REFS frame of many references waits for a resent page: stream-in ends by itself", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-fault-"));
  try {
    // RESENDs in order: the run of 1 twin, then the first of the run of 7 (its REFS frame waits there)
    let n = 0;
    const { r, data } = await withFrameRewritten(dir, SFrame.Resend, () => (++n === 2 ? "cut" : null), { truncate: true, layout: "runs" });
    assert.match(r.si.error ?? "", /link (closed while waiting for a resent page|from stream-out (failed|closed))/);
    assert.ok(r.inEnded, "stream-in ended by itself, not waiting for the rest of the frame's pages");
    assert.ok(r.out.length < data.length && data.subarray(0, r.out.length).equals(r.out), "the destination QEMU got a clean prefix");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ------------------------------------------------------------ real guest

const skipReal = skipRealGuest;

let work = "";
let indexPath = "";
let vm: QemuVm | null = null;

before(async () => {
  if (skipReal) return;
  work = mkdtempSync(join(tmpdir(), "pt-stream-faults-"));
  indexPath = join(work, "disk.img.pagetwin-index"); // the guest's disk is used in place, read-only; its index lives here
  (await openNasIndex(guest!.disk, { indexPath })).image.close();
  vm = await QemuVm.start({
    ...guest!, memoryMiB: 256, memPath: `/dev/shm/pt-stream-faults-${process.pid}`,
    qmpSocket: join(work, "src.qmp"), serialLog: join(work, "src.log"), name: "pt-stream-faults",
  });
  await vm.waitForSerial(/pagetwin-ready/, 240_000);
  await vm.waitForSerial(/pagetwin-counter 2\b/, 30_000);
  // slow enough that the faults below strike mid-stream
  await vm.qmp.execute("migrate-set-parameters", { "max-bandwidth": 40_000_000 });
});

after(async () => {
  await vm?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
});

/** A destination QEMU stand-in that takes the stream and counts its bytes. */
async function drain(onBytes: (total: number) => void = () => {}): Promise<{ port: number; close(): void }> {
  let total = 0;
  const s = net.createServer((c) => { c.on("data", (d: Buffer) => onBytes((total += d.length))); c.on("error", () => {}); });
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  return { port: (s.address() as net.AddressInfo).port, close: () => s.close() };
}

const lastCounter = (v: QemuVm) => Math.max(-1, ...[...v.serialLog().matchAll(/pagetwin-counter (\d+)/g)].map((m) => Number(m[1])));

/** Migrates the guest to stream-out; after the fault, its migration must fail and the guest run on, counting. */
async function migrateAndSurvive(soPort: number): Promise<{ counterBefore: number; counterAfter: number; status: string }> {
  const src = vm!;
  const counterBefore = lastCounter(src);
  await src.qmp.execute("migrate", { uri: `tcp:127.0.0.1:${soPort}` });
  let status = "";
  for (const t = Date.now(); Date.now() - t < 30_000;) {
    status = (await src.qmp.execute<{ status: string }>("query-migrate")).status;
    if (status === "completed" || status === "failed" || status === "cancelled") break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(status, "failed", "the source QEMU's migration failed");
  const s = await src.qmp.execute<{ status: string; running: boolean }>("query-status");
  assert.equal(s.status, "running");
  assert.equal(s.running, true);
  const since = src.serialLog().length;
  const m = await src.waitForSerial(/pagetwin-counter (\d+)/, 15_000, since);
  const counterAfter = Number(m[1]);
  assert.ok(counterAfter > counterBefore, `the counter goes on: ${counterBefore} -> ${counterAfter}`);
  return { counterBefore, counterAfter, status };
}

test("stream fault, real guest: the link torn mid-migration: stream-out says so, QEMU's migration fails, the guest runs on", { skip: skipReal, timeout: 60_000 }, async (t) => {
  const sink = await drain();
  const si = await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${sink.port}`, image: guest!.disk, indexPath, psk: TEST_KEY });
  const link = await tamperProxy(si.port, cutAfter(2 << 20));
  const so = await streamOut({ listenPort: 0, to: `127.0.0.1:${link.port}`, image: guest!.disk, indexPath, psk: TEST_KEY });
  try {
    const r = await migrateAndSurvive(so.port);
    const [o, i]: StreamStats[] = await Promise.all([so.done, si.done]);
    assert.match(o.error ?? "", /link to stream-in (closed|failed)/);
    assert.match(i.error ?? "", /link from stream-out (closed|failed)/);
    assert.ok(o.bytesFromQemu > 2 << 20, "the fault struck mid-stream");
    t.diagnostic(`torn after ${o.bytesOutLink} link bytes (${o.bytesFromQemu} from QEMU); counter ${r.counterBefore} -> ${r.counterAfter}`);
  } finally {
    link.close();
    await Promise.all([so.close(), si.close()]);
    sink.close();
  }
});

test("stream fault, real guest: the stream-in process killed mid-migration: QEMU's migration fails, the guest runs on", { skip: skipReal, timeout: 60_000 }, async (t) => {
  let child: ChildProcess | null = null;
  let killedAt = 0;
  const sink = await drain((total) => {
    if (!killedAt && total > 4 << 20 && child) { killedAt = total; child.kill("SIGKILL"); }
  });
  const port = await freePort();
  const main = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
  child = spawn(process.execPath, [main, "stream-in", "--listen", `127.0.0.1:${port}`, "--qemu", `127.0.0.1:${sink.port}`, "--image", guest!.disk, "--index", indexPath, "--psk-file", testKeyFile(dirname(indexPath))], { stdio: ["ignore", "ignore", "pipe"] });
  const so = await streamOut({ listenPort: 0, to: `127.0.0.1:${port}`, image: guest!.disk, indexPath, psk: TEST_KEY });
  try {
    let err = "";
    await new Promise<void>((resolve, reject) => {
      child!.stderr!.on("data", (d: Buffer) => { err += d.toString(); if (/listening on/.test(err)) resolve(); });
      child!.once("exit", (code) => reject(new Error(`stream-in exited (${code}) before listening: ${err}`)));
    });
    const r = await migrateAndSurvive(so.port);
    assert.ok(killedAt > 0, "stream-in was killed mid-stream");
    const o = await so.done;
    assert.match(o.error ?? "", /link to stream-in (closed|failed)/);
    t.diagnostic(`stream-in killed after ${killedAt} bytes to its QEMU; stream-out: ${o.error}; counter ${r.counterBefore} -> ${r.counterAfter}`);
  } finally {
    child.kill("SIGKILL");
    await so.close();
    sink.close();
  }
});
