// `node dist/bench/index-refresh.js [--gib N] [--percent P]`: an image with
// P% of its blocks rewritten (through QEMU, tracked by a dirty bitmap) since
// it was indexed. Side by side in one run: a full index build; opening the
// stale index (a migration can start then); a refresh through the dirty
// bitmap over QEMU's NBD server (the index is fresh then); a full re-read
// refresh (no VM tracking writes). Printed as times and ratios to the build.
// Opening is timed --opens times (median; each open makes a new engine, so
// fresh memory like a new process), beside the same open inserting the
// hashes block by block, and beside the cost of touching as much fresh memory
// for the first time (the page faults no index layout avoids).
// The build and the open are timed with the image and the index in the page
// cache (warm: flatters the build, which reads the whole image) and, at the
// end, with both dropped from it first (cold, as on a NAS whose files this
// host has not read: posix_fadvise DONTNEED through `dd iflag=nocache`), in
// wall and CPU time (user + system, all threads).
// Needs qemu-system-x86_64; QEMU runs with no guest (-machine none), its
// drive written with qemu-io in the monitor, as a guest's writes would be.

import { execFileSync, spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, existsSync, fsyncSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openNasIndex, readIndexHeader, type NasIndex } from "../src/adapters/nas/index-file.js";
import { createEngine, HASH_SIZE } from "../src/core/engine.js";
import { refreshByReread } from "../src/adapters/nas/refresh.js";
import { DirtyTracker } from "../src/adapters/qemu/dirty-tracker.js";
import { QmpClient } from "../src/adapters/qemu/qmp.js";
import { argString } from "./cli.js";

const args = process.argv.slice(2);
const gib = Number(argString(args, "--gib") ?? "1");
const percent = Number(argString(args, "--percent") ?? "1");
const opens = Number(argString(args, "--opens") ?? "3");
const BLOCK = 4096;

/** A GiB-sized image of distinct blocks (a random 4 MiB pattern, each block stamped with its number). */
function makeImage(path: string, bytes: number): void {
  const chunk = Buffer.alloc(4 << 20);
  randomFillSync(chunk);
  const fd = openSync(path, "w");
  try {
    for (let at = 0; at < bytes; at += chunk.length) {
      for (let b = 0; b < chunk.length; b += BLOCK) chunk.writeUInt32LE((at + b) / BLOCK, b);
      writeSync(fd, chunk, 0, chunk.length, at);
    }
  } finally {
    closeSync(fd);
  }
}

