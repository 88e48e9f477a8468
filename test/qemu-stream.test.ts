// The QEMU stream parser's RAM block list (MEM_SIZE record): read entry by
// entry, never held back whole, and capped.
import { test } from "node:test";
import assert from "node:assert/strict";
import { BLOCK_LIST_MAX, QemuStreamParser, RAM_FLAG, SEC, type Piece } from "../src/stream/qemu-stream.js";

const PAGE = 4096;

function be32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; }
function be64(n: number): Buffer { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; }
function str8(s: string): Buffer { return Buffer.concat([Buffer.from([s.length]), Buffer.from(s, "latin1")]); }

/** Stream header, then the RAM START section up to its first record. */
function ramStart(): Buffer {
  return Buffer.concat([Buffer.from("QEVM"), be32(3), Buffer.from([0x01]), be32(2), str8("ram"), be32(0), be32(4)]);
}

/** `count` block list entries of one page each, named blk0, blk1, ... */
function entries(count: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < count; i++) parts.push(str8(`blk${i}`), be64(PAGE));
  return Buffer.concat(parts);
}

function reassemble(pieces: Piece[]): Buffer {
  return Buffer.concat(pieces.flatMap((p) => (p.kind === "raw" ? [p.data] : [p.header, p.data])));
}

/** Feeds `data` in pieces of `step` bytes; returns the pieces and the most bytes ever held back. */
function feed(parser: QemuStreamParser, data: Buffer, step: number): { pieces: Piece[]; maxPending: number } {
  const pieces: Piece[] = [];
  let maxPending = 0;
  for (let i = 0; i < data.length; i += step) {
    pieces.push(...parser.push(data.subarray(i, i + step)));
    maxPending = Math.max(maxPending, parser.pending);
  }
  parser.finish();
  return { pieces, maxPending };
}

test("a block list that never adds up is not held back: the parser passes through past the cap", () => {
  const chunk = 64 * 1024;
  const list = entries(Math.ceil((4 << 20) / 17)); // about 4 MiB of entries
  // Announces far more RAM than the entries will ever cover.
  const data = Buffer.concat([ramStart(), be64(2 ** 40 + RAM_FLAG.MEM_SIZE), list]);
  const p = new QemuStreamParser();
  const { pieces, maxPending } = feed(p, data, chunk);
  assert.ok(maxPending <= BLOCK_LIST_MAX + chunk, `held back ${maxPending} bytes`);
  assert.equal(p.mode, "passthrough");
  assert.match(p.passthroughReason ?? "", /block list longer than/);
  assert.equal(p.takeWarnings().length, 1);
  assert.ok(reassemble(pieces).equals(data));
});

test("a long block list split anywhere is read entry by entry and its blocks are known afterwards", () => {
  const count = 2000;
  const list = entries(count);
  assert.ok(list.length < BLOCK_LIST_MAX);
  const page = Buffer.alloc(PAGE, 0x5a);
  const data = Buffer.concat([
    ramStart(), be64(count * PAGE + RAM_FLAG.MEM_SIZE), list,
    be64(0 + RAM_FLAG.PAGE), str8(`blk${count - 1}`), page,
  ]);
  for (const step of [1, 7, 300, 8192, data.length]) {
    const p = new QemuStreamParser();
    const { pieces, maxPending } = feed(p, data, step);
    assert.ok(maxPending <= PAGE + 8 + 16, `step ${step}: held back ${maxPending} bytes`);
    assert.equal(p.mode, "parsing", p.passthroughReason);
    const pages = pieces.filter((x) => x.kind === "page");
    assert.deepEqual(pages.map((x) => x.kind === "page" && [x.block, x.offset]), [[`blk${count - 1}`, 0]], `step ${step}`);
    assert.ok(reassemble(pieces).equals(data), `step ${step}`);
  }
});

test("a block list that adds up but is longer than the cap passes through with the bytes unchanged", () => {
  const count = Math.ceil(BLOCK_LIST_MAX / 13) + 10; // entries are 13 to 16 bytes
  const data = Buffer.concat([ramStart(), be64(count * PAGE + RAM_FLAG.MEM_SIZE), entries(count), Buffer.alloc(5000, 1)]); // then bytes it must not read
  const p = new QemuStreamParser();
  const { pieces } = feed(p, data, 4096);
  assert.equal(p.mode, "passthrough");
  assert.match(p.passthroughReason ?? "", /block list longer than/);
  assert.ok(reassemble(pieces).equals(data));
});

