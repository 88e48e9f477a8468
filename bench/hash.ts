// Page-hashing throughput, all contenders in one run over the same bytes.
//
//   node dist/bench/hash.js [--json] [--mib N] [--reps N]
//
// Contenders (each hashes every 4 KiB page of the same data, or copies it):
//   simd-zero-copy    SIMD build, hashPagesAt on pages already in wasm memory,
//                     batches of 4096 pages, with the zero-page bits
//   simd-copy-in      SIMD build, engine.hashPages(Uint8Array) (copies 4 MiB
//                     at a time into wasm memory, copies the digests out)
//   scalar-zero-copy  scalar build, hashPagesAt as above
//   hash-wasm         hash-wasm 4.12 XXH3-128 per page: one hasher from
//                     createXXHash128(), then init/update/digest('binary') per
//                     page (its fastest per-page path: the sync hasher; the
//                     one-shot xxhash128() costs a Promise and a hex string)
//   sha1              node:crypto SHA-1 per page (crypto.hash one-shot where
//                     Node has it, else createHash/update/digest)
//   buffer-copy       Buffer.copy of the same bytes, 4 MiB chunks into one
//                     preallocated 4 MiB buffer (a memory-bandwidth yardstick)
// The contenders run interleaved, one pass each per repetition, after one
// warm-up pass; each contender's best pass counts (median shown too).
// GB/s = 1e9 bytes per second.

import os from "node:os";
import crypto from "node:crypto";
import { createXXHash128, xxhash128 } from "hash-wasm";
import { createEngine, bitBytes, PAGE_SIZE, HASH_SIZE, type Engine } from "../src/core/index.js";
import { argValue, benchArgs, isMain } from "./cli.js";

export interface HashBenchOptions {
  /** Print one JSON object instead of the table. */
  json?: boolean;
  /** MiB of data (default 256). */
  mib?: number;
  /** Measured repetitions per contender (default 7). */
  reps?: number;
  /** Print nothing (for callers that format the result themselves). */
  quiet?: boolean;
}

export interface ContenderResult {
  name: string;
  what: string;
  /** Best pass, GB/s (1e9 B/s). */
  gbps: number;
  /** Median pass, GB/s. */
  medianGbps: number;
  /** Every measured pass, GB/s. */
  samples: number[];
}

export interface HashBenchResult {
  bench: "hash";
  node: string;
  cpu: string;
  cores: number;
  totalMemBytes: number;
  mib: number;
  pages: number;
  batchPages: number;
  reps: number;
  sha1Api: string;
  hashWasmApi: string;
  contenders: ContenderResult[];
  ratios: {
    /** SIMD zero-copy / Buffer.copy (goal >= 1.2). */
    simdZeroCopyVsBufferCopy: number;
    /** SIMD copy-in / hash-wasm per page (goal >= 4). */
    simdCopyInVsHashWasm: number;
    /** SIMD zero-copy / scalar zero-copy. */
    simdVsScalar: number;
    /** SIMD zero-copy / Buffer.copy of the same bytes into new memory. */
    simdZeroCopyVsBufferCopyFull: number;
    /** SIMD copy-in / hash-wasm's one-shot xxhash128() per page. */
    simdCopyInVsHashWasmOneShot: number;
  };
  /**
   * The goals (zero-copy >= 1.2x Buffer.copy of the same bytes; copy-in >= 4x
   * hash-wasm's xxhash128 per page), as written (a copy of the same bytes to
   * memory, hash-wasm's xxhash128() function) and against the stricter
   * yardsticks (a copy into a cache-resident buffer, hash-wasm's fastest API).
   */
  goals: { simdZeroCopyVsBufferCopy: boolean; simdCopyInVsHashWasm: boolean; simdZeroCopyVsBufferCopyFull: boolean; simdCopyInVsHashWasmOneShot: boolean };
}

const BATCH_PAGES = 4096;
const COPY_CHUNK = 4 << 20;

