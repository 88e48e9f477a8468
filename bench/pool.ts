// The pool: one planner iteration over a RAM file of 4 GiB with 1 and 2
// workers (and on the main thread alone), measured in one run; and the
// process's resident memory for an 8 GiB VM beyond the windows it reads.
//
//   node dist/bench/pool.js [--json] [--gib 4] [--mem-gib 8]

import os from "node:os";
import crypto from "node:crypto";
import { mkdtempSync, openSync, writeSync, closeSync, rmSync, ftruncateSync } from "node:fs";
import { join } from "node:path";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { createEngine, PAGE_SIZE } from "../src/core/index.js";
import { Planner } from "../src/plan/planner.js";
import { EnginePool } from "../src/pool/pool.js";
import { RamFile } from "../src/adapters/ram/ram-file.js";
import { argValue, benchArgs, isMain } from "./cli.js";

const WINDOW = 8192; // pages per window: 32 MiB

/** Times `runs` planner iterations in a row with one planner and one pool (the first runs cold: fresh worker memory). */
async function iterationsMs(path: string, pages: number, workers: number, runs: number): Promise<number[]> {
  const engine = await createEngine({ seed: 3n });
  const index = engine.createIndex(262144);
  index.setBlocks(new Uint8Array(crypto.randomBytes(262144 * 16)), 0);
  const planner = new Planner(engine, { pages, windowPages: WINDOW, index });
  const pool = workers > 0 ? await EnginePool.create({ size: workers, seed: 3n }) : null;
  const scans = pool?.session();
  const ram = RamFile.open(path);
  const times: number[] = [];
  try {
   for (let run = 0; run < runs; run++) {
    const t = performance.now();
    // as the source agent does: the workers scan the next window while this thread joins this one
    let pending = scans?.scanFile(path, 0, Math.min(WINDOW, pages));
    for (let first = 0; first < pages; first += WINDOW) {
      const count = Math.min(WINDOW, pages - first);
      if (pool) {
        const scan = await pending!;
        if (first + WINDOW < pages) pending = scans!.scanFile(path, first + WINDOW, Math.min(WINDOW, pages - first - WINDOW));
        planner.planWindowHashed(first, count, scan.hashes, scan.zeroBits);
      } else {
        ram.readPages(first, count, planner.window.view(0, count * PAGE_SIZE));
        planner.planWindow(first, count);
      }
    }
    times.push(performance.now() - t);
   }
    return times;
  } finally {
    ram.close();
    planner.free();
    await pool?.close();
  }
}

interface MemoryResult { vmGib: number; plannerBytes: number; rssGrowthBytes: number; windowBytes: number; beyondWindowsBytes: number }

