// EnginePool: the Engine's hashing sharded over Node worker threads through
// comlink. Calls are batched large (a comlink call costs tens of
// microseconds); workers read their share of a file straight into their own
// wasm memory. Shared by a service: stateful work (scan, then fetch the pages
// scanned) goes through sessions, each with its own buffers in every worker.
// A worker that dies fails the calls on it with a PoolWorkerError and is
// replaced; after close() every call fails with a PoolClosedError.

import { availableParallelism } from "node:os";
import type { PoolWorkerCalls, WorkerConfig } from "./worker-api.js";
import { startMember, type Member } from "./member.js";
import { PoolSession, type SessionOptions } from "./session.js";
import { HASH_SIZE, PAGE_SIZE } from "../core/engine.js";
import { resolveSource, type CoreFlavor } from "../core/wasm.js";
import { PoolClosedError, UsageError } from "../errors.js";
import { abortable, throwIfAborted, type AbortOptions } from "../abort.js";
import { toLog, type Log, type LogOption } from "../log.js";

export interface PoolOptions {
  /** Workers (default: the cores available). */
  size?: number;
  /** Hash seed of hashPages and the default of sessions (default 0). */
  seed?: bigint;
  /** Core build for the workers (default: SIMD where supported). */
  flavor?: CoreFlavor;
  /**
   * The worker's entry file (default: the package's own, `pagetwin/pool/worker`).
   * A bundled service points it at where its bundler put that entry (a URL,
   * or a path relative to the current directory).
   */
  workerUrl?: URL | string;
  /** Where the workers load the core's wasm from (a URL, or a path relative to the current directory; default: the package's build/). */
  coreSource?: URL | string;
  /** Worker crashes and replacements are logged here (warn). */
  log?: LogOption;
}

/** Splits count pages into `n` shards whose sizes are multiples of 64 pages (bit vectors stay byte-aligned). */
export function shards(first: number, count: number, n: number): { first: number; count: number }[] {
  const per = Math.ceil(count / n / 64) * 64;
  const out = [];
  for (let f = first; f < first + count; f += per) out.push({ first: f, count: Math.min(per, first + count - f) });
  return out;
}

/**
 * Hashing on worker threads, shared by a whole service: stateless hashing
 * (hashPages) and sessions (session()) for scans whose page bytes stay in
 * the workers. Crashed workers are replaced; close() when done.
 */
export class EnginePool {
  private closing = false;
  private nextSession = 1;
  private readonly sessions = new Set<PoolSession>();

  private constructor(
    private readonly slots: Promise<Member>[],
    readonly seed: bigint,
    private readonly start: (slot: number, generation: number) => Promise<Member>,
    private readonly log: Log,
  ) {}

  /** Starts `size` workers; resolves once all are ready. */
  static async create(o: PoolOptions = {}): Promise<EnginePool> {
    const size = o.size ?? availableParallelism();
    if (!Number.isInteger(size) || size < 1) throw new UsageError(`pagetwin pool: size must be a positive integer (got ${size})`);
    const seed = o.seed ?? 0n;
    const config: WorkerConfig = { seed, ...(o.flavor ? { flavor: o.flavor } : {}), ...(o.coreSource ? { source: String(o.coreSource) } : {}) };
    const url = o.workerUrl instanceof URL ? o.workerUrl
      : o.workerUrl ? await resolveSource(o.workerUrl) : new URL("./node-worker.js", import.meta.url);
    let pool: EnginePool | null = null;
    const start = (slot: number, generation: number) => startMember({
      slot, generation, url, config,
      closing: () => pool?.closing ?? false,
      onCrash: (m, err) => pool?.replace(m, err),
    });
    const slots = Array.from({ length: size }, (_, i) => start(i, 0));
    try {
      await Promise.all(slots);
    } catch (err) {
      await Promise.allSettled(slots.map(async (s) => (await s).worker.terminate()));
      throw err;
    }
    pool = new EnginePool(slots, seed, start, toLog(o.log));
    return pool;
  }

  get size(): number {
    return this.slots.length;
  }

  /** True after close(). */
  get closed(): boolean {
    return this.closing;
  }

  private replace(m: Member, err: Error): void {
    this.log.warn(err.message, { slot: m.slot, generation: m.generation });
    const next = this.start(m.slot, m.generation + 1);
    next.catch((e: Error) => this.log.error(`pagetwin pool: cannot restart worker ${m.slot}: ${e.message}`));
    this.slots[m.slot] = next;
  }

  /** @internal The worker in `slot`, once it is ready (a replacement may still be starting). */
  async member(slot: number): Promise<Member> {
    if (this.closing) throw new PoolClosedError("pagetwin pool: the pool is closed");
    return this.slots[slot]!;
  }

  /** @internal Runs `f` on the worker in `slot`; fails at once if that worker dies meanwhile. */
  async call<T>(slot: number, f: (api: PoolWorkerCalls) => Promise<T>, m?: Member): Promise<T> {
    const member = m ?? await this.member(slot);
    if (this.closing) throw new PoolClosedError("pagetwin pool: the pool is closed");
    return Promise.race([f(member.api), member.dead]);
  }

  /** Canonical XXH3-128 digests of every page of `data` with the pool's seed, the same as Engine.hashPages. */
  async hashPages(data: Uint8Array, o: AbortOptions = {}): Promise<Uint8Array> {
    throwIfAborted(o.signal, "hashing on the pool");
    if (data.length % PAGE_SIZE) throw new RangeError(`pagetwin: hashPages needs whole 4096-byte pages; got ${data.length} bytes`);
    const pages = data.length / PAGE_SIZE;
    const parts = shards(0, pages, this.size);
    const results = await abortable(Promise.all(parts.map((s, i) => this.call(i, (api) =>
      api.hashPages(data.subarray(s.first * PAGE_SIZE, (s.first + s.count) * PAGE_SIZE))))), o.signal, "hashing on the pool");
    const out = new Uint8Array(pages * HASH_SIZE);
    parts.forEach((s, i) => out.set(results[i]!, s.first * HASH_SIZE));
    return out;
  }

  /**
   * A session: one caller's scans of files and the page bytes they keep, in
   * buffers of its own in every worker. Sessions of one pool run
   * concurrently (the workers take their calls in turn); close a session
   * when done with it to free those buffers.
   */
  session(o: SessionOptions = {}): PoolSession {
    if (this.closing) throw new PoolClosedError("pagetwin pool: the pool is closed");
    const s = new PoolSession(this, this.nextSession++, o.seed ?? this.seed, () => this.sessions.delete(s));
    this.sessions.add(s);
    return s;
  }

  /** wasm memory held by all workers, bytes. */
  async memoryBytes(): Promise<number> {
    const all = await Promise.all(this.slots.map((_, i) => this.call(i, (api) => api.memoryBytes())));
    return all.reduce((a, b) => a + b, 0);
  }

  /** Stops the workers; calls in flight and later calls fail with PoolClosedError. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    await Promise.all(this.slots.map(async (slot) => {
      let m: Member;
      try { m = await slot; } catch { return; /* never started */ }
      try { await Promise.race([m.api.close(), m.dead, new Promise((r) => setTimeout(r, 1000))]); } catch { /* dead already */ }
      await m.worker.terminate();
    }));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** For tests: the worker threads (as they are now; a replacement may still be starting). */
  async workers(): Promise<import("node:worker_threads").Worker[]> {
    return Promise.all(this.slots.map(async (s) => (await s).worker));
  }
}