async function startQemu(image: string, qmpPath: string) {
  const p = spawn("qemu-system-x86_64", [
    "-machine", "none", "-nodefaults", "-display", "none",
    "-drive", `file=${image},if=none,id=drive0,format=raw,cache=writeback`,
    "-qmp", `unix:${qmpPath},server=on,wait=off`,
  ], { stdio: ["ignore", "ignore", "inherit"] });
  for (let i = 0; i < 400 && !existsSync(qmpPath); i++) await new Promise((r) => setTimeout(r, 25));
  return { proc: p, qmp: await QmpClient.connect(qmpPath) };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

/** CPU milliseconds (user + system) since `c0` (a process.cpuUsage()). */
const cpuSince = (c0: NodeJS.CpuUsage) => { const c = process.cpuUsage(c0); return (c.user + c.system) / 1000; };

/** Wall and CPU (user + system, all threads) milliseconds of `fn`. */
async function timed<T>(fn: () => Promise<T>): Promise<{ value: T; ms: number; cpu: number }> {
  const t0 = performance.now(), c0 = process.cpuUsage();
  const value = await fn();
  return { value, ms: performance.now() - t0, cpu: cpuSince(c0) };
}

/** Drops the files' pages from this host's page cache (written back first). */
function dropCache(...paths: string[]): void {
  for (const p of paths) {
    const fd = openSync(p, "r");
    try { fsyncSync(fd); } finally { closeSync(fd); }
    execFileSync("dd", [`if=${p}`, "iflag=nocache", "count=0", "status=none"]);
  }
}

/** The open as it was before the core's bulk load: the file's hashes inserted block by block, 1 MiB at a time. */
async function openBlockByBlock(indexPath: string): Promise<number> {
  const t0 = performance.now();
  const h = readIndexHeader(indexPath);
  const engine = await createEngine({ seed: h.seed });
  const index = engine.createIndex(h.blocks);
  const batch = 65536;
  const r = engine.alloc(batch * HASH_SIZE);
  const fd = openSync(indexPath, "r");
  try {
    for (let first = 0; first < h.blocks; first += batch) {
      const n = Math.min(batch, h.blocks - first);
      readSync(fd, r.view(0, n * HASH_SIZE), 0, n * HASH_SIZE, h.hashesAt + first * HASH_SIZE);
      index.setBlocksAt(r.ptr, first, n);
    }
  } finally {
    closeSync(fd);
  }
  return performance.now() - t0;
}

/** Wall and CPU milliseconds to write `bytes` of memory never touched before (the host's page-fault cost). */
function firstTouch(bytes: number): { ms: number; cpu: number } {
  const mem = new WebAssembly.Memory({ initial: Math.ceil(bytes / 65536) });
  const t0 = performance.now(), c0 = process.cpuUsage();
  new Uint8Array(mem.buffer).fill(1);
  return { ms: performance.now() - t0, cpu: cpuSince(c0) };
}

interface OpenPhases { engine: number; memory: number; read: number; table: number }

/**
 * The bulk open's steps (as openNasIndex's loadHashes does them), CPU ms each:
 * a new engine; the index's memory (records and table, zeroed: its first
 * touch); the file read into the records; the core building the table.
 */
async function openInPhases(indexPath: string): Promise<OpenPhases> {
  let c0 = process.cpuUsage();
  const step = () => { const ms = cpuSince(c0); c0 = process.cpuUsage(); return ms; };
  const h = readIndexHeader(indexPath);
  const engine = await createEngine({ seed: h.seed });
  const tEngine = step();
  const index = engine.createIndex(h.blocks);
  const recs = index.recordsFor(h.blocks);
  const tMemory = step();
  const fd = openSync(indexPath, "r");
  try {
    const mem = engine.u8();
    for (let at = 0; at < h.blocks * HASH_SIZE; at += 1 << 24) {
      readSync(fd, mem, recs + at, Math.min(1 << 24, h.blocks * HASH_SIZE - at), h.hashesAt + at);
    }
  } finally {
    closeSync(fd);
  }
  const tRead = step();
  index.loadAt(recs, h.blocks);
  const tTable = step();
  index.free();
  return { engine: tEngine, memory: tMemory, read: tRead, table: tTable };
}

/** Opens the stale index `opens` times, alternating with the block-by-block open and the open in steps; medians. */
async function timeOpens(path: string) {
  const bulk: number[] = [], bulkCpu: number[] = [], one: number[] = [], touch: number[] = [], touchCpu: number[] = [];
  const phases: OpenPhases[] = [];
  let bytes = 0;
  for (let i = 0; i < opens; i++) {
    const { value: nas, ms, cpu } = await timed<NasIndex>(() => openNasIndex(path));
    if (!nas.stale || nas.built) throw new Error("bench: expected a stale index, loaded");
    bulk.push(ms);
    bulkCpu.push(cpu);
    bytes = nas.index.bytes;
    nas.image.close();
    nas.index.free();
    one.push(await openBlockByBlock(`${path}.pagetwin-index`));
    const t = firstTouch(bytes);
    touch.push(t.ms);
    touchCpu.push(t.cpu);
    phases.push(await openInPhases(`${path}.pagetwin-index`));
  }
  const phase = (k: keyof OpenPhases) => median(phases.map((p) => p[k]));
  return {
    bulk: median(bulk), bulkCpu: median(bulkCpu), oneByOne: median(one), touch: median(touch), touchCpu: median(touchCpu), mib: bytes / 2 ** 20,
    phases: { engine: phase("engine"), memory: phase("memory"), read: phase("read"), table: phase("table") },
  };
}

/** Cold open and cold build, in turn (the open first: the build replaces the index). */
async function coldPair(image: string) {
  const index = `${image}.pagetwin-index`;
  const opens: { ms: number; cpu: number }[] = [], builds: { ms: number; cpu: number }[] = [];
  for (let i = 0; i < 2; i++) {
    dropCache(image, index);
    const o = await timed(() => openNasIndex(image));
    o.value.image.close();
    o.value.index.free();
    opens.push(o);
    dropCache(image, index);
    const b = await timed(() => openNasIndex(image, { rebuild: true }));
    b.value.image.close();
    b.value.index.free();
    builds.push(b);
  }
  const med = (xs: { ms: number; cpu: number }[]) => ({ ms: median(xs.map((x) => x.ms)), cpu: median(xs.map((x) => x.cpu)) });
  return { opens, open: med(opens), build: med(builds) };
}

const dir = mkdtempSync(join(tmpdir(), "pagetwin-bench-refresh-"));
const image = join(dir, "disk.raw");
let qemu: Awaited<ReturnType<typeof startQemu>> | null = null;
try {
  const bytes = gib * 2 ** 30;
  makeImage(image, bytes);
  const blocks = bytes / BLOCK;
  console.log(`index refresh: ${gib} GiB image (${blocks} blocks), ${percent}% of blocks rewritten since indexing (scattered single blocks: the worst case for reads)`);

  const { value: built, ms: tBuild, cpu: cBuild } = await timed(() => openNasIndex(image, { rebuild: true }));
  built.image.close();

  qemu = await startQemu(image, join(dir, "qmp.sock"));
  const tracker = await DirtyTracker.attach(qemu.qmp, built.header.indexId, { drive: "drive0", socketDir: dir });
  const n = Math.round((blocks * percent) / 100);
  const picked = new Set<number>();
  let seed = 12345;
  while (picked.size < n) { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; picked.add(seed % blocks); }
  for (const b of picked) {
    await qemu.qmp.execute("human-monitor-command", { "command-line": `qemu-io drive0 "write -P ${b & 0xff} ${b * BLOCK} ${BLOCK}"` });
  }
  await qemu.qmp.execute("human-monitor-command", { "command-line": `qemu-io drive0 "flush"` });

  const opened = await timeOpens(image);
  const tStale = opened.bulk;
  const stale = await openNasIndex(image);
  const r = await tracker.refresh(stale);
  stale.image.close();
  // the same blocks again, read through QEMU's NBD server instead of the file
  for (const b of picked) {
    await qemu.qmp.execute("human-monitor-command", { "command-line": `qemu-io drive0 "write -P ${(b + 1) & 0xff} ${b * BLOCK} ${BLOCK}"` });
  }
  const viaNbd = await DirtyTracker.attach(qemu.qmp, built.header.indexId, { drive: "drive0", socketDir: dir, readVia: "nbd" });
  const stale2 = await openNasIndex(image);
  const rn = await viaNbd.refresh(stale2);
  stale2.image.close();

  const again = await openNasIndex(image);
  // the re-read path (no VM tracking writes) on the same image: every block read and hashed again
  const rr = await refreshByReread(again);
  again.image.close();

  await tracker.detach();
  const cold = await coldPair(image);

  const row = (what: string, ms: number) => console.log(`  ${what.padEnd(58)} ${ms.toFixed(0).padStart(7)} ms   ${(ms / tBuild).toFixed(4)}x of the build`);
  const both = (what: string, ms: number, cpu: number, build: { ms: number; cpu: number }) => console.log(
    `  ${what.padEnd(58)} ${ms.toFixed(0).padStart(7)} ms   ${(ms / build.ms).toFixed(4)}x of the build; CPU ${cpu.toFixed(0)} ms, ${(cpu / build.cpu).toFixed(4)}x`);
  console.log(`page cache warm (image and index read before):`);
  both("full index build (every block read and hashed)", tBuild, cBuild, { ms: tBuild, cpu: cBuild });
  both(`open the stale index (a migration can start; median of ${opens})`, tStale, opened.bulkCpu, { ms: tBuild, cpu: cBuild });
  row("  the same open inserting the hashes block by block", opened.oneByOne);
  both(`  touching ${opened.mib.toFixed(0)} MiB of fresh memory (the index's size) alone`, opened.touch, opened.touchCpu, { ms: tBuild, cpu: cBuild });
  const p = opened.phases;
  console.log(`  the open in steps, CPU ms (x of the build's CPU): new engine ${p.engine.toFixed(0)} (${(p.engine / cBuild).toFixed(4)}),` +
    ` index memory zeroed ${p.memory.toFixed(0)} (${(p.memory / cBuild).toFixed(4)}), file read into it ${p.read.toFixed(0)} (${(p.read / cBuild).toFixed(4)}),` +
    ` table built ${p.table.toFixed(0)} (${(p.table / cBuild).toFixed(4)})`);
  row(`refresh through the dirty bitmap, blocks read from the file (${r.blocksRead})`, r.ms);
  row("open + that refresh (ready with a fresh index)", tStale + r.ms);
  row(`same, blocks read through QEMU's NBD server (${rn.nbdReads} reads)`, rn.ms);
  row("re-read refresh, no VM (every block read and hashed)", rr.ms);
  console.log(`page cache cold (image and index dropped from it before each step; the slower of ${cold.opens.length} pairs):`);
  both("full index build", cold.build.ms, cold.build.cpu, cold.build);
  both("open the index (a migration can start)", cold.open.ms, cold.open.cpu, cold.build);
  console.log(`  ratios to the full build: ready to migrate (stale index opened) ${(tStale / tBuild).toFixed(4)}x warm, ${(cold.open.ms / cold.build.ms).toFixed(4)}x cold` +
    ` (CPU ${(opened.bulkCpu / cBuild).toFixed(4)}x, ${(cold.open.cpu / cold.build.cpu).toFixed(4)}x);` +
    ` ready with a fresh index (open + bitmap refresh, warm) ${((tStale + r.ms) / tBuild).toFixed(4)}x (${((tStale + rn.ms) / tBuild).toFixed(4)}x reading through NBD)`);
} finally {
  if (qemu) {
    await qemu.qmp.execute("quit").catch(() => undefined);
    qemu.qmp.close();
    await new Promise((res) => { if (qemu!.proc.exitCode !== null) res(null); else qemu!.proc.once("exit", res); });
  }
  rmSync(dir, { recursive: true, force: true });
}
