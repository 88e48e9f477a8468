// Compressors for the pages that still travel in full, on realistic page data.
//
//   node dist/bench/compress.js [--json] [--mib N] [--reps N] [--ram FILE]
//   node dist/bench/compress.js --migrate [--mib N]   (end to end, agent mode: off / auto / zstd at 125 MB/s and unlimited)
//
// Data sets (4 KiB pages, all-zero pages dropped: those never travel in full):
//   libs     shared objects and executables from /usr/lib (code + rodata, as a
//            guest's anonymous and file-backed text pages)
//   text     text files from /usr/share (docs, scripts, dictionaries, man
//            sources; already-gzipped files are skipped)
//   mixed    libs and text interleaved page by page, plus one page in eight of
//            random bytes (crypto keys, compressed files, encrypted data)
//   random   random bytes: must come out raw
//   ram      the non-zero pages of --ram FILE (e.g. a guest's RAM file)
// Each candidate compresses every 256-page batch (1 MiB, one Pages frame)
// one-shot, and decompresses it again (checked). Single thread. Best of
// --reps passes; MB/s = 1e6 bytes of page data per second.
//
// Candidates (loaded dynamically, skipped when not installed):
//   deflate-1   node:zlib deflateRawSync level 1 (built in)
//   brotli-1    node:zlib brotliCompressSync quality 1 (built in)
//   zstd-1/3    zstd-napi (native, libzstd built from its bundled sources)
//   zstd-wasm-1 @bokuweb/zstd-wasm (wasm)
//   lz4-napi    lz4-napi (native, lz4_flex, prebuilt optional dep)
//   lz4-wasm    lz4-wasm-nodejs (wasm, lz4_flex)

import { readdirSync, readFileSync, statSync, openSync, readSync, closeSync, fstatSync } from "node:fs";
import { join } from "node:path";
import { randomFillSync } from "node:crypto";
import os from "node:os";
import zlib from "node:zlib";
import { pathToFileURL } from "node:url";

const PAGE = 4096;
const BATCH = 256;

export interface Candidate {
  name: string;
  compress(src: Uint8Array): Uint8Array;
  decompress(src: Uint8Array, size: number): Uint8Array;
}

async function tryImport(name: string): Promise<any | null> {
  try {
    return await import(name);
  } catch {
    return null;
  }
}

export async function loadCandidates(): Promise<Candidate[]> {
  const out: Candidate[] = [
    {
      name: "deflate-1",
      compress: (s) => zlib.deflateRawSync(s, { level: 1 }),
      decompress: (s, n) => zlib.inflateRawSync(s, { maxOutputLength: n }),
    },
    {
      name: "brotli-1",
      compress: (s) => zlib.brotliCompressSync(s, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 1, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: s.length } }),
      decompress: (s, n) => zlib.brotliDecompressSync(s, { maxOutputLength: n }),
    },
  ];
  const zn = await tryImport("zstd-napi");
  if (zn) {
    for (const level of [1, 3]) {
      const c = new zn.Compressor();
      c.setParameters({ compressionLevel: level });
      const d = new zn.Decompressor();
      out.push({ name: `zstd-napi-${level}`, compress: (s) => c.compress(s), decompress: (s) => d.decompress(s) });
    }
  }
  const zw = await tryImport("@bokuweb/zstd-wasm");
  if (zw) {
    await zw.init();
    out.push({ name: "zstd-wasm-1", compress: (s) => zw.compress(s, 1), decompress: (s) => zw.decompress(s) });
  }
  const ln = await tryImport("lz4-napi");
  if (ln) {
    const m = ln.default ?? ln;
    out.push({ name: "lz4-napi", compress: (s) => m.compressSync(Buffer.from(s.buffer, s.byteOffset, s.byteLength)), decompress: (s) => m.uncompressSync(Buffer.from(s.buffer, s.byteOffset, s.byteLength)) });
  }
  const lw = await tryImport("lz4-wasm-nodejs");
  if (lw) {
    const m = lw.default ?? lw;
    out.push({ name: "lz4-wasm", compress: (s) => m.compress(s), decompress: (s) => m.decompress(s) });
  }
  // the one pagetwin ships (src/codec/compress.ts), for the record
  const own = await tryImport(new URL("../src/codec/compress.js", import.meta.url).href);
  if (own?.createCompressor) {
    for (const algo of own.availableAlgorithms() as string[]) {
      const c = await own.createCompressor(algo);
      out.push({
        name: `pagetwin:${algo}`,
        compress: (s) => {
          const dst = Buffer.allocUnsafe(c.bound(s.length));
          return dst.subarray(0, c.compressInto(s, dst));
        },
        decompress: (s, n) => {
          const dst = Buffer.allocUnsafe(n);
          c.decompressInto(s, dst);
          return dst;
        },
      });
    }
  }
  return out;
}

