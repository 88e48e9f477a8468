// A raw disk image on the NAS mount (NFS or local), read block by block
// straight into core memory.

import { NasError } from "../../errors.js";
import { openSync, closeSync, fstatSync, readSync } from "node:fs";
import { PAGE_SIZE } from "../../core/engine.js";

export const BLOCK_SIZE = PAGE_SIZE;

export interface ImageIdentity {
  size: number;
  mtimeNs: bigint;
  ino: bigint;
}

/** A raw disk image opened for reading, addressed in 4 KiB blocks. close() when done. */
export class DiskImage {
  private fd: number;
  readonly size: number;

  private constructor(readonly path: string, fd: number, size: number) {
    this.fd = fd;
    this.size = size;
  }

  static open(path: string): DiskImage {
    let fd: number;
    try {
      fd = openSync(path, "r");
    } catch (err) {
      throw new NasError(`pagetwin: cannot open the disk image ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}. Give the path of a raw image on the NAS mount.`);
    }
    const st = fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) {
      closeSync(fd);
      throw new NasError(`pagetwin: ${path} is not a file or block device`);
    }
    return new DiskImage(path, fd, st.size);
  }

  /** Whole 4 KiB blocks in the image (a partial last block is not indexed). */
  get blocks(): number {
    return Math.floor(this.size / BLOCK_SIZE);
  }

  identity(): ImageIdentity {
    const st = fstatSync(this.fd, { bigint: true });
    return { size: Number(st.size), mtimeNs: st.mtimeNs, ino: st.ino };
  }

  /**
   * Reads blocks first..first+count-1 into `into` (count * 4096 bytes).
   * Throws if the image is shorter than that now (truncated since indexing).
   */
  readBlocks(first: number, count: number, into: Uint8Array): void {
    const want = count * BLOCK_SIZE;
    let done = 0;
    while (done < want) {
      const n = readSync(this.fd, into, done, want - done, first * BLOCK_SIZE + done);
      if (n === 0) {
        throw new NasError(`pagetwin: the disk image ${this.path} ended at block ${first + Math.floor(done / BLOCK_SIZE)} (wanted blocks ${first}..${first + count - 1}); was it truncated?`);
      }
      done += n;
    }
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
