// One caller's use of a shared EnginePool: scans of a file whose page bytes
// stay in the workers (in this session's own buffers) until the caller asks
// for the pages it will send. Its results never mix with another session's.

import { transfer } from "./comlink.js";
import type { ScanResult } from "./worker-api.js";
import type { EnginePool } from "./pool.js";
import { shards } from "./pool.js";
import { HASH_SIZE, PAGE_SIZE } from "../core/engine.js";
import { PoolClosedError, PoolWorkerError } from "../errors.js";
import { abortable, throwIfAborted, type AbortOptions } from "../abort.js";

export interface SessionOptions {
  /**
   * Hash seed of this session's scans (default: the pool's): the seed of the
   * Engine whose Planner uses them. Each seed in use costs every worker one
   * more wasm instance, kept until the pool closes.
   */
  seed?: bigint;
}

interface Scan {
  parts: { first: number; count: number }[];
  /** The worker generation of each part's slot when it scanned: a replaced worker lost the bytes. */
  generations: number[];
}

/** One caller's scans on a shared pool (see EnginePool.session()). */
export class PoolSession {
  private closed = false;
  private last: Scan | null = null;
  /** Two result buffers shared with the workers, used in turn (see scanFile). */
  private outputs: SharedArrayBuffer[] = [];
  private nextOutput = 0;
  /** The call in flight: an aborted scan may still be writing, the next one waits for it. */
  private busy: Promise<unknown> = Promise.resolve();

  /** @internal Made by EnginePool.session(). */
  constructor(private readonly pool: EnginePool, readonly id: number, readonly seed: bigint, private readonly onClose: () => void) {}

  private check(): void {
    if (this.closed) throw new PoolClosedError("pagetwin pool: this session is closed");
    if (this.pool.closed) throw new PoolClosedError("pagetwin pool: the pool is closed");
  }

  /**
   * Each worker reads and hashes its share of pages first..first+count-1 of
   * the file (a RAM file or a disk image); returns all hashes and zero bits
   * in page order. The workers keep the bytes for pagesOf until this
   * session's next scan. The result is a view of a buffer the session
   * reuses: valid until the scan after the next one (so a caller may start
   * the next scan before it is done with this one).
   */
  async scanFile(path: string, first: number, count: number, o: AbortOptions = {}): Promise<ScanResult> {
    this.check();
    throwIfAborted(o.signal, "the pool scan");
    if (!Number.isInteger(first) || !Number.isInteger(count) || first < 0 || count <= 0) {
      throw new RangeError(`pagetwin pool: bad scan of ${count} pages from page ${first}`);
    }
    const prev = this.busy;
    const run = (async () => {
      await prev.catch(() => {});
      this.last = null;
      return this.scan(path, first, count, o.signal);
    })();
    this.busy = run;
    return abortable(run, o.signal, "the pool scan");
  }

  private async scan(path: string, first: number, count: number, signal: AbortSignal | undefined): Promise<ScanResult> {
    const parts = shards(first, count, this.pool.size);
    const hashBytes = count * HASH_SIZE, bitBytes = Math.ceil(count / 8) + 8;
    if (!this.outputs[0] || this.outputs[0].byteLength < hashBytes + bitBytes) {
      this.outputs = [new SharedArrayBuffer(hashBytes + bitBytes), new SharedArrayBuffer(hashBytes + bitBytes)];
    }
    const buffer = this.outputs[this.nextOutput]!;
    this.nextOutput ^= 1;
    new Uint8Array(buffer, hashBytes, bitBytes).fill(0);
    const generations = await Promise.all(parts.map(async (s, i) => {
      const m = await this.pool.member(i);
      await this.pool.call(i, (api) => api.scanFile(this.id, this.seed, path, s.first, s.count,
        { buffer, hashesAt: (s.first - first) * HASH_SIZE, zeroBitsAt: hashBytes + (s.first - first) / 8 }), m);
      return m.generation;
    }));
    // an aborted scan is no scan: pagesOf must not hand out its bytes
    if (!signal?.aborted) this.last = { parts, generations };
    return { hashes: new Uint8Array(buffer, 0, hashBytes), zeroBits: new Uint8Array(buffer, hashBytes, bitBytes) };
  }

  /** Bytes of the given pages (ascending, from this session's last scan), concatenated in that order. */
  async pagesOf(pages: Uint32Array, o: AbortOptions = {}): Promise<Uint8Array> {
    this.check();
    throwIfAborted(o.signal, "reading pages from the pool");
    await this.busy.catch(() => {});
    const scan = this.last;
    if (!scan) throw new RangeError("pagetwin pool: this session has no finished scan to take pages from");
    const out = new Uint8Array(pages.length * PAGE_SIZE);
    const jobs: Promise<void>[] = [];
    let k = 0;
    for (let i = 0; i < scan.parts.length; i++) {
      const s = scan.parts[i]!;
      const start = k;
      while (k < pages.length && pages[k]! < s.first + s.count) k++;
      if (k === start) continue;
      const m = await this.pool.member(i);
      if (m.generation !== scan.generations[i]) {
        throw new PoolWorkerError(`pagetwin pool: the worker that held pages ${s.first}..${s.first + s.count - 1} was replaced after it died; scan again`);
      }
      const mine = pages.slice(start, k);
      jobs.push(this.pool.call(i, (api) => api.pagesOf(this.id, transfer(mine, [mine.buffer])), m).then((b) => out.set(b, start * PAGE_SIZE)));
    }
    if (k !== pages.length) {
      await Promise.allSettled(jobs);
      throw new RangeError(`pagetwin pool: page ${pages[k]} is not in this session's last scan`);
    }
    await abortable(Promise.all(jobs), o.signal, "reading pages from the pool");
    return out;
  }

  /** Frees this session's buffers in the workers; later calls on it fail with PoolClosedError. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.onClose();
    await this.busy.catch(() => {});
    if (this.pool.closed) return;
    await Promise.allSettled(Array.from({ length: this.pool.size }, (_, i) => this.pool.call(i, (api) => api.endSession(this.id))));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