test("a block entry too big for what is left of the announced size is still a format error", () => {
  const data = Buffer.concat([ramStart(), be64(PAGE + RAM_FLAG.MEM_SIZE), str8("a"), be64(2 * PAGE)]);
  assert.throws(() => feed(new QemuStreamParser(), data, 5), /RAM block "a" of 8192 bytes does not fit the 4096 bytes announced/);
});

test("a parser whose input buffer is reused after each push keeps a copy of the record it holds back", async () => {
  const { qemuStream } = await import("./helpers/stream.js");
  const pages = Buffer.alloc(200 * PAGE);
  for (let i = 0; i < pages.length; i += 64) pages.writeUInt32LE((i * 2654435761) >>> 0, i);
  const stream = qemuStream(pages);
  for (const step of [1000, 4097, 65536]) {
    const p = new QemuStreamParser({ reuseBridges: true });
    p.inputReused = true;
    const read = Buffer.alloc(step);
    const out: Buffer[] = [];
    for (let i = 0; i < stream.length; i += step) {
      const n = Math.min(step, stream.length - i);
      stream.copy(read, 0, i, i + n);
      // the pieces are used before the next read, as stream-out does
      out.push(reassemble(p.push(read.subarray(0, n))));
      read.fill(0xee);
    }
    p.finish();
    assert.equal(Buffer.compare(Buffer.concat(out), stream), 0, `reads of ${step} bytes`);
    assert.equal(p.stats.pages, 200);
  }
});

test("the configuration section: the subsections QEMU 7.2 sends are read, split anywhere; what the parser cannot rewrite passes through, named", () => {
  const sub = (name: string, body: Buffer) => Buffer.concat([Buffer.from([SEC.SUBSECTION]), str8(name), be32(1), body]);
  const config = (...subs: Buffer[]) => Buffer.concat([Buffer.from("QEVM"), be32(3), Buffer.from([SEC.CONFIGURATION]), be32(13), Buffer.from("pc-i440fx-7.2"), ...subs]);
  const page = Buffer.alloc(PAGE, 0x42);
  const ram = Buffer.concat([Buffer.from([0x01]), be32(2), str8("ram"), be32(0), be32(4), be64(PAGE + RAM_FLAG.MEM_SIZE), str8("pc.ram"), be64(PAGE), be64(RAM_FLAG.PAGE), str8("pc.ram"), page]);
  const caps = (...names: string[]) => Buffer.concat([be32(names.length), ...names.map(str8)]);
  const known = Buffer.concat([config(sub("configuration/target-page-bits", be32(12)), sub("configuration/capabilities", caps()), sub("configuration/uuid", Buffer.alloc(16, 9))), ram]);
  for (const step of [1, 3, 17, known.length]) {
    const p = new QemuStreamParser();
    const { pieces } = feed(p, known, step);
    assert.equal(p.mode, "parsing", `step ${step}: ${p.passthroughReason}`);
    assert.equal(pieces.filter((x) => x.kind === "page").length, 1, `step ${step}`);
    assert.ok(reassemble(pieces).equals(known));
  }
  const cases: [Buffer, RegExp][] = [
    [sub("configuration/target-page-bits", be32(16)), /target page size 2\^16/],
    [sub("configuration/capabilities", caps("x-ignore-shared", "validate-uuid")), /migration capabilities x-ignore-shared, validate-uuid in use/],
    [sub("configuration/future", be32(0)), /unknown configuration subsection "configuration\/future"/],
  ];
  for (const [s, why] of cases) {
    for (const step of [1, 5, 4096]) {
      const data = Buffer.concat([config(s), ram]);
      const p = new QemuStreamParser();
      const { pieces } = feed(p, data, step);
      assert.equal(p.mode, "passthrough");
      assert.match(p.passthroughReason ?? "", why);
      assert.equal(pieces.filter((x) => x.kind === "page").length, 0);
      assert.ok(reassemble(pieces).equals(data), "passthrough hands on every byte as it came");
    }
  }
});

