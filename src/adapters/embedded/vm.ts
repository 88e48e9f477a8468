// The embedded VM: a RAM file and a raw disk image made locally, and a guest
// worker that keeps changing them while a migration runs. It lets anyone run
// a real migration (real files, real TCP) with nothing installed.

import { Worker } from "node:worker_threads";
import { mkdirSync, openSync, closeSync, writeSync, ftruncateSync, statSync } from "node:fs";
import { join } from "node:path";
import { ContentStream } from "./content.js";
import type { GuestConfig } from "./guest.js";

export interface EmbeddedVmOptions {
  dir: string;
  /** RAM size, MiB (default 256). */
  ramMiB?: number;
  /** Disk image size, MiB (default: same as RAM). */
  diskMiB?: number;
  /** Share of RAM pages that are page cache: copies of disk blocks (default 0.5). */
  twinShare?: number;
  /** Share of RAM pages that are zero (default 0.2); the rest is anonymous data. */
  zeroShare?: number;
  /** Pages the guest writes per second while running (default 2000 = 7.8 MiB/s). */
  dirtyPagesPerSecond?: number;
  /** Share of the writes that are page-cache fills from disk (default 0.25). */
  cacheFillShare?: number;
  /** Disk blocks rewritten per second behind the page cache (default 20). */
  rewriteBlocksPerSecond?: number;
  /** Seed of the content, so the same VM can be made again (default "pagetwin"). */
  seed?: string;
  /**
   * Keep the RAM file and disk image already in `dir` when their sizes fit
   * (a VM made there before, as a guest left it): benchmarks that migrate the
   * same VM many times need not write it again.
   */
  reuse?: boolean;
}

export interface EmbeddedVmLayout {
  ramPath: string;
  imagePath: string;
  pages: number;
  imageBlocks: number;
  zeroPages: number;
  cachePages: number;
  anonPages: number;
}

export class EmbeddedVm {
  private worker: Worker | null = null;
  private acks: ((m: Record<string, unknown>) => void)[] = [];

  private constructor(readonly layout: EmbeddedVmLayout, private readonly cfg: GuestConfig) {}

  /** Writes the disk image and the RAM file (deterministic for a given seed). */
  static create(o: EmbeddedVmOptions): EmbeddedVm {
    const ramMiB = o.ramMiB ?? 256;
    const pages = ramMiB * 256;
    const blocks = (o.diskMiB ?? ramMiB) * 256;
    const twinShare = o.twinShare ?? 0.5;
    const zeroShare = o.zeroShare ?? 0.2;
    if (!(pages > 0) || twinShare < 0 || zeroShare < 0 || twinShare + zeroShare > 1) {
      throw new RangeError("pagetwin demo: need RAM > 0, and twin share + zero share between 0 and 1");
    }
    const seed = o.seed ?? "pagetwin";
    mkdirSync(join(o.dir, "nas"), { recursive: true });
    const imagePath = join(o.dir, "nas", "disk.img");
    const ramPath = join(o.dir, "source-ram");
    const files = new ContentStream(`${seed}/disk`);
    const anon = new ContentStream(`${seed}/anon`);
    const keep = !!o.reuse && sizeOf(imagePath) === blocks * 4096 && sizeOf(ramPath) === pages * 4096;
    const chunk = new Uint8Array(4 << 20);
    const img = openSync(imagePath, keep ? "r" : "w", 0o644);
    for (let b = 0; b < blocks && !keep; b += chunk.length / 4096) {
      const n = Math.min(chunk.length / 4096, blocks - b);
      files.fill(b, chunk.subarray(0, n * 4096));
      writeSync(img, chunk, 0, n * 4096, b * 4096);
    }
    closeSync(img);
    // Page roles from a seeded shuffle: page cache, zero, anonymous.
    const rng = mulberry32(hashString(seed));
    const order = Uint32Array.from({ length: pages }, (_, i) => i);
    for (let i = pages - 1; i > 0; i--) {
      const j = Math.floor(rng() * (i + 1));
      const t = order[i]!; order[i] = order[j]!; order[j] = t;
    }
    const nCache = Math.min(Math.round(pages * twinShare), blocks);
    const nZero = Math.round(pages * zeroShare);
    const cachePages = order.slice(0, nCache).sort();
    const anonPages = order.slice(nCache + nZero).sort();
    // distinct blocks for the cached pages
    const blockOrder = Uint32Array.from({ length: blocks }, (_, i) => i);
    for (let i = blocks - 1; i > 0; i--) {
      const j = Math.floor(rng() * (i + 1));
      const t = blockOrder[i]!; blockOrder[i] = blockOrder[j]!; blockOrder[j] = t;
    }
    const cacheBlocks = blockOrder.slice(0, nCache);
    if (!keep) writeRam(ramPath, pages, { cachePages, cacheBlocks, anonPages, files, anon });
    const cfg: GuestConfig = {
      ramPath, imagePath, anonPages, cachePages, cacheBlocks, imageBlocks: blocks,
      dirtyPagesPerSecond: o.dirtyPagesPerSecond ?? 2000,
      cacheFillShare: o.cacheFillShare ?? 0.25,
      rewriteBlocksPerSecond: o.rewriteBlocksPerSecond ?? 20,
    };
    return new EmbeddedVm({ ramPath, imagePath, pages, imageBlocks: blocks, zeroPages: nZero, cachePages: nCache, anonPages: anonPages.length }, cfg);
  }

