// Bringing a stale index up to date: re-read some blocks (the ones QEMU's
// dirty bitmap says were written, or all of them at a bounded rate when no VM
// tracks writes), re-hash them into the index in memory, and write the index
// file as the next generation. The seed and the index id stay: a destination
// that read the header before the refresh still matches the source.

import { HASH_SIZE } from "../../core/engine.js";
import { RateLimiter } from "../../link/rate.js";
import { BLOCK_SIZE, type ImageIdentity } from "./image.js";
import { sameIdentity, type RefreshKind } from "./index-header.js";
import { writeIndexFile, type NasIndex } from "./index-file.js";
import type { Log, Progress } from "../../log.js";
import { throwIfAborted } from "../../abort.js";
import { AbortError } from "../../errors.js";

/** Where the fresh content of blocks comes from. */
export interface BlockSource {
  /** Each run's blocks into `into`, one run after the other (sum of counts * 4096 bytes); a source may read them all at once. */
  read(runs: readonly BlockRun[], into: Uint8Array): Promise<void> | void;
}

/** A run of blocks: first, count. */
export type BlockRun = readonly [number, number];

export interface RefreshOptions {
  kind: RefreshKind;
  /** The image's identity taken before the first block was read (what the new generation stands for). */
  identity: ImageIdentity;
  /** Bytes per second to read at most (0 or absent: no limit). */
  rateBytesPerSec?: number;
  /** Blocks read per batch (default 256 = 1 MiB). */
  batchBlocks?: number;
  signal?: AbortSignal;
  onProgress?: (p: Progress) => void;
}

export interface RefreshResult {
  kind: RefreshKind;
  generation: number;
  blocksRead: number;
  /** Blocks whose hash differs from the index's. */
  blocksChanged: number;
  ms: number;
}

/** Re-hashes the blocks of `runs` from `source` into the index, then writes generation + 1. */
export async function refreshBlocks(nas: NasIndex, runs: Iterable<BlockRun>, source: BlockSource, o: RefreshOptions): Promise<RefreshResult> {
  const t0 = performance.now();
  const { engine, index } = nas;
  const batch = o.batchBlocks ?? 256;
  const rate = new RateLimiter(o.rateBytesPerSec ?? 0);
  const list = [...runs];
  const total = list.reduce((n, [, c]) => n + c, 0);
  const buf = engine.alloc(batch * BLOCK_SIZE);
  const out = engine.alloc(batch * HASH_SIZE);
  let done = 0;
  let changed = 0;
  try {
    for (const group of batches(list, batch)) {
      throwIfAborted(o.signal, "the index refresh");
      const n = group.reduce((k, [, c]) => k + c, 0);
      await rate.take(n * BLOCK_SIZE);
      await source.read(group, buf.view(0, n * BLOCK_SIZE));
      engine.hashPagesAt(buf.ptr, n, out.ptr);
      let slot = 0;
      for (const [first, count] of group) {
        changed += countChanged(index.blockHashes(), out.view(slot * HASH_SIZE, count * HASH_SIZE), first, count);
        index.setBlocksAt(out.ptr + slot * HASH_SIZE, first, count);
        slot += count;
      }
      done += n;
      o.onProgress?.({ phase: "refresh", done, total, bytes: done * BLOCK_SIZE });
    }
  } finally {
    buf.free();
    out.free();
  }
  const h = nas.header;
  Object.assign(h, { generation: h.generation + 1, identity: o.identity, refreshedAt: Date.now(), refreshedBy: o.kind });
  writeIndexFile(nas.indexPath, h, index.blockHashes());
  nas.stale = !sameIdentity(o.identity, nas.image.identity());
  return { kind: o.kind, generation: h.generation, blocksRead: done, blocksChanged: changed, ms: performance.now() - t0 };
}

/** Re-reads the whole image from its file (no VM tracks its writes), at most `rateBytesPerSec`. */
export function refreshByReread(nas: NasIndex, o: Omit<RefreshOptions, "kind" | "identity"> = {}): Promise<RefreshResult> {
  const identity = nas.image.identity();
  return refreshBlocks(nas, [[0, nas.header.blocks]], imageSource(nas.image), { ...o, kind: "re-read", identity });
}

/** Blocks read from the image file, the way the destination reads them to verify a twin. */
export function imageSource(image: NasIndex["image"]): BlockSource {
  return {
    read: (runs, into) => {
      let at = 0;
      for (const [first, count] of runs) {
        image.readBlocks(first, count, into.subarray(at, at + count * BLOCK_SIZE));
        at += count * BLOCK_SIZE;
      }
    },
  };
}

/**
 * A re-read in the background at a bounded rate, started when a migration
 * opened a stale index: the migration goes on with the index as it is.
 */
export class BackgroundRefresh {
  private readonly abort = new AbortController();
  readonly done: Promise<RefreshResult | null>;

  constructor(nas: NasIndex, rateBytesPerSec: number, log: Log) {
    this.done = refreshByReread(nas, { rateBytesPerSec, signal: this.abort.signal }).then(
      (r) => { log.info(`index ${nas.indexPath} refreshed in the background: generation ${r.generation}, ${r.blocksChanged} of ${r.blocksRead} blocks changed`); return r; },
      (err: Error) => { if (!(err instanceof AbortError)) log.warn(`index refresh failed: ${err.message}`); return null; },
    );
  }

  /** Stops the re-read (before the image is closed); resolves when it has. */
  async stop(): Promise<void> {
    this.abort.abort();
    await this.done;
  }
}

/** The runs cut and grouped into batches of at most `max` blocks (a run longer than that spans batches). */
function* batches(runs: readonly BlockRun[], max: number): Generator<BlockRun[]> {
  let group: BlockRun[] = [];
  let size = 0;
  for (const [first, count] of runs) {
    for (let b = first; b < first + count;) {
      const n = Math.min(max - size, first + count - b);
      group.push([b, n]);
      size += n;
      b += n;
      if (size === max) { yield group; group = []; size = 0; }
    }
  }
  if (size) yield group;
}

/** How many of the n hashes at `fresh` differ from the index's records of blocks first.. */
function countChanged(records: Uint8Array, fresh: Uint8Array, first: number, n: number): number {
  let changed = 0;
  for (let i = 0; i < n; i++) {
    const at = (first + i) * HASH_SIZE;
    for (let k = 0; k < HASH_SIZE; k++) {
      if (records[at + k] !== fresh[i * HASH_SIZE + k]) { changed++; break; }
    }
  }
  return changed;
}
