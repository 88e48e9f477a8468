// Engine: one instance of the wasm core with typed views over its memory.
// The core owns the memory layout; callers hold pointers (`Region`s) and pass
// (pointer, count) across the boundary. Views are re-made whenever the memory
// has grown (growth detaches every earlier view).

import { CoreLoadError } from "../errors.js";
import { instantiateCore, simdSupported, type CoreExports, type CoreFlavor, type CoreSource } from "./wasm.js";

export const PAGE_SIZE = 4096;
export const HASH_SIZE = 16;
export const NO_BLOCK = 0xffffffff;
/** The most memory a wasm32 core can ever have (65536 pages of 64 KiB). */
const MAX_MEMORY = 2 ** 32;

export interface EngineOptions {
  /** 64-bit hash seed (default 0). */
  seed?: bigint;
  /** Force a build; default: SIMD where the runtime supports it (with `source`: the build given). */
  flavor?: CoreFlavor;
  /**
   * Where to load the wasm from: bytes, a compiled module, a URL, or a string
   * (relative to the page, or to the working directory in Node). Default: the
   * builds inlined in the package (no file access, no fetch).
   */
  source?: CoreSource;
}

/** A block of the core's memory. `ptr` stays valid until freed; views do not. */
export class Region {
  constructor(private readonly engine: Engine, readonly ptr: number, readonly bytes: number) {}
  /** A fresh Uint8Array over the region (re-take it after any call that may grow memory). */
  view(offset = 0, length = this.bytes - offset): Uint8Array {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.bytes) {
      throw new RangeError(`pagetwin: view ${offset}+${length} is outside a region of ${this.bytes} bytes`);
    }
    const mem = this.engine.u8();
    // subarray would clamp silently and hand back a shorter view than asked for.
    if (this.ptr + offset + length > mem.length) {
      throw new RangeError(
        `pagetwin: view ${offset}+${length} of the region at ${this.ptr} ends past the core's memory (${mem.length} bytes); the region is not a valid allocation`,
      );
    }
    return mem.subarray(this.ptr + offset, this.ptr + offset + length);
  }
  free(): void {
    this.engine.free(this);
  }
}

export type BitOp = "and" | "andNot" | "or" | "copy";
const BIT_OPS: Record<BitOp, number> = { and: 0, andNot: 1, or: 2, copy: 3 };

/** Bytes a bit vector of `nbits` needs, padded to whole 64-bit words. */
export function bitBytes(nbits: number): number {
  return Math.ceil(nbits / 64) * 8;
}

export class Engine {
  private buf: ArrayBuffer | null = null;
  private view8: Uint8Array = new Uint8Array(0);
  private scratch: Region | null = null;
  private scratchOut: Region | null = null;

  private constructor(readonly core: CoreExports, readonly flavor: CoreFlavor, readonly seed: bigint) {}

  static async create(options: EngineOptions = {}): Promise<Engine> {
    const seed = options.seed ?? 0n;
    if (typeof seed !== "bigint" || seed < 0n || seed >= 1n << 64n) {
      throw new RangeError("pagetwin: seed must be a bigint in [0, 2^64)");
    }
    const asked = options.flavor;
    const core = await instantiateCore(asked ?? (simdSupported() ? "simd" : "scalar"), options.source);
    // the build says what it is: a caller's source decides the flavor, not a guess
    const flavor: CoreFlavor = core.SIMD.value ? "simd" : "scalar";
    if (asked !== undefined && asked !== flavor) {
      throw new CoreLoadError(`pagetwin: flavor "${asked}" was asked for, but the core source given is the ${flavor} build`);
    }
    core.setSeed(BigInt.asIntN(64, seed));
    return new Engine(core, flavor, seed);
  }

  get simd(): boolean {
    return this.flavor === "simd";
  }

  /** The whole memory as bytes (fresh after growth). */
  u8(): Uint8Array {
    const b = this.core.memory.buffer;
    if (b !== this.buf) {
      this.buf = b;
      this.view8 = new Uint8Array(b);
    }
    return this.view8;
  }

  u32(ptr: number, count: number): Uint32Array {
    if (ptr % 4) throw new RangeError("pagetwin: u32 view must be 4-byte aligned");
    return new Uint32Array(this.core.memory.buffer, ptr, count);
  }

  alloc(bytes: number): Region {
    if (!Number.isInteger(bytes) || bytes < 0) {
      throw new RangeError(`pagetwin: cannot allocate ${bytes} bytes: the size must be a whole number of bytes, 0 or more`);
    }
    // The core takes a u32: a larger size would wrap to a small allocation.
    if (bytes >= MAX_MEMORY) {
      throw new RangeError(`pagetwin: cannot allocate ${bytes} bytes: wasm memory is limited to 4 GiB; allocate less`);
    }
    let ptr: number;
    try {
      ptr = this.core.alloc(Math.max(bytes, 1)) >>> 0;
    } catch (err) {
      throw new RangeError(`pagetwin: the core could not allocate ${bytes} bytes (wasm memory is limited to 4 GiB): ${(err as Error).message}`);
    }
    return new Region(this, ptr, bytes);
  }

