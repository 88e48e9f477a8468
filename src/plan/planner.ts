// Planner: per pre-copy iteration, joins page hashes against what the
// destination holds and against the block index, window by window:
//   dirty = hash != sent;  zero = dirty & zeroPage;  twin = dirty & ~zero & inIndex
//   send  = dirty & ~zero & ~twin;  twinPages/twinBlocks = (page, block) for twin pages.
// Pure logic over Engine results: the caller reads pages into `pages` (a
// region of core memory) and sends what the plan says from those same bytes,
// so what the destination gets is exactly what was hashed.

import { Engine, Region, TwinIndex, bitBytes, HASH_SIZE, PAGE_SIZE } from "../core/engine.js";
import { AsyncReaderError, EngineMismatchError } from "../errors.js";
import { abortable, throwIfAborted, type AbortOptions } from "../abort.js";
import type { Progress } from "../log.js";

export interface PlannerOptions {
  /** Pages of guest RAM. */
  pages: number;
  /** Pages hashed per window (a multiple of 64). Default 4096 (16 MiB). */
  windowPages?: number;
  /** Block index of the NAS image; without it no page is a twin (plain pre-copy). */
  index?: TwinIndex | null;
}

/** What one window of one iteration moves. Page numbers are absolute. */
export interface WindowPlan {
  first: number;
  count: number;
  dirty: number;
  /** Pages to send in full (their bytes are at pageOffset(i) in the window region). */
  send: Uint32Array;
  /** Twin pages and the NAS block each is a copy of. */
  twinPages: Uint32Array;
  twinBlocks: Uint32Array;
  /** Dirty pages that are now all zero. */
  zero: Uint32Array;
  /**
   * Zero pages that are not dirty: the destination holds zeros for them
   * already (in a first round, every zero page of RAM: the destination's RAM
   * starts zeroed), so nothing is sent.
   */
  zeroHeld: number;
}

/** Counters of one iteration, named after QEMU's query-migrate where one exists. */
export interface IterationStats {
  iteration: number;
  /** Pages whose hash differed from the destination's. */
  dirty: number;
  /** Pages sent in full (QEMU: ram.normal). */
  normal: number;
  /** Dirty pages that are zero (QEMU: ram.duplicate). */
  zero: number;
  /** Pages sent as a reference to a NAS block. */
  twin: number;
  /** Pages sent again after the destination found their NAS block changed. */
  resent: number;
}

export interface IterationPlan extends IterationStats {
  send: Uint32Array;
  twinPages: Uint32Array;
  twinBlocks: Uint32Array;
  zeroPages: Uint32Array;
}

/**
 * Plans pre-copy iterations of one VM: per window, which dirty pages are
 * zero, which are twins of NAS blocks (the index) and which go in full.
 * Holds, per page, the hash the destination has. Its buffers live in the
 * engine's memory: call free() when done. The index must live in the same engine.
 */
export class Planner {
  readonly pages: number;
  readonly windowPages: number;
  readonly window: Region; // page bytes of the current window
  private readonly sent: Region; // 16 B per page: the hash the destination holds
  private readonly winHashes: Region;
  private readonly winBlocks: Region;
  private readonly bits: { zero: Region; dirty: Region; cand: Region; twin: Region; send: Region; zeroDirty: Region };
  private readonly list: Region;
  private index: TwinIndex | null;

  constructor(readonly engine: Engine, options: PlannerOptions) {
    if (!Number.isInteger(options.pages) || options.pages <= 0) throw new RangeError(`pagetwin: a VM needs a whole, positive number of pages (got ${options.pages})`);
    const w = options.windowPages ?? 4096;
    if (w % 64 !== 0 || w <= 0) throw new RangeError("pagetwin: windowPages must be a positive multiple of 64");
    if (options.index && options.index.engine !== engine) {
      throw new EngineMismatchError("pagetwin: the Planner's index lives in another Engine; build or open the index with the engine the Planner uses (openNasIndex returns it as nas.engine)");
    }
    this.pages = options.pages;
    this.windowPages = Math.min(w, Math.ceil(options.pages / 64) * 64);
    this.index = options.index ?? null;
    const W = this.windowPages;
    this.sent = engine.alloc(this.pages * HASH_SIZE);
    this.window = engine.alloc(W * PAGE_SIZE);
    this.winHashes = engine.alloc(W * HASH_SIZE);
    this.winBlocks = engine.alloc(W * 4);
    const b = () => engine.allocZeroed(bitBytes(W));
    this.bits = { zero: b(), dirty: b(), cand: b(), twin: b(), send: b(), zeroDirty: b() };
    this.list = engine.alloc(W * 4);
    this.resetDestination();
  }

  /** The destination starts from zeroed RAM: every page's known hash is the zero page's. */
  resetDestination(): void {
    const z = this.engine.zeroPageHash();
    const v = this.sent.view();
    for (let i = 0; i < this.pages; i++) v.set(z, i * HASH_SIZE);
  }

