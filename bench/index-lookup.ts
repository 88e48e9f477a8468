// Block-index build and lookup rates.
//
//   node dist/bench/index-lookup.js [--json] [--blocks N] [--lookups N] [--reps N]
//
// Builds a TwinIndex of 4M blocks (capacity reserved up front) from random
// 128-bit hashes already in wasm memory (setBlocksAt), then times one batched
// lookupAt of 1M hashes, half of them indexed (hits) and half not (misses), in
// random order, with block numbers and hit bits written through pointers.
// Build and lookup are repeated; the best pass counts (median shown too).

import os from "node:os";
import crypto from "node:crypto";
import { createEngine, bitBytes, HASH_SIZE, NO_BLOCK, type CoreFlavor } from "../src/core/index.js";
import { argValue, benchArgs, isMain } from "./cli.js";

export interface IndexLookupBenchOptions {
  json?: boolean;
  /** Indexed blocks (default 4 Mi = 4194304). */
  blocks?: number;
  /** Hashes per lookup batch (default 1 Mi = 1048576). */
  lookups?: number;
  /** Measured lookup passes (default 9); builds: a third of that, at least 2. */
  reps?: number;
  flavor?: CoreFlavor;
  quiet?: boolean;
}

export interface IndexLookupBenchResult {
  bench: "index-lookup";
  node: string;
  cpu: string;
  cores: number;
  totalMemBytes: number;
  flavor: CoreFlavor;
  blocks: number;
  lookups: number;
  hits: number;
  /** Best lookup pass, million lookups per second (goal >= 20). */
  mLookupsPerSec: number;
  medianMLookupsPerSec: number;
  lookupSamples: number[];
  /** Best build pass, million blocks indexed per second. */
  mBlocksPerSecBuild: number;
  medianMBlocksPerSecBuild: number;
  buildSamples: number[];
  indexBytes: number;
  /** idx.bytes / blocks (goal <= 32). */
  bytesPerBlock: number;
  goals: { lookupRate: boolean; bytesPerBlock: boolean };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export async function benchIndexLookup(opts: IndexLookupBenchOptions = {}): Promise<IndexLookupBenchResult> {
  const blocks = opts.blocks ?? 4 * 1024 * 1024;
  const lookups = opts.lookups ?? 1024 * 1024;
  const reps = Math.max(1, opts.reps ?? 9);
  const buildReps = Math.max(2, Math.ceil(reps / 3));
  const flavor = opts.flavor ?? "simd";
  const log = (s: string) => { if (!opts.json && !opts.quiet) process.stderr.write(s + "\n"); };

  const engine = await createEngine({ flavor, seed: 0x1dea5n });
  const blockHashes = engine.alloc(blocks * HASH_SIZE);
  const queries = engine.alloc(lookups * HASH_SIZE);
  const outBlocks = engine.alloc(lookups * 4);
  const outBits = engine.allocZeroed(bitBytes(lookups));

  log(`preparing ${blocks} random block hashes and ${lookups} queries...`);
  crypto.randomFillSync(blockHashes.view());
  // queries: the first half copies of random indexed hashes, the rest fresh
  // random hashes; then shuffled. want[i] = the expected block.
  const hits = lookups >> 1;
  const want = new Uint32Array(lookups).fill(NO_BLOCK);
  {
    const q = queries.view();
    crypto.randomFillSync(q);
    const bh = blockHashes.view();
    const pick = new Uint32Array(hits);
    crypto.randomFillSync(pick);
    for (let i = 0; i < hits; i++) {
      const b = pick[i]! % blocks;
      q.set(bh.subarray(b * HASH_SIZE, (b + 1) * HASH_SIZE), i * HASH_SIZE);
      want[i] = b;
    }
    const tmp = new Uint8Array(HASH_SIZE);
    const rnd = new Uint32Array(lookups);
    crypto.randomFillSync(rnd);
    for (let i = lookups - 1; i > 0; i--) {
      const j = rnd[i]! % (i + 1);
      tmp.set(q.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE));
      q.copyWithin(i * HASH_SIZE, j * HASH_SIZE, (j + 1) * HASH_SIZE);
      q.set(tmp, j * HASH_SIZE);
      const w = want[i]!; want[i] = want[j]!; want[j] = w;
    }
  }

