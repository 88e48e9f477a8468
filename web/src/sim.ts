// A VM simulated in memory, migrated with the real core: the same Engine,
// TwinIndex, Planner and ConvergencePolicy as `pagetwin migrate`, but the
// guest, the disk image and the link are simulated, so a run is a pure
// function of its config (the browser's worker and Node compute the same
// numbers). No DOM and no Node APIs here: the visualizer's worker and the
// Node test both import this file.
//
// The guest is the embedded VM's (src/adapters/embedded): a seeded shuffle
// gives each page a role (page cache holding a distinct disk block, zero,
// anonymous); while pre-copy runs the guest writes pages at the dirty rate
// (a share of the writes read a disk block into a page-cache page, the rest
// overwrite anonymous pages) and rewrites disk blocks behind cached copies
// (those twins fail the destination's hash check and are sent again).
// Simulated time: an iteration lasts its wire bytes / bandwidth; the guest
// writes what it would write in that time before the next iteration starts.

import { Engine, HASH_SIZE, PAGE_SIZE, type Region, type TwinIndex } from "../../src/core/engine.js";
import { Planner } from "../../src/plan/planner.js";
import { ConvergencePolicy, type CapReason, type ConvergenceDecision } from "../../src/plan/convergence.js";

export type SimMode = "pagetwin" | "baseline";

export interface SimConfig {
  /** Guest RAM, MiB (4 KiB pages: 256 per MiB). */
  ramMiB: number;
  /** Disk image on the NAS, MiB (default: as RAM). */
  diskMiB?: number;
  /** Share of RAM pages that are page cache (copies of disk blocks), 0..1. */
  twinShare: number;
  /** Share of RAM pages that are zero, 0..1. */
  zeroShare: number;
  /** Pages the guest writes per second while pre-copy runs. */
  dirtyPagesPerSecond: number;
  /** Share of those writes that read a disk block into a page-cache page (default 0.25). */
  cacheFillShare?: number;
  /** Disk blocks the guest rewrites per second behind cached copies (default 20). */
  rewriteBlocksPerSecond?: number;
  /** Link bandwidth, Mbit/s (10^6 bits). */
  bandwidthMbit: number;
  /** Downtime target, ms (default 300, QEMU's). */
  downtimeMs?: number;
  /** Most pre-copy iterations (default 30). */
  maxIterations?: number;
  /** Seed of the guest's contents and behavior (default "pagetwin"). */
  seed?: string;
}

/** Page codes, as in trace files: what an iteration did to each page. */
export const PAGE_CLASS = { clean: 0, zero: 1, twin: 2, sent: 3, resent: 4 } as const;
/** Extra bits of live page maps: the guest wrote the page after it was scanned this round. */
export const MAP_DIRTIED = 0x08;
/** Bits 4-5 of live page maps: the page's role (0 unknown, as in replayed traces). */
export const ROLE = { unknown: 0, zero: 1, cache: 2, anon: 3 } as const;
export const ROLE_SHIFT = 4;

export interface PageCounts {
  normal: number;
  zero: number;
  twin: number;
  resent: number;
}

/** What one round moved: the fields a simulated round and a trace's round share. */
export interface RoundStats {
  iteration: number;
  final: boolean;
  /** Time since the migration started (simulated, in the simulation), ms. */
  startMs: number;
  durationMs: number;
  scanMs: number;
  dirty: number;
  pages: PageCounts;
  /** Bytes on the wire (frames as in docs/PROTOCOL.md). */
  transferredBytes: number;
}

export interface SimIteration extends RoundStats {
  /** Pages the guest wrote while this round was on the link (dirty for the next one). */
  guestWrites: number;
  /** One byte a page: PAGE_CLASS | MAP_DIRTIED | role << ROLE_SHIFT. */
  pageMap: Uint8Array;
}

export interface SimResult {
  mode: SimMode;
  status: "completed";
  totalTimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  iterations: number;
  pages: PageCounts;
  convergence: "converged" | CapReason;
  expectedDowntimeMs: number;
  /** The destination's page hashes equal the source RAM's at the end (by digest). */
  verified: boolean;
}

