// qcow2 reading throughput against raw, side by side in one run.
//
//   node dist/bench/qcow2.js [--json] [--mib N] [--reps N]
//
// The same N MiB of guest data (default 256; a mix of random, text and zero
// 64 KiB stretches) as a raw image, as a qcow2 made by `qemu-img convert`
// (64 KiB clusters), and as a qcow2 overlay on the raw image with a quarter
// of its clusters rewritten in the overlay. Each is read whole in 4 MiB
// batches of blocks, as the index build reads (files in the page cache after
// a first pass, so the reader's cost shows, not the disk's); passes alternate
// between the images and the best pass of each counts. Goal: qcow2 within
// 1.5x of raw. Needs qemu-img (Debian qemu-utils).

import os from "node:os";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, openSync, writeSync, closeSync } from "node:fs";
import { join } from "node:path";
import { openDisk } from "../src/adapters/nas/disk.js";
import { argValue, isMain } from "./cli.js";

const MIB = 1 << 20;
const BATCH_BLOCKS = 1024;

export interface Qcow2BenchResult {
  bench: "qcow2-read";
  mib: number;
  /** Best pass, MiB/s. */
  rawMiBs: number;
  qcow2MiBs: number;
  overlayMiBs: number;
  /** Read time relative to raw (goal <= 1.5). */
  qcow2Ratio: number;
  overlayRatio: number;
  goal: boolean;
}

export async function benchQcow2(opts: { mib?: number; reps?: number; quiet?: boolean } = {}): Promise<Qcow2BenchResult | { skipped: string }> {
  const mib = opts.mib ?? 256, reps = opts.reps ?? 5;
  try {
    execFileSync("qemu-img", ["--version"], { stdio: "ignore" });
  } catch {
    if (!opts.quiet) console.log("qcow2 read: skipped (qemu-img not installed: apt-get install qemu-utils)");
    return { skipped: "qemu-img not installed" };
  }
  const dir = mkdtempSync(join(os.tmpdir(), "pagetwin-bench-qcow2-"));
  try {
    const raw = join(dir, "disk.raw"), qcow2 = join(dir, "disk.qcow2"), overlay = join(dir, "overlay.qcow2");
    writeData(raw, mib);
    execFileSync("qemu-img", ["convert", "-O", "qcow2", "-o", "cluster_size=64k", raw, qcow2]);
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw", overlay]);
    const writes: string[] = [];
    for (let c = 0; c < mib * 16; c += 4) writes.push("-c", `write -P ${c & 0xff} ${c * 64}k 64k`);
    for (let i = 0; i < writes.length; i += 2000) execFileSync("qemu-io", ["-f", "qcow2", ...writes.slice(i, i + 2000), overlay], { stdio: "ignore" });
    const best = { raw: Infinity, qcow2: Infinity, overlay: Infinity };
    for (let r = 0; r < reps + 1; r++) {
      for (const [k, p] of [["raw", raw], ["qcow2", qcow2], ["overlay", overlay]] as const) {
        const ms = readAll(p);
        if (r > 0) best[k] = Math.min(best[k], ms); // pass 0 warms the page cache
      }
    }
    const rate = (ms: number) => mib / (ms / 1000);
    const result: Qcow2BenchResult = {
      bench: "qcow2-read", mib,
      rawMiBs: rate(best.raw), qcow2MiBs: rate(best.qcow2), overlayMiBs: rate(best.overlay),
      qcow2Ratio: best.qcow2 / best.raw, overlayRatio: best.overlay / best.raw,
      goal: best.qcow2 / best.raw <= 1.5 && best.overlay / best.raw <= 1.5,
    };
    if (!opts.quiet) {
      console.log(`qcow2 read, ${mib} MiB of guest data in 4 MiB batches, best of ${reps} (page cache warm):`);
      console.log(`  raw              ${result.rawMiBs.toFixed(0).padStart(6)} MiB/s  1.00x time`);
      console.log(`  qcow2 (64k)      ${result.qcow2MiBs.toFixed(0).padStart(6)} MiB/s  ${result.qcow2Ratio.toFixed(2)}x time`);
      console.log(`  qcow2 overlay    ${result.overlayMiBs.toFixed(0).padStart(6)} MiB/s  ${result.overlayRatio.toFixed(2)}x time (1/4 of its clusters its own, the rest from the raw backing file)`);
      console.log(`  goal (qcow2 within 1.5x of raw): ${result.goal ? "met" : "NOT met"}`);
    }
    return result;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** ms to read the whole guest disk at `path`. */
function readAll(path: string): number {
  const disk = openDisk(path);
  const buf = new Uint8Array(BATCH_BLOCKS * 4096);
  const t0 = performance.now();
  try {
    for (let first = 0; first < disk.blocks; first += BATCH_BLOCKS) disk.readBlocks(first, Math.min(BATCH_BLOCKS, disk.blocks - first), buf);
  } finally {
    disk.close();
  }
  return performance.now() - t0;
}

/** mib MiB of 64 KiB stretches: random, text or zeros in turn. */
function writeData(path: string, mib: number): void {
  const fd = openSync(path, "w");
  const chunk = Buffer.alloc(MIB);
  let x = 12345;
  try {
    for (let m = 0; m < mib; m++) {
      for (let s = 0; s < 16; s++) {
        const at = s * 65536, kind = (m * 16 + s) % 3;
        if (kind === 0) for (let i = at; i < at + 65536; i += 4) { x = (x * 1103515245 + 12345) >>> 0; chunk.writeUInt32LE(x, i); }
        else if (kind === 1) chunk.fill(`pagetwin ${m}.${s} `, at, at + 65536);
        else chunk.fill(0, at, at + 65536);
      }
      writeSync(fd, chunk);
    }
  } finally {
    closeSync(fd);
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  benchQcow2({ mib: argValue(args, "--mib"), reps: argValue(args, "--reps"), quiet: args.includes("--json") }).then((r) => {
    if (args.includes("--json")) console.log(JSON.stringify(r));
  }).catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
