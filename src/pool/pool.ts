// EnginePool: the Engine's hashing sharded over worker threads (Node) or Web
// Workers (browsers) through comlink. Calls are batched large (a comlink call
// costs tens of microseconds); workers read their share of a file straight
// into their own wasm memory. A worker that dies fails every call in flight
// with an error that says so, instead of hanging.

import { Worker } from "node:worker_threads";
import { availableParallelism } from "node:os";
import { wrap, transfer, nodeEndpoint, type Remote } from "./comlink.js";
import type { PoolWorkerApi, ScanResult } from "./worker-api.js";
import { HASH_SIZE, PAGE_SIZE } from "../core/engine.js";

export interface PoolOptions {
  /** Workers (default: the cores available). */
  size?: number;
  seed?: bigint;
  flavor?: "simd" | "scalar";
}

export class PoolWorkerError extends Error {
  override name = "PoolWorkerError";
}

interface Member {
  worker: Worker;
  api: Remote<PoolWorkerApi>;
  dead: Promise<never>;
}

/** Splits count pages into `n` shards whose sizes are multiples of 64 pages (bit vectors stay byte-aligned). */
export function shards(first: number, count: number, n: number): { first: number; count: number }[] {
  const per = Math.ceil(count / n / 64) * 64;
  const out = [];
  for (let f = first; f < first + count; f += per) out.push({ first: f, count: Math.min(per, first + count - f) });
  return out;
}

export class EnginePool {
  private constructor(private readonly members: Member[], readonly seed: bigint) {}

  static async create(o: PoolOptions = {}): Promise<EnginePool> {
    const size = o.size ?? availableParallelism();
    if (!Number.isInteger(size) || size < 1) throw new RangeError(`pagetwin pool: size must be a positive integer (got ${size})`);
    const seed = o.seed ?? 0n;
    const members = await Promise.all(Array.from({ length: size }, (_, i) => startMember(i, seed, o.flavor)));
    return new EnginePool(members, seed);
  }

  get size(): number {
    return this.members.length;
  }

  private call<T>(m: Member, f: (api: Remote<PoolWorkerApi>) => Promise<T>): Promise<T> {
    return Promise.race([f(m.api), m.dead]);
  }

  /** Canonical XXH3-128 digests of every page of `data`, the same as Engine.hashPages. */
  async hashPages(data: Uint8Array): Promise<Uint8Array> {
    if (data.length % PAGE_SIZE) throw new RangeError(`pagetwin: hashPages needs whole 4096-byte pages; got ${data.length} bytes`);
    const pages = data.length / PAGE_SIZE;
    const parts = shards(0, pages, this.size);
    const results = await Promise.all(parts.map((s, i) => this.call(this.members[i]!, (api) =>
      api.hashPages(data.subarray(s.first * PAGE_SIZE, (s.first + s.count) * PAGE_SIZE)))));
    const out = new Uint8Array(pages * HASH_SIZE);
    parts.forEach((s, i) => out.set(results[i]!, s.first * HASH_SIZE));
    return out;
  }

  private lastScan: { first: number; count: number }[] = [];

  /** Two result buffers shared with the workers, used in turn (see scanFile). */
  private outputs: SharedArrayBuffer[] = [];
  private nextOutput = 0;

  /**
   * Each worker reads and hashes its share of pages first..first+count-1 of
   * the file; returns all hashes and zero bits in page order. The workers
   * keep the bytes for pagesOf until the next scan. The result is a view of
   * a buffer the pool reuses: valid until the scan after the next one (so a
   * caller may start the next scan before it is done with this one).
   */
  async scanFile(path: string, first: number, count: number): Promise<ScanResult> {
    const parts = shards(first, count, this.size);
    const hashBytes = count * HASH_SIZE, bitBytes = Math.ceil(count / 8) + 8;
    if (!this.outputs[0] || this.outputs[0].byteLength < hashBytes + bitBytes) {
      this.outputs = [new SharedArrayBuffer(hashBytes + bitBytes), new SharedArrayBuffer(hashBytes + bitBytes)];
    }
    const buffer = this.outputs[this.nextOutput]!;
    this.nextOutput ^= 1;
    new Uint8Array(buffer, hashBytes, bitBytes).fill(0);
    await Promise.all(parts.map((s, i) => this.call(this.members[i]!, (api) =>
      api.scanFile(path, s.first, s.count, { buffer, hashesAt: (s.first - first) * HASH_SIZE, zeroBitsAt: hashBytes + (s.first - first) / 8 }))));
    this.lastScan = parts;
    return { hashes: new Uint8Array(buffer, 0, hashBytes), zeroBits: new Uint8Array(buffer, hashBytes, bitBytes) };
  }

  /** Bytes of the given pages (ascending, from the last scan), concatenated in that order. */
  async pagesOf(pages: Uint32Array): Promise<Uint8Array> {
    const out = new Uint8Array(pages.length * PAGE_SIZE);
    const jobs: Promise<void>[] = [];
    let k = 0;
    this.lastScan.forEach((s, i) => {
      const start = k;
      while (k < pages.length && pages[k]! < s.first + s.count) k++;
      if (k > start) {
        const mine = pages.slice(start, k);
        jobs.push(this.call(this.members[i]!, (api) => api.pagesOf(transfer(mine, [mine.buffer]))).then((b) => out.set(b, start * PAGE_SIZE)));
      }
    });
    if (k !== pages.length) throw new RangeError(`pagetwin pool: page ${pages[k]} is not in the last scan`);
    await Promise.all(jobs);
    return out;
  }

  /** wasm memory held by all workers, bytes. */
  async memoryBytes(): Promise<number> {
    const all = await Promise.all(this.members.map((m) => this.call(m, (api) => api.memoryBytes())));
    return all.reduce((a, b) => a + b, 0);
  }

  async close(): Promise<void> {
    await Promise.all(this.members.map(async (m) => {
      try { await Promise.race([m.api.close(), new Promise((r) => setTimeout(r, 1000))]); } catch { /* dead already */ }
      await m.worker.terminate();
    }));
  }

  /** For tests: the worker threads. */
  get workers(): Worker[] {
    return this.members.map((m) => m.worker);
  }
}

async function startMember(i: number, seed: bigint, flavor?: "simd" | "scalar"): Promise<Member> {
  // a small young generation: a worker's pages live in its wasm memory and it
  // allocates little else, which a default-sized one would still let grow resident
  const worker = new Worker(new URL("./node-worker.js", import.meta.url), { workerData: { seed, flavor }, resourceLimits: { maxYoungGenerationSizeMb: 4 } });
  let fail: (e: Error) => void = () => {};
  const dead = new Promise<never>((_, reject) => { fail = reject; });
  dead.catch(() => {}); // observed by calls; not an unhandled rejection on its own
  worker.on("error", (err) => fail(new PoolWorkerError(`pagetwin pool: worker ${i} died: ${err.message}`)));
  worker.on("exit", (code) => fail(new PoolWorkerError(`pagetwin pool: worker ${i} exited (code ${code}); the pool cannot finish this call — create a new pool`)));
  await Promise.race([
    new Promise<void>((resolve) => worker.once("message", () => resolve())),
    dead,
  ]);
  worker.unref();
  return { worker, api: wrap<PoolWorkerApi>(nodeEndpoint(worker)), dead };
}
