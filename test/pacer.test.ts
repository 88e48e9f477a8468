import { test } from "node:test";
import assert from "node:assert/strict";
import * as net from "node:net";
import type { Socket } from "node:net";
import { LinkPacer } from "../src/stream/pacer.js";
import { LinkMeter } from "../src/link/rate.js";
import { SEND_QUEUE_BYTES } from "../src/link/channel.js";
import { MAX_REFS, RefsBuilder, SFrame, rebuiltLength } from "../src/stream/frames.js";

const queued = (n: number) => ({ writableLength: n }) as unknown as Socket;

test("pacer: the queue toward the link holds queueMs of the link's rate, within its bounds", () => {
  // told the rate: 300 Mbit/s = 37.5 MB/s, 5 ms of it
  const told = new LinkPacer(new LinkMeter(), { bandwidth: 37.5e6, queueMs: 5 });
  assert.equal(told.limit, 187_500);
  assert.equal(told.over(queued(187_500)), false);
  assert.equal(told.over(queued(187_501)), true);
  // not told and not measured yet: a small fixed queue, not the 4 MiB of a bulk sender
  const meter = new LinkMeter();
  const measured = new LinkPacer(meter, { queueMs: 5 });
  assert.equal(measured.limit, 256 * 1024);
  // measured: 1 Gbit/s carried 1.25 MB in 10 ms
  meter.record(1_250_000, 10);
  assert.equal(measured.limit, 625_000);
  // bounds: a slow link keeps a queue worth one write; a fast one no more than a bulk sender's
  assert.equal(new LinkPacer(new LinkMeter(), { bandwidth: 1e6 }).limit, 64 * 1024);
  assert.equal(new LinkPacer(new LinkMeter(), { bandwidth: 10e9, queueMs: 5 }).limit, SEND_QUEUE_BYTES);
});

test("pacer: over() once a socket whose peer does not read holds more than the limit; wait() returns when it drained, and times the link", async () => {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const accepted = new Promise<Socket>((r) => server.once("connection", r));
  const sock = net.connect((server.address() as net.AddressInfo).port, "127.0.0.1");
  const peer = await accepted;
  peer.pause();
  try {
    const meter = new LinkMeter();
    const pacer = new LinkPacer(meter, { bandwidth: 100e6, queueMs: 5 }); // 500 kB
    const chunk = Buffer.alloc(64 * 1024);
    let written = 0;
    while (!pacer.over(sock)) {
      sock.write(chunk);
      written += chunk.length;
      if (written > 256 << 20) assert.fail("the socket never held more than the limit");
      if (sock.writableLength === 0) await new Promise((r) => setImmediate(r));
    }
    assert.ok(sock.writableLength > pacer.limit);
    const waiting = pacer.wait(sock);
    setTimeout(() => peer.resume(), 20);
    await waiting;
    assert.equal(sock.writableLength, 0);
    assert.ok(meter.measured > 0, "the drain was timed");
  } finally {
    sock.destroy();
    peer.destroy();
    server.close();
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
