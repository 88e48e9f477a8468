// Guest RAM as a file: QEMU's memory-backend-file (share=on) or the embedded
// VM's RAM file. The source reads pages from it; the destination writes them.

import { openSync, closeSync, fstatSync, readSync, writeSync, ftruncateSync } from "node:fs";
import { PAGE_SIZE } from "../../core/engine.js";
import { RamFileError } from "../../errors.js";

/** Guest RAM as a file of whole 4 KiB pages (QEMU's memory-backend-file): read and write pages by number. */
export class RamFile {
  private fd: number;

  private constructor(readonly path: string, fd: number, readonly pages: number, readonly writable: boolean) {
    this.fd = fd;
  }

  /** Opens an existing RAM file; its size must be whole pages (and `expectPages`, when given). */
  static open(path: string, opts: { write?: boolean; expectPages?: number } = {}): RamFile {
    let fd: number;
    try {
      fd = openSync(path, opts.write ? "r+" : "r");
    } catch (err) {
      throw new RamFileError(`pagetwin: cannot open the RAM file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    const st = fstatSync(fd);
    if (!st.isFile()) {
      closeSync(fd);
      throw new Error(`pagetwin: the RAM file ${path} is not a regular file${st.isDirectory() ? " (it is a directory)" : ""}`);
    }
    const size = st.size;
    if (size === 0 || size % PAGE_SIZE !== 0 || (opts.expectPages !== undefined && size !== opts.expectPages * PAGE_SIZE)) {
      closeSync(fd);
      const want = opts.expectPages !== undefined ? `${opts.expectPages * PAGE_SIZE} bytes (${opts.expectPages} pages)` : "a whole number of 4096-byte pages";
      throw new RamFileError(`pagetwin: the RAM file ${path} has ${size} bytes; want ${want}.${opts.expectPages !== undefined ? " Both VMs must have the same RAM size." : ""}`);
    }
    return new RamFile(path, fd, size / PAGE_SIZE, !!opts.write);
  }

  /** Creates (or truncates to zero) a RAM file of `pages` pages, all zero. */
  static create(path: string, pages: number): RamFile {
    const fd = openSync(path, "w+", 0o600);
    ftruncateSync(fd, pages * PAGE_SIZE);
    return new RamFile(path, fd, pages, true);
  }

  readPages(first: number, count: number, into: Uint8Array): void {
    const want = count * PAGE_SIZE;
    let done = 0;
    while (done < want) {
      const n = readSync(this.fd, into, done, want - done, first * PAGE_SIZE + done);
      if (n === 0) throw new RamFileError(`pagetwin: the RAM file ${this.path} ended at page ${first + Math.floor(done / PAGE_SIZE)}`);
      done += n;
    }
  }

  /** Writes `data` (whole pages) at page `first`. */
  writePages(first: number, data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      done += writeSync(this.fd, data, done, data.length - done, first * PAGE_SIZE + done);
    }
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