  get dedup(): boolean {
    return this.index !== null;
  }

  /** Page count of the window starting at `first`. */
  windowCount(first: number): number {
    return Math.min(this.windowPages, this.pages - first);
  }

  /** Byte offset of page `page` inside the window region (page in the current window). */
  pageOffset(first: number, page: number): number {
    return (page - first) * PAGE_SIZE;
  }

  /**
   * Plans the window of pages first..first+count-1, whose bytes the caller
   * has just put in `window`. Marks every dirty page as held by the
   * destination with the hash of the bytes in `window` (the caller sends them).
   */
  planWindow(first: number, count: number): WindowPlan {
    this.checkWindow(first, count);
    this.engine.hashPagesAt(this.window.ptr, count, this.winHashes.ptr, this.bits.zero.ptr);
    return this.join(first, count);
  }

  /**
   * Same, for a window hashed elsewhere (a worker of the pool, which keeps the
   * page bytes): `hashes` 16 bytes a page, `zeroBits` one bit a page.
   */
  planWindowHashed(first: number, count: number, hashes: Uint8Array, zeroBits: Uint8Array): WindowPlan {
    this.checkWindow(first, count);
    if (hashes.length !== count * HASH_SIZE || zeroBits.length < Math.ceil(count / 8)) {
      throw new RangeError(`pagetwin: ${hashes.length} bytes of hashes / ${zeroBits.length} of zero bits for a window of ${count} pages`);
    }
    this.winHashes.view(0, hashes.length).set(hashes);
    this.bits.zero.view(0, Math.ceil(count / 8)).set(zeroBits.subarray(0, Math.ceil(count / 8)));
    return this.join(first, count);
  }

  /**
   * Counts the pages of `window` (bytes the caller put there for pages
   * first..first+count-1) whose hash differs from what the destination
   * holds, and changes nothing: a sample of how much a round would send.
   */
  countDirty(first: number, count: number): number {
    this.checkWindow(first, count);
    this.engine.hashPagesAt(this.window.ptr, count, this.winHashes.ptr);
    return this.engine.diffBits(this.bits.dirty.ptr, this.winHashes.ptr, this.sent.ptr + first * HASH_SIZE, count);
  }

  private checkWindow(first: number, count: number): void {
    if (first % 64 !== 0 || count <= 0 || count > this.windowPages || first + count > this.pages) {
      throw new RangeError(`pagetwin: bad window ${first}+${count} for a VM of ${this.pages} pages`);
    }
  }

  private join(first: number, count: number): WindowPlan {
    const e = this.engine;
    const { zero, dirty, cand, twin, send, zeroDirty } = this.bits;
    const sentPtr = this.sent.ptr + first * HASH_SIZE;
    const nDirty = e.diffBits(dirty.ptr, this.winHashes.ptr, sentPtr, count);
    e.bitsCombine("and", zeroDirty.ptr, dirty.ptr, zero.ptr, count);
    e.bitsCombine("andNot", cand.ptr, dirty.ptr, zero.ptr, count);
    let twinPages = new Uint32Array(0);
    let twinBlocks = new Uint32Array(0);
    if (this.index && nDirty > 0) {
      const found = this.index.lookupAt(this.winHashes.ptr, count, cand.ptr, this.winBlocks.ptr, twin.ptr);
      e.bitsCombine("andNot", send.ptr, cand.ptr, twin.ptr, count);
      if (found > 0) {
        const n = e.extractBits(twin.ptr, count, this.list.ptr, 0);
        const rel = e.u32(this.list.ptr, n);
        const blocks = e.u32(this.winBlocks.ptr, count);
        twinPages = new Uint32Array(n);
        twinBlocks = new Uint32Array(n);
        for (let i = 0; i < n; i++) {
          twinPages[i] = first + rel[i]!;
          twinBlocks[i] = blocks[rel[i]!]!;
        }
      }
    } else {
      e.bitsCombine("copy", send.ptr, cand.ptr, cand.ptr, count);
    }
    const sendList = this.extract(send, count, first);
    const zeroList = this.extract(zeroDirty, count, first);
    const zeroHeld = e.popcount(zero.ptr, count) - zeroList.length;
    e.copyRecordsMasked(sentPtr, this.winHashes.ptr, dirty.ptr, count);
    return { first, count, dirty: nDirty, send: sendList, twinPages, twinBlocks, zero: zeroList, zeroHeld };
  }

  private extract(bits: Region, count: number, first: number): Uint32Array {
    const n = this.engine.extractBits(bits.ptr, count, this.list.ptr, first);
    return this.engine.u32(this.list.ptr, n).slice();
  }

  /** The 16-byte hash of page `i` of the current window (valid until the next planWindow). */
  windowHash(first: number, page: number): Uint8Array {
    return this.winHashes.view((page - first) * HASH_SIZE, HASH_SIZE);
  }

  /** Records that the destination now holds content with `hash` for `page` (a resend). */
  recordSent(page: number, hash: Uint8Array): void {
    this.sent.view(page * HASH_SIZE, HASH_SIZE).set(hash);
  }

