// What the destination agent spends on a round, timed here on a sample of
// the round's own pages: its RAM file hashed once at the start, each twin's NAS block read and hashed (a
// BlockVerifier, as the destination checks it), and each page written into
// RAM, read back and hashed (as the destination records what it wrote), in
// runs of consecutive pages as it writes them. The writes go to a sparse
// scratch file of the RAM's size in /dev/shm (where RAM files live) or the
// temp directory, removed at once: the VM's own files are only read.

import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HASH_SIZE, PAGE_SIZE, type Engine, type Region } from "../core/engine.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import type { GuestDisk } from "../adapters/nas/image.js";
import { RamFile } from "../adapters/ram/ram-file.js";
import { MAX_REFS } from "../agent/protocol.js";

/** Twins the destination checks per Refs frame (one frame per 4096-page window), and how many frames are timed. */
const WINDOW_PAGES = 4096;
const SAMPLE_WINDOWS = 8;
/** Pages per Pages frame, and how many frames of them are timed. */
const FRAME_PAGES = 256;
const SAMPLE_FRAMES = 64;

export interface DestinationSample {
  /** Reading and hashing its whole RAM file once, as it does when the migration starts, ms (scaled from a sample). */
  ramHashMs: number;
  /** Checking every twin (NAS read and hash) and writing it, ms (scaled from the sample). */
  twinMs: number;
  /** Writing every page sent in full, reading it back and hashing it, ms (scaled; decompression apart). */
  pagesMs: number;
  sampledTwins: number;
  sampledPages: number;
}

/** `n` indexes spread evenly over 0..count-1 (all of them when count <= n). */
function spread(count: number, n: number): number[] {
  if (count <= n) return [...Array(count).keys()];
  return Array.from({ length: n }, (_, k) => Math.floor((k * (count - 1)) / (n - 1)));
}

/** Writes `pages` (ascending) from `data` (page i at i * 4096) in runs of consecutive pages, reads them back the same way, hashes them. */
function writeAndHold(ram: RamFile, engine: Engine, pages: Uint32Array, data: Uint8Array, back: Region, hashes: Region): void {
  const runs: [number, number][] = [];
  for (let i = 0; i < pages.length;) {
    let j = i + 1;
    while (j < pages.length && pages[j] === pages[j - 1]! + 1) j++;
    runs.push([i, j]);
    i = j;
  }
  for (const [i, j] of runs) ram.writePages(pages[i]!, data.subarray(i * PAGE_SIZE, j * PAGE_SIZE));
  for (const [i, j] of runs) ram.readPages(pages[i]!, j - i, back.view(i * PAGE_SIZE, (j - i) * PAGE_SIZE));
  engine.hashPagesAt(back.ptr, pages.length, hashes.ptr);
}

/**
 * Times the destination's part of a round whose pages in full are `send`
 * and whose twins are `twinPages` (blocks `twinBlocks`), all ascending.
 */
export function sampleDestination(engine: Engine, image: GuestDisk, ramPages: number, send: Uint32Array, twinPages: Uint32Array, twinBlocks: Uint32Array): DestinationSample {
  const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "pagetwin-analyze-"));
  const ram = RamFile.create(join(dir, "ram"), ramPages);
  const back = engine.alloc(MAX_REFS * PAGE_SIZE);
  const hashes = engine.alloc(MAX_REFS * HASH_SIZE);
  const verifier = new BlockVerifier(engine, image);
  const unwanted = new Uint8Array(HASH_SIZE); // what the block should hash to does not change the time it takes
  try {
    // the destination hashes its RAM file once as the migration starts (QEMU's file may hold anything), during
    // round 1: read and hash windows of the scratch file, as fresh (sparse) as a just-started QEMU's
    const allWindows = Math.ceil(ramPages / WINDOW_PAGES);
    const hashWindows = spread(allWindows, SAMPLE_WINDOWS);
    let ramHashMs = 0;
    for (const w of hashWindows) {
      const first = w * WINDOW_PAGES, n = Math.min(WINDOW_PAGES, ramPages - first);
      const t = performance.now();
      ram.readPages(first, n, back.view(0, n * PAGE_SIZE));
      engine.hashPagesAt(back.ptr, n, hashes.ptr);
      ramHashMs += performance.now() - t;
    }
    // twins: whole windows' worth (a Refs frame each), spread over RAM
    const windows: [number, number][] = [];
    for (let i = 0; i < twinPages.length;) {
      const end = (Math.floor(twinPages[i]! / WINDOW_PAGES) + 1) * WINDOW_PAGES;
      let j = i;
      while (j < twinPages.length && twinPages[j]! < end && j - i < MAX_REFS) j++;
      windows.push([i, j]);
      i = j;
    }
    let twinMs = 0, sampledTwins = 0;
    for (const w of spread(windows.length, SAMPLE_WINDOWS)) {
      const [i, j] = windows[w]!;
      const t = performance.now();
      verifier.verify(twinBlocks.subarray(i, j), () => unwanted);
      writeAndHold(ram, engine, twinPages.subarray(i, j), verifier.slots(j - i), back, hashes);
      twinMs += performance.now() - t;
      sampledTwins += j - i;
    }
    // pages in full: frames of up to 256 pages, spread over RAM (their bytes do not change the time a write takes)
    const data = new Uint8Array(FRAME_PAGES * PAGE_SIZE).fill(0x5a);
    const frames = Math.ceil(send.length / FRAME_PAGES);
    let pagesMs = 0, sampledPages = 0;
    for (const f of spread(frames, SAMPLE_FRAMES)) {
      const pages = send.subarray(f * FRAME_PAGES, (f + 1) * FRAME_PAGES);
      const t = performance.now();
      writeAndHold(ram, engine, pages, data, back, hashes);
      pagesMs += performance.now() - t;
      sampledPages += pages.length;
    }
    return {
      ramHashMs: (ramHashMs * allWindows) / hashWindows.length,
      twinMs: sampledTwins ? (twinMs * twinPages.length) / sampledTwins : 0,
      pagesMs: sampledPages ? (pagesMs * send.length) / sampledPages : 0,
      sampledTwins, sampledPages,
    };
  } finally {
    verifier.free();
    back.free();
    hashes.free();
    ram.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
