// XXH3-128 of exactly one 4096-byte page, bit-exact with the reference xxHash
// (long-input path: 3 blocks of 16 stripes, one partial block of 15 stripes,
// the last stripe, then the 128-bit merge). Output is the canonical form:
// big-endian high 64 bits, then big-endian low 64 bits.

export const PAGE_SIZE: u32 = 4096;
export const HASH_SIZE: u32 = 16;

const SECRET_SIZE: usize = 192;
const PRIME32_1: u64 = 0x9E3779B1;
const PRIME32_2: u64 = 0x85EBCA77;
const PRIME32_3: u64 = 0xC2B2AE3D;
const PRIME64_1: u64 = 0x9E3779B185EBCA87;
const PRIME64_2: u64 = 0xC2B2AE3D27D4EB4F;
const PRIME64_3: u64 = 0x165667B19E3779F9;
const PRIME64_4: u64 = 0x85EBCA77C2B2AE63;
const PRIME64_5: u64 = 0x27D4EB2F165667C5;
const PRIME_MX1: u64 = 0x165667919E3779F9;

// The reference implementation's default 192-byte secret (kSecret).
const K_SECRET = memory.data<u8>([
  0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
  0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
  0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
  0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
  0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
  0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
  0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
  0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
  0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
  0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
  0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
  0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
], 16);

// The secret derived from the seed (XXH3_initCustomSecret); seed 0 gives kSecret.
const SECRET = memory.data(<i32>SECRET_SIZE, 16);
// The scramble secret (last 64 bytes of SECRET) with each pair of u64 swapped,
// for the SIMD path's swapped accumulator layout.
const SECRET_SW = memory.data(64, 16);
// Canonical hash of the all-zero page under the current seed.
const ZERO_HASH = memory.data(16, 16);
let seedValue: u64 = 0;

export function zeroHashPtr(): usize {
  return ZERO_HASH;
}

export function currentSeed(): u64 {
  return seedValue;
}

export function initSeed(seed: u64): void {
  seedValue = seed;
  for (let i: usize = 0; i < SECRET_SIZE; i += 16) {
    store<u64>(SECRET + i, load<u64>(K_SECRET + i) + seed);
    store<u64>(SECRET + i + 8, load<u64>(K_SECRET + i + 8) - seed);
  }
  for (let i: usize = 0; i < 64; i += 16) {
    store<u64>(SECRET_SW + i, load<u64>(SECRET + SECRET_SIZE - 64 + i + 8));
    store<u64>(SECRET_SW + i + 8, load<u64>(SECRET + SECRET_SIZE - 64 + i));
  }
  const page = heap.alloc(PAGE_SIZE);
  memory.fill(page, 0, PAGE_SIZE);
  hashPage(page, ZERO_HASH);
  heap.free(page);
}

@inline function mulFold64(a: u64, b: u64): u64 {
  const aLo = a & 0xFFFFFFFF, aHi = a >> 32;
  const bLo = b & 0xFFFFFFFF, bHi = b >> 32;
  const lolo = aLo * bLo, hilo = aHi * bLo, lohi = aLo * bHi, hihi = aHi * bHi;
  const cross = (lolo >> 32) + (hilo & 0xFFFFFFFF) + lohi;
  const upper = (hilo >> 32) + (cross >> 32) + hihi;
  const lower = (cross << 32) | (lolo & 0xFFFFFFFF);
  return lower ^ upper;
}

@inline function avalanche(h: u64): u64 {
  h ^= h >> 37;
  h *= PRIME_MX1;
  return h ^ (h >> 32);
}

@inline function mergeAccs(a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64, a7: u64,
                           secret: usize, start: u64): u64 {
  let r = start;
  r += mulFold64(a0 ^ load<u64>(secret), a1 ^ load<u64>(secret + 8));
  r += mulFold64(a2 ^ load<u64>(secret + 16), a3 ^ load<u64>(secret + 24));
  r += mulFold64(a4 ^ load<u64>(secret + 32), a5 ^ load<u64>(secret + 40));
  r += mulFold64(a6 ^ load<u64>(secret + 48), a7 ^ load<u64>(secret + 56));
  return avalanche(r);
}