function walk(dir: string, pick: (p: string, size: number) => boolean, out: string[], limit: number, total = { n: 0 }): void {
  let entries: string[];
  try { entries = readdirSync(dir).sort(); } catch { return; }
  for (const e of entries) {
    if (total.n >= limit) return;
    const p = join(dir, e);
    let st;
    try { st = statSync(p); } catch { continue; }
    if (st.isDirectory()) walk(p, pick, out, limit, total);
    else if (st.isFile() && st.size >= PAGE && pick(p, st.size)) {
      out.push(p);
      total.n += st.size;
    }
  }
}

function pagesOf(files: string[], bytes: number): Buffer {
  const out = Buffer.alloc(bytes);
  let at = 0;
  for (const f of files) {
    if (at >= bytes) break;
    let b: Buffer;
    try { b = readFileSync(f); } catch { continue; }
    for (let o = 0; o + PAGE <= b.length && at < bytes; o += PAGE) {
      const pg = b.subarray(o, o + PAGE);
      if (pg.every((x) => x === 0)) continue;
      pg.copy(out, at);
      at += PAGE;
    }
  }
  return out.subarray(0, at - (at % (PAGE * BATCH)) || at);
}

export function dataSets(mib: number, ramPath?: string): Record<string, Buffer> {
  const bytes = mib << 20;
  const isText = (p: string) => !/\.(gz|xz|bz2|zst|png|jpg|jpeg|gif|ico|svgz|woff2?|ttf|otf|pyc|mo|zip|jar|deb)$/i.test(p);
  const libFiles: string[] = [], textFiles: string[] = [];
  walk("/usr/lib", (p) => /\.so(\.|$)|\/bin\//.test(p) || /x86_64-linux-gnu\/[^/]+\.so/.test(p), libFiles, bytes * 2);
  walk("/usr/share", (p) => isText(p), textFiles, bytes * 2);
  const libs = pagesOf(libFiles, bytes), text = pagesOf(textFiles, bytes);
  const mixed = Buffer.alloc(bytes);
  let li = 0, ti = 0, at = 0;
  for (let k = 0; at < bytes; k++, at += PAGE) {
    const dst = mixed.subarray(at, at + PAGE);
    if (k % 8 === 7) randomFillSync(dst);
    else if (k % 2 === 0) { libs.copy(dst, 0, li, li + PAGE); li = (li + PAGE) % libs.length; }
    else { text.copy(dst, 0, ti, ti + PAGE); ti = (ti + PAGE) % text.length; }
  }
  const random = randomFillSync(Buffer.alloc(Math.min(bytes, 32 << 20)));
  const sets: Record<string, Buffer> = { libs, text, mixed, random };
  if (ramPath) {
    const fd = openSync(ramPath, "r");
    const size = fstatSync(fd).size;
    const out = Buffer.alloc(Math.min(size, bytes));
    const pg = Buffer.alloc(PAGE);
    let o = 0;
    for (let pos = 0; pos + PAGE <= size && o < out.length; pos += PAGE) {
      readSync(fd, pg, 0, PAGE, pos);
      if (!pg.every((x) => x === 0)) { pg.copy(out, o); o += PAGE; }
    }
    closeSync(fd);
    sets.ram = out.subarray(0, o);
  }
  return sets;
}

export interface Row { set: string; candidate: string; mib: number; ratio: number; compressMBs: number; decompressMBs: number }

export async function benchCompress(o: { mib?: number; reps?: number; ram?: string; quiet?: boolean } = {}): Promise<Row[]> {
  const sets = dataSets(o.mib ?? 32, o.ram);
  const cands = await loadCandidates();
  const reps = o.reps ?? 3;
  const rows: Row[] = [];
  for (const [set, data] of Object.entries(sets)) {
    const batches: Buffer[] = [];
    for (let i = 0; i < data.length; i += PAGE * BATCH) batches.push(data.subarray(i, Math.min(data.length, i + PAGE * BATCH)));
    for (const c of cands) {
      let bestC = Infinity, bestD = Infinity, outBytes = 0;
      for (let r = 0; r < reps; r++) {
        const packed: Uint8Array[] = [];
        let t = performance.now();
        for (const b of batches) packed.push(c.compress(b));
        bestC = Math.min(bestC, performance.now() - t);
        outBytes = packed.reduce((a, p) => a + p.length, 0);
        t = performance.now();
        for (let k = 0; k < batches.length; k++) {
          const back = c.decompress(packed[k]!, batches[k]!.length);
          if (r === 0 && Buffer.compare(Buffer.from(back.buffer, back.byteOffset, back.byteLength), batches[k]!) !== 0) throw new Error(`${c.name} did not round-trip on ${set}`);
        }
        bestD = Math.min(bestD, performance.now() - t);
      }
      const row = {
        set, candidate: c.name, mib: data.length / 2 ** 20, ratio: outBytes / data.length,
        compressMBs: data.length / 1e6 / (bestC / 1000), decompressMBs: data.length / 1e6 / (bestD / 1000),
      };
      rows.push(row);
      if (!o.quiet) console.log(`${set.padEnd(7)} ${c.name.padEnd(18)} ${row.mib.toFixed(0).padStart(4)} MiB  ratio ${row.ratio.toFixed(3)}  compress ${row.compressMBs.toFixed(0).padStart(5)} MB/s  decompress ${row.decompressMBs.toFixed(0).padStart(5)} MB/s`);
    }
  }
  return rows;
}

/**
 * End to end, agent mode over loopback TCP: the same RAM file (the mixed
 * set, `mib` MiB, no index: every non-zero page travels in full) migrated
 * with --compress off / auto / zstd, at each bandwidth (0: no limit).
 */
export async function benchMigrate(o: { mib?: number; bandwidths?: number[]; modes?: readonly ("off" | "auto" | "zstd" | "brotli")[]; quiet?: boolean } = {}): Promise<Record<string, unknown>[]> {
  const { mkdtempSync, writeFileSync, rmSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const { createEngine } = await import("../src/core/index.js");
  const { RamFile } = await import("../src/adapters/ram/ram-file.js");
  const { DestinationAgent } = await import("../src/agent/destination.js");
  const { migrateSource } = await import("../src/agent/source.js");
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-compress-bench-"));
  const rows: Record<string, unknown>[] = [];
  try {
    const ramPath = join(dir, "src-ram");
    writeFileSync(ramPath, dataSets(o.mib ?? 64).mixed);
    for (const bandwidth of o.bandwidths ?? [125e6, 0]) {
      for (const compress of o.modes ?? (["off", "auto", "zstd"] as const)) {
        const agent = new DestinationAgent({ ramPath: join(dir, "dst-ram"), createRam: true });
        const port = await agent.listen();
        const ram = RamFile.open(ramPath);
        try {
          const r = await migrateSource({
            engine: await createEngine(), index: null, indexId: null, ram, vm: { pause: async () => {}, resume: async () => {} },
            host: "127.0.0.1", port, bandwidth, compress,
          });
          const c = r.compression;
          const row = {
            bandwidth, compress, totalTimeMs: Math.round(r.totalTimeMs), transferredBytes: r.transferredBytes,
            framesCompressed: c.framesCompressed, framesRaw: c.framesRaw, rawSlow: c.rawSlow, rawPoorRatio: c.rawPoorRatio,
            compressMBs: Math.round(c.compressMBs), linkMBs: Math.round(c.linkMBs),
          };
          rows.push(row);
          if (!o.quiet) console.log(`link ${bandwidth ? `${(bandwidth / 1e6).toFixed(0)} MB/s` : "unlimited"} --compress ${compress.padEnd(4)}: total ${String(row.totalTimeMs).padStart(5)} ms, ${(r.transferredBytes / 1e6).toFixed(1).padStart(6)} MB on the link; frames ${c.framesCompressed} compressed, ${c.framesRaw} raw (${c.rawSlow} slow, ${c.rawPoorRatio} poor); compressor ${row.compressMBs} MB/s, link ${row.linkMBs ? `${row.linkMBs} MB/s` : "not measured (no raw frames)"}`);
        } finally {
          ram.close();
          agent.close();
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href && process.argv.includes("--migrate")) {
  const i = process.argv.indexOf("--mib");
  await benchMigrate({ mib: i > 0 ? Number(process.argv[i + 1]) : 64 });
} else if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const args = process.argv.slice(2);
  const val = (k: string) => { const i = args.indexOf(k); return i >= 0 ? args[i + 1] : undefined; };
  const json = args.includes("--json");
  if (!json) console.log(`compress bench: ${os.cpus().length} cpus (${os.cpus()[0]?.model}), node ${process.version}, batches of ${BATCH} pages`);
  const rows = await benchCompress({ mib: Number(val("--mib") ?? 32), reps: Number(val("--reps") ?? 3), ram: val("--ram"), quiet: json });
  if (json) console.log(JSON.stringify(rows));
}