  /** An allocation filled with zeros. */
  allocZeroed(bytes: number): Region {
    const r = this.alloc(bytes);
    this.u8().fill(0, r.ptr, r.ptr + bytes);
    return r;
  }

  free(region: Region): void {
    this.core.free(region.ptr);
  }

  /** The canonical hash of an all-zero page under this engine's seed. */
  zeroPageHash(): Uint8Array {
    const p = this.core.zeroHashPtr() >>> 0;
    return this.u8().slice(p, p + HASH_SIZE);
  }

  // ---- hashing -------------------------------------------------------------

  /**
   * Zero-copy path: hashes `count` pages already in core memory at `pagesPtr`
   * into 16-byte digests at `outPtr`; bit i of `zeroBitsPtr` (if not 0) tells
   * whether page i is all zero. Returns the number of zero pages.
   */
  hashPagesAt(pagesPtr: number, count: number, outPtr: number, zeroBitsPtr = 0): number {
    return this.core.hashPages(pagesPtr, count, outPtr, zeroBitsPtr);
  }

  /**
   * Copy-in path: the canonical XXH3-128 digest (big-endian high 64 bits, then
   * low 64 bits) of every 4096-byte page of `data`, 16 bytes each.
   */
  hashPages(data: Uint8Array): Uint8Array {
    if (!(data instanceof Uint8Array)) throw new TypeError("pagetwin: hashPages takes a Uint8Array");
    if (data.length % PAGE_SIZE !== 0) {
      throw new RangeError(`pagetwin: hashPages needs whole 4096-byte pages; got ${data.length} bytes (${data.length % PAGE_SIZE} past the last whole page)`);
    }
    const pages = data.length / PAGE_SIZE;
    const out = new Uint8Array(pages * HASH_SIZE);
    const chunk = 1024; // 4 MiB through the scratch region at a time
    const [src, dst] = this.scratchRegions(Math.min(pages, chunk));
    for (let first = 0; first < pages; first += chunk) {
      const n = Math.min(chunk, pages - first);
      this.u8().set(data.subarray(first * PAGE_SIZE, (first + n) * PAGE_SIZE), src.ptr);
      this.core.hashPages(src.ptr, n, dst.ptr, 0);
      out.set(this.u8().subarray(dst.ptr, dst.ptr + n * HASH_SIZE), first * HASH_SIZE);
    }
    return out;
  }

  private scratchRegions(pages: number): [Region, Region] {
    if (!this.scratch || this.scratch.bytes < pages * PAGE_SIZE) {
      this.scratch?.free();
      this.scratchOut?.free();
      this.scratch = this.alloc(Math.max(pages, 1) * PAGE_SIZE);
      this.scratchOut = this.alloc(Math.max(pages, 1) * HASH_SIZE);
    }
    return [this.scratch, this.scratchOut!];
  }

  /**
   * A 16-byte digest of arbitrary bytes (e.g. a whole RAM's page hashes):
   * hash 4 KiB pages (the last zero-padded), then hash those hashes, until
   * one hash is left. The length is folded into the first level.
   */
  digest(data: Uint8Array): Uint8Array {
    let level = new Uint8Array(Math.ceil((data.length + 8) / PAGE_SIZE) * PAGE_SIZE);
    level.set(data);
    new DataView(level.buffer).setFloat64(data.length, data.length);
    for (;;) {
      const h = this.hashPages(level);
      if (h.length === HASH_SIZE) return h;
      level = new Uint8Array(Math.ceil(h.length / PAGE_SIZE) * PAGE_SIZE);
      level.set(h);
    }
  }

  // ---- bit vectors (one bit per page; pointers, bit counts) -----------------

  bitsCombine(op: BitOp, outPtr: number, aPtr: number, bPtr: number, nbits: number): void {
    this.core.bitsCombine(BIT_OPS[op], outPtr, aPtr, bPtr, nbits);
  }

  popcount(bitsPtr: number, nbits: number): number {
    return this.core.bitsPopcount(bitsPtr, nbits) >>> 0;
  }

  /** Writes base + i for each set bit i as u32 at `outPtr`; returns the count. */
  extractBits(bitsPtr: number, nbits: number, outPtr: number, base = 0): number {
    return this.core.bitsExtract(bitsPtr, nbits, outPtr, base) >>> 0;
  }

  /** Bit i = 16-byte record a[i] differs from b[i]; returns how many differ. */
  diffBits(outPtr: number, aPtr: number, bPtr: number, count: number): number {
    return this.core.bitsDiff(outPtr, aPtr, bPtr, count) >>> 0;
  }

  fillBits(bitsPtr: number, first: number, count: number, on: boolean): void {
    this.core.bitsFill(bitsPtr, first, count, on ? 1 : 0);
  }