@inline function finish(a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64, a7: u64,
                        out: usize): void {
  const len: u64 = PAGE_SIZE;
  const low = mergeAccs(a0, a1, a2, a3, a4, a5, a6, a7, SECRET + 11, len * PRIME64_1);
  const high = mergeAccs(a0, a1, a2, a3, a4, a5, a6, a7, SECRET + SECRET_SIZE - 64 - 11, ~(len * PRIME64_2));
  store<u64>(out, bswap<u64>(high));
  store<u64>(out + 8, bswap<u64>(low));
}

// One page, SIMD. The four accumulator vectors hold the eight lanes pairwise
// swapped, a0 = (acc1, acc0), a1 = (acc3, acc2), ...: the `acc[i^1] += data` term then adds the loaded data
// unswapped, and the lo32 * hi32 products come out swapped for free by
// picking the shuffle order. So a stripe costs no lane swap and no extra
// registers (V8 kept spilling when the data sums had accumulators of their own).
// Returns true when the page is all zero.
@inline function hashPageSimd(p: usize, out: usize): bool {
  let a0 = i64x2(<i64>PRIME64_1, <i64>PRIME32_3);
  let a1 = i64x2(<i64>PRIME64_3, <i64>PRIME64_2);
  let a2 = i64x2(<i64>PRIME32_2, <i64>PRIME64_4);
  let a3 = i64x2(<i64>PRIME32_1, <i64>PRIME64_5);
  let any = i64x2.splat(0);
  const prime = i64x2.splat(<i64>PRIME32_1);
  // 4 blocks of 16 stripes. The 4th block's 16th stripe is XXH3's "last
  // stripe": the page's final 64 bytes (the same address here), read with the
  // secret at 192 - 64 - 7 instead of 15 * 8. One stripe per iteration:
  // unrolling two made V8 hoist all 16 loads and spill.
  for (let block: usize = 0; block < 4; block++) {
    const base = p + block * 1024;
    for (let s: usize = 0; s < 16; s++) {
      const ip = base + s * 64;
      const sp = block == 3 && s == 15 ? SECRET + SECRET_SIZE - 64 - 7 : SECRET + s * 8;
      const x0 = v128.load(ip), x1 = v128.load(ip, 16), x2 = v128.load(ip, 32), x3 = v128.load(ip, 48);
      const k0 = v128.xor(x0, v128.load(sp)), k1 = v128.xor(x1, v128.load(sp, 16));
      const k2 = v128.xor(x2, v128.load(sp, 32)), k3 = v128.xor(x3, v128.load(sp, 48));
      const l01 = v128.shuffle<i32>(k0, k1, 2, 0, 6, 4), h01 = v128.shuffle<i32>(k0, k1, 3, 1, 7, 5);
      const l23 = v128.shuffle<i32>(k2, k3, 2, 0, 6, 4), h23 = v128.shuffle<i32>(k2, k3, 3, 1, 7, 5);
      a0 = i64x2.add(a0, i64x2.add(x0, i64x2.extmul_low_i32x4_u(l01, h01)));
      a1 = i64x2.add(a1, i64x2.add(x1, i64x2.extmul_high_i32x4_u(l01, h01)));
      a2 = i64x2.add(a2, i64x2.add(x2, i64x2.extmul_low_i32x4_u(l23, h23)));
      a3 = i64x2.add(a3, i64x2.add(x3, i64x2.extmul_high_i32x4_u(l23, h23)));
      any = v128.or(any, v128.or(v128.or(x0, x1), v128.or(x2, x3)));
    }
    // the scramble works lane by lane; only its secret needs the swapped order
    if (block < 3) {
      a0 = i64x2.mul(v128.xor(v128.xor(a0, i64x2.shr_u(a0, 47)), v128.load(SECRET_SW)), prime);
      a1 = i64x2.mul(v128.xor(v128.xor(a1, i64x2.shr_u(a1, 47)), v128.load(SECRET_SW, 16)), prime);
      a2 = i64x2.mul(v128.xor(v128.xor(a2, i64x2.shr_u(a2, 47)), v128.load(SECRET_SW, 32)), prime);
      a3 = i64x2.mul(v128.xor(v128.xor(a3, i64x2.shr_u(a3, 47)), v128.load(SECRET_SW, 48)), prime);
    }
  }
  finish(
    <u64>i64x2.extract_lane(a0, 1), <u64>i64x2.extract_lane(a0, 0),
    <u64>i64x2.extract_lane(a1, 1), <u64>i64x2.extract_lane(a1, 0),
    <u64>i64x2.extract_lane(a2, 1), <u64>i64x2.extract_lane(a2, 0),
    <u64>i64x2.extract_lane(a3, 1), <u64>i64x2.extract_lane(a3, 0),
    out);
  return !v128.any_true(any);
}