interface Contender {
  name: string;
  what: string;
  run(): void | Promise<void>;
  samples: number[];
  async?: boolean;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Allocates the pages, the digests and the zero bits of a zero-copy contender. */
function zeroCopySetup(engine: Engine, data: Uint8Array): () => void {
  const pages = data.length / PAGE_SIZE;
  const region = engine.alloc(data.length);
  const out = engine.alloc(pages * HASH_SIZE);
  const bits = engine.allocZeroed(bitBytes(BATCH_PAGES));
  region.view().set(data);
  const base = region.ptr, outBase = out.ptr, bitsPtr = bits.ptr;
  return () => {
    for (let first = 0; first < pages; first += BATCH_PAGES) {
      const n = Math.min(BATCH_PAGES, pages - first);
      engine.hashPagesAt(base + first * PAGE_SIZE, n, outBase + first * HASH_SIZE, bitsPtr);
    }
  };
}

export async function benchHash(opts: HashBenchOptions = {}): Promise<HashBenchResult> {
  const mib = opts.mib ?? 256;
  const reps = Math.max(1, opts.reps ?? 7);
  const bytes = mib * 1024 * 1024;
  if (!Number.isInteger(mib) || mib <= 0 || bytes % PAGE_SIZE) throw new RangeError(`bench: --mib must be a positive integer, got ${mib}`);
  const pages = bytes / PAGE_SIZE;
  const log = (s: string) => { if (!opts.json && !opts.quiet) process.stderr.write(s + "\n"); };

  log(`preparing ${mib} MiB (${pages} pages) of random data...`);
  const data = Buffer.allocUnsafeSlow(bytes);
  crypto.randomFillSync(data);

  const simd = await createEngine({ flavor: "simd", seed: 0x5eedn });
  const scalar = await createEngine({ flavor: "scalar", seed: 0x5eedn });
  const hw = await createXXHash128(0x5eed, 0);

  // Sanity: the contenders agree on a few pages before anything is timed.
  {
    const sample = data.subarray(0, 8 * PAGE_SIZE);
    const a = simd.hashPages(sample), b = scalar.hashPages(sample);
    for (let i = 0; i < 8; i++) {
      const want = hw.init().update(sample.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)).digest("binary");
      const got = a.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE);
      if (Buffer.compare(Buffer.from(got), Buffer.from(want)) || Buffer.compare(Buffer.from(got), Buffer.from(b.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE)))) {
        throw new Error(`bench: digests disagree on page ${i}`);
      }
    }
  }

  const simdZeroCopy = zeroCopySetup(simd, data);
  const scalarZeroCopy = zeroCopySetup(scalar, data);
  const copyDst = Buffer.allocUnsafeSlow(COPY_CHUNK);
  const copyFull = Buffer.allocUnsafeSlow(bytes);
  copyFull.fill(1); // touch every page before timing
  const oneShotSha1 = typeof (crypto as { hash?: unknown }).hash === "function";
  let sink = 0; // keeps results observable so nothing is optimised away

  const contenders: Contender[] = [
    { name: "simd-zero-copy", what: "SIMD hashPagesAt, pages in wasm memory", run: simdZeroCopy, samples: [] },
    {
      name: "simd-copy-in", what: "SIMD hashPages(Uint8Array), copy-in", samples: [],
      run: () => { sink ^= simd.hashPages(data)[0]!; },
    },
    { name: "scalar-zero-copy", what: "scalar hashPagesAt, pages in wasm memory", run: scalarZeroCopy, samples: [] },
    {
      name: "hash-wasm", what: "hash-wasm xxhash128 per page (sync hasher)", samples: [],
      run: () => {
        for (let off = 0; off < bytes; off += PAGE_SIZE) sink ^= hw.init().update(data.subarray(off, off + PAGE_SIZE)).digest("binary")[0]!;
      },
    },
    {
      name: "sha1", what: `node:crypto sha1 per page (${oneShotSha1 ? "crypto.hash" : "createHash"})`, samples: [],
      run: oneShotSha1
        ? () => { for (let off = 0; off < bytes; off += PAGE_SIZE) sink ^= crypto.hash("sha1", data.subarray(off, off + PAGE_SIZE), "buffer")[0]!; }
        : () => { for (let off = 0; off < bytes; off += PAGE_SIZE) sink ^= crypto.createHash("sha1").update(data.subarray(off, off + PAGE_SIZE)).digest()[0]!; },
    },
    {
      name: "hash-wasm-oneshot", what: "hash-wasm xxhash128() per page (its one-shot API, async)", samples: [], async: true,
      run: async () => {
        for (let off = 0; off < bytes; off += PAGE_SIZE) sink ^= (await xxhash128(data.subarray(off, off + PAGE_SIZE), 0x5eed, 0)).charCodeAt(0);
      },
    },
    {
      name: "buffer-copy-full", what: "Buffer.copy of the same bytes to new memory (256 MiB -> 256 MiB)", samples: [],
      run: () => {
        for (let off = 0; off < bytes; off += COPY_CHUNK) data.copy(copyFull, off, off, Math.min(off + COPY_CHUNK, bytes));
        sink ^= copyFull[0]!;
      },
    },
    {
      name: "buffer-copy", what: "Buffer.copy, 4 MiB chunks into one cache-resident buffer", samples: [],
      run: () => {
        for (let off = 0; off < bytes; off += COPY_CHUNK) data.copy(copyDst, 0, off, Math.min(off + COPY_CHUNK, bytes));
        sink ^= copyDst[0]!;
      },
    },
  ];

  log(`warm-up pass...`);
  for (const c of contenders) await c.run();
  for (let r = 0; r < reps; r++) {
    // rotate the order so no contender always follows the same one
    for (let k = 0; k < contenders.length; k++) {
      const c = contenders[(k + r) % contenders.length]!;
      const t0 = process.hrtime.bigint();
      await c.run();
      const ns = Number(process.hrtime.bigint() - t0);
      c.samples.push(bytes / ns); // bytes per ns = GB/s
    }
    log(`  repetition ${r + 1}/${reps} done`);
  }
  if (sink === 0x7fffffff) log(""); // never true; reads sink

  const results: ContenderResult[] = contenders.map((c) => ({
    name: c.name, what: c.what, gbps: Math.max(...c.samples), medianGbps: median(c.samples), samples: c.samples,
  }));
  const g = (name: string) => results.find((r) => r.name === name)!.gbps;
  const ratios = {
    simdZeroCopyVsBufferCopy: g("simd-zero-copy") / g("buffer-copy"),
    simdZeroCopyVsBufferCopyFull: g("simd-zero-copy") / g("buffer-copy-full"),
    simdCopyInVsHashWasmOneShot: g("simd-copy-in") / g("hash-wasm-oneshot"),
    simdCopyInVsHashWasm: g("simd-copy-in") / g("hash-wasm"),
    simdVsScalar: g("simd-zero-copy") / g("scalar-zero-copy"),
  };
  const result: HashBenchResult = {
    bench: "hash",
    node: process.version,
    cpu: os.cpus()[0]?.model ?? "unknown",
    cores: os.cpus().length,
    totalMemBytes: os.totalmem(),
    mib, pages, batchPages: BATCH_PAGES, reps,
    sha1Api: oneShotSha1 ? "crypto.hash('sha1', page, 'buffer')" : "crypto.createHash('sha1').update(page).digest()",
    hashWasmApi: "createXXHash128(seedLow, seedHigh) once; init().update(page).digest('binary') per page",
    contenders: results,
    ratios,
    goals: {
      simdZeroCopyVsBufferCopy: ratios.simdZeroCopyVsBufferCopy >= 1.2, simdCopyInVsHashWasm: ratios.simdCopyInVsHashWasm >= 4,
      simdZeroCopyVsBufferCopyFull: ratios.simdZeroCopyVsBufferCopyFull >= 1.2, simdCopyInVsHashWasmOneShot: ratios.simdCopyInVsHashWasmOneShot >= 4,
    },
  };

  if (opts.json) {
    console.log(JSON.stringify(result));
  } else if (!opts.quiet) {
    console.log(formatHashResult(result));
  }
  return result;
}

