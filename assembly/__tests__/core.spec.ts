const ZERO_SEED0 = "3ee8dc4f9e7ee49593d76fe148c689ba";
const PATTERN_SEED0 = "1546867423105cd5d7428746842be37e";
const PATTERN_SEED42 = "e2b776fcaa1da60d48590469274a04ac";
import { hashPages, alloc, setSeed, bitsCombine, bitsPopcount, bitsExtract, bitsDiff,
  copyRecordsMasked, indexCreate, indexSetBlocks, indexLookup, indexCount, zeroHashPtr,
  indexLoad, indexReserve, indexBlocks, indexHashesPtr } from "../index";

// Reference digests from the xxHash reference (via hash-wasm's xxhash128) for
// a page whose byte i is (i * 7 + 3) & 0xff, and for the zero page.
function patternPage(p: usize): void {
  for (let i: usize = 0; i < 4096; i++) store<u8>(p + i, <u8>((i * 7 + 3) & 0xff));
}

function hex(p: usize, n: usize): string {
  let s = "";
  for (let i: usize = 0; i < n; i++) {
    const b = load<u8>(p + i);
    s += (b < 16 ? "0" : "") + b.toString(16);
  }
  return s;
}

describe("xxh3-128 of a 4 KiB page", () => {
  it("matches the reference for the zero page, seed 0", () => {
    setSeed(0);
    const p = alloc(4096);
    memory.fill(p, 0, 4096);
    const out = alloc(16);
    expect(hashPages(p, 1, out, 0)).toBe(1, "one zero page");
    expect(hex(out, 16)).toBe(ZERO_SEED0);
  });
  it("matches the reference for a pattern page, seed 0 and seed 42", () => {
    const p = alloc(4096);
    patternPage(p);
    const out = alloc(16);
    setSeed(0);
    expect(hashPages(p, 1, out, 0)).toBe(0);
    expect(hex(out, 16)).toBe(PATTERN_SEED0);
    setSeed(42);
    hashPages(p, 1, out, 0);
    expect(hex(out, 16)).toBe(PATTERN_SEED42);
    setSeed(0);
  });
  it("sets zero bits per page", () => {
    const p = alloc(4096 * 3);
    memory.fill(p, 0, 4096 * 3);
    store<u8>(p + 4096 + 4095, 1);
    const out = alloc(48);
    const bits = alloc(8);
    store<u64>(bits, 0);
    expect(hashPages(p, 3, out, bits)).toBe(2);
    expect(load<u8>(bits)).toBe(0b101);
  });
});

describe("bit vectors", () => {
  it("combines, counts and extracts, keeping bits past the end", () => {
    const a = alloc(16), b = alloc(16), o = alloc(16);
    store<u64>(a, 0xF0F0); store<u64>(a, 0, 8);
    store<u64>(b, 0xFF00); store<u64>(b, 0, 8);
    store<u64>(o, 0xFFFFFFFFFFFFFFFF); store<u64>(o, 0, 8);
    bitsCombine(1, o, a, b, 12); // and-not on the low 12 bits only
    expect(load<u64>(o)).toBe(0xFFFFFFFFFFFFF0F0 & ~(<u64>0xF00) | 0x000);
    expect(bitsPopcount(a, 64)).toBe(8);
    const list = alloc(64);
    expect(bitsExtract(a, 16, list, 100)).toBe(8);
    expect(load<u32>(list)).toBe(104);
    expect(load<u32>(list, 28)).toBe(115);
  });
  it("diffs 16-byte records and copies under a mask", () => {
    const a = alloc(48), b = alloc(48), bits = alloc(8);
    memory.fill(a, 1, 48); memory.fill(b, 1, 48);
    store<u8>(b + 16 + 15, 9);
    store<u64>(bits, 0);
    expect(bitsDiff(bits, a, b, 3)).toBe(1);
    expect(load<u8>(bits)).toBe(0b010);
    copyRecordsMasked(b, a, bits, 3);
    expect(bitsDiff(bits, a, b, 3)).toBe(0);
  });
});