  /** Starts the guest worker. */
  async start(): Promise<void> {
    const w = new Worker(new URL("./guest.js", import.meta.url), { workerData: this.cfg });
    this.worker = w;
    w.on("message", (m) => this.acks.shift()?.(m));
    w.on("error", (err) => { for (const a of this.acks.splice(0)) a({ error: err.message }); });
    await this.waitAck();
  }

  private waitAck(): Promise<Record<string, unknown>> {
    return new Promise((r) => this.acks.push(r));
  }

  private async command(cmd: string): Promise<Record<string, unknown>> {
    if (!this.worker) throw new Error("pagetwin: the embedded guest is not running");
    const p = this.waitAck();
    this.worker.postMessage(cmd);
    const m = await p;
    if (m.error) throw new Error(`pagetwin: the embedded guest failed: ${m.error}`);
    return m;
  }

  private pausedNow = false;

  async pause(): Promise<void> { await this.command("pause"); this.pausedNow = true; }
  async resume(): Promise<void> { await this.command("resume"); this.pausedNow = false; }

  /** The guest runs (started and not paused). */
  get running(): boolean {
    return this.worker !== null && !this.pausedNow;
  }

  /** Disk blocks that page-cache pages hold copies of (as made; the guest may change them). */
  get cachedBlocks(): Uint32Array {
    return this.cfg.cacheBlocks;
  }

  /** Stops the guest; returns what it did. */
  async stop(): Promise<{ written: number; filled: number; rewritten: number }> {
    if (!this.worker) return { written: 0, filled: 0, rewritten: 0 };
    const m = await this.command("stop");
    await this.worker.terminate();
    this.worker = null;
    return m as unknown as { written: number; filled: number; rewritten: number };
  }
}

function sizeOf(path: string): number {
  return statSync(path, { throwIfNoEntry: false })?.size ?? -1;
}

/** The RAM file: page-cache pages hold their disk block's bytes, anonymous pages their own, the rest zero. */
function writeRam(ramPath: string, pages: number, c: { cachePages: Uint32Array; cacheBlocks: Uint32Array; anonPages: Uint32Array; files: ContentStream; anon: ContentStream }): void {
  const ram = openSync(ramPath, "w+", 0o600);
  ftruncateSync(ram, pages * 4096);
  const page = new Uint8Array(4096);
  for (let k = 0; k < c.cachePages.length; k++) {
    c.files.fill(c.cacheBlocks[k]!, page);
    writeSync(ram, page, 0, 4096, c.cachePages[k]! * 4096);
  }
  for (const p of c.anonPages) {
    c.anon.fill(p, page);
    writeSync(ram, page, 0, 4096, p * 4096);
  }
  closeSync(ram);
}

function hashString(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return h >>> 0;
}

function mulberry32(a: number): () => number {
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