export function formatHashResult(r: HashBenchResult): string {
  const lines: string[] = [];
  lines.push(`pagetwin hash bench: ${r.mib} MiB = ${r.pages} pages of 4 KiB, best of ${r.reps} interleaved passes`);
  lines.push(`node ${r.node}, ${r.cpu}, ${r.cores} cores, ${(r.totalMemBytes / 2 ** 30).toFixed(1)} GiB RAM`);
  lines.push("");
  const w = Math.max(...r.contenders.map((c) => c.name.length));
  lines.push(`${"contender".padEnd(w)}  best GB/s  median GB/s  what`);
  for (const c of r.contenders) {
    lines.push(`${c.name.padEnd(w)}  ${c.gbps.toFixed(2).padStart(9)}  ${c.medianGbps.toFixed(2).padStart(11)}  ${c.what}`);
  }
  lines.push("");
  const ok = (b: boolean) => (b ? "ok" : "MISSED");
  lines.push(`SIMD zero-copy / Buffer.copy of the same bytes (to new memory)   ${r.ratios.simdZeroCopyVsBufferCopyFull.toFixed(2)}x  (goal >= 1.2 as written: ${ok(r.goals.simdZeroCopyVsBufferCopyFull)})`);
  lines.push(`SIMD zero-copy / Buffer.copy into a cache-resident 4 MiB buffer  ${r.ratios.simdZeroCopyVsBufferCopy.toFixed(2)}x  (against the fastest copy: ${ok(r.goals.simdZeroCopyVsBufferCopy)})`);
  lines.push(`SIMD copy-in / hash-wasm xxhash128() per page (one-shot API)     ${r.ratios.simdCopyInVsHashWasmOneShot.toFixed(2)}x  (goal >= 4 as written: ${ok(r.goals.simdCopyInVsHashWasmOneShot)})`);
  lines.push(`SIMD copy-in / hash-wasm per page, its fastest (sync hasher) API ${r.ratios.simdCopyInVsHashWasm.toFixed(2)}x  (against its fastest API: ${ok(r.goals.simdCopyInVsHashWasm)})`);
  lines.push(`SIMD / scalar (zero-copy)           ${r.ratios.simdVsScalar.toFixed(2)}x`);
  lines.push(`hash-wasm: ${r.hashWasmApi}; sha1: ${r.sha1Api}`);
  return lines.join("\n");
}


if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/hash.js [--json] [--mib N] [--reps N]: page-hashing throughput, all contenders in one run", ["--json", "--mib", "--reps"]);
  benchHash({ json: args.includes("--json"), mib: argValue(args, "--mib"), reps: argValue(args, "--reps") }).catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