export interface SimSetup {
  mode: SimMode;
  pages: number;
  blocks: number;
  roles: { zero: number; cache: number; anon: number };
  indexEntries: number;
  indexBytes: number;
  flavor: string;
}

// ---- deterministic randomness and contents -----------------------------------

export function hashString(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return h >>> 0;
}

export function mulberry32(a: number): () => number {
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function mix32(a: number, b: number): number {
  let h = Math.imul(a ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(b + 0x632be5ab, 0xc2b2ae35);
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  return h >>> 0;
}

const TAG_BLOCK = 0x424c4b21; // disk block contents
const TAG_ANON = 0x414e4f4e; // anonymous memory

/**
 * Page contents: 4 KiB of a seeded noise pool at an offset that depends on
 * what the page holds, stamped with (tag, id, version, seed) so that no two
 * different contents are equal. Cheap to make, never zero.
 */
class Contents {
  private readonly pool: Uint32Array;
  private readonly poolWords = 1 << 18; // 1 MiB
  constructor(private readonly seed: number) {
    const rng = mulberry32(seed ^ 0x5eed);
    this.pool = new Uint32Array(this.poolWords + PAGE_SIZE / 4);
    for (let i = 0; i < this.pool.length; i++) this.pool[i] = (rng() * 4294967296) >>> 0;
  }
  fill(tag: number, id: number, version: number, into: Uint8Array): void {
    const off = (mix32(mix32(tag, id), version) & (this.poolWords - 1)) & ~3;
    const words = new Uint32Array(into.buffer, into.byteOffset, PAGE_SIZE / 4);
    words.set(this.pool.subarray(off, off + PAGE_SIZE / 4));
    words[0] = tag;
    words[1] = id;
    words[2] = version;
    words[3] = this.seed;
  }
}

// ---- wire bytes, as the source agent frames them -----------------------------

const FRAME_HEAD = 5 + 4; // length, type, count
const FRAME_PAGES = 256; // pages per Pages frame (source.ts framePages)
const REFS_PER_FRAME = 4096;
const ITER_END_BYTES = 5 + 48; // the IterEnd JSON frame

function framed(n: number, perFrame: number, each: number): number {
  return n === 0 ? 0 : Math.ceil(n / perFrame) * FRAME_HEAD + n * each;
}

// ---- the simulation ----------------------------------------------------------

export class Simulation {
  readonly pages: number;
  readonly blocks: number;
  readonly bytesPerSecond: number;
  private readonly ram: Uint8Array;
  private readonly role: Uint8Array;
  private readonly anonPages: Uint32Array;
  private readonly cachePages: Uint32Array;
  private readonly cacheBlocks: Uint32Array;
  private readonly blockVersion: Uint16Array;
  private readonly anonVersion: Uint32Array;
  private readonly contents: Contents;
  private readonly rng: () => number;
  private readonly planner: Planner;
  private readonly policy: ConvergencePolicy;
  private readonly log: SimIteration[] = [];
  private debt = 0;
  private rewriteDebt = 0;
  private clockMs = 0;
  private totalBytes = 0;
  private decision: ConvergenceDecision = { action: "continue" };
  private finished: SimResult | null = null;

  private constructor(
    readonly engine: Engine,
    readonly config: Required<SimConfig>,
    readonly mode: SimMode,
    private readonly index: TwinIndex | null,
  ) {
    const c = config;
    this.pages = c.ramMiB * 256;
    this.blocks = c.diskMiB * 256;
    this.bytesPerSecond = (c.bandwidthMbit * 1e6) / 8;
    const seed = hashString(c.seed);
    this.contents = new Contents(seed);
    this.rng = mulberry32(seed);
    // Page roles from a seeded shuffle, then distinct blocks for the cached pages (as the embedded VM).
    const order = shuffled(this.pages, this.rng);
    const nCache = Math.min(Math.round(this.pages * c.twinShare), this.blocks);
    const nZero = Math.round(this.pages * c.zeroShare);
    this.cachePages = order.slice(0, nCache).sort();
    this.anonPages = order.slice(nCache + nZero).sort();
    this.cacheBlocks = shuffled(this.blocks, this.rng).slice(0, nCache);
    this.role = new Uint8Array(this.pages).fill(ROLE.zero);
    this.ram = new Uint8Array(this.pages * PAGE_SIZE);
    for (let k = 0; k < nCache; k++) {
      const p = this.cachePages[k]!;
      this.role[p] = ROLE.cache;
      this.contents.fill(TAG_BLOCK, this.cacheBlocks[k]!, 0, this.page(p));
    }
    for (const p of this.anonPages) {
      this.role[p] = ROLE.anon;
      this.contents.fill(TAG_ANON, p, 0, this.page(p));
    }
    this.blockVersion = new Uint16Array(this.blocks);
    this.anonVersion = new Uint32Array(this.pages);
    this.planner = new Planner(engine, { pages: this.pages, index });
    this.policy = new ConvergencePolicy({ downtimeMs: c.downtimeMs, maxIterations: c.maxIterations });
  }

  /** Makes the VM and, for pagetwin, the block index of its disk image (hashed by the core). */
  static create(engine: Engine, config: SimConfig, mode: SimMode): Simulation {
    const c = normalizeConfig(config);
    const index = mode === "pagetwin" ? buildIndex(engine, c) : null;
    return new Simulation(engine, c, mode, index);
  }

  get done(): boolean {
    return this.finished !== null;
  }

  get iterations(): readonly SimIteration[] {
    return this.log;
  }

  setup(): SimSetup {
    let zero = 0, cache = 0, anon = 0;
    for (const r of this.role) {
      if (r === ROLE.zero) zero++;
      else if (r === ROLE.cache) cache++;
      else anon++;
    }
    return {
      mode: this.mode, pages: this.pages, blocks: this.blocks, roles: { zero, cache, anon },
      indexEntries: this.index?.size ?? 0, indexBytes: this.index?.bytes ?? 0, flavor: this.engine.flavor,
    };
  }

  /** Page roles now (ROLE values, one byte a page). */
  roles(): Uint8Array {
    return this.role.slice();
  }

  private page(p: number): Uint8Array {
    return this.ram.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
  }

  /** Runs the next round (pre-copy, or the final one with the guest stopped); null when finished. */
  next(): SimIteration | null {
    if (this.finished) return null;
    const final = this.decision.action !== "continue";
    const iteration = this.log.length + 1;
    const rec = this.runIteration(iteration, final);
    if (final) {
      this.finish(rec);
      return rec;
    }
    // The guest ran while the round was on the link.
    rec.guestWrites = this.runGuest(rec.durationMs / 1000, rec.pageMap);
    this.decision = this.policy.decide({
      iteration, wireBytes: rec.transferredBytes, scanMs: rec.scanMs,
      bytesPerSecond: this.bytesPerSecond, totalBytes: this.totalBytes, ramBytes: this.pages * PAGE_SIZE,
    });
    return rec;
  }

  /** Runs to the end. */
  run(): SimResult {
    while (this.next());
    return this.finished!;
  }

  result(): SimResult | null {
    return this.finished;
  }

  private runIteration(iteration: number, final: boolean): SimIteration {
    const planner = this.planner;
    const map = new Uint8Array(this.pages);
    const pages: PageCounts = { normal: 0, zero: 0, twin: 0, resent: 0 };
    let dirty = 0;
    let bytes = ITER_END_BYTES;
    for (let first = 0; first < this.pages; first += planner.windowPages) {
      const count = planner.windowCount(first);
      planner.window.view(0, count * PAGE_SIZE).set(this.ram.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE));
      const plan = planner.planWindow(first, count);
      dirty += plan.dirty;
      pages.zero += plan.zero.length;
      pages.twin += plan.twinPages.length;
      pages.normal += plan.send.length;
      bytes += framed(plan.zero.length, Infinity, 4);
      bytes += framed(plan.twinPages.length, REFS_PER_FRAME, 24);
      bytes += framed(plan.send.length, FRAME_PAGES, 4 + PAGE_SIZE);
      for (const p of plan.zero) map[p] = PAGE_CLASS.zero;
      for (const p of plan.send) map[p] = PAGE_CLASS.sent;
      for (let i = 0; i < plan.twinPages.length; i++) {
        const p = plan.twinPages[i]!;
        // The destination reads the block and checks its hash: a block rewritten since indexing fails.
        if (this.blockVersion[plan.twinBlocks[i]!] !== 0) {
          map[p] = PAGE_CLASS.resent;
          pages.resent++;
        } else map[p] = PAGE_CLASS.twin;
      }
    }
    if (pages.resent > 0) bytes += framed(pages.resent, FRAME_PAGES, 4 + PAGE_SIZE) + 13 + 4 * pages.resent + ITER_END_BYTES;
    bytes += 13; // IterAck
    for (let p = 0; p < this.pages; p++) map[p] = map[p]! | (this.role[p]! << ROLE_SHIFT);
    const durationMs = (bytes / this.bytesPerSecond) * 1000;
    const rec: SimIteration = {
      iteration, final, startMs: this.clockMs, durationMs, scanMs: 0, dirty, pages,
      transferredBytes: bytes, guestWrites: 0, pageMap: map,
    };
    this.clockMs += durationMs;
    this.totalBytes += bytes;
    this.log.push(rec);
    return rec;
  }

  /** The guest's writes during `seconds` of simulated time; marks written pages in `map`. */
  private runGuest(seconds: number, map: Uint8Array): number {
    const c = this.config;
    const rng = this.rng;
    let writes = 0;
    this.debt += c.dirtyPagesPerSecond * seconds;
    this.rewriteDebt += c.rewriteBlocksPerSecond * seconds;
    while (this.debt >= 1) {
      this.debt -= 1;
      if (this.cachePages.length && rng() < c.cacheFillShare) {
        // the guest reads a file: a disk block (as it is on disk now) lands in a page-cache page
        const k = Math.floor(rng() * this.cachePages.length);
        const b = Math.floor(rng() * this.blocks);
        const p = this.cachePages[k]!;
        this.contents.fill(TAG_BLOCK, b, this.blockVersion[b]!, this.page(p));
        this.cacheBlocks[k] = b;
        map[p] = map[p]! | MAP_DIRTIED;
        writes++;
      } else if (this.anonPages.length) {
        const p = this.anonPages[Math.floor(rng() * this.anonPages.length)]!;
        this.contents.fill(TAG_ANON, p, ++this.anonVersion[p]!, this.page(p));
        map[p] = map[p]! | MAP_DIRTIED;
        writes++;
      }
    }
    while (this.rewriteDebt >= 1 && this.cachePages.length) {
      this.rewriteDebt -= 1;
      // a block that some page still caches gets new content on disk only
      const b = this.cacheBlocks[Math.floor(rng() * this.cacheBlocks.length)]!;
      this.blockVersion[b] = Math.min(this.blockVersion[b]! + 1, 0xffff);
    }
    return writes;
  }

  private finish(last: SimIteration): void {
    if (this.decision.action === "continue") throw new Error("unreachable");
    const totals: PageCounts = { normal: 0, zero: 0, twin: 0, resent: 0 };
    for (const r of this.log) {
      totals.normal += r.pages.normal;
      totals.zero += r.pages.zero;
      totals.twin += r.pages.twin;
      totals.resent += r.pages.resent;
    }
    // What the destination holds, by hash, against the source RAM now.
    const want = this.engine.digest(this.engine.hashPages(this.ram));
    const have = this.engine.digest(this.planner.sentHashes());
    this.finished = {
      mode: this.mode, status: "completed",
      totalTimeMs: this.clockMs, downtimeMs: last.durationMs, transferredBytes: this.totalBytes,
      iterations: this.log.length, pages: totals,
      convergence: this.decision.reason, expectedDowntimeMs: this.decision.expectedDowntimeMs,
      verified: want.every((b, i) => b === have[i]),
    };
    this.planner.free();
    this.index?.free();
  }
}

function shuffled(n: number, rng: () => number): Uint32Array {
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    const t = order[i]!; order[i] = order[j]!; order[j] = t;
  }
  return order;
}

