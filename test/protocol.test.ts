import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { FrameType, encodePages, encodeRefs, encodePageList, encodeIterAck, decodePages, decodeRefs, decodePageList, decodeIterAck, MAX_FRAME, MAX_REFS, AGENT_FRAMES } from "../src/agent/protocol.js";
import { FrameReader, ProtocolError, frame, jsonFrame, parseJson, seal } from "../src/wire/envelope.js";
import { crc32 } from "node:zlib";

function sampleStream(): { bytes: Buffer; frames: Buffer[] } {
  const pages = [3, 7, 8];
  const data = pages.map(() => new Uint8Array(randomBytes(4096)));
  const frames = [
    jsonFrame(FrameType.Hello, { version: 1, pages: 100 }),
    encodePages(pages, (i) => data[i]!),
    encodeRefs([1, 2], [10, 20], (i) => new Uint8Array(16).fill(i + 1)),
    encodePageList(FrameType.Zeros, [5, 6, 99]),
    encodeIterAck(4, [1]),
  ];
  return { bytes: Buffer.concat(frames), frames };
}

test("frames split at every possible point come out whole and in order", () => {
  const { bytes, frames } = sampleStream();
  for (let cut = 1; cut < bytes.length; cut += 97) {
    const r = new FrameReader(AGENT_FRAMES);
    const out = [...r.push(bytes.subarray(0, cut)), ...r.push(bytes.subarray(cut))];
    assert.equal(out.length, frames.length);
    out.forEach((f, i) => assert.deepEqual(Buffer.from(f.payload), frames[i]!.subarray(5, frames[i]!.length - 4)));
    assert.equal(r.pending, 0);
  }
  // and byte by byte, in random chunk sizes
  const r = new FrameReader(AGENT_FRAMES);
  const out = [];
  for (let o = 0; o < bytes.length; ) {
    const n = randomInt(1, 300);
    out.push(...r.push(bytes.subarray(o, o + n)));
    o += n;
  }
  assert.equal(out.length, frames.length);
});

test("payloads decode to what was encoded, and bounds are enforced", () => {
  const { frames } = sampleStream();
  const r = new FrameReader(AGENT_FRAMES);
  const [hello, pages, refs, zeros, ack] = r.push(Buffer.concat(frames));
  assert.deepEqual(parseJson(hello!), { version: 1, pages: 100 });
  assert.deepEqual(Array.from(decodePages(pages!, 100).pages), [3, 7, 8]);
  assert.throws(() => decodePages(pages!, 8), /page 8, past the VM's 8 pages/);
  const d = decodeRefs(refs!, 100, 21);
  assert.deepEqual(Array.from(d.blocks), [10, 20]);
  assert.throws(() => decodeRefs(refs!, 100, 20), /block 20, past the image's 20 blocks/);
  // at most MAX_REFS (4096) references a frame: what the destination's verifier has slots for
  const refsOf = (n: number) => new FrameReader(AGENT_FRAMES).push(encodeRefs(new Uint32Array(n), new Uint32Array(n), () => new Uint8Array(16)))[0]!;
  assert.equal(decodeRefs(refsOf(MAX_REFS), 1, 1).pages.length, MAX_REFS);
  assert.throws(() => decodeRefs(refsOf(MAX_REFS + 1), 1, 1), (e: Error) => e instanceof ProtocolError && /4097 references; at most 4096/.test(e.message));
  assert.deepEqual(Array.from(decodePageList(zeros!, 100, "Zeros")), [5, 6, 99]);
  assert.deepEqual(decodeIterAck(ack!, 100), { iteration: 4, resend: Uint32Array.from([1]) });
});

test("corrupt frames get clear errors: bad length, unknown type, count that lies, truncated JSON, flipped bits", () => {
  const big = Buffer.alloc(9);
  big.writeUInt32BE(MAX_FRAME + 1, 0);
  assert.throws(() => new FrameReader(AGENT_FRAMES).push(big), /frame length .* outside/);
  const zero = Buffer.alloc(9);
  assert.throws(() => new FrameReader(AGENT_FRAMES).push(zero), /frame length 0/);
  assert.throws(() => new FrameReader(AGENT_FRAMES).push(frame(77 as FrameType, new Uint8Array(3))), /unknown frame type 77/);
  const payload = Buffer.alloc(4 + 4 + 4096);
  payload.writeUInt32BE(2, 0); // says two pages, holds one
  const [f] = new FrameReader(AGENT_FRAMES).push(frame(FrameType.Pages, payload));
  assert.throws(() => decodePages(f!, 10), (e: Error) => e instanceof ProtocolError && /says 2 entries/.test(e.message));
  const [j] = new FrameReader(AGENT_FRAMES).push(frame(FrameType.Hello, Buffer.from('{"a":')));
  assert.throws(() => parseJson(j!), /does not hold a JSON object/);
  // any flipped bit in type, payload or trailer is caught by the CRC
  const pages = encodePages([1], () => new Uint8Array(randomBytes(4096)));
  for (const at of [4, 5, 9, 100, 4000, pages.length - 1]) {
    const b = Buffer.from(pages);
    b[at] ^= 1 << randomInt(8);
    assert.throws(() => new FrameReader(AGENT_FRAMES).push(b), /fails its CRC-32|unknown frame type/);
  }
});

test("a frame sealed without its CRC (agreed inside TLS) is read only by a reader told so; seal() writes the CRC by default", () => {
  const f = seal(Buffer.from([0, 0, 0, 0, FrameType.Hello, 1, 2, 3, 0, 0, 0, 0]), false);
  assert.equal(f.readUInt32BE(f.length - 4), 0);
  assert.throws(() => new FrameReader(AGENT_FRAMES).push(f), /fails its CRC-32/);
  const r = new FrameReader(AGENT_FRAMES);
  r.handshakeDone({ crc: false });
  const [got] = r.push(f);
  assert.deepEqual([...got!.payload], [1, 2, 3]);
  const sealed = seal(Buffer.from(f));
  assert.equal(sealed.readUInt32BE(sealed.length - 4), crc32(sealed.subarray(4, sealed.length - 4)));
  const checking = new FrameReader(AGENT_FRAMES);
  checking.handshakeDone();
  assert.equal(checking.push(sealed).length, 1);
  assert.throws(() => checking.push(f), /fails its CRC-32/);
});

test("a flipped length bit never yields a frame past the bound", () => {
  const { bytes } = sampleStream();
  for (let bit = 0; bit < 32; bit++) {
    const b = Buffer.from(bytes);
    b.writeUInt32BE((b.readUInt32BE(0) ^ (1 << bit)) >>> 0, 0);
    const r = new FrameReader(AGENT_FRAMES);
    try {
      for (const f of r.push(b)) assert.ok(f.payload.length <= MAX_FRAME);
    } catch (err) {
      assert.ok(err instanceof ProtocolError);
    }
  }
});
