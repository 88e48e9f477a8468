// The guest-visible disk of an image on the NAS mount (NFS or local), read
// block by block straight into core memory: GuestDisk is what the index build
// and the block verifier read; DiskImage is the raw format (qcow2.ts the other).

import { NasError } from "../../errors.js";
import { openSync, closeSync, fstatSync, readSync } from "node:fs";
import { PAGE_SIZE } from "../../core/engine.js";

export const BLOCK_SIZE = PAGE_SIZE;

export interface ImageIdentity {
  size: number;
  mtimeNs: bigint;
  ino: bigint;
}

export type DiskFormat = "raw" | "qcow2";

export interface GuestDisk {
  /** The image file as opened (the top of its chain). */
  readonly path: string;
  readonly format: DiskFormat;
  /** The files this disk reads, top first: the image, then its backing files. */
  readonly chain: string[];
  /** Guest-visible bytes. */
  readonly size: number;
  /** Whole 4 KiB guest blocks (a partial last block is not indexed). */
  readonly blocks: number;
  /** The disk this one reads its unallocated clusters from, or null. */
  readonly backing: GuestDisk | null;
  /** Size, newest mtime and inode of the chain: changes when any file of it does. */
  identity(): ImageIdentity;
  /** Blocks first..first+count-1 into `into` (count * 4096 bytes); throws past the end. */
  readBlocks(first: number, count: number, into: Uint8Array): void;
  /** Guest bytes offset..offset+into.length-1 (all within `size`). */
  readAt(offset: number, into: Uint8Array): void;
  /** True when every byte of block `block` reads from `backing` (none of this image's own). */
  fromBacking(block: number): boolean;
  close(): void;
}

/** A raw disk image opened for reading, addressed in 4 KiB blocks. close() when done. */
export class DiskImage implements GuestDisk {
  private fd: number;
  readonly size: number;
  readonly format = "raw" as const;
  readonly backing = null;

  private constructor(readonly path: string, fd: number, size: number) {
    this.fd = fd;
    this.size = size;
  }

  static open(path: string): DiskImage {
    let fd: number;
    try {
      fd = openSync(path, "r");
    } catch (err) {
      throw new NasError(`pagetwin: cannot open the disk image ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}. Give the path of a raw or qcow2 image on the NAS mount.`);
    }
    const st = fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) {
      closeSync(fd);
      throw new NasError(`pagetwin: ${path} is not a file or block device`);
    }
    return new DiskImage(path, fd, st.size);
  }

  get chain(): string[] {
    return [this.path];
  }

  fromBacking(): boolean {
    return false;
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
    this.readAt(first * BLOCK_SIZE, into.subarray(0, count * BLOCK_SIZE));
  }

  readAt(offset: number, into: Uint8Array): void {
    const want = into.length;
    let done = 0;
    while (done < want) {
      const n = readSync(this.fd, into, done, want - done, offset + done);
      if (n === 0) {
        throw new NasError(`pagetwin: the disk image ${this.path} ended at byte ${offset + done} (wanted ${offset}..${offset + want - 1}); was it truncated?`);
      }
      done += n;
    }
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