// One page, scalar (no SIMD), same algorithm with eight u64 locals.
@inline function hashPageScalar(p: usize, out: usize): bool {
  let a0 = PRIME32_3, a1 = PRIME64_1, a2 = PRIME64_2, a3 = PRIME64_3;
  let a4 = PRIME64_4, a5 = PRIME32_2, a6 = PRIME64_5, a7 = PRIME32_1;
  let any: u64 = 0;
  for (let block: usize = 0; block < 5; block++) {
    // blocks 0..2: 16 stripes then scramble; block 3: 15 stripes; block 4: the last stripe
    const stripes: usize = block < 3 ? 16 : block == 3 ? 15 : 1;
    for (let s: usize = 0; s < stripes; s++) {
      const ip = block < 4 ? p + block * 1024 + s * 64 : p + PAGE_SIZE - 64;
      const sp = block < 4 ? SECRET + s * 8 : SECRET + SECRET_SIZE - 64 - 7;
      const x0 = load<u64>(ip), x1 = load<u64>(ip, 8), x2 = load<u64>(ip, 16), x3 = load<u64>(ip, 24);
      const x4 = load<u64>(ip, 32), x5 = load<u64>(ip, 40), x6 = load<u64>(ip, 48), x7 = load<u64>(ip, 56);
      const k0 = x0 ^ load<u64>(sp), k1 = x1 ^ load<u64>(sp, 8), k2 = x2 ^ load<u64>(sp, 16), k3 = x3 ^ load<u64>(sp, 24);
      const k4 = x4 ^ load<u64>(sp, 32), k5 = x5 ^ load<u64>(sp, 40), k6 = x6 ^ load<u64>(sp, 48), k7 = x7 ^ load<u64>(sp, 56);
      a0 += x1 + (k0 & 0xFFFFFFFF) * (k0 >> 32);
      a1 += x0 + (k1 & 0xFFFFFFFF) * (k1 >> 32);
      a2 += x3 + (k2 & 0xFFFFFFFF) * (k2 >> 32);
      a3 += x2 + (k3 & 0xFFFFFFFF) * (k3 >> 32);
      a4 += x5 + (k4 & 0xFFFFFFFF) * (k4 >> 32);
      a5 += x4 + (k5 & 0xFFFFFFFF) * (k5 >> 32);
      a6 += x7 + (k6 & 0xFFFFFFFF) * (k6 >> 32);
      a7 += x6 + (k7 & 0xFFFFFFFF) * (k7 >> 32);
      any |= x0 | x1 | x2 | x3 | x4 | x5 | x6 | x7;
    }
    if (block < 3) {
      const kp = SECRET + SECRET_SIZE - 64;
      a0 = ((a0 ^ (a0 >> 47)) ^ load<u64>(kp)) * PRIME32_1;
      a1 = ((a1 ^ (a1 >> 47)) ^ load<u64>(kp, 8)) * PRIME32_1;
      a2 = ((a2 ^ (a2 >> 47)) ^ load<u64>(kp, 16)) * PRIME32_1;
      a3 = ((a3 ^ (a3 >> 47)) ^ load<u64>(kp, 24)) * PRIME32_1;
      a4 = ((a4 ^ (a4 >> 47)) ^ load<u64>(kp, 32)) * PRIME32_1;
      a5 = ((a5 ^ (a5 >> 47)) ^ load<u64>(kp, 40)) * PRIME32_1;
      a6 = ((a6 ^ (a6 >> 47)) ^ load<u64>(kp, 48)) * PRIME32_1;
      a7 = ((a7 ^ (a7 >> 47)) ^ load<u64>(kp, 56)) * PRIME32_1;
    }
  }
  finish(a0, a1, a2, a3, a4, a5, a6, a7, out);
  return any == 0;
}

/** Hash one page at `p` into the 16 bytes at `out`; true when the page is all zero. */
@inline export function hashPage(p: usize, out: usize): bool {
  if (ASC_FEATURE_SIMD) {
    return hashPageSimd(p, out);
  } else {
    return hashPageScalar(p, out);
  }
}
