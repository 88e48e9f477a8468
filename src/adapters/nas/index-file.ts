// The block index kept beside the image (IMAGE.pagetwin-index), so a second
// run does not re-hash an unchanged image. It holds the random hash seed:
// both hosts read it from the NAS, it never crosses the migration link, and
// the file is created mode 0600.
//
// Layout (little-endian): 64-byte header
//   0  magic "PTWINIX1"      8  version u32 (1)     12 block size u32
//   16 seed u64             24 image size u64      32 image mtime ns u64
//   40 image inode u64      48 blocks u32          52 index id (12 random bytes)
// then 16 bytes (canonical XXH3-128) per block.

import { closeSync, openSync, readSync, renameSync, writeSync, existsSync, fsyncSync, unlinkSync, fchmodSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { createEngine, Engine, TwinIndex, HASH_SIZE } from "../../core/engine.js";
import { BLOCK_SIZE, type DiskFormat, type GuestDisk, type ImageIdentity } from "./image.js";
import { openDisk } from "./disk.js";
import { hashOverlay } from "./chain-index.js";

const MAGIC = "PTWINIX1";
const VERSION = 1;
const HEADER = 64;

export interface IndexHeader {
  seed: bigint;
  blockSize: number;
  identity: ImageIdentity;
  blocks: number;
  /** Random id of this index, hex; the agents compare it instead of sending the seed. */
  indexId: string;
}

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
    const h = Buffer.alloc(HEADER);
    if (readSync(fd, h, 0, HEADER, 0) !== HEADER || h.toString("latin1", 0, 8) !== MAGIC) {
      throw new Error(`pagetwin: ${path} is not a pagetwin index (bad magic); delete it and re-index`);
    }
    const version = h.readUInt32LE(8);
    if (version !== VERSION) throw new Error(`pagetwin: ${path} is index version ${version}, this pagetwin reads version ${VERSION}; re-index`);
    return {
      blockSize: h.readUInt32LE(12),
      seed: h.readBigUInt64LE(16),
      identity: { size: Number(h.readBigUInt64LE(24)), mtimeNs: h.readBigUInt64LE(32), ino: h.readBigUInt64LE(40) },
      blocks: h.readUInt32LE(48),
      indexId: h.toString("hex", 52, 64),
    };
  } finally {
    closeSync(fd);
  }
}

function sameIdentity(a: ImageIdentity, b: ImageIdentity): boolean {
  return a.size === b.size && a.mtimeNs === b.mtimeNs && a.ino === b.ino;
}

export interface NasIndex {
  engine: Engine;
  index: TwinIndex;
  image: GuestDisk;
  header: IndexHeader;
  indexPath: string;
  /** True when this call hashed the image (no index, or the image changed). */
  built: boolean;
  /** Blocks this call read and hashed, a backing file's included (0 when the index was current). */
  hashed: number;
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
  /** The image's format; detected from its first bytes when not given. */
  format?: DiskFormat;
}

/** Loads the image's index if it is current, or builds (and saves) it. */
export async function openNasIndex(imagePath: string, opts: OpenIndexOptions = {}): Promise<NasIndex> {
  const t0 = performance.now();
  const image = openDisk(imagePath, { format: opts.format ?? null });
  const indexPath = opts.indexPath ?? defaultIndexPath(imagePath);
  try {
    const identity = image.identity();
    let header: IndexHeader | null = null;
    if (!opts.rebuild && existsSync(indexPath)) {
      try {
        const h = readIndexHeader(indexPath);
        if (sameIdentity(h.identity, identity) && h.blockSize === BLOCK_SIZE && h.blocks === image.blocks) header = h;
      } catch {
        header = null; // unreadable or old: rebuild below
      }
    }
    if (header) {
      const engine = await createEngine({ seed: header.seed });
      const index = engine.createIndex(header.blocks);
      loadHashes(engine, index, indexPath, header.blocks);
      return { engine, index, image, header, indexPath, built: false, hashed: 0, ms: performance.now() - t0 };
    }
    // An overlay takes its backing file's index (built once, beside that file) and its seed.
    const below = image.backing ? await openNasIndex(image.backing.path, { format: image.backing.format, ...(opts.onProgress ? { onProgress: opts.onProgress } : {}) }) : null;
    const seed = below?.header.seed ?? randomBytes(8).readBigUInt64LE(0);
    const engine = await createEngine({ seed });
    const index = engine.createIndex(image.blocks);
    let hashes: Uint8Array, hashed = image.blocks;
    if (below) {
      try {
        ({ hashes, hashed } = hashOverlay(engine, image, index, below.index, opts.batchBlocks ?? 1024, opts.onProgress));
        hashed += below.hashed;
      } finally {
        below.index.free();
        below.image.close();
      }
    } else {
      hashes = opts.workers && image.format === "raw" && image.size % BLOCK_SIZE === 0
        ? await hashImageWithPool(engine, image, index, seed, opts)
        : hashImage(engine, image, index, opts);
    }
    header = { seed, blockSize: BLOCK_SIZE, identity, blocks: image.blocks, indexId: randomBytes(12).toString("hex") };
    writeIndexFile(indexPath, header, hashes);
    return { engine, index, image, header, indexPath, built: true, hashed, ms: performance.now() - t0 };
  } catch (err) {
    image.close();
    throw err;
  }
}

function hashImage(engine: Engine, image: GuestDisk, index: TwinIndex, opts: OpenIndexOptions): Uint8Array {
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

async function hashImageWithPool(engine: Engine, image: GuestDisk, index: TwinIndex, seed: bigint, opts: OpenIndexOptions): Promise<Uint8Array> {
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

function loadHashes(engine: Engine, index: TwinIndex, path: string, blocks: number): void {
  const fd = openSync(path, "r");
  const batch = 65536;
  const r = engine.alloc(Math.min(batch, Math.max(blocks, 1)) * HASH_SIZE);
  try {
    for (let first = 0; first < blocks; first += batch) {
      const n = Math.min(batch, blocks - first);
      const want = n * HASH_SIZE;
      const got = readSync(fd, r.view(0, want), 0, want, HEADER + first * HASH_SIZE);
      if (got !== want) throw new Error(`pagetwin: the index ${path} is truncated; delete it and re-index`);
      index.setBlocksAt(r.ptr, first, n);
    }
  } finally {
    r.free();
    closeSync(fd);
  }
}

function writeIndexFile(path: string, header: IndexHeader, hashes: Uint8Array): void {
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

function encodeHeader(header: IndexHeader): Buffer {
  const h = Buffer.alloc(HEADER);
  h.write(MAGIC, 0, "latin1");
  h.writeUInt32LE(VERSION, 8);
  h.writeUInt32LE(header.blockSize, 12);
  h.writeBigUInt64LE(header.seed, 16);
  h.writeBigUInt64LE(BigInt(header.identity.size), 24);
  h.writeBigUInt64LE(header.identity.mtimeNs, 32);
  h.writeBigUInt64LE(header.identity.ino, 40);
  h.writeUInt32LE(header.blocks, 48);
  Buffer.from(header.indexId, "hex").copy(h, 52);
  return h;
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
