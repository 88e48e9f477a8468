// FrameLink's send queue over a real loopback TCP connection: send() returns
// while the rate limiter still holds frames back, close() delivers every
// queued frame before the end, and a peer that goes away fails a waiting send.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer, connect, type Socket } from "node:net";
import { once } from "node:events";
import { FrameLink, RECEIVE_QUEUE_BYTES } from "../src/link/channel.js";
import { RateLimiter } from "../src/link/rate.js";
import { LinkClosedError } from "../src/link/dial.js";
import { FrameType, AGENT_FRAMES } from "../src/agent/protocol.js";
import { FrameReader, frame } from "../src/wire/envelope.js";
import { FrameBuffers } from "../src/link/buffers.js";

async function socketPair(): Promise<{ a: Socket; b: Socket; close: () => void }> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const port = (server.address() as { port: number }).port;
  const accepted = once(server, "connection");
  const a = connect(port, "127.0.0.1");
  await once(a, "connect");
  const [b] = (await accepted) as [Socket];
  return { a, b, close: () => { a.destroy(); b.destroy(); server.close(); } };
}

/** Frame i: an opaque frame of `size` payload bytes, each byte i. */
const frameOf = (i: number, size: number) => frame(FrameType.Pages, Buffer.alloc(size, i));

test("send() queues: it returns while the rate limiter still holds most of the bytes back", async () => {
  const { a, b, close } = await socketPair();
  try {
    let received = 0;
    b.on("data", (d: Buffer) => { received += d.length; });
    // 1 MB/s, bucket 256 KiB: 3 MiB takes about 3 s to leave; the queue (4 MiB) takes it at once
    const link = new FrameLink(a, "peer", AGENT_FRAMES, new RateLimiter(1e6), 4 << 20);
    for (let i = 0; i < 3; i++) await link.send(frameOf(i, 1 << 20));
    assert.ok(received < 1 << 20, `the peer has ${received} bytes already: send() waited for the link`);
    link.destroy();
  } finally {
    close();
  }
});

test("close() ends the socket only after every queued frame went out, in order", async () => {
  const { a, b, close } = await socketPair();
  try {
    const reader = new FrameReader(AGENT_FRAMES);
    const frames: Buffer[] = [];
    b.on("data", (d: Buffer) => { for (const f of reader.push(d)) frames.push(Buffer.from(f.payload)); });
    const ended = once(b, "end");
    const link = new FrameLink(a, "peer", AGENT_FRAMES, new RateLimiter(20e6), 1 << 20);
    const sizes = [300_000, 700_000, 5, 1 << 20, 123_456];
    for (let i = 0; i < sizes.length; i++) await link.send(frameOf(i, sizes[i]!));
    link.close();
    await ended;
    assert.equal(frames.length, sizes.length);
    frames.forEach((f, i) => {
      assert.equal(f.length, sizes[i]);
      assert.ok(f.every((x) => x === i), `frame ${i} arrived altered`);
    });
    await link.flush();
  } finally {
    close();
  }
});

test("a peer that goes away fails the send waiting for room, and every later one", async () => {
  const { a, b, close } = await socketPair();
  try {
    const link = new FrameLink(a, "peer at the far end", AGENT_FRAMES, new RateLimiter(1e6), 100_000);
    await link.send(frameOf(0, 200_000));
    const waiting = link.send(frameOf(1, 200_000)); // over the queue's limit: waits for room
    b.destroy();
    await assert.rejects(waiting, (e: Error) => e instanceof LinkClosedError && /peer at the far end/.test(e.message));
    await assert.rejects(link.send(frameOf(2, 10)), LinkClosedError);
    await assert.rejects(link.flush(), LinkClosedError);
  } finally {
    close();
  }
});

test("the link's rate is timed on the pump's drain waits: a peer that reads at ~16 MB/s measures near that, not loopback's speed", async () => {
  const { a, b, close } = await socketPair();
  try {
    // the peer takes 256 KiB every 16 ms, pausing its socket in between
    let got = 0;
    let budget = 256 << 10;
    b.on("data", (d: Buffer) => {
      got += d.length;
      budget -= d.length;
      if (budget <= 0) { b.pause(); setTimeout(() => { budget = 256 << 10; b.resume(); }, 16); }
    });
    const link = new FrameLink(a, "slow peer", AGENT_FRAMES, new RateLimiter(0), 1 << 20);
    assert.equal(link.meter.rate, Infinity, "not measured before any wait");
    for (let i = 0; i < 48; i++) await link.send(frameOf(i, 1 << 20));
    await link.flush();
    const rate = link.meter.rate;
    assert.ok(Number.isFinite(rate), `the pump waited for the socket and timed it (${got} bytes read so far)`);
    assert.ok(rate > 2e6 && rate < 80e6, `measured ${(rate / 1e6).toFixed(1)} MB/s for a ~16 MB/s reader`);
    link.destroy();
  } finally {
    close();
  }
});