  /** dst[i] = src[i] (16-byte records) for every set bit i < count. */
  copyRecordsMasked(dstPtr: number, srcPtr: number, bitsPtr: number, count: number): void {
    this.core.copyRecordsMasked(dstPtr, srcPtr, bitsPtr, count);
  }

  // ---- the block index ------------------------------------------------------

  createIndex(blockCapacity = 1024): TwinIndex {
    return new TwinIndex(this, this.core.indexCreate(blockCapacity, this.core.zeroHashPtr()) >>> 0);
  }

  /**
   * An empty index about to be loaded whole: its first `blocks` records
   * (`recordsFor(blocks)`) are not zeroed, so write every one of them, then
   * `loadAt(that pointer, blocks)`. Spares a pass over memory the load
   * writes anyway (an index file's hashes read straight into it).
   */
  createIndexForLoad(blocks: number): TwinIndex {
    return new TwinIndex(this, this.core.indexCreateForLoad(blocks, this.core.zeroHashPtr()) >>> 0);
  }
}

/** Block hash -> block number, in the core's memory (see assembly/twin_index.ts). */
export class TwinIndex {
  constructor(readonly engine: Engine, readonly ptr: number) {}

  /** Records the hashes (16 bytes each, at `hashesPtr`) of blocks first..first+count-1. */
  setBlocksAt(hashesPtr: number, first: number, count: number): void {
    this.engine.core.indexSetBlocks(this.ptr, hashesPtr, first, count);
  }

  /**
   * Sets blocks 0..count-1 of an index with no block set yet, all at once
   * (far faster than setBlocksAt for a whole disk: the core builds its table
   * slice by slice). `hashesPtr` may be recordsFor(count), so an index file
   * is read straight into the index's own memory. On an index that has
   * blocks already, the same as setBlocksAt(hashesPtr, 0, count).
   */
  loadAt(hashesPtr: number, count: number): void {
    this.engine.core.indexLoad(this.ptr, hashesPtr, count);
  }

  /**
   * Where the index keeps its per-block hash records, with room for
   * `blocks` of them: write hashes there, then loadAt(that pointer, blocks).
   * Re-take memory views after this call (it may grow the memory).
   */
  recordsFor(blocks: number): number {
    return this.engine.core.indexReserve(this.ptr, blocks) >>> 0;
  }

  /** Same, with the hashes given as bytes (copied in). */
  setBlocks(hashes: Uint8Array, first: number): void {
    if (hashes.length % HASH_SIZE) throw new RangeError("pagetwin: block hashes come 16 bytes each");
    const r = this.engine.alloc(hashes.length);
    try {
      this.engine.u8().set(hashes, r.ptr);
      this.setBlocksAt(r.ptr, first, hashes.length / HASH_SIZE);
    } finally {
      r.free();
    }
  }

  /**
   * Looks up `count` hashes at `hashesPtr` (only those whose bit is set in
   * `candidatesPtr`, or all when it is 0). Block numbers go to `outBlocksPtr`
   * (u32, NO_BLOCK when none) and hits to `outBitsPtr`; either may be 0.
   */
  lookupAt(hashesPtr: number, count: number, candidatesPtr: number, outBlocksPtr: number, outBitsPtr: number): number {
    return this.engine.core.indexLookup(this.ptr, hashesPtr, count, candidatesPtr, outBlocksPtr, outBitsPtr) >>> 0;
  }

  /** Convenience copy path: block number per hash (NO_BLOCK when none). */
  lookup(hashes: Uint8Array): Uint32Array {
    const n = hashes.length / HASH_SIZE;
    const h = this.engine.alloc(hashes.length);
    const o = this.engine.alloc(n * 4);
    try {
      this.engine.u8().set(hashes, h.ptr);
      this.lookupAt(h.ptr, n, 0, o.ptr, 0);
      return this.engine.u32(o.ptr, n).slice();
    } finally {
      h.free();
      o.free();
    }
  }

  /** Entries in the table (distinct non-zero contents). */
  get size(): number {
    return this.engine.core.indexCount(this.ptr) >>> 0;
  }

  /** Highest block number recorded + 1. */
  get blocks(): number {
    return this.engine.core.indexBlocks(this.ptr) >>> 0;
  }

  /** Bytes of core memory the index holds. */
  get bytes(): number {
    return this.engine.core.indexBytes(this.ptr) >>> 0;
  }

  /** The per-block hash records (16 bytes per block, `blocks` of them). */
  blockHashes(): Uint8Array {
    const p = this.engine.core.indexHashesPtr(this.ptr) >>> 0;
    return this.engine.u8().subarray(p, p + this.blocks * HASH_SIZE);
  }

  free(): void {
    this.engine.core.indexFree(this.ptr);
  }
}

export function createEngine(options?: EngineOptions): Promise<Engine> {
  return Engine.create(options);
}