export function normalizeConfig(c: SimConfig): Required<SimConfig> {
  const out: Required<SimConfig> = {
    ramMiB: c.ramMiB, diskMiB: c.diskMiB ?? c.ramMiB, twinShare: c.twinShare, zeroShare: c.zeroShare,
    dirtyPagesPerSecond: c.dirtyPagesPerSecond, cacheFillShare: c.cacheFillShare ?? 0.25,
    rewriteBlocksPerSecond: c.rewriteBlocksPerSecond ?? 20, bandwidthMbit: c.bandwidthMbit,
    downtimeMs: c.downtimeMs ?? 300, maxIterations: c.maxIterations ?? 30, seed: c.seed ?? "pagetwin",
  };
  const bad = (why: string) => { throw new RangeError(`pagetwin sim: ${why}`); };
  if (!Number.isInteger(out.ramMiB) || out.ramMiB < 1 || out.ramMiB > 2048) bad("RAM must be a whole number of MiB, 1..2048");
  if (!Number.isInteger(out.diskMiB) || out.diskMiB < 1 || out.diskMiB > 8192) bad("the disk must be a whole number of MiB, 1..8192");
  if (!(out.twinShare >= 0 && out.zeroShare >= 0 && out.twinShare + out.zeroShare <= 1)) bad("twin share + zero share must be between 0 and 1");
  if (!(out.dirtyPagesPerSecond >= 0) || !(out.rewriteBlocksPerSecond >= 0)) bad("rates must be 0 or more");
  if (!(out.cacheFillShare >= 0 && out.cacheFillShare <= 1)) bad("the cache fill share must be between 0 and 1");
  if (!(out.bandwidthMbit > 0)) bad("bandwidth must be positive");
  return out;
}

