// What one pool worker does, around its own Engine (its own wasm memory):
// hash pages handed to it, or read its share of a RAM file / disk image
// straight into its memory and hash it there, keeping the bytes until the
// main thread asks for the pages it will send (so what is sent is exactly
// what was hashed).

import { createEngine, Engine, Region, HASH_SIZE, PAGE_SIZE, bitBytes } from "../core/engine.js";
import { RamFile } from "../adapters/ram/ram-file.js";

export interface ScanResult {
  hashes: Uint8Array;
  zeroBits: Uint8Array;
}

/** Where a worker writes a scan's results: its part of a buffer the pool shares with it. */
export interface ScanOutput {
  buffer: SharedArrayBuffer;
  hashesAt: number;
  zeroBitsAt: number;
}

export class PoolWorkerApi {
  private files = new Map<string, RamFile>();
  private buf: Region | null = null;
  private out: Region | null = null;
  private bits: Region | null = null;
  private kept = { first: 0, count: 0 };

  private constructor(readonly engine: Engine) {}

  static async create(seed: bigint, flavor?: "simd" | "scalar"): Promise<PoolWorkerApi> {
    return new PoolWorkerApi(await createEngine({ seed, flavor }));
  }

  private regions(pages: number): [Region, Region, Region] {
    if (!this.buf || this.buf.bytes < pages * PAGE_SIZE) {
      this.buf?.free(); this.out?.free(); this.bits?.free();
      this.buf = this.engine.alloc(pages * PAGE_SIZE);
      this.out = this.engine.alloc(pages * HASH_SIZE);
      this.bits = this.engine.alloc(bitBytes(pages));
    }
    return [this.buf, this.out!, this.bits!];
  }

  /** Copy-in hashing of whole pages. */
  hashPages(data: Uint8Array): Uint8Array {
    return this.engine.hashPages(data);
  }

  /**
   * Reads pages first..first+count-1 of a page-addressed file (RAM file or
   * disk image) into this worker's memory and hashes them; the bytes stay
   * until the next scan (see pagesOf). The hashes and zero bits go into `to`,
   * shared with the pool: no buffer is made per call, so none piles up in
   * either thread waiting for a garbage collection.
   */
  scanFile(path: string, first: number, count: number, to: ScanOutput): void {
    let f = this.files.get(path);
    if (!f) {
      f = RamFile.open(path);
      this.files.set(path, f);
    }
    const [buf, out, bits] = this.regions(count);
    f.readPages(first, count, buf.view(0, count * PAGE_SIZE));
    this.engine.hashPagesAt(buf.ptr, count, out.ptr, bits.ptr);
    this.kept = { first, count };
    new Uint8Array(to.buffer, to.hashesAt, count * HASH_SIZE).set(out.view(0, count * HASH_SIZE));
    new Uint8Array(to.buffer, to.zeroBitsAt, Math.ceil(count / 8)).set(bits.view(0, Math.ceil(count / 8)));
  }

  /** The bytes of the given pages (absolute numbers, within the last scan), concatenated. */
  pagesOf(pages: Uint32Array): Uint8Array {
    const out = new Uint8Array(pages.length * PAGE_SIZE);
    const v = this.buf?.view();
    for (let i = 0; i < pages.length; i++) {
      const rel = pages[i]! - this.kept.first;
      if (!v || rel < 0 || rel >= this.kept.count) throw new RangeError(`pagetwin pool: page ${pages[i]} is not in this worker's last scan`);
      out.set(v.subarray(rel * PAGE_SIZE, (rel + 1) * PAGE_SIZE), i * PAGE_SIZE);
    }
    return out;
  }

  /** Bytes of wasm memory this worker holds. */
  memoryBytes(): number {
    return this.engine.core.memory.buffer.byteLength;
  }

  close(): void {
    for (const f of this.files.values()) f.close();
    this.files.clear();
  }
}