  // Builds: a fresh index with reserved capacity each time; the last one stays.
  const buildSamples: number[] = [];
  let idx = engine.createIndex(blocks);
  for (let r = 0; r < buildReps; r++) {
    if (r > 0) { idx.free(); idx = engine.createIndex(blocks); }
    const t0 = process.hrtime.bigint();
    idx.setBlocksAt(blockHashes.ptr, 0, blocks);
    const ns = Number(process.hrtime.bigint() - t0);
    buildSamples.push((blocks / ns) * 1e3); // M blocks/s
    log(`  build ${r + 1}/${buildReps}: ${buildSamples[r]!.toFixed(1)} M blocks/s`);
  }
  if (idx.size !== blocks) throw new Error(`bench: index holds ${idx.size} entries, expected ${blocks}`);

  // Lookups: one warm-up pass (also checks every answer), then timed passes.
  const found0 = idx.lookupAt(queries.ptr, lookups, 0, outBlocks.ptr, outBits.ptr);
  {
    const got = engine.u32(outBlocks.ptr, lookups);
    let bad = 0;
    for (let i = 0; i < lookups; i++) if (got[i] !== want[i]) bad++;
    if (bad || found0 !== hits) throw new Error(`bench: ${bad} wrong lookup answers, ${found0} found of ${hits}`);
  }
  const lookupSamples: number[] = [];
  for (let r = 0; r < reps; r++) {
    const t0 = process.hrtime.bigint();
    const found = idx.lookupAt(queries.ptr, lookups, 0, outBlocks.ptr, outBits.ptr);
    const ns = Number(process.hrtime.bigint() - t0);
    if (found !== hits) throw new Error(`bench: lookup found ${found}, expected ${hits}`);
    lookupSamples.push((lookups / ns) * 1e3); // M lookups/s
  }

  const indexBytes = idx.bytes;
  const result: IndexLookupBenchResult = {
    bench: "index-lookup",
    node: process.version,
    cpu: os.cpus()[0]?.model ?? "unknown",
    cores: os.cpus().length,
    totalMemBytes: os.totalmem(),
    flavor, blocks, lookups, hits,
    mLookupsPerSec: Math.max(...lookupSamples),
    medianMLookupsPerSec: median(lookupSamples),
    lookupSamples,
    mBlocksPerSecBuild: Math.max(...buildSamples),
    medianMBlocksPerSecBuild: median(buildSamples),
    buildSamples,
    indexBytes,
    bytesPerBlock: indexBytes / blocks,
    goals: { lookupRate: Math.max(...lookupSamples) >= 20, bytesPerBlock: indexBytes / blocks <= 32 },
  };
  idx.free();
  for (const r of [blockHashes, queries, outBlocks, outBits]) r.free();

  if (opts.json) console.log(JSON.stringify(result));
  else if (!opts.quiet) console.log(formatIndexLookupResult(result));
  return result;
}

export function formatIndexLookupResult(r: IndexLookupBenchResult): string {
  const ok = (b: boolean) => (b ? "ok" : "MISSED");
  return [
    `pagetwin index bench (${r.flavor} build): ${r.blocks} blocks indexed, ${r.lookups} lookups per batch (${r.hits} hits)`,
    `node ${r.node}, ${r.cpu}, ${r.cores} cores, ${(r.totalMemBytes / 2 ** 30).toFixed(1)} GiB RAM`,
    "",
    `lookup   ${r.mLookupsPerSec.toFixed(1).padStart(7)} M/s best, ${r.medianMLookupsPerSec.toFixed(1)} M/s median  (goal >= 20 M/s: ${ok(r.goals.lookupRate)})`,
    `build    ${r.mBlocksPerSecBuild.toFixed(1).padStart(7)} M blocks/s best, ${r.medianMBlocksPerSecBuild.toFixed(1)} median`,
    `memory   ${r.bytesPerBlock.toFixed(2).padStart(7)} B per indexed block (${(r.indexBytes / 2 ** 20).toFixed(1)} MiB; goal <= 32: ${ok(r.goals.bytesPerBlock)})`,
  ].join("\n");
}


if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/index-lookup.js [--json] [--blocks N] [--lookups N] [--reps N] [--scalar]: block-index build and lookup rates", ["--json", "--blocks", "--lookups", "--reps", "--scalar"]);
  benchIndexLookup({
    json: args.includes("--json"),
    blocks: argValue(args, "--blocks"),
    lookups: argValue(args, "--lookups"),
    reps: argValue(args, "--reps"),
    flavor: args.includes("--scalar") ? "scalar" : undefined,
  }).catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