/** Hashes every block of the (procedural) disk image in the core and indexes it. */
function buildIndex(engine: Engine, c: Required<SimConfig>): TwinIndex {
  const blocks = c.diskMiB * 256;
  const contents = new Contents(hashString(c.seed));
  const index = engine.createIndex(blocks);
  const batch = Math.min(1024, blocks);
  const data: Region = engine.alloc(batch * PAGE_SIZE);
  const hashes: Region = engine.alloc(batch * HASH_SIZE);
  try {
    for (let first = 0; first < blocks; first += batch) {
      const n = Math.min(batch, blocks - first);
      const v = data.view(0, n * PAGE_SIZE);
      for (let i = 0; i < n; i++) contents.fill(TAG_BLOCK, first + i, 0, v.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
      engine.hashPagesAt(data.ptr, n, hashes.ptr);
      index.setBlocksAt(hashes.ptr, first, n);
    }
  } finally {
    data.free();
    hashes.free();
  }
  return index;
}

// ---- traces (the format `pagetwin demo` writes) ----------------------------------

export interface TraceIteration extends RoundStats {
  /** base64, one byte a page (PAGE_CLASS). */
  pageMap?: string;
}

export interface Trace {
  format: "pagetwin-trace";
  version: 1;
  pages: number;
  config: Record<string, unknown>;
  machine?: Record<string, unknown>;
  runs: { mode: string; result: Record<string, unknown> & { totalTimeMs: number; downtimeMs: number; transferredBytes: number; iterations: number; pages: PageCounts; verified?: boolean }; iterations: TraceIteration[] }[];
}

export function base64Encode(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function base64Decode(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** A trace of simulated runs, in the format of `pagetwin demo` (page maps without the live-only bits). */
export function toTrace(config: SimConfig, runs: { result: SimResult; iterations: readonly SimIteration[] }[]): Trace {
  const c = normalizeConfig(config);
  return {
    format: "pagetwin-trace", version: 1, pages: c.ramMiB * 256,
    config: { ...c, bandwidthBytesPerSecond: (c.bandwidthMbit * 1e6) / 8, simulated: true },
    machine: { simulated: true },
    runs: runs.map(({ result, iterations }) => ({
      mode: result.mode,
      result: { ...result, pages: { ...result.pages } },
      iterations: iterations.map((r) => ({
        iteration: r.iteration, final: r.final, startMs: r.startMs, durationMs: r.durationMs, scanMs: r.scanMs,
        dirty: r.dirty, pages: { ...r.pages }, transferredBytes: r.transferredBytes,
        pageMap: base64Encode(r.pageMap.map((b) => b & 0x07)),
      })),
    })),
  };
}
