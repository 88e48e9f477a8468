// `node dist/bench/index-refresh.js [--gib N] [--percent P]`: an image with
// P% of its blocks rewritten (through QEMU, tracked by a dirty bitmap) since
// it was indexed. Side by side in one run: a full index build; opening the
// stale index (a migration can start then); a refresh through the dirty
// bitmap over QEMU's NBD server (the index is fresh then); a full re-read
// refresh (no VM tracking writes). Printed as times and ratios to the build.
// The build and every open run in a process of their own (open-index.ts), as
// a `pagetwin index` run and a migration do; only openNasIndex is timed in it.
// Opening is timed --opens times (median), beside the same open inserting the
// hashes block by block, the open in steps and the cost of touching as much
// fresh memory for the first time (these in this process, in a new engine).
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
import { fileURLToPath } from "node:url";
import { openNasIndex, readIndexHeader } from "../src/adapters/nas/index-file.js";
import { createEngine, HASH_SIZE } from "../src/core/engine.js";
import { refreshByReread } from "../src/adapters/nas/refresh.js";
import { DirtyTracker } from "../src/adapters/qemu/dirty-tracker.js";
import { QmpClient } from "../src/adapters/qemu/qmp.js";
import { argString, benchArgs } from "./cli.js";

const args = benchArgs("node dist/bench/index-refresh.js [--gib N] [--percent P] [--opens N] [--cold-pairs N] [--open-only]: an image with P% of its\n  blocks rewritten since it was indexed; a full index build, opening the stale index, and refreshing it, side by side", ["--gib", "--percent", "--opens", "--cold-pairs", "--open-only"]);
const gib = Number(argString(args, "--gib") ?? "1");
const percent = Number(argString(args, "--percent") ?? "1");
const opens = Number(argString(args, "--opens") ?? "3");
// --open-only: no QEMU and no refresh rows; the blocks are rewritten in the file itself (the index goes stale as well)
const openOnly = args.includes("--open-only");
const coldPairs = Number(argString(args, "--cold-pairs") ?? "2");
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

interface Step { ms: number; cpu: number; stale: boolean; built: boolean; bytes: number; indexId: string }

