// The block index kept beside the image (IMAGE.pagetwin-index), so a second
// run does not re-hash an unchanged image. It holds the random hash seed:
// both hosts read it from the NAS, it never crosses the migration link, and
// the file is created mode 0600 and replaced atomically (temp file + rename).
// Its layout is in index-header.ts. An index whose image changed since is
// still used (stale): the destination verifies every block it fetches, so a
// stale entry costs a resend, never a wrong page; refresh.ts brings it up to
// date.

import { closeSync, openSync, readSync, renameSync, writeSync, existsSync, fsyncSync, unlinkSync, fchmodSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { createEngine, Engine, TwinIndex, HASH_SIZE } from "../../core/engine.js";
import { DiskImage, BLOCK_SIZE } from "./image.js";
import { decodeHeader, diskSource, encodeHeader, sameIdentity, type IndexHeader } from "./index-header.js";

export type { IndexHeader } from "./index-header.js";

export function defaultIndexPath(imagePath: string): string {
  return `${imagePath}.pagetwin-index`;
}

export function readIndexHeader(path: string): IndexHeader {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (err) {
    throw new Error(`pagetwin: no block index at ${path} (${(err as NodeJS.ErrnoException).code}); run \`pagetwin index --image IMAGE\` on the source first`);
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

export interface NasIndex {
  engine: Engine;
  index: TwinIndex;
  image: DiskImage;
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
  ms: number;
}

export interface OpenIndexOptions {
  indexPath?: string;
  /** Called as blocks are hashed: (done, total). */
  onProgress?: (done: number, total: number) => void;
  /** Blocks read per batch (default 1024 = 4 MiB). */
  batchBlocks?: number;
  /** Re-hash even if the index file looks current. */
  rebuild?: boolean;
  /** Hash with this many worker threads (each reads its share of the image); 0: this thread. */
  workers?: number;
  /** An index whose image changed since: "use" it as it is (default) or "rebuild" it. */
  stale?: "use" | "rebuild";
}

/** Loads the image's index if it is current, or builds (and saves) it. */
export async function openNasIndex(imagePath: string, opts: OpenIndexOptions = {}): Promise<NasIndex> {
  const t0 = performance.now();
  const image = DiskImage.open(imagePath);
  const indexPath = opts.indexPath ?? defaultIndexPath(imagePath);
  try {
    const identity = image.identity();
    let header: IndexHeader | null = null;
    let stale = false;
    if (!opts.rebuild && existsSync(indexPath)) {
      try {
        const h = readIndexHeader(indexPath);
        // a resized image is re-indexed; any other change leaves a usable, stale index
        if (h.blockSize === BLOCK_SIZE && h.blocks === image.blocks) header = h;
        stale = !sameIdentity(h.identity, identity);
        if (stale && opts.stale === "rebuild") header = null;
      } catch {
        header = null; // unreadable or old: rebuild below
      }
    }
    if (header) {
      const engine = await createEngine({ seed: header.seed });
      const index = engine.createIndex(header.blocks);
      loadHashes(engine, index, indexPath, header);
      return { engine, index, image, header, indexPath, built: false, stale, ms: performance.now() - t0 };
    }
    const seed = randomBytes(8).readBigUInt64LE(0);
    const engine = await createEngine({ seed });
    const index = engine.createIndex(image.blocks);
    const hashes = opts.workers && image.size % BLOCK_SIZE === 0
      ? await hashImageWithPool(engine, image, index, seed, opts)
      : hashImage(engine, image, index, opts);
    const now = Date.now();
    header = {
      seed, blockSize: BLOCK_SIZE, identity, blocks: image.blocks, indexId: randomBytes(12).toString("hex"),
      version: 2, generation: 0, ...diskSource(image), builtAt: now, refreshedAt: now, refreshedBy: "build", hashesAt: 0,
    };
    writeIndexFile(indexPath, header, hashes);
    return { engine, index, image, header, indexPath, built: true, stale: false, ms: performance.now() - t0 };
  } catch (err) {
    image.close();
    throw err;
  }
}

function hashImage(engine: Engine, image: DiskImage, index: TwinIndex, opts: OpenIndexOptions): Uint8Array {
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
      opts.onProgress?.(first + n, total);
    }
  } finally {
    buf.free();
    out.free();
  }
  return all;
}

async function hashImageWithPool(engine: Engine, image: DiskImage, index: TwinIndex, seed: bigint, opts: OpenIndexOptions): Promise<Uint8Array> {
  const { EnginePool } = await import("../../pool/pool.js");
  const pool = await EnginePool.create({ size: opts.workers, seed, flavor: engine.flavor });
  const total = image.blocks;
  const batch = (opts.batchBlocks ?? 1024) * pool.size;
  const all = new Uint8Array(total * HASH_SIZE);
  try {
    for (let first = 0; first < total; first += batch) {
      const n = Math.min(batch, total - first);
      const { hashes } = await pool.scanFile(image.path, first, n);
      all.set(hashes, first * HASH_SIZE);
      index.setBlocks(hashes, first);
      opts.onProgress?.(first + n, total);
    }
  } finally {
    await pool.close();
  }
  return all;
}

function loadHashes(engine: Engine, index: TwinIndex, path: string, header: IndexHeader): void {
  const blocks = header.blocks;
  const fd = openSync(path, "r");
  const batch = 65536;
  const r = engine.alloc(Math.min(batch, Math.max(blocks, 1)) * HASH_SIZE);
  try {
    for (let first = 0; first < blocks; first += batch) {
      const n = Math.min(batch, blocks - first);
      const want = n * HASH_SIZE;
      const got = readSync(fd, r.view(0, want), 0, want, header.hashesAt + first * HASH_SIZE);
      if (got !== want) throw new Error(`pagetwin: the index ${path} is truncated; delete it and re-index`);
      index.setBlocksAt(r.ptr, first, n);
    }
  } finally {
    r.free();
    closeSync(fd);
  }
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
    throw new Error(`pagetwin: cannot replace the index ${path} (${(err as NodeJS.ErrnoException).code}); check that it is not a directory and that its directory is writable`);
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
    throw new Error(`pagetwin: cannot create a temporary file beside the index ${path} (${(err as NodeJS.ErrnoException).code}); check that its directory is writable`);
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