test("postcopy-ram's ADVISE before the RAM section leaves the pre-copy rewritten; RAM in bigger pages, and postcopy itself, pass through, named", () => {
  const head = Buffer.concat([Buffer.from("QEVM"), be32(3), Buffer.from([SEC.CONFIGURATION]), be32(13), Buffer.from("pc-i440fx-7.2")]);
  const command = (cmd: number, data: Buffer) => { const b = Buffer.alloc(5); b[0] = SEC.COMMAND; b.writeUInt16BE(cmd, 1); b.writeUInt16BE(data.length, 3); return Buffer.concat([b, data]); };
  const advise = (summary: number) => command(3, Buffer.concat([be64(summary), be64(PAGE)]));
  const page = Buffer.alloc(PAGE, 0x42);
  const ram = Buffer.concat([Buffer.from([0x01]), be32(2), str8("ram"), be32(0), be32(4), be64(2 * PAGE + RAM_FLAG.MEM_SIZE), str8("pc.ram"), be64(2 * PAGE),
    be64(RAM_FLAG.PAGE), str8("pc.ram"), page, be64(RAM_FLAG.EOS), Buffer.from([SEC.FOOTER]), be32(2)]);
  const part = Buffer.concat([Buffer.from([SEC.PART]), be32(2), be64(PAGE + RAM_FLAG.PAGE + RAM_FLAG.CONTINUE), page, be64(RAM_FLAG.EOS), Buffer.from([SEC.FOOTER]), be32(2)]);
  const cases: [string, Buffer, number, RegExp | null][] = [
    ["ADVISE (4 KiB pages), pre-copy to the end", Buffer.concat([head, command(1, Buffer.alloc(0)), advise(PAGE), ram, part]), 2, null],
    ["ADVISE without data (dirty bitmaps only)", Buffer.concat([head, command(3, Buffer.alloc(0)), ram, part]), 2, null],
    ["ADVISE with 2 MiB pages in some block", Buffer.concat([head, advise(PAGE | (2 << 20)), ram, part]), 0, /postcopy with RAM in pages of 0x201000 bytes/],
    ["postcopy starting after a pre-copy pass", Buffer.concat([head, advise(PAGE), ram, command(4, Buffer.alloc(0)), part]), 1, /migration command POSTCOPY_LISTEN/],
  ];
  for (const [what, data, pages, why] of cases) {
    for (const step of [1, 6, 4099, data.length]) {
      const p = new QemuStreamParser();
      const { pieces } = feed(p, data, step);
      assert.equal(pieces.filter((x) => x.kind === "page").length, pages, `${what}, step ${step}`);
      if (why) assert.match(p.passthroughReason ?? "", why, what);
      else assert.equal(p.mode, "parsing", `${what}: ${p.passthroughReason}`);
      assert.ok(reassemble(pieces).equals(data), `${what}: every byte handed on as it came`);
    }
  }
});

test("XBZRLE records (the xbzrle capability, libvirt's --compressed) go on raw and the pages after them are still handed out; a bad one is a format error", () => {
  const page = Buffer.alloc(PAGE, 0x42);
  const start = Buffer.concat([ramStart(), be64(2 * PAGE + RAM_FLAG.MEM_SIZE), str8("pc.ram"), be64(2 * PAGE), be64(RAM_FLAG.PAGE), str8("pc.ram"), page,
    be64(RAM_FLAG.EOS), Buffer.from([SEC.FOOTER]), be32(2)]);
  const delta = (encoding: number, len: number) => Buffer.concat([be64(RAM_FLAG.XBZRLE + RAM_FLAG.CONTINUE), Buffer.from([encoding]), Buffer.from([len >> 8, len & 0xff]), Buffer.alloc(len, 7)]);
  const part = (rec: Buffer) => Buffer.concat([Buffer.from([SEC.PART]), be32(2), rec, be64(PAGE + RAM_FLAG.PAGE + RAM_FLAG.CONTINUE), page,
    be64(RAM_FLAG.EOS), Buffer.from([SEC.FOOTER]), be32(2)]);
  const data = Buffer.concat([start, part(delta(1, 10)), part(delta(1, PAGE))]);
  for (const step of [1, 7, 4100, data.length]) {
    const p = new QemuStreamParser();
    const { pieces } = feed(p, data, step);
    assert.equal(p.mode, "parsing", `step ${step}: ${p.passthroughReason}`);
    assert.equal(pieces.filter((x) => x.kind === "page").length, 3, `step ${step}`);
    assert.equal(p.stats.xbzrlePages, 2);
    assert.ok(reassemble(pieces).equals(data), `step ${step}: every byte handed on as it came`);
  }
  for (const [bad, why] of [[delta(2, 10), /XBZRLE record with encoding 2/], [delta(1, PAGE + 1), /4097 bytes of delta/]] as const) {
    assert.throws(() => feed(new QemuStreamParser(), Buffer.concat([start, part(bad)]), 4096), why);
  }
});
