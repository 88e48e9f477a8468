// The destination's writes into guest RAM, with few system calls. Pages
// (sent in full, verified twins, zeros) are laid into buffers of 4 MiB chunks
// of RAM, so that the frames of one window of the source's pass (its zeros,
// references and full pages, which interleave in RAM) fill a chunk together;
// a chunk is written when it is evicted or at flush(), in one call per run
// of consecutive pages (a 4 KiB write costs several times a page's share of
// a large one), then read back and hashed where it was written: the held
// hashes vouch for the file, not for the bytes this agent meant to write.

import { HASH_SIZE, PAGE_SIZE, type Engine, type Region } from "../core/engine.js";
import type { RamFile } from "../adapters/ram/ram-file.js";

/** Pages in a chunk (the source's 4096-page windows cover four). */
export const CHUNK_PAGES = 1024;
/** Chunks held before the least recently used is written. */
const CHUNK_SLOTS = 4;

class Chunk {
  index = -1;
  used = 0;
  readonly present = new Uint8Array(CHUNK_PAGES);
  constructor(readonly buf: Region) {}
}

export class PageWriter {
  private readonly chunks: Chunk[];
  private tick = 0;

  /** `held`: 16 B per page of `ram`, the hash of what the file holds there (up to date after flush()). */
  constructor(private readonly engine: Engine, private readonly ram: RamFile, private readonly held: Region) {
    this.chunks = Array.from({ length: CHUNK_SLOTS }, () => new Chunk(engine.alloc(CHUNK_PAGES * PAGE_SIZE)));
  }

  /** Page `pages[i]` gets `bytesOf(i)` for every i (the bytes are copied: the caller may reuse them at once). */
  write(pages: ArrayLike<number>, bytesOf: (i: number) => Uint8Array): void {
    let c: Chunk | null = null;
    let mem = this.engine.u8();
    for (let i = 0; i < pages.length; i++) {
      const p = pages[i]!;
      const index = Math.floor(p / CHUNK_PAGES);
      if (c?.index !== index) {
        c = this.chunkFor(index);
        mem = this.engine.u8();
      }
      const at = p - index * CHUNK_PAGES;
      mem.set(bytesOf(i), c.buf.ptr + at * PAGE_SIZE);
      c.present[at] = 1;
    }
  }

  /** Writes every chunk held (the file and `held` are then up to date). */
  flush(): void {
    for (const c of this.chunks) this.writeChunk(c);
  }

  free(): void {
    for (const c of this.chunks) c.buf.free();
  }

  private chunkFor(index: number): Chunk {
    let victim = this.chunks[0]!;
    for (const c of this.chunks) {
      if (c.index === index) {
        c.used = ++this.tick;
        return c;
      }
      if (c.used < victim.used) victim = c;
    }
    this.writeChunk(victim);
    victim.index = index;
    victim.used = ++this.tick;
    return victim;
  }

  /** Each run of written pages in one write and one read back (pages not written stay as they are: writing them again, even as zeros, cost more than the calls it saved). */
  private writeChunk(c: Chunk): void {
    if (c.index < 0) return;
    const base = c.index * CHUNK_PAGES;
    const n = Math.min(CHUNK_PAGES, this.ram.pages - base);
    for (let i = 0; i < n;) {
      if (!c.present[i]) {
        i++;
        continue;
      }
      let end = i + 1;
      while (end < n && c.present[end]) end++;
      this.writeSpan(c, base, i, end);
      i = end;
    }
    c.present.fill(0);
    c.index = -1;
  }

  private writeSpan(c: Chunk, base: number, from: number, to: number): void {
    const count = to - from;
    const bytes = c.buf.view(from * PAGE_SIZE, count * PAGE_SIZE);
    this.ram.writePages(base + from, bytes);
    this.ram.readPages(base + from, count, bytes);
    this.engine.hashPagesAt(c.buf.ptr + from * PAGE_SIZE, count, this.held.ptr + (base + from) * HASH_SIZE);
  }

}
