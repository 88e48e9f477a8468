// The embedded VM's guest: a worker thread that runs while the migration
// runs, as a guest would. It writes anonymous pages at the dirty rate, reads
// disk blocks into page-cache pages, and rewrites disk blocks behind the
// page cache's back (so some twins go stale and take the resend path).
// Control: "pause" / "resume" / "stop" messages, each acknowledged.

import { parentPort, workerData } from "node:worker_threads";
import { openSync, readSync, writeSync, closeSync } from "node:fs";
import { randomFillSync, randomInt } from "node:crypto";

export interface GuestConfig {
  ramPath: string;
  imagePath: string;
  /** Pages the guest may overwrite with fresh data (anonymous memory). */
  anonPages: Uint32Array;
  /** Pages that hold page cache (copies of disk blocks). */
  cachePages: Uint32Array;
  imageBlocks: number;
  /** Pages written per second in all. */
  dirtyPagesPerSecond: number;
  /** Share of those writes that read a disk block into a page-cache page. */
  cacheFillShare: number;
  /** Disk blocks rewritten per second (behind cached copies). */
  rewriteBlocksPerSecond: number;
  /** Map from page-cache page to the block it holds (parallel to cachePages). */
  cacheBlocks: Uint32Array;
}

const TICK_MS = 5;

function run(cfg: GuestConfig): void {
  const ram = openSync(cfg.ramPath, "r+");
  const img = openSync(cfg.imagePath, "r+");
  const page = new Uint8Array(4096);
  let paused = false;
  let stopped = false;
  let written = 0, filled = 0, rewritten = 0;
  let debt = 0, rewriteDebt = 0;
  let last = performance.now();
  const tick = () => {
    if (stopped) return;
    const now = performance.now();
    const dt = (now - last) / 1000;
    last = now;
    if (!paused) {
      debt += cfg.dirtyPagesPerSecond * dt;
      rewriteDebt += cfg.rewriteBlocksPerSecond * dt;
      while (debt >= 1) {
        debt -= 1;
        if (cfg.cachePages.length && Math.random() < cfg.cacheFillShare) {
          // the guest reads a file: a disk block lands in a page-cache page
          const k = randomInt(cfg.cachePages.length);
          const b = randomInt(cfg.imageBlocks);
          readSync(img, page, 0, 4096, b * 4096);
          writeSync(ram, page, 0, 4096, cfg.cachePages[k]! * 4096);
          cfg.cacheBlocks[k] = b;
          filled++;
        } else if (cfg.anonPages.length) {
          randomFillSync(page);
          writeSync(ram, page, 0, 4096, cfg.anonPages[randomInt(cfg.anonPages.length)]! * 4096);
          written++;
        }
      }
      while (rewriteDebt >= 1 && cfg.cachePages.length) {
        rewriteDebt -= 1;
        // a block that some page still caches gets new content on disk only
        const b = cfg.cacheBlocks[randomInt(cfg.cacheBlocks.length)]!;
        randomFillSync(page);
        writeSync(img, page, 0, 4096, b * 4096);
        rewritten++;
      }
    }
    setTimeout(tick, TICK_MS);
  };
  parentPort!.on("message", (m: string) => {
    if (m === "pause") { paused = true; parentPort!.postMessage({ ack: "pause" }); }
    else if (m === "resume") { paused = false; last = performance.now(); parentPort!.postMessage({ ack: "resume" }); }
    else if (m === "stop") {
      stopped = true;
      closeSync(ram);
      closeSync(img);
      parentPort!.postMessage({ ack: "stop", written, filled, rewritten });
    }
  });
  parentPort!.postMessage({ ack: "ready" });
  tick();
}

if (parentPort && workerData) run(workerData as GuestConfig);
