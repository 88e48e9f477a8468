// Bit vectors with one bit per page: bit i lives in byte i>>3, bit i&7, so a
// vector can be addressed from any page that is a multiple of 8. Full 64-bit
// words are processed at once; a partial last word is merged under a mask so
// bits past `nbits` (which may belong to a neighbouring window) are kept.

@inline function tailMask(nbits: usize): u64 {
  return (<u64>1 << (<u64>(nbits & 63))) - 1;
}

@inline function setBit(bits: usize, i: usize, on: bool): void {
  const p = bits + (i >> 3);
  const m = <u8>(1 << <u8>(i & 7));
  const b = load<u8>(p);
  store<u8>(p, on ? b | m : b & ~m);
}

@inline export function getBit(bits: usize, i: usize): bool {
  return (load<u8>(bits + (i >> 3)) >> <u8>(i & 7)) & 1 ? true : false;
}

@inline export function writeBit(bits: usize, i: usize, on: bool): void {
  setBit(bits, i, on);
}

/** out = a OP b over nbits, OP: 0 and, 1 and-not (a & ~b), 2 or, 3 copy a. */
export function bitsCombine(op: u32, out: usize, a: usize, b: usize, nbits: usize): void {
  const words = nbits >> 6;
  for (let w: usize = 0; w < words; w++) {
    const o = w << 3;
    const x = load<u64>(a + o), y = load<u64>(b + o);
    store<u64>(out + o, op == 0 ? x & y : op == 1 ? x & ~y : op == 2 ? x | y : x);
  }
  const rest = nbits & 63;
  if (rest) {
    // the partial word is assembled bytewise so no byte past the vector is touched
    const o = words << 3;
    for (let i: usize = 0; i < rest; i++) {
      const x = getBit(a + o, i), y = getBit(b + o, i);
      setBit(out + o, i, op == 0 ? x && y : op == 1 ? x && !y : op == 2 ? x || y : x);
    }
  }
}

export function bitsPopcount(bits: usize, nbits: usize): u32 {
  const words = nbits >> 6;
  let n: u64 = 0;
  for (let w: usize = 0; w < words; w++) n += popcnt<u64>(load<u64>(bits + (w << 3)));
  const rest = nbits & 63;
  for (let i: usize = 0; i < rest; i++) if (getBit(bits + (words << 3), i)) n++;
  return <u32>n;
}

/** Writes base + i (u32) for every set bit i < nbits to `out`; returns how many. */
export function bitsExtract(bits: usize, nbits: usize, out: usize, base: u32): u32 {
  const words = nbits >> 6;
  let n: usize = 0;
  for (let w: usize = 0; w < words; w++) {
    let x = load<u64>(bits + (w << 3));
    const first = base + <u32>(w << 6);
    while (x) {
      store<u32>(out + (n << 2), first + <u32>ctz<u64>(x));
      n++;
      x &= x - 1;
    }
  }
  const rest = nbits & 63;
  for (let i: usize = 0; i < rest; i++) {
    if (getBit(bits + (words << 3), i)) {
      store<u32>(out + (n << 2), base + <u32>((words << 6) + i));
      n++;
    }
  }
  return <u32>n;
}

/** Sets `count` bits from `first` on or off. */
export function bitsFill(bits: usize, first: usize, count: usize, on: bool): void {
  for (let i = first; i < first + count; i++) setBit(bits, i, on);
}

/** Bit i = (16-byte record a[i] != b[i]): "hash differs from the last sent hash". */
export function bitsDiff(out: usize, a: usize, b: usize, count: usize): u32 {
  let n: u32 = 0;
  for (let i: usize = 0; i < count; i++) {
    const o = i << 4;
    const d = (load<u64>(a + o) ^ load<u64>(b + o)) | (load<u64>(a + o, 8) ^ load<u64>(b + o, 8));
    setBit(out, i, d != 0);
    if (d != 0) n++;
  }
  return n;
}

/** For every set bit i < count: copy 16-byte record src[i] to dst[i]. */
export function copyRecordsMasked(dst: usize, src: usize, bits: usize, count: usize): void {
  for (let i: usize = 0; i < count; i++) {
    if (getBit(bits, i)) {
      const o = i << 4;
      store<u64>(dst + o, load<u64>(src + o));
      store<u64>(dst + o, load<u64>(src + o, 8), 8);
    }
  }
}
