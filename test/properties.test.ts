// Property tests (fast-check): the frame decoder against arbitrary splits and
// corruption, the decoders against arbitrary payloads, the block index
// against a model under arbitrary update sequences.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { FrameType, decodePages, decodeRefs, decodePageList, decodeIterAck, AGENT_FRAMES } from "../src/agent/protocol.js";
import { FrameReader, ProtocolError, frame } from "../src/wire/envelope.js";
import { createEngine, NO_BLOCK } from "../src/index.js";

const frameArb = fc.record({
  type: fc.constantFrom(...Object.values(FrameType).filter((v): v is FrameType => typeof v === "number")),
  payload: fc.uint8Array({ maxLength: 3000 }),
});

test("any frames, split anywhere, come out whole, equal and in order", () => {
  fc.assert(fc.property(fc.array(frameArb, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 10 }), (frames, cuts) => {
    const bytes = Buffer.concat(frames.map((f) => frame(f.type, f.payload)));
    const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
    const r = new FrameReader(AGENT_FRAMES);
    const out = [];
    let prev = 0;
    for (const p of [...points, bytes.length]) { out.push(...r.push(bytes.subarray(prev, p))); prev = p; }
    assert.equal(out.length, frames.length);
    out.forEach((f, i) => { assert.equal(f.type, frames[i]!.type); assert.deepEqual(new Uint8Array(f.payload), frames[i]!.payload); });
  }), { numRuns: 300 });
});

test("a reader whose chunks are overwritten after each push (a reused read buffer) gives every frame whole, in its alloc's memory", () => {
  fc.assert(fc.property(fc.array(frameArb, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 10 }), (frames, cuts) => {
    const bytes = Buffer.concat(frames.map((f) => frame(f.type, f.payload)));
    const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
    const types: number[] = [];
    const r = new FrameReader({ ...AGENT_FRAMES, inputReused: true, alloc: (n, type) => { types.push(type); return Buffer.allocUnsafe(n); } });
    const read = Buffer.allocUnsafeSlow(bytes.length); // its own memory (not the shared pool alloc draws from)
    const out = [];
    let prev = 0;
    for (const p of [...points, bytes.length]) {
      const chunk = read.subarray(0, p - prev);
      bytes.copy(chunk, 0, prev, p);
      for (const f of r.push(chunk)) { assert.ok(f.mem && f.mem.buffer !== read.buffer && f.payload.buffer === f.mem.buffer); out.push(f); }
      chunk.fill(0xa5); // the next read lands here
      prev = p;
    }
    assert.equal(out.length, frames.length);
    assert.deepEqual(types, frames.map((f) => f.type), "alloc is told each frame's type");
    out.forEach((f, i) => { assert.equal(f.type, frames[i]!.type); assert.deepEqual(new Uint8Array(f.payload), frames[i]!.payload); });
    assert.equal(r.pending, 0);
  }), { numRuns: 300 });
});

test("a flipped bit anywhere never yields a frame that differs from what was sent", () => {
  fc.assert(fc.property(fc.array(frameArb, { minLength: 1, maxLength: 5 }), fc.nat(), fc.nat(7), (frames, at, bit) => {
    const enc = frames.map((f) => frame(f.type, f.payload));
    const bytes = Buffer.concat(enc);
    bytes[at % bytes.length]! ^= 1 << bit;
    const r = new FrameReader(AGENT_FRAMES);
    let out;
    try {
      out = r.push(bytes);
    } catch (err) {
      assert.ok(err instanceof ProtocolError, `${(err as Error).name}: ${(err as Error).message}`);
      return;
    }
    // no error: only the frames before the flip came out (the flip made a length that waits for more)
    out.forEach((f, i) => { assert.equal(f.type, frames[i]!.type); assert.deepEqual(new Uint8Array(f.payload), frames[i]!.payload); });
    assert.ok(out.length < frames.length);
  }), { numRuns: 500 });
});

test("decoders given arbitrary payloads return in-bounds entries or a ProtocolError, nothing else", () => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), fc.integer({ min: 1, max: 1 << 20 }), (payload, max) => {
    for (const [type, decode] of [
      [FrameType.Pages, (f: { type: FrameType; payload: Buffer }) => decodePages(f, max).pages],
      [FrameType.Refs, (f: { type: FrameType; payload: Buffer }) => decodeRefs(f, max, max).pages],
      [FrameType.Zeros, (f: { type: FrameType; payload: Buffer }) => decodePageList(f, max, "Zeros")],
      [FrameType.IterAck, (f: { type: FrameType; payload: Buffer }) => decodeIterAck(f, max).resend],
    ] as const) {
      try {
        const pages = decode({ type, payload: Buffer.from(payload) });
        for (const p of pages) assert.ok(p < max);
      } catch (err) {
        assert.ok(err instanceof ProtocolError, `${FrameType[type]}: ${(err as Error).message}`);
      }
    }
  }), { numRuns: 500 });
});

test("the block index against a model: every answer is right, and no indexed unique content is missed", async () => {
  const engine = await createEngine({ seed: 1n });
  const zero = engine.zeroPageHash();
  const hashOf = (k: number) => { const h = new Uint8Array(16); new DataView(h.buffer).setUint32(0, k * 2654435761); new DataView(h.buffer).setUint32(12, k); return h; };
  await fc.assert(fc.asyncProperty(
    fc.array(fc.record({ block: fc.nat(199), content: fc.nat(60) }), { maxLength: 400 }),
    fc.boolean(),
    async (ops, unique) => {
      const idx = engine.createIndex(16);
      const model = new Map<number, number>(); // block -> content
      let next = 1000;
      for (const op of ops) {
        const content = unique ? next++ : op.content; // unique: every content is set once, never shared
        model.set(op.block, content);
        idx.setBlocks(content === 0 ? zero : hashOf(content), op.block);
      }
      const contents = [...new Set([...model.values(), 0, 1, 2, 3])];
      const q = new Uint8Array(contents.length * 16);
      contents.forEach((c, i) => q.set(c === 0 ? zero : hashOf(c), i * 16));
      const got = idx.lookup(q);
      contents.forEach((c, i) => {
        const holders = [...model].filter(([, x]) => x === c).map(([b]) => b);
        if (got[i] !== NO_BLOCK) assert.ok(holders.includes(got[i]!), `content ${c} -> block ${got[i]}, which holds ${model.get(got[i]!)}`);
        if (c === 0) assert.equal(got[i], NO_BLOCK, "zero is never indexed");
        else if (unique && holders.length === 1) assert.equal(got[i], holders[0], `unique content ${c} found`);
      });
      idx.free();
    },
  ), { numRuns: 200 });
});
