// What one pool worker does, around its own Engines (its own wasm memory,
// one engine per hash seed in use): hash pages handed to it, or read its
// share of a RAM file / disk image straight into its memory and hash it
// there, keeping the bytes until the session that scanned asks for the pages
// it will send (so what is sent is exactly what was hashed). Every session
// has its own buffers and files here, so sessions never see each other's bytes.

import { createEngine, Engine, Region, HASH_SIZE, PAGE_SIZE, bitBytes } from "../core/engine.js";
import type { CoreFlavor } from "../core/wasm.js";
import { RamFile } from "../adapters/ram/ram-file.js";

export interface ScanResult {
  /** 16 bytes (canonical XXH3-128) per page, in page order. */
  hashes: Uint8Array;
  /** One bit per page (bit i of byte i>>3): the page is all zeros. */
  zeroBits: Uint8Array;
}

/** Where a worker writes a scan's results: its part of a buffer the session shares with it. */
export interface ScanOutput {
  buffer: SharedArrayBuffer;
  hashesAt: number;
  zeroBitsAt: number;
}

/** What the worker is started with (workerData). */
export interface WorkerConfig {
  seed: bigint;
  flavor?: CoreFlavor;
  /** The core's wasm (a URL's href), for bundled services that ship it elsewhere. */
  source?: string;
}

/**
 * The worker's methods as the pool calls them (comlink's Remote, spelled out:
 * comlink's own types need the DOM lib, which a Node user may not have).
 */
export type PoolWorkerCalls = {
  [K in Exclude<keyof PoolWorkerApi, "engine">]: PoolWorkerApi[K] extends (...a: infer A) => infer R ? (...a: A) => Promise<Awaited<R>> : never;
};

/** One session's state in this worker. */
class SessionState {
  private files = new Map<string, RamFile>();
  private buf: Region | null = null;
  private out: Region | null = null;
  private bits: Region | null = null;
  kept = { first: 0, count: 0 };

  constructor(readonly engine: Engine) {}

  file(path: string): RamFile {
    let f = this.files.get(path);
    if (!f) {
      f = RamFile.open(path);
      this.files.set(path, f);
    }
    return f;
  }

  regions(pages: number): [Region, Region, Region] {
    if (!this.buf || this.buf.bytes < pages * PAGE_SIZE) {
      this.freeRegions();
      this.buf = this.engine.alloc(pages * PAGE_SIZE);
      this.out = this.engine.alloc(pages * HASH_SIZE);
      this.bits = this.engine.alloc(bitBytes(pages));
    }
    return [this.buf, this.out!, this.bits!];
  }

  view(): Uint8Array | undefined {
    return this.buf?.view();
  }

  private freeRegions(): void {
    this.buf?.free(); this.out?.free(); this.bits?.free();
    this.buf = this.out = this.bits = null;
  }

  close(): void {
    this.freeRegions();
    for (const f of this.files.values()) f.close();
    this.files.clear();
  }
}

export class PoolWorkerApi {
  private readonly engines = new Map<bigint, Promise<Engine>>();
  private readonly sessions = new Map<number, SessionState>();

  private constructor(private readonly config: WorkerConfig, readonly engine: Engine) {
    this.engines.set(config.seed, Promise.resolve(engine));
  }

  static async create(config: WorkerConfig): Promise<PoolWorkerApi> {
    return new PoolWorkerApi(config, await createEngine(PoolWorkerApi.engineOptions(config, config.seed)));
  }

  private static engineOptions(c: WorkerConfig, seed: bigint) {
    return { seed, ...(c.flavor ? { flavor: c.flavor } : {}), ...(c.source ? { source: c.source } : {}) };
  }

  private engineFor(seed: bigint): Promise<Engine> {
    let e = this.engines.get(seed);
    if (!e) {
      e = createEngine(PoolWorkerApi.engineOptions(this.config, seed));
      this.engines.set(seed, e);
    }
    return e;
  }

  /** Copy-in hashing of whole pages, with the pool's seed. */
  hashPages(data: Uint8Array): Uint8Array {
    return this.engine.hashPages(data);
  }

  /**
   * Reads pages first..first+count-1 of a page-addressed file (RAM file or
   * disk image) into this session's memory and hashes them with `seed`; the
   * bytes stay until the session's next scan (see pagesOf). The hashes and
   * zero bits go into `to`, shared with the pool: no buffer is made per call,
   * so none piles up in either thread waiting for a garbage collection.
   */
  async scanFile(session: number, seed: bigint, path: string, first: number, count: number, to: ScanOutput): Promise<void> {
    let s = this.sessions.get(session);
    if (!s) {
      s = new SessionState(await this.engineFor(seed));
      this.sessions.set(session, s);
    }
    const [buf, out, bits] = s.regions(count);
    s.kept = { first: 0, count: 0 };
    s.file(path).readPages(first, count, buf.view(0, count * PAGE_SIZE));
    s.engine.hashPagesAt(buf.ptr, count, out.ptr, bits.ptr);
    s.kept = { first, count };
    new Uint8Array(to.buffer, to.hashesAt, count * HASH_SIZE).set(out.view(0, count * HASH_SIZE));
    new Uint8Array(to.buffer, to.zeroBitsAt, Math.ceil(count / 8)).set(bits.view(0, Math.ceil(count / 8)));
  }

  /** The bytes of the given pages (absolute numbers, within the session's last scan), concatenated. */
  pagesOf(session: number, pages: Uint32Array): Uint8Array {
    const s = this.sessions.get(session);
    const out = new Uint8Array(pages.length * PAGE_SIZE);
    const v = s?.view();
    for (let i = 0; i < pages.length; i++) {
      const rel = pages[i]! - (s?.kept.first ?? 0);
      if (!v || rel < 0 || rel >= s!.kept.count) throw new RangeError(`pagetwin pool: page ${pages[i]} is not in this worker's last scan`);
      out.set(v.subarray(rel * PAGE_SIZE, (rel + 1) * PAGE_SIZE), i * PAGE_SIZE);
    }
    return out;
  }

  /** Frees a session's buffers and closes its files. */
  endSession(session: number): void {
    this.sessions.get(session)?.close();
    this.sessions.delete(session);
  }

  /** Bytes of wasm memory this worker holds. */
  async memoryBytes(): Promise<number> {
    const engines = await Promise.all(this.engines.values());
    return engines.reduce((n, e) => n + e.core.memory.buffer.byteLength, 0);
  }

  close(): void {
    for (const s of this.sessions.values()) s.close();
    this.sessions.clear();
  }
}
