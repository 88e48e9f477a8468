import { test } from "node:test";
import assert from "node:assert/strict";
import * as net from "node:net";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { randomBytes } from "node:crypto";
import { LinkPacer } from "../src/stream/pacer.js";
import { ReceiverWait } from "../src/link/credit.js";
import { CompressionPolicy } from "../src/codec/compress.js";
import { LinkMeter, drained } from "../src/link/rate.js";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import { TEST_KEY } from "./helpers/stream.js";
import { MAX_REFS, RefsBuilder, SFrame, rebuiltLength } from "../src/stream/frames.js";

test("pacer: what may be on its way beyond the credit is queueMs of the link's rate, within its bounds", () => {
  // told the rate: 300 Mbit/s = 37.5 MB/s, 20 ms of it
  const told = new LinkPacer(new LinkMeter(), { bandwidth: 37.5e6, queueMs: 20 });
  assert.equal(told.limit, 750_000);
  told.onSent(750_000);
  assert.equal(told.over(), false);
  told.onSent(1);
  assert.equal(told.over(), true);
  assert.equal(told.credit(1, 0), null);
  assert.equal(told.over(), false, "stream-in handed a byte on");
  // references: few bytes on the link, MBs of QEMU's stream for stream-in and its QEMU; those are bounded too
  assert.equal(told.streamLimit, 8 << 20, "not measured yet");
  told.onTaken(8 << 20);
  assert.equal(told.over(), false);
  told.onTaken(1);
  assert.equal(told.over(), true, "8 MiB of QEMU's stream on its way, 1 byte on the link");
  assert.equal(told.credit(1, 1), null);
  assert.equal(told.over(), false);
  assert.match(told.credit(1, (8 << 20) + 2) ?? "", /bytes of QEMU's stream, outside 1\.\./, "more than was taken");
  // not told and not measured yet: a fixed window; a slow link keeps the floor (the credit's round trip), a fast one the ceiling
  assert.equal(new LinkPacer(new LinkMeter()).limit, 2 * 1024 * 1024);
  assert.equal(new LinkPacer(new LinkMeter(), { bandwidth: 1e6 }).limit, 512 * 1024);
  assert.equal(new LinkPacer(new LinkMeter(), { bandwidth: 10e9, queueMs: 10 }).limit, 16 * 1024 * 1024);
});

test("pacer: the rate comes from credits that arrived while the way to stream-in was never empty; a credit outside what was sent is refused", async () => {
  const meter = new LinkMeter();
  let now = 1000;
  const pacer = new LinkPacer(meter, { queueMs: 10, clock: () => now });
  pacer.onSent(64 << 20);
  assert.match(pacer.credit((64 << 20) + 1, 0) ?? "", /outside 0\.\.67108864/);
  // credits of 1 MiB every 10 ms: 100 MiB/s; then a burst of late ones (a busy event loop) does not read as a faster link
  for (let i = 1; i <= 25; i++) {
    now += 10;
    assert.equal(pacer.credit(i << 20, 0), null);
  }
  for (let i = 26; i <= 28; i++) assert.equal(pacer.credit(i << 20, 0), null);
  const rate = 100 * (1 << 20);
  // all of it went out at once, behind more than the floor: no round trip timed, the window is queueMs of the rate
  assert.equal(pacer.limit, rate * 0.01, "10 ms of 100 MiB/s");
  assert.ok(meter.measured > rate * 0.5 && meter.measured < rate * 1.25, `measured ${meter.measured}`);
  assert.match(pacer.credit(1 << 20, 0) ?? "", /outside/, "a credit never goes back");
  // wait() returns once credits bring what is on its way under the limit, or at close()
  const small = new LinkPacer(new LinkMeter(), { bandwidth: 1e6 });
  small.onSent(600 * 1024);
  let woke = false;
  const w = small.wait().then(() => { woke = true; });
  await new Promise((r) => setImmediate(r));
  assert.equal(woke, false);
  small.credit(50 * 1024, 0);
  await new Promise((r) => setImmediate(r));
  assert.equal(woke, false, "still 550 KiB on its way");
  small.credit(100 * 1024, 0);
  await w;
  const closed = new LinkPacer(new LinkMeter(), { bandwidth: 1e6 });
  closed.onSent(1 << 20);
  const cw = closed.wait();
  closed.close();
  await cw;
  // a wait that starts after close() (one chained before the session failed) returns too: stream-out's session ends
  closed.onSent(1 << 20);
  assert.ok(closed.over());
  await closed.wait();
});

/**
 * A way to stream-in with a round trip of `rttMs` (half each way) and a link of `rate` bytes/s, 64 KiB sends,
 * stream-in crediting each send once the link has carried it; `ms` of it. What was credited over the last
 * second, and the most on its way over the last 2 s (before, the rate is not measured yet: a fixed 2 MiB).
 */
function simulate(rate: number, rttMs: number, ms: number): { lastSecond: number; maxOutstanding: number; pacer: LinkPacer } {
  let now = 0;
  const pacer = new LinkPacer(new LinkMeter(), { queueMs: 10, clock: () => now });
  const SEND = 64 * 1024;
  const credits: { at: number; total: number }[] = [];
  let sent = 0, linkFree = 0, credited = 0, atSecond = 0, maxOutstanding = 0;
  for (; now <= ms; now++) {
    while (credits.length && credits[0]!.at <= now) assert.equal(pacer.credit(credited = credits.shift()!.total, 0), null);
    if (now === ms - 1000) atSecond = credited;
    while (!pacer.over()) {
      pacer.onSent(SEND);
      sent += SEND;
      linkFree = Math.max(now + rttMs / 2, linkFree) + (SEND / rate) * 1000;
      credits.push({ at: linkFree + rttMs / 2, total: sent });
    }
    if (now >= ms - 2000) maxOutstanding = Math.max(maxOutstanding, pacer.outstanding);
  }
  return { lastSecond: credited - atSecond, maxOutstanding, pacer };
}

test("pacer: a round trip longer than queueMs (a busy host) does not limit the rate; what queues stays bounded", () => {
  const rate = 37.5e6; // 300 Mbit/s
  for (const rtt of [2, 50, 150]) {
    const { lastSecond, maxOutstanding, pacer } = simulate(rate, rtt, 6000);
    assert.ok(lastSecond > 0.9 * rate, `round trip ${rtt} ms: ${(lastSecond / 1e6).toFixed(1)} MB/s credited, the link carries ${rate / 1e6}`);
    // what waits beyond the way: queueMs of the rate and one round trip (and a send, and a few ms of the 1 ms steps)
    const queued = maxOutstanding - (rate * rtt) / 1000;
    assert.ok(queued <= rate * (10 + rtt + 5) / 1000 + 64 * 1024, `round trip ${rtt} ms: ${(queued / 1e6).toFixed(2)} MB beyond the way`);
    assert.ok(pacer.limit <= Math.max(512 * 1024, (rate * (10 + 2 * (rtt + 5))) / 1000), `round trip ${rtt} ms: limit ${pacer.limit}`);
  }
});

test("proxies: with a slow destination QEMU, stream-out takes from the source QEMU only what the credit allows beyond what the destination took", { timeout: 60_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-credit-"));
  const image = path.join(dir, "disk.img");
  fs.writeFileSync(image, Buffer.alloc(1 << 20));
  const sinkPath = path.join(dir, "qemu.sock");
  const RATE = 16e6; // the destination QEMU takes 16 MB/s
  let taken = 0;
  const sink = net.createServer({ allowHalfOpen: true }, (s) => {
    s.on("data", (d: Buffer) => {
      taken += d.length;
      s.pause();
      setTimeout(() => s.resume(), (d.length / RATE) * 1000);
    });
    s.on("end", () => s.end());
    s.on("error", () => {});
  });
  await new Promise<void>((r) => sink.listen(sinkPath, r));
  const si = await streamIn({ listenPort: 0, qemu: `unix:${sinkPath}`, image, psk: TEST_KEY });
  // raw and uncompressed: a byte of QEMU's stream is a byte on the link
  const so = await streamOut({ listenPort: 0, to: `127.0.0.1:${si.port}`, image, psk: TEST_KEY, noDedup: true, compress: "off" });
  try {
    const data = randomBytes(24 << 20);
    const q = net.connect(so.port, "127.0.0.1");
    q.on("error", () => {});
    await new Promise<void>((r) => q.once("connect", r));
    let ahead = 0;
    const watch = setInterval(() => { ahead = Math.max(ahead, so.stats.bytesFromQemu - taken); }, 2);
    for (let i = 0; i < data.length && !q.destroyed; i += 65536) {
      if (!q.write(data.subarray(i, i + 65536))) await drained(q);
    }
    q.end();
    const [o] = await Promise.all([so.done, si.done]);
    clearInterval(watch);
    assert.equal(o.error, undefined);
    assert.equal(taken, data.length);
    // what the credit bounds: the window before the rate is measured (2 MiB) and stream-in's queue to its QEMU (1 MiB
    // in its socket, the unix socket's own buffer); without the credit the link's socket buffers (MBs on TCP) and
    // stream-in's 4 MiB queue come on top
    t.diagnostic(`stream-out was at most ${(ahead / 1e6).toFixed(2)} MB ahead of what the destination QEMU took`);
    assert.ok(ahead < 4.5e6, `stream-out took ${(ahead / 1e6).toFixed(2)} MB more than the destination QEMU did`);
  } finally {
    await so.close();
    await si.close();
    sink.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("stream-in's queue counts a frame as the stream it rebuilds to: a REFS frame its pages, a RAW_Z frame its raw length", () => {
  const refs = new RefsBuilder();
  for (let i = 0; i < 3; i++) refs.add(i, Buffer.alloc(8), i, Buffer.alloc(16));
  const sealed = refs.take();
  const f = (type: number, payload: Buffer) => ({ type, payload });
  assert.equal(rebuiltLength(f(SFrame.Refs, sealed.subarray(5, sealed.length - 4))), 3 * (4096 + 9));
  const rawZ = Buffer.alloc(20);
  rawZ[0] = 1;
  rawZ.writeUInt32BE(1 << 20, 1);
  assert.equal(rebuiltLength(f(SFrame.RawZ, rawZ)), 1 << 20);
  assert.equal(rebuiltLength(f(SFrame.Raw, Buffer.alloc(1234))), 1234);
  // a lying count is bounded (the frame fails its decoding later)
  const huge = Buffer.alloc(8);
  huge.writeUInt32BE(0xffffffff, 4);
  assert.equal(rebuiltLength(f(SFrame.Refs, huge)), MAX_REFS * (4096 + 9));
});

test("ReceiverWait: the share of its own clock the receiver waited for the link, over 100 ms samples; busy under a tenth", () => {
  const r = new ReceiverWait();
  r.record(0, 0);
  r.record(5, 60);
  assert.equal(r.share, -1, "60 ms is not a sample yet");
  assert.equal(r.busy, false, "nothing measured: not known to be busy");
  r.record(8, 120);
  assert.equal(r.share, 8 / 120);
  assert.equal(r.busy, true);
  r.record(68, 240);
  assert.equal(r.share, 0.5, "60 of 120 ms waiting");
  assert.equal(r.busy, false);
  r.record(68, 230);
  assert.equal(r.share, 0.5, "a clock that goes back is no sample");
  r.record(70, 340);
  assert.ok(Math.abs(r.share - 2 / 110) < 1e-9);
  assert.equal(r.busy, true);
});

test("the compression policy sends raw while the receiver is busy (auto only), and compresses again once it waits", () => {
  const receiver = { busy: true };
  const auto = new CompressionPolicy({ mode: "auto", bandwidth: 0, receiver });
  assert.equal(auto.decide(), "receiver");
  receiver.busy = false;
  assert.equal(auto.decide(), "compress");
  receiver.busy = true;
  const always = new CompressionPolicy({ mode: "always", bandwidth: 0, receiver });
  assert.equal(always.decide(), "compress", "--compress zstd compresses whatever the receiver's load");
});