test("send()'s written callback runs only once the frame left the queue, for every frame in order; the buffer may then be refilled", async () => {
  const { a, b, close } = await socketPair();
  try {
    const reader = new FrameReader(AGENT_FRAMES);
    const got: Buffer[] = [];
    b.on("data", (d: Buffer) => { for (const f of reader.push(d)) got.push(Buffer.from(f.payload)); });
    const ended = once(b, "end");
    // 2 MB/s, bucket 256 KiB: the third 600 kB frame cannot have left when the sends return
    const link = new FrameLink(a, "peer", AGENT_FRAMES, new RateLimiter(2e6), 4 << 20);
    const written: number[] = [];
    const bufs = [0, 1, 2].map((i) => frameOf(i, 600_000));
    for (let i = 0; i < bufs.length; i++) await link.send(bufs[i]!, () => { written.push(i); bufs[i]!.fill(0xee); });
    assert.ok(written.length < 3, `all written at once (${written.join(",")}): the callback did not wait for the queue`);
    link.close();
    await ended;
    assert.deepEqual(written, [0, 1, 2]);
    // overwriting each buffer in its callback changed nothing the peer read
    assert.equal(got.length, 3);
    got.forEach((f, i) => assert.ok(f.length === 600_000 && f.every((x) => x === i), `frame ${i} arrived altered`));
  } finally {
    close();
  }
});

test("a receiver that does not take its frames stops reading the socket after RECEIVE_QUEUE_BYTES; taking them reads on, every frame whole and in order", async () => {
  const { a, b, close } = await socketPair();
  try {
    const link = new FrameLink(b, "peer", AGENT_FRAMES);
    link.handshakeDone();
    const count = 40, size = 1 << 20;
    let written = 0;
    const sent = (async () => {
      for (let i = 0; i < count; i++) {
        if (!a.write(frameOf(i, size))) await once(a, "drain");
        written++;
      }
    })();
    // the sender fills the socket's buffers, then waits: nothing takes the frames
    await new Promise((r) => setTimeout(r, 400));
    assert.ok(link.bytesIn <= RECEIVE_QUEUE_BYTES + 2 * size, `${link.bytesIn} bytes read with none taken: the queue is not bounded`);
    assert.ok(written < count, "the sender never waited: the socket's buffers took all 40 MiB");
    for (let i = 0; i < count; i++) {
      const f = await link.next(FrameType.Pages, 5000);
      assert.ok(f.payload.length === size && f.payload[0] === i && f.payload[size - 1] === i, `frame ${i} arrived altered or out of order`);
    }
    await sent;
    assert.equal(written, count);
    link.destroy();
  } finally {
    close();
  }
});

test("FrameBuffers: a buffer given back is taken again; sizes outside half..capacity and foreign buffers are not pooled", () => {
  const pool = new FrameBuffers(1000, 2);
  const x = pool.take(900);
  assert.equal(x.length, 900);
  pool.give(x.subarray(10, 20)); // a view of it counts as the buffer
  assert.equal(pool.spareCount, 1);
  pool.give(x); // given twice: kept once
  assert.equal(pool.spareCount, 1);
  const y = pool.take(600);
  assert.equal(y.buffer, x.buffer, "the spare buffer was not used again");
  assert.equal(y.length, 600);
  assert.equal(pool.spareCount, 0);
  pool.give(Buffer.alloc(1000)); // not the pool's
  pool.give(pool.take(400)); // too small for the pool: a buffer of its own
  pool.give(pool.take(1001)); // too large
  assert.equal(pool.spareCount, 0);
  for (const b of [pool.take(1000), pool.take(1000), pool.take(1000)]) pool.give(b);
  assert.equal(pool.spareCount, 2, "more kept than `keep`");
});

test("FrameReader joins a frame split across chunks in its alloc's buffer, and a buffer refilled after its frame was read does not touch later frames", () => {
  const pool = new FrameBuffers(300_000, 4);
  let taken = 0;
  const reader = new FrameReader({ ...AGENT_FRAMES, alloc: (n) => { taken++; return pool.take(n); } });
  const wire = Buffer.concat([0, 1, 2, 3].map((i) => frameOf(i, 200_000)));
  const seen: number[] = [];
  for (let at = 0; at < wire.length; at += 65_536) {
    for (const f of reader.push(wire.subarray(at, at + 65_536))) {
      assert.ok(f.payload.length === 200_000 && f.payload.every((x) => x === seen.length), `frame ${seen.length} altered`);
      seen.push(seen.length);
      pool.give(f.payload);
      f.payload.fill(0xee); // the next frame may be joined in this very buffer: it must not see this
    }
  }
  assert.deepEqual(seen, [0, 1, 2, 3]);
  assert.equal(taken, 4, "every frame spans chunks here: each is joined in the alloc's buffer");
});