/** Opens (or with `rebuild`, builds) the image's index in a new process (open-index.ts): its wall and CPU ms. */
function inNewProcess(image: string, rebuild = false): Step {
  const script = fileURLToPath(new URL("./open-index.js", import.meta.url));
  const out = execFileSync(process.execPath, [script, image, ...(rebuild ? ["--rebuild"] : [])], { encoding: "utf8" });
  return JSON.parse(out.trim().split("\n").pop()!) as Step;
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
 * The bulk open's steps (as openNasIndex does them), CPU ms each: a new
 * engine; the index's memory (the table zeroed: its first touch); the file
 * read into the records (their first touch); the core building the table.
 */
async function openInPhases(indexPath: string): Promise<OpenPhases> {
  let c0 = process.cpuUsage();
  const step = () => { const ms = cpuSince(c0); c0 = process.cpuUsage(); return ms; };
  const h = readIndexHeader(indexPath);
  const engine = await createEngine({ seed: h.seed });
  const tEngine = step();
  const index = engine.createIndexForLoad(h.blocks);
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
    const o = inNewProcess(path);
    if (!o.stale || o.built) throw new Error("bench: expected a stale index, loaded");
    bulk.push(o.ms);
    bulkCpu.push(o.cpu);
    bytes = o.bytes;
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
  for (let i = 0; i < coldPairs; i++) {
    dropCache(image, index);
    opens.push(inNewProcess(image));
    dropCache(image, index);
    builds.push(inNewProcess(image, true));
  }
  const med = (xs: { ms: number; cpu: number }[]) => ({ ms: median(xs.map((x) => x.ms)), cpu: median(xs.map((x) => x.cpu)) });
  return { opens, open: med(opens), build: med(builds) };
}

type Opened = Awaited<ReturnType<typeof timeOpens>>;
type Cold = Awaited<ReturnType<typeof coldPair>>;
interface Refreshes { r: { ms: number; blocksRead: number }; rn: { ms: number; nbdReads: number }; rr: { ms: number } }

/** Writes the picked blocks (a new pattern each) straight into the image file: the index is stale then. */
function rewriteInFile(image: string, picked: Set<number>): void {
  const block = Buffer.alloc(BLOCK);
  const fd = openSync(image, "r+");
  try {
    for (const b of picked) {
      block.fill(b & 0xff);
      writeSync(fd, block, 0, BLOCK, b * BLOCK);
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** The picked blocks rewritten through QEMU (its dirty bitmap sees them), then the refreshes timed. */
async function timeRefreshes(qemu: Awaited<ReturnType<typeof startQemu>>, indexId: string, picked: Set<number>, opened: () => Promise<Opened>) {
  const tracker = await DirtyTracker.attach(qemu.qmp, indexId, { drive: "drive0", socketDir: dir });
  for (const b of picked) {
    await qemu.qmp.execute("human-monitor-command", { "command-line": `qemu-io drive0 "write -P ${b & 0xff} ${b * BLOCK} ${BLOCK}"` });
  }
  await qemu.qmp.execute("human-monitor-command", { "command-line": `qemu-io drive0 "flush"` });
  const open = await opened();
  const stale = await openNasIndex(image);
  const r = await tracker.refresh(stale);
  stale.image.close();
  // the same blocks again, read through QEMU's NBD server instead of the file
  for (const b of picked) {
    await qemu.qmp.execute("human-monitor-command", { "command-line": `qemu-io drive0 "write -P ${(b + 1) & 0xff} ${b * BLOCK} ${BLOCK}"` });
  }
  const viaNbd = await DirtyTracker.attach(qemu.qmp, indexId, { drive: "drive0", socketDir: dir, readVia: "nbd" });
  const stale2 = await openNasIndex(image);
  const rn = await viaNbd.refresh(stale2);
  stale2.image.close();
  const again = await openNasIndex(image);
  // the re-read path (no VM tracking writes) on the same image: every block read and hashed again
  const rr = await refreshByReread(again);
  again.image.close();
  await tracker.detach();
  return { open, refreshes: { r, rn, rr } };
}

function report(build: { ms: number; cpu: number }, opened: Opened, cold: Cold, refreshes: Refreshes | null): void {
  const tBuild = build.ms, cBuild = build.cpu, tStale = opened.bulk;
  const row = (what: string, ms: number) => console.log(`  ${what.padEnd(58)} ${ms.toFixed(0).padStart(7)} ms   ${(ms / tBuild).toFixed(4)}x of the build`);
  const both = (what: string, ms: number, cpu: number, b: { ms: number; cpu: number }) => console.log(
    `  ${what.padEnd(58)} ${ms.toFixed(0).padStart(7)} ms   ${(ms / b.ms).toFixed(4)}x of the build; CPU ${cpu.toFixed(0)} ms, ${(cpu / b.cpu).toFixed(4)}x`);
  console.log(`page cache warm (image and index read before):`);
  both("full index build (every block read and hashed)", tBuild, cBuild, build);
  both(`open the stale index (a migration can start; median of ${opens})`, tStale, opened.bulkCpu, build);
  row("  the same open inserting the hashes block by block", opened.oneByOne);
  both(`  touching ${opened.mib.toFixed(0)} MiB of fresh memory (the index's size) alone`, opened.touch, opened.touchCpu, build);
  const p = opened.phases;
  const part = (what: string, cpu: number) => `${what} ${cpu.toFixed(0)} (${(cpu / cBuild).toFixed(4)})`;
  console.log(`  the open in steps, CPU ms (x of the build's CPU): ${part("new engine", p.engine)}, ${part("index memory (table zeroed)", p.memory)},` +
    ` ${part("file read into the records", p.read)}, ${part("table built", p.table)}`);
  if (refreshes) {
    const { r, rn, rr } = refreshes;
    row(`refresh through the dirty bitmap, blocks read from the file (${r.blocksRead})`, r.ms);
    row("open + that refresh (ready with a fresh index)", tStale + r.ms);
    row(`same, blocks read through QEMU's NBD server (${rn.nbdReads} reads)`, rn.ms);
    row("re-read refresh, no VM (every block read and hashed)", rr.ms);
  }
  console.log(`page cache cold (image and index dropped from it before each step; the slower of ${cold.opens.length} pairs):`);
  both("full index build", cold.build.ms, cold.build.cpu, cold.build);
  both("open the index (a migration can start)", cold.open.ms, cold.open.cpu, cold.build);
  console.log(`  ratios to the full build: ready to migrate (stale index opened) ${(tStale / tBuild).toFixed(4)}x warm, ${(cold.open.ms / cold.build.ms).toFixed(4)}x cold` +
    ` (CPU ${(opened.bulkCpu / cBuild).toFixed(4)}x, ${(cold.open.cpu / cold.build.cpu).toFixed(4)}x)` +
    (refreshes ? `; ready with a fresh index (open + bitmap refresh, warm) ${((tStale + refreshes.r.ms) / tBuild).toFixed(4)}x` +
      ` (${((tStale + refreshes.rn.ms) / tBuild).toFixed(4)}x reading through NBD)` : ""));
}

const dir = mkdtempSync(join(tmpdir(), "pagetwin-bench-refresh-"));
const image = join(dir, "disk.raw");
let qemu: Awaited<ReturnType<typeof startQemu>> | null = null;
try {
  const bytes = gib * 2 ** 30;
  makeImage(image, bytes);
  const blocks = bytes / BLOCK;
  console.log(`index refresh: ${gib} GiB image (${blocks} blocks), ${percent}% of blocks rewritten since indexing (scattered single blocks: the worst case for reads)` +
    (openOnly ? ", in the file (--open-only)" : ", through QEMU"));
  const build = inNewProcess(image, true);
  const n = Math.round((blocks * percent) / 100);
  const picked = new Set<number>();
  let seed = 12345;
  while (picked.size < n) { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; picked.add(seed % blocks); }
  let opened: Opened, refreshes: Refreshes | null = null;
  if (openOnly) {
    rewriteInFile(image, picked);
    opened = await timeOpens(image);
  } else {
    qemu = await startQemu(image, join(dir, "qmp.sock"));
    ({ open: opened, refreshes } = await timeRefreshes(qemu, build.indexId, picked, () => timeOpens(image)));
  }
  report(build, opened, await coldPair(image), refreshes);
} finally {
  if (qemu) {
    await qemu.qmp.execute("quit").catch(() => undefined);
    qemu.qmp.close();
    await new Promise((res) => { if (qemu!.proc.exitCode !== null) res(null); else qemu!.proc.once("exit", res); });
  }
  rmSync(dir, { recursive: true, force: true });
}
