// The block index kept beside the image (IMAGE.pagetwin-index), so a second
// run does not re-hash an unchanged image. It holds the random hash seed:
// both hosts read it from the NAS, it never crosses the migration link, and
// the file is created mode 0600 and replaced atomically (temp file + rename).
// Its layout is in index-header.ts. An index whose image changed since is
// still used (stale): the destination verifies every block it fetches, so a
// stale entry costs a resend, never a wrong page; refresh.ts brings it up to
// date.

import { NasError } from "../../errors.js";
import { closeSync, openSync, readSync, renameSync, writeSync, existsSync, fsyncSync, unlinkSync, fchmodSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { createEngine, Engine, TwinIndex, HASH_SIZE } from "../../core/engine.js";
import { EngineMismatchError } from "../../errors.js";
import { throwIfAborted, type AbortOptions } from "../../abort.js";
import type { Progress } from "../../log.js";
import type { EnginePool } from "../../pool/pool.js";
import { BLOCK_SIZE, type DiskFormat, type GuestDisk } from "./image.js";
import { openDisk } from "./disk.js";
import { hashOverlay } from "./chain-index.js";
import { decodeHeader, diskSource, encodeHeader, sameIdentity, type IndexHeader } from "./index-header.js";

export type { IndexHeader } from "./index-header.js";

/** Where openNasIndex keeps the index of `imagePath` unless told otherwise: beside it. */
export function defaultIndexPath(imagePath: string): string {
  return `${imagePath}.pagetwin-index`;
}

/** The header of an index file (seed, image identity, block count, id); throws NasError if it is none. */
export function readIndexHeader(path: string): IndexHeader {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (err) {
    throw new NasError(`pagetwin: no block index at ${path} (${(err as NodeJS.ErrnoException).code}); run \`pagetwin index --image IMAGE\` on the source first`);
  }
  try {
    const h = Buffer.alloc(4096);
    const got = readSync(fd, h, 0, h.length, 0);
    return decodeHeader(h.subarray(0, got), path, (offset, length) => {
      const m = Buffer.alloc(length);
      if (readSync(fd, m, 0, length, offset) !== length) throw new Error("short read");
      return m;
    });
  } finally {
    closeSync(fd);
  }
}

/** An opened block index: the engine of its seed, the index in that engine's memory, the open image. */
export interface NasIndex {
  /** The engine whose seed the index was built with: plan with this engine (or the one you passed). */
  engine: Engine;
  index: TwinIndex;
  /** The image, open for reading; close it (`image.close()`) when done. */
  image: GuestDisk;
  header: IndexHeader;
  indexPath: string;
  /** True when this call hashed the image (no index, or one that does not fit the image). */
  built: boolean;
  /**
   * True when the image was written since the index's last build or refresh
   * (its size, mtime or inode differ): the index is used as it is, and its
   * stale entries cost resends until refresh.ts brings it up to date.
   */
  stale: boolean;
  /** Blocks this call read and hashed, a backing file's included (0 when the index was current). */
  hashed: number;
  ms: number;
}

export interface OpenIndexOptions extends AbortOptions {
  indexPath?: string;
  /** Called after every batch of blocks hashed, with phase "index" (not called when the index is loaded). */
  onProgress?: (p: Progress) => void;
  /** Blocks read per batch (default 1024 = 4 MiB). */
  batchBlocks?: number;
  /** Re-hash even if the index file looks current. */
  rebuild?: boolean;
  /** Hash with this many worker threads (each reads its share of the image); 0: this thread. */
  workers?: number;
  /** Hash on this pool (a session of the index's seed) instead of starting workers. */
  pool?: EnginePool;
  /**
   * Use this engine (its seed) instead of making one. An index file built
   * with another seed is an EngineMismatchError, unless `rebuild` (then it
   * is rebuilt with this engine's seed). The seed keeps guests from crafting
   * pages that collide with blocks: give an engine of a random seed.
   */
  engine?: Engine;
  /**
   * Save a built index to `indexPath` (default true). False: a current index
   * there is still loaded, but one built is kept in memory only, so a dry run
   * (`pagetwin analyze`) writes nothing beside the image.
   */
  write?: boolean;
  /** An index whose image changed since: "use" it as it is (default) or "rebuild" it. */
  stale?: "use" | "rebuild";
  /** The image's format; detected from its first bytes when not given. */
  format?: DiskFormat;
}

/** A random 64-bit hash seed, as openNasIndex uses for a new index. */
export function randomSeed(): bigint {
  return randomBytes(8).readBigUInt64LE(0);
}

/**
 * Loads the image's index if it is current, or builds (and, unless `write: false`, saves) it.
 * Aborting (signal) stops a build between batches; nothing is written then
 * and the image is closed.
 */
export async function openNasIndex(imagePath: string, opts: OpenIndexOptions = {}): Promise<NasIndex> {
  const t0 = performance.now();
  throwIfAborted(opts.signal, "building the block index");
  const image = openDisk(imagePath, { format: opts.format ?? null });
  const indexPath = opts.indexPath ?? defaultIndexPath(imagePath);
  try {
    if (image.blocks === 0) {
      throw new Error(`pagetwin: the disk image ${imagePath} holds no whole ${BLOCK_SIZE}-byte block (${image.size} bytes): there is nothing to index`);
    }
    // taken before any hashing: a write during a build leaves the index stale, as it is
    const identity = image.identity();
    const { header, stale } = usableHeader(image, identity, indexPath, opts);
    if (header && opts.engine && opts.engine.seed !== header.seed) {
      throw new EngineMismatchError(`pagetwin: the index ${indexPath} was built with another hash seed than the engine given: ` +
        "open it without `engine` and plan with the returned nas.engine, or pass rebuild: true to rebuild it with this engine's seed");
    }
    if (header) {
      const engine = opts.engine ?? await createEngine({ seed: header.seed });
      const index = engine.createIndexForLoad(header.blocks);
      try {
        loadHashes(index, indexPath, header);
      } catch (err) {
        index.free();
        throw err;
      }
      return { engine, index, image, header, indexPath, built: false, stale, hashed: 0, ms: performance.now() - t0 };
    }
    return { ...await buildIndex(image, identity, indexPath, opts), image, indexPath, built: true, stale: false, ms: performance.now() - t0 };
  } catch (err) {
    image.close();
    throw err;
  }
}

/** The index file's header when it fits the image (null: build it), and whether the image changed since. */
function usableHeader(image: GuestDisk, identity: IndexHeader["identity"], indexPath: string, opts: OpenIndexOptions): { header: IndexHeader | null; stale: boolean } {
  if (opts.rebuild || !existsSync(indexPath)) return { header: null, stale: false };
  try {
    const h = readIndexHeader(indexPath);
    // a resized image is re-indexed; any other change leaves a usable, stale index
    // so is one read in another format than the image is opened in now (--format)
    const stale = !sameIdentity(h.identity, identity);
    const fits = h.blockSize === BLOCK_SIZE && h.blocks === image.blocks && h.format === image.format;
    return { header: fits && !(stale && opts.stale === "rebuild") ? h : null, stale };
  } catch {
    return { header: null, stale: false }; // unreadable or old: rebuild
  }
}

/** Hash the image (an overlay: over its backing file's index, and with its seed) and, unless told not to, save the index. */
async function buildIndex(image: GuestDisk, identity: IndexHeader["identity"], indexPath: string, opts: OpenIndexOptions): Promise<{ engine: Engine; index: TwinIndex; header: IndexHeader; hashed: number }> {
  const below = image.backing ? await openNasIndex(image.backing.path, {
    format: image.backing.format, signal: opts.signal,
    ...(opts.engine ? { engine: opts.engine } : {}), ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
  }) : null;
  const engine = opts.engine ?? await createEngine({ seed: below?.header.seed ?? randomSeed() });
  const index = engine.createIndex(image.blocks);
  let hashes: Uint8Array, hashed = image.blocks;
  try {
    if (below) {
      try {
        ({ hashes, hashed } = hashOverlay(engine, image, index, below.index, opts.batchBlocks ?? 1024, opts.onProgress));
        hashed += below.hashed;
      } finally {
        below.index.free();
        below.image.close();
      }
    } else {
      hashes = (opts.workers || opts.pool) && image.format === "raw" && image.size % BLOCK_SIZE === 0
        ? await hashImageWithPool(engine, image, index, opts)
        : await hashImage(engine, image, index, opts);
    }
  } catch (err) {
    index.free();
    throw err;
  }
  const now = Date.now();
  const header: IndexHeader = {
    seed: engine.seed, blockSize: BLOCK_SIZE, identity, blocks: image.blocks, indexId: randomBytes(12).toString("hex"),
    version: 2, generation: 0, ...diskSource(image), builtAt: now, refreshedAt: now, refreshedBy: "build", hashesAt: 0,
  };
  if (opts.write ?? true) writeIndexFile(indexPath, header, hashes);
  return { engine, index, header, hashed };
}

/** Lets other work (and an abort) in between batches: index builds take seconds to minutes. */
const nextTurn = () => new Promise<void>((r) => setImmediate(r));

async function hashImage(engine: Engine, image: GuestDisk, index: TwinIndex, opts: OpenIndexOptions): Promise<Uint8Array> {
  const total = image.blocks;
  const batch = opts.batchBlocks ?? 1024;
  const buf = engine.alloc(batch * BLOCK_SIZE);
  const out = engine.alloc(batch * HASH_SIZE);
  const all = new Uint8Array(total * HASH_SIZE);
  try {
    for (let first = 0; first < total; first += batch) {
      const n = Math.min(batch, total - first);
      image.readBlocks(first, n, buf.view(0, n * BLOCK_SIZE));
      engine.hashPagesAt(buf.ptr, n, out.ptr);
      index.setBlocksAt(out.ptr, first, n);
      all.set(out.view(0, n * HASH_SIZE), first * HASH_SIZE);
      opts.onProgress?.({ phase: "index", done: first + n, total, bytes: (first + n) * BLOCK_SIZE });
      await nextTurn();
      throwIfAborted(opts.signal, "building the block index");
    }
  } finally {
    buf.free();
    out.free();
  }
  return all;
}

async function hashImageWithPool(engine: Engine, image: GuestDisk, index: TwinIndex, opts: OpenIndexOptions): Promise<Uint8Array> {
  let pool = opts.pool ?? null;
  if (!pool) {
    const { EnginePool } = await import("../../pool/pool.js");
    pool = await EnginePool.create({ size: opts.workers, seed: engine.seed, flavor: engine.flavor });
  }
  const scans = pool.session({ seed: engine.seed });
  const total = image.blocks;
  const batch = (opts.batchBlocks ?? 1024) * pool.size;
  const all = new Uint8Array(total * HASH_SIZE);
  try {
    for (let first = 0; first < total; first += batch) {
      const n = Math.min(batch, total - first);
      const { hashes } = await scans.scanFile(image.path, first, n, { signal: opts.signal });
      all.set(hashes, first * HASH_SIZE);
      index.setBlocks(hashes, first);
      opts.onProgress?.({ phase: "index", done: first + n, total, bytes: (first + n) * BLOCK_SIZE });
    }
  } finally {
    await scans.close();
    if (!opts.pool) await pool.close();
  }
  return all;
}

/**
 * Reads the file's hashes straight into the index's records and has the core
 * build its table from them in one go (one insert at a time would cost a
 * cache miss per block).
 */
function loadHashes(index: TwinIndex, path: string, header: IndexHeader): void {
  const blocks = header.blocks;
  const recs = index.recordsFor(blocks);
  const fd = openSync(path, "r");
  try {
    const mem = index.engine.u8();
    const chunk = 1 << 24;
    for (let at = 0; at < blocks * HASH_SIZE; at += chunk) {
      const want = Math.min(chunk, blocks * HASH_SIZE - at);
      const got = readSync(fd, mem, recs + at, want, header.hashesAt + at);
      if (got !== want) throw new NasError(`pagetwin: the index ${path} is truncated; delete it and re-index`);
    }
  } finally {
    closeSync(fd);
  }
  index.loadAt(recs, blocks);
}

/** Writes the whole index file (header, then a hash per block) in place of the old one, atomically. */
export function writeIndexFile(path: string, header: IndexHeader, hashes: Uint8Array): void {
  const tmp = `${path}.tmp-${randomBytes(8).toString("hex")}`;
  const fd = createTempFile(tmp, path);
  let open = true;
  try {
    // The umask can only narrow the mode; fchmod makes it exactly 0600 (the file holds the seed).
    fchmodSync(fd, 0o600);
    writeSync(fd, encodeHeader(header));
    writeSync(fd, hashes);
    fsyncSync(fd);
    open = false;
    closeSync(fd);
  } catch (err) {
    if (open) closeQuietly(fd);
    removeQuietly(tmp);
    throw err;
  }
  try {
    renameSync(tmp, path);
  } catch (err) {
    removeQuietly(tmp);
    throw new NasError(`pagetwin: cannot replace the index ${path} (${(err as NodeJS.ErrnoException).code}); check that it is not a directory and that its directory is writable`);
  }
}

/**
 * Random name, O_CREAT|O_EXCL: whoever can write the image's directory cannot
 * have planted a file or symlink there for us to write through.
 */
function createTempFile(tmp: string, path: string): number {
  try {
    return openSync(tmp, "wx", 0o600);
  } catch (err) {
    throw new NasError(`pagetwin: cannot create a temporary file beside the index ${path} (${(err as NodeJS.ErrnoException).code}); check that its directory is writable`);
  }
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // the write's failure is the one worth reporting
  }
}

function removeQuietly(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // gone already; nothing to clean up
  }
}
