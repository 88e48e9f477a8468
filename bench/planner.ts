// Planner work per pre-copy iteration, at several RAM sizes, on one core:
// hash every page, diff against the destination's hashes, join with the block
// index, extract the lists. Pages are already in core memory (the window is
// filled once and re-planned for every window of the VM), so this measures
// the planner, not the disk or the page cache.
//
//   node dist/bench/planner.js [--json] [--gib 1,4,8]

import os from "node:os";
import crypto from "node:crypto";
import { createEngine, PAGE_SIZE } from "../src/core/index.js";
import { Planner } from "../src/plan/planner.js";
import { isMain } from "./cli.js";

export interface PlannerBenchRow {
  gib: number;
  pages: number;
  /** First iteration: every page dirty (vs a zeroed destination). */
  firstMs: number;
  /** A later iteration: ~1% of pages dirty. */
  laterMs: number;
  gbpsFirst: number;
}

export interface PlannerBenchResult {
  bench: "planner";
  cores: number;
  totalMemBytes: number;
  rows: PlannerBenchRow[];
  /** 8 GiB time / 1 GiB time (linear: 8). */
  scale8vs1: number | null;
  goals: { oneGiBWithin150ms: boolean | null; linear8Within8_5x: boolean | null };
}

export async function benchPlanner(opts: { json?: boolean; gib?: number[]; quiet?: boolean } = {}): Promise<PlannerBenchResult> {
  const sizes = opts.gib ?? [1, 4, 8];
  const log = (s: string) => { if (!opts.json && !opts.quiet) process.stderr.write(s + "\n"); };
  const rows: PlannerBenchRow[] = [];
  for (const gib of sizes) {
    const pages = gib * 262144;
    const engine = await createEngine({ seed: 11n });
    const blocks = 262144;
    const index = engine.createIndex(blocks);
    const disk = new Uint8Array(crypto.randomBytes(4096 * PAGE_SIZE));
    // the index holds the 4096 sample blocks (the rest random hashes): half of each window are twins
    index.setBlocks(engine.hashPages(disk), 0);
    index.setBlocks(new Uint8Array(crypto.randomBytes((blocks - 4096) * 16)), 4096);
    const planner = new Planner(engine, { pages, windowPages: 4096, index });
    const w = planner.window.view();
    w.set(crypto.randomBytes(w.length));
    for (let i = 0; i < 4096; i += 2) w.set(disk.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), i * PAGE_SIZE);
    const iterate = () => {
      const t = performance.now();
      for (let first = 0; first < pages; first += planner.windowPages) planner.planWindow(first, planner.windowCount(first));
      return performance.now() - t;
    };
    const firstMs = iterate();
    // later iterations: change ~1% of the window's pages between passes
    let laterMs = Infinity;
    for (let r = 0; r < 7; r++) {
      for (let k = 0; k < 41; k++) planner.window.view(k * 100 * PAGE_SIZE, 8).set(crypto.randomBytes(8));
      laterMs = Math.min(laterMs, iterate());
    }
    planner.free();
    rows.push({ gib, pages, firstMs: +firstMs.toFixed(1), laterMs: +laterMs.toFixed(1), gbpsFirst: +((pages * PAGE_SIZE) / 1e6 / firstMs).toFixed(2) });
    log(`  ${gib} GiB: first iteration ${firstMs.toFixed(1)} ms, later iteration ${laterMs.toFixed(1)} ms`);
  }
  const g1 = rows.find((r) => r.gib === 1), g8 = rows.find((r) => r.gib === 8);
  const scale = g1 && g8 ? +(g8.laterMs / g1.laterMs).toFixed(2) : null;
  const result: PlannerBenchResult = {
    bench: "planner", cores: os.cpus().length, totalMemBytes: os.totalmem(), rows, scale8vs1: scale,
    goals: { oneGiBWithin150ms: g1 ? Math.max(g1.firstMs, g1.laterMs) <= 150 : null, linear8Within8_5x: scale === null ? null : scale <= 8.5 },
  };
  if (opts.json) console.log(JSON.stringify(result));
  else if (!opts.quiet) console.log(formatPlannerResult(result));
  return result;
}

export function formatPlannerResult(r: PlannerBenchResult): string {
  const lines = ["planner iteration (one core, pages already in core memory)", "  RAM     first iteration   later iteration"];
  for (const x of r.rows) lines.push(`  ${String(x.gib).padStart(2)} GiB  ${x.firstMs.toFixed(1).padStart(10)} ms  ${x.laterMs.toFixed(1).padStart(12)} ms`);
  if (r.scale8vs1 !== null) lines.push(`  8 GiB / 1 GiB: ${r.scale8vs1}x (linear: 8)`);
  if (r.goals.oneGiBWithin150ms !== null) lines.push(`  1 GiB within 150 ms: ${r.goals.oneGiBWithin150ms ? "ok" : "MISSED"}`);
  return lines.join("\n");
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const i = args.indexOf("--gib");
  benchPlanner({ json: args.includes("--json"), gib: i >= 0 ? args[i + 1]!.split(",").map(Number) : undefined }).catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