describe("twin index", () => {
  it("inserts, grows, finds, updates and forgets", () => {
    setSeed(0);
    const idx = indexCreate(4, zeroHashPtr());
    const n: u32 = 1000;
    const hs = alloc(16 * n);
    for (let i: u32 = 0; i < n; i++) {
      store<u64>(hs + 16 * i, <u64>i * 0x9E3779B97F4A7C15);
      store<u64>(hs + 16 * i, <u64>i, 8);
    }
    indexSetBlocks(idx, hs, 0, n);
    expect(indexCount(idx)).toBe(n);
    const blocks = alloc(4 * n);
    expect(indexLookup(idx, hs, n, 0, blocks, 0)).toBe(n);
    expect(load<u32>(blocks + 4 * 777)).toBe(777);
    // block 5 gets new content: its old hash is gone, the new one maps to 5
    const nh = alloc(16);
    store<u64>(nh, 0x1234); store<u64>(nh, 0x5678, 8);
    indexSetBlocks(idx, nh, 5, 1);
    expect(indexLookup(idx, hs + 16 * 5, 1, 0, blocks, 0)).toBe(0);
    expect(load<u32>(blocks)).toBe(0xFFFFFFFF);
    expect(indexLookup(idx, nh, 1, 0, blocks, 0)).toBe(1);
    expect(load<u32>(blocks)).toBe(5);
    expect(indexLookup(idx, hs + 16 * 6, 1, 0, blocks, 0)).toBe(1);
  });
});

// n hashes, every 7th a copy of an earlier one, every 11th the zero page's hash
function someHashes(n: u32): usize {
  const hs = alloc(16 * n);
  for (let i: u32 = 0; i < n; i++) {
    const src = i % 7 == 6 ? i / 3 : i;
    store<u64>(hs + 16 * i, <u64>src * 0x9E3779B97F4A7C15 + 1);
    store<u64>(hs + 16 * i, <u64>src ^ 0xABCDEF, 8);
    if (i % 11 == 10) memory.copy(hs + 16 * i, zeroHashPtr(), 16);
  }
  return hs;
}

describe("twin index bulk load", () => {
  it("answers every lookup as block-by-block inserts do, duplicates and zero pages included", () => {
    setSeed(0);
    const n: u32 = 5000;
    const hs = someHashes(n);
    const one = indexCreate(n, zeroHashPtr());
    indexSetBlocks(one, hs, 0, n);
    const bulk = indexCreate(n, zeroHashPtr());
    indexLoad(bulk, hs, n);
    expect(indexCount(bulk)).toBe(indexCount(one));
    expect(indexBlocks(bulk)).toBe(n);
    const a = alloc(4 * n), b = alloc(4 * n), bitsA = alloc(n / 8 + 8), bitsB = alloc(n / 8 + 8);
    expect(indexLookup(bulk, hs, n, 0, b, bitsB)).toBe(indexLookup(one, hs, n, 0, a, bitsA));
    for (let i: u32 = 0; i < n; i++) expect(load<u32>(b + 4 * i)).toBe(load<u32>(a + 4 * i));
    // a copy maps to the first block of its content; the zero page is never indexed
    expect(load<u32>(b + 4 * 6)).toBe(2);
    expect(load<u32>(b + 4 * 10)).toBe(0xFFFFFFFF);
  });
  it("loads from its own records and grows a table reserved too small", () => {
    setSeed(0);
    const n: u32 = 20000;
    const hs = someHashes(n);
    const idx = indexCreate(4, zeroHashPtr());
    const recs = indexReserve(idx, n);
    expect(recs).toBe(indexHashesPtr(idx));
    memory.copy(recs, hs, 16 * n);
    indexLoad(idx, recs, n);
    const out = alloc(4 * n);
    indexLookup(idx, hs, n, 0, out, 0);
    expect(load<u32>(out + 4 * 19999)).toBe(19999);
    expect(load<u32>(out + 4 * 13)).toBe(4); // 13 % 7 == 6: a copy of block 13 / 3
    // the records stay the block's: an update finds and drops the old entry
    const nh = alloc(16);
    store<u64>(nh, 77); store<u64>(nh, 88, 8);
    indexSetBlocks(idx, nh, 19999, 1);
    expect(indexLookup(idx, hs + 16 * 19999, 1, 0, out, 0)).toBe(0);
    expect(indexLookup(idx, nh, 1, 0, out, 0)).toBe(1);
    expect(load<u32>(out)).toBe(19999);
  });
  it("adds to an index that has blocks as indexSetBlocks does", () => {
    setSeed(0);
    const hs = someHashes(100);
    const idx = indexCreate(100, zeroHashPtr());
    indexSetBlocks(idx, hs + 16 * 50, 50, 50);
    indexLoad(idx, hs, 100);
    const out = alloc(400);
    indexLookup(idx, hs, 100, 0, out, 0);
    expect(load<u32>(out + 4 * 99)).toBe(99);
    expect(load<u32>(out + 4 * 1)).toBe(1);
  });
});
