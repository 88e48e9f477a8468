// Stream-out's page lookup: a batch of QEMU's page records copied into the
// core's memory, hashed, and looked up in the NAS index. Each session has
// its own regions, freed when it ends.

import { HASH_SIZE, PAGE_SIZE, type Engine, type Region, type TwinIndex } from "../core/engine.js";
import type { Piece } from "./qemu-stream.js";

export interface Lookup {
  /** The twin block of page i (NO_BLOCK: none). */
  blocks: Uint32Array;
  /** Page i's hash at i * HASH_SIZE. */
  hashes: Uint8Array;
}

/** A session's page lookup: one disk's (PageHasher) or several disks' (disks.ts). */
export interface PageLookup {
  /** Looks up the `count` page pieces among `pieces`, in order; the views hold until the next call. */
  lookup(pieces: readonly Piece[], count: number): Lookup;
  free(): void;
}

export class PageHasher implements PageLookup {
  private pages: Region | null = null;
  private hashes: Region | null = null;
  private blocks: Region | null = null;
  private capacity = 0;

  constructor(private readonly engine: Engine, private readonly index: TwinIndex) {}

  /** Hashes the `count` page pieces among `pieces`, in order; the views hold until the next call. */
  lookup(pieces: readonly Piece[], count: number): Lookup {
    this.reserve(count);
    const pages = this.pages!, hashes = this.hashes!, blocks = this.blocks!;
    // taken after reserve(): an allocation may have grown (and moved) the memory
    const mem = this.engine.u8();
    let i = 0;
    for (const p of pieces) if (p.kind === "page") mem.set(p.data, pages.ptr + PAGE_SIZE * i++);
    this.engine.hashPagesAt(pages.ptr, count, hashes.ptr, 0);
    this.index.lookupAt(hashes.ptr, count, 0, blocks.ptr, 0);
    return { blocks: this.engine.u32(blocks.ptr, count), hashes: hashes.view(0, count * HASH_SIZE) };
  }

  free(): void {
    this.pages?.free();
    this.hashes?.free();
    this.blocks?.free();
    this.pages = this.hashes = this.blocks = null;
    this.capacity = 0;
  }

  private reserve(n: number): void {
    if (this.pages && this.capacity >= n) return;
    this.free();
    this.capacity = Math.max(n, 64);
    this.pages = this.engine.alloc(this.capacity * PAGE_SIZE);
    this.hashes = this.engine.alloc(this.capacity * HASH_SIZE);
    this.blocks = this.engine.alloc(this.capacity * 4);
  }
}
