// The end-to-end check of a stream-mode session: CRC-32 of QEMU's stream as
// checked, i.e. the stream with each referenced page's 4096 bytes replaced by
// its 16-byte hash. stream-out takes it of what the source QEMU sent (the
// hashes it looked the pages up with), stream-in of what it writes to its
// QEMU (the hashes its NAS blocks were verified against, or of the pages
// resent). A referenced page is then proven by its hash, everything else byte
// for byte, and neither side makes a CRC pass over the pages it references
// (most of the stream).
//
// One zlib call per view cost more than the CRC of a page header: views that
// follow each other in memory are summed in one call, and small ones (record
// headers, hashes) are gathered in a scratch buffer first.

import { crc32 } from "node:zlib";

/** Views at most this long are copied into the scratch buffer. */
const SMALL = 64;
const SCRATCH = 16 * 1024;

export class CheckCrc {
  private crc = 0;
  /** A view being extended by the views that follow it in memory. */
  private span: Uint8Array | null = null;
  private spanEnd = 0;
  private readonly scratch = Buffer.allocUnsafe(SCRATCH);
  private used = 0;

  /** Adds `v`'s bytes. A view may be read until the next flush() (it is not copied unless small). */
  add(v: Uint8Array): void {
    if (!v.length) return;
    const s = this.span;
    if (s && v.buffer === s.buffer && v.byteOffset === this.spanEnd) {
      this.spanEnd += v.length;
      return;
    }
    if (v.length <= SMALL) {
      if (s) this.flushSpan();
      if (this.used + v.length > SCRATCH) this.flushScratch();
      this.scratch.set(v, this.used);
      this.used += v.length;
      return;
    }
    this.flush();
    this.span = v;
    this.spanEnd = v.byteOffset + v.length;
  }

  /** Sums what is pending: call before any view added may change. */
  flush(): void {
    this.flushSpan();
    this.flushScratch();
  }

  /** The CRC-32 of everything added. */
  get value(): number {
    this.flush();
    return this.crc;
  }

  private flushSpan(): void {
    const s = this.span;
    if (!s) return;
    this.crc = crc32(new Uint8Array(s.buffer, s.byteOffset, this.spanEnd - s.byteOffset), this.crc);
    this.span = null;
  }

  private flushScratch(): void {
    if (!this.used) return;
    this.crc = crc32(this.scratch.subarray(0, this.used), this.crc);
    this.used = 0;
  }
}