/** The resident memory of a pool of 2 hashing an 8 GiB VM (a sparse RAM file: its content does not change it). */
async function measureMemory(memGib: number): Promise<MemoryResult> {
  const dir = mkdtempSync(join(os.tmpdir(), "pagetwin-bench-pool-mem-"));
  try {
    const memPath = join(dir, "ram8");
    const mfd = openSync(memPath, "w");
    ftruncateSync(mfd, memGib * 2 ** 30);
    closeSync(mfd);
    const rssStart = process.memoryUsage().rss;
    const engine = await createEngine({ seed: 3n });
    const planner = new Planner(engine, { pages: memGib * 262144, windowPages: WINDOW, index: engine.createIndex(1024) });
    // the planner's own state (16 B per page: the hashes the destination holds) is not the pool's
    const rss0 = process.memoryUsage().rss;
    const pool = await EnginePool.create({ size: 2, seed: 3n });
    const scans = pool.session();
    for (let first = 0; first < memGib * 262144; first += WINDOW) {
      const scan = await scans.scanFile(memPath, first, WINDOW);
      planner.planWindowHashed(first, WINDOW, scan.hashes, scan.zeroBits);
    }
    const rss1 = process.memoryUsage().rss;
    await pool.close();
    planner.free();
    const windowBytes = WINDOW * PAGE_SIZE; // the two workers' shares of one window
    return { vmGib: memGib, plannerBytes: rss0 - rssStart, rssGrowthBytes: rss1 - rss0, windowBytes, beyondWindowsBytes: rss1 - rss0 - windowBytes };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function benchPool(opts: { json?: boolean; gib?: number; memGib?: number; quiet?: boolean } = {}) {
  const gib = opts.gib ?? 4, memGib = opts.memGib ?? 8;
  const log = (s: string) => { if (!opts.json && !opts.quiet) process.stderr.write(s + "\n"); };
  const dir = mkdtempSync(join(os.tmpdir(), "pagetwin-bench-pool-"));
  try {
    const path = join(dir, "ram");
    // resident memory in a process of its own: in one that ran other benchmarks, memory they hand back
    // to the system meanwhile hides the pool's growth (it measured negative inside npm run bench)
    const mem = JSON.parse(execFileSync(process.execPath, [fileURLToPath(import.meta.url), "--memory-only", "--mem-gib", String(memGib)], { encoding: "utf8" })) as MemoryResult;
    log(`writing a ${gib} GiB RAM file...`);
    const chunk = crypto.randomBytes(64 << 20);
    const fd = openSync(path, "w");
    for (let o = 0; o < gib * 1024; o += 64) writeSync(fd, chunk, 0, chunk.length, o * 2 ** 20);
    closeSync(fd);
    const pages = gib * 262144;
    // per configuration: a first iteration (cold) and later ones (best of 3), as bench/planner reports them
    const ms: Record<string, number[]> = { main: [], w1: [], w2: [] };
    const first: Record<string, number> = {};
    await iterationsMs(path, pages, 1, 1); // warm the page cache
    for (const [k, w] of [["main", 0], ["w1", 1], ["w2", 2]] as const) {
      const [cold, ...later] = await iterationsMs(path, pages, w, 4);
      first[k] = cold!;
      ms[k] = later;
    }
    const best = (k: string) => Math.min(...ms[k]!);
    rmSync(path);
    const windowBytes = mem.windowBytes;
    const result = {
      bench: "pool", cores: os.cpus().length, gib, windowPages: WINDOW,
      iterationMs: { mainThread: +best("main").toFixed(1), workers1: +best("w1").toFixed(1), workers2: +best("w2").toFixed(1) },
      firstIterationMs: { mainThread: +first["main"]!.toFixed(1), workers1: +first["w1"]!.toFixed(1), workers2: +first["w2"]!.toFixed(1) },
      speedup2vs1: +(best("w1") / best("w2")).toFixed(2),
      speedup2vs1First: +(first["w1"]! / first["w2"]!).toFixed(2),
      memory: mem,
      goals: { speedup2vs1AtLeast1_8: best("w1") / best("w2") >= 1.8, beyondWindowsAtMost64MiB: mem.beyondWindowsBytes <= 64 * 2 ** 20 },
    };
    if (opts.json) console.log(JSON.stringify(result));
    else if (!opts.quiet) {
      console.log(`pool: one planner iteration over a ${gib} GiB RAM file (read + hash + plan); later iterations best of 3`);
      console.log(`  later: main thread only ${result.iterationMs.mainThread} ms; 1 worker ${result.iterationMs.workers1} ms; 2 workers ${result.iterationMs.workers2} ms`);
      console.log(`  first: main thread only ${result.firstIterationMs.mainThread} ms; 1 worker ${result.firstIterationMs.workers1} ms; 2 workers ${result.firstIterationMs.workers2} ms (${result.speedup2vs1First}x)`);
      console.log(`  2 workers / 1 worker (later): ${result.speedup2vs1}x (goal >= 1.8: ${result.goals.speedup2vs1AtLeast1_8 ? "ok" : "MISSED"}; this machine has ${result.cores} cores)`);
      console.log(`  resident memory for a ${memGib} GiB VM: planner ${(result.memory.plannerBytes / 2 ** 20).toFixed(1)} MiB; pool of 2 +${(result.memory.rssGrowthBytes / 2 ** 20).toFixed(1)} MiB, ${(result.memory.beyondWindowsBytes / 2 ** 20).toFixed(1)} MiB beyond the ${(windowBytes / 2 ** 20).toFixed(0)} MiB window (goal <= 64: ${result.goals.beyondWindowsAtMost64MiB ? "ok" : "MISSED"})`);
    }
    return result;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMain(import.meta.url) && process.argv.includes("--memory-only")) {
  measureMemory(argValue(process.argv.slice(2), "--mem-gib") ?? 8).then((m) => console.log(JSON.stringify(m)), (err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
} else if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/pool.js [--gib N] [--mem-gib N] [--json]: a planner iteration over a RAM file with 1 and 2 workers, and resident memory", ["--gib", "--mem-gib", "--json", "--memory-only"]);
  benchPool({ json: args.includes("--json"), gib: argValue(args, "--gib"), memGib: argValue(args, "--mem-gib") }).catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