  /** The hashes the destination holds, 16 bytes per page (a fresh view). */
  sentHashes(): Uint8Array {
    return this.sent.view();
  }

  free(): void {
    for (const r of [this.sent, this.window, this.winHashes, this.winBlocks, this.list, ...Object.values(this.bits)]) r.free();
  }
}

/** Puts the bytes of pages first..first+count-1 into `into` (count * 4096 bytes) before it returns. */
export type WindowReader = (first: number, count: number, into: Uint8Array) => void;

/** Same, done when the returned promise settles (e.g. `fs/promises` FileHandle.read). */
export type AsyncWindowReader = (first: number, count: number, into: Uint8Array) => void | Promise<void>;

export interface PlanIterationOptions extends AbortOptions {
  /** Called after every window with phase "iteration": pages planned so far, bytes read so far. */
  onProgress?: (p: Progress) => void;
}

/**
 * Runs a whole iteration through a synchronous page reader, collecting one
 * IterationPlan. A reader that returns a Promise would leave stale bytes in
 * the window: it is refused with an AsyncReaderError (use planIterationAsync).
 */
export function planIteration(planner: Planner, iteration: number, readWindow: WindowReader): IterationPlan {
  const parts: WindowPlan[] = [];
  for (let first = 0; first < planner.pages; first += planner.windowPages) {
    const count = planner.windowCount(first);
    const r: unknown = readWindow(first, count, planner.window.view(0, count * PAGE_SIZE));
    if (isThenable(r)) {
      r.then(undefined, () => {}); // refused below; its outcome no longer matters
      throw new AsyncReaderError("pagetwin: planIteration's reader returned a Promise, so the window would be planned before its bytes arrived; use planIterationAsync for an async reader");
    }
    parts.push(planner.planWindow(first, count));
  }
  return collect(iteration, parts);
}

/**
 * Pages dirtied since they were recorded as sent, estimated from evenly
 * spaced runs of 64 pages (1/32 of RAM, 4096..16384 pages): read, hashed and
 * compared, nothing recorded (`sampled`: the pages read). What the agent's
 * first round decides on, and what analyze predicts that decision from.
 */
export function estimateDirtyPages(planner: Planner, read: (first: number, count: number, into: Uint8Array) => void): { pages: number; sampled: number } {
  const pages = planner.pages;
  const target = Math.min(pages, Math.max(4096, Math.min(16384, Math.floor(pages / 32))));
  const runs = Math.ceil(target / 64);
  const stride = Math.max(64, Math.floor(pages / runs / 64) * 64);
  let sampled = 0, dirty = 0;
  for (let first = 0; first < pages && sampled < target; first += stride) {
    const count = Math.min(64, pages - first);
    read(first, count, planner.window.view(0, count * PAGE_SIZE));
    dirty += planner.countDirty(first, count);
    sampled += count;
  }
  return { pages: Math.ceil((dirty / sampled) * pages), sampled };
}

/**
 * Runs a whole iteration through a page reader that may be async (each
 * window is read, awaited, then planned), collecting one IterationPlan.
 * Aborting stops it between windows with an AbortError; the windows already
 * planned stay recorded as sent (as they would be in a migration).
 */
export async function planIterationAsync(planner: Planner, iteration: number, readWindow: AsyncWindowReader, o: PlanIterationOptions = {}): Promise<IterationPlan> {
  const parts: WindowPlan[] = [];
  for (let first = 0; first < planner.pages; first += planner.windowPages) {
    throwIfAborted(o.signal, "planning the iteration");
    const count = planner.windowCount(first);
    await abortable(Promise.resolve(readWindow(first, count, planner.window.view(0, count * PAGE_SIZE))), o.signal, "planning the iteration");
    parts.push(planner.planWindow(first, count));
    o.onProgress?.({ phase: "iteration", iteration, done: first + count, total: planner.pages, bytes: (first + count) * PAGE_SIZE });
  }
  return collect(iteration, parts);
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return typeof v === "object" && v !== null && typeof (v as { then?: unknown }).then === "function";
}

/** @internal One IterationPlan from the plans of its windows. */
export function collect(iteration: number, parts: WindowPlan[]): IterationPlan {
  const cat = (f: (p: WindowPlan) => Uint32Array) => {
    const out = new Uint32Array(parts.reduce((n, p) => n + f(p).length, 0));
    let o = 0;
    for (const p of parts) { out.set(f(p), o); o += f(p).length; }
    return out;
  };
  const send = cat((p) => p.send), twinPages = cat((p) => p.twinPages), twinBlocks = cat((p) => p.twinBlocks), zeroPages = cat((p) => p.zero);
  return {
    iteration,
    dirty: parts.reduce((n, p) => n + p.dirty, 0),
    normal: send.length,
    zero: zeroPages.length,
    twin: twinPages.length,
    resent: 0,
    send, twinPages, twinBlocks, zeroPages,
  };
}
