import { mkdirSync, mkdtempSync } from "node:fs";
import { tmpdir, cpus, totalmem } from "node:os";
import { join, resolve } from "node:path";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { runEmbeddedMigration, removeDir, type EmbeddedRunResult } from "../../demo/embedded-run.js";
import { parse, helpText, num, int, parseRate, fmtBytes, UsageError, type CommandSpec } from "../args.js";
import { parseCompressionMode, type CompressionStats } from "../../codec/compress.js";
import { printJson } from "../json.js";
import { demoRunRecord } from "../records.js";
import { FileTraceSink } from "../../trace/sink.js";
import { AgentTracer } from "../../trace/agent.js";
import type { IterationRecord } from "../../agent/source.js";
import type { EmbeddedVmOptions } from "../../adapters/embedded/vm.js";

export const spec: CommandSpec = {
  name: "demo",
  summary: "migrate the embedded VM twice over loopback TCP: plain pre-copy, then pagetwin",
  usage: "pagetwin demo [--ram-mib 256] [--twin-share 0.5] [--dirty-rate 2000] [--bandwidth 1gbit] [--compress auto|off|zstd|brotli] [--json]",
  options: {
    "ram-mib": { type: "string", default: "256", help: "the VM's RAM size, MiB" },
    "twin-share": { type: "string", default: "0.5", help: "share of RAM pages that are page cache (copies of disk blocks)" },
    "zero-share": { type: "string", default: "0.2", help: "share of RAM pages that are zero" },
    "dirty-rate": { type: "string", default: "2000", help: "pages the guest writes per second during the migration" },
    "rewrite-rate": { type: "string", default: "20", help: "disk blocks the guest rewrites per second behind its page cache" },
    bandwidth: { type: "string", default: "1gbit", help: "link bandwidth (rate limit on the source), e.g. 1gbit, 500mbit" },
    compress: { type: "string", default: "auto", help: "pagetwin run: compress pages sent in full (auto, off, zstd, brotli); the plain pre-copy run never does" },
    downtime: { type: "string", default: "300", help: "downtime target, ms (QEMU's default downtime-limit)" },
    "max-iterations": { type: "string", default: "30", help: "iteration cap" },
    workers: { type: "string", default: "0", help: "hash on this many worker threads (0: on the agent's own thread)" },
    trace: { type: "string", default: "pagetwin-trace.ndjson", help: "trace of both runs for the visualizer (docs/TRACE.md; '' for none)" },
    dir: { type: "string", help: "work directory for the VM's files (default: a new temp dir, removed after)" },
    json: { type: "boolean", help: "print one JSON object with a runs array" },
    "run-only": { type: "string", help: "baseline or pagetwin: make that one run and print its result as JSON (the demo runs each mode so, in a process of its own, so that neither pays for what the other left behind)" },
  },
  details: "With --qemu, runs `pagetwin compare-qemu` instead (a real QEMU guest; see its --help).\n\nEach run makes the same VM (RAM file + raw disk image on a directory standing for the NAS), starts a\nguest worker that keeps dirtying memory, reading disk blocks into its page cache and rewriting blocks\non disk, starts a destination agent process, and migrates over TCP on loopback at the bandwidth.\nThe destination's RAM is compared byte for byte with the source's at switchover.",
};

export interface DemoRun {
  mode: "baseline" | "pagetwin";
  totalTimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  iterations: number;
  pages: { normal: number; zero: number; twin: number; resent: number };
  verified: boolean;
  status: string;
  convergence: string;
  mbps: number;
  setupTimeMs: number;
  indexMs: number;
  guest: EmbeddedRunResult["guest"];
  compression: CompressionStats;
  error?: string;
}

type Values = ReturnType<typeof parse>["values"];

interface DemoSetup {
  values: Values;
  vm: EmbeddedVmOptions & Required<Pick<EmbeddedVmOptions, "ramMiB" | "twinShare" | "zeroShare" | "dirtyPagesPerSecond">>;
  convergence: { downtimeMs: number; maxIterations: number };
  bandwidth: number;
  json: boolean;
}

export async function run(argv: string[]): Promise<number> {
  if (argv.includes("--qemu")) return (await import("./compare-qemu.js")).run(argv.filter((a) => a !== "--qemu"));
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const ramMiB = int(values, "ram-mib", 1, 3072);
  const own = !values.dir;
  const dir = (values.dir as string | undefined) ?? mkdtempSync(join(tmpdir(), "pagetwin-demo-"));
  const setup: DemoSetup = {
    values, bandwidth: parseRate(values.bandwidth as string), json: !!values.json,
    vm: {
      dir, ramMiB, twinShare: num(values, "twin-share", 0, 1), zeroShare: num(values, "zero-share", 0, 1),
      dirtyPagesPerSecond: num(values, "dirty-rate", 0), rewriteBlocksPerSecond: num(values, "rewrite-rate", 0),
    },
    convergence: { downtimeMs: num(values, "downtime", 1), maxIterations: int(values, "max-iterations", 1) },
  };
  const runOnly = values["run-only"] as string | undefined;
  let runs: DemoRun[], traces: DemoTrace[];
  try {
    if (runOnly !== undefined) return await runOne(setup, runOnly);
    ({ runs, traces } = await runBoth(setup));
  } finally {
    if (own) removeDir(dir);
  }
  await report(setup, runs, traces);
  return runs.every((r) => r.status === "completed" && r.verified) ? 0 : 1;
}

/** --run-only: one run, progress on stderr, its result on stdout for the demo that started this process. */
async function runOne({ values, vm, convergence, bandwidth, json }: DemoSetup, mode: string): Promise<number> {
  if (mode !== "baseline" && mode !== "pagetwin") throw new UsageError(`--run-only is baseline or pagetwin (got "${mode}")`);
  let compress;
  try { compress = parseCompressionMode(values.compress as string); } catch (err) { throw new UsageError((err as Error).message); }
  const progress = (s: string) => { if (!json) process.stderr.write(s + "\n"); };
  const r = await runEmbeddedMigration({
    vm, mode, bandwidth, convergence, trace: !!values.trace, compress: mode === "pagetwin" ? compress : "off", workers: int(values, "workers", 0, 64),
    onIteration: (it) => progress(iterationLine(it)),
  });
  const one: DemoRun = {
    mode, status: r.status, totalTimeMs: round(r.totalTimeMs), downtimeMs: round(r.downtimeMs), transferredBytes: r.transferredBytes,
    iterations: r.iterations, pages: { normal: r.pages.normal, zero: r.pages.zero, twin: r.pages.twin, resent: r.pages.resent },
    verified: r.verified, convergence: r.convergence, mbps: round(r.mbps), setupTimeMs: round(r.setupTimeMs), indexMs: round(r.indexMs),
    guest: r.guest, compression: r.compression, ...(r.error ? { error: r.error } : {}),
  };
  process.stdout.write(JSON.stringify({ run: one, iterations: r.iterationLog }) + "\n");
  return one.status === "completed" && one.verified ? 0 : 1;
}

function iterationLine(it: IterationRecord): string {
  return `  iteration ${String(it.iteration).padStart(2)}${it.final ? " (final, VM stopped)" : ""}: ${String(it.dirty).padStart(7)} dirty -> ${String(it.pages.normal).padStart(7)} sent, ` +
    `${String(it.pages.twin).padStart(7)} twin, ${String(it.pages.zero).padStart(6)} zero, ${String(it.pages.resent).padStart(4)} resent; ` +
    `${fmtBytes(it.transferredBytes).padStart(9)} in ${it.durationMs.toFixed(0)} ms (scan ${it.scanMs.toFixed(0)}, ack ${it.ackWaitMs.toFixed(0)})`;
}

type DemoTrace = { run: DemoRun; iterations: IterationRecord[] };

/** Plain pre-copy, then pagetwin, each in a process of its own. */
async function runBoth({ values, vm, bandwidth, json }: DemoSetup): Promise<{ runs: DemoRun[]; traces: DemoTrace[] }> {
  const say = (s: string) => { if (!json) console.log(s); };
  try { parseCompressionMode(values.compress as string); } catch (err) { throw new UsageError((err as Error).message); }
  say(`pagetwin demo: ${vm.ramMiB} MiB VM, ${vm.twinShare * 100}% page cache, ${vm.zeroShare * 100}% zero, guest dirtying ${vm.dirtyPagesPerSecond} pages/s, link ${fmtBytes(bandwidth)}/s`);
  const runs: DemoRun[] = [];
  const traces: DemoTrace[] = [];
  // the same options for each run, but the work directory, which this process owns
  const childArgs = Object.entries(values).flatMap(([k, v]) =>
    k === "dir" || v === undefined || v === false ? [] : v === true ? [`--${k}`] : [`--${k}`, String(v)]);
  for (const mode of ["baseline", "pagetwin"] as const) {
    say(`\n${mode === "baseline" ? "plain pre-copy (zero pages skipped, every other dirty page sent)" : "pagetwin (twin pages sent as NAS references)"}:`);
    // a directory of its own, removed once its run is over: the next run must not start with the last one's
    // files (0.7 GB, dirty in the page cache) still there, which slowed it by a quarter or more
    const runDir = join(vm.dir, mode);
    mkdirSync(runDir, { recursive: true });
    const { run: one, iterations } = await runInOwnProcess([...childArgs, "--run-only", mode, "--dir", runDir]).finally(() => removeDir(runDir));
    runs.push(one);
    traces.push({ run: one, iterations: iterations as IterationRecord[] });
    if (one.status !== "completed") say(`  FAILED: ${one.error}`);
  }
  return { runs, traces };
}

/** The ratios, the trace, and the table (or one JSON object). */
async function report({ values, vm, convergence, bandwidth, json }: DemoSetup, runs: DemoRun[], traces: DemoTrace[]): Promise<void> {
  const [b, p] = runs as [DemoRun, DemoRun];
  const ratios = {
    totalTime: +(p.totalTimeMs / b.totalTimeMs).toFixed(3),
    transferredBytes: +(p.transferredBytes / b.transferredBytes).toFixed(3),
    downtime: +(p.downtimeMs / Math.max(b.downtimeMs, 1e-9)).toFixed(3),
  };
  const machine = { cpus: cpus().length, memoryBytes: totalmem(), node: process.version };
  const config = { bandwidthBytesPerSecond: bandwidth, ...vm, dir: undefined, ...convergence };
  let tracePath: string | null = null;
  if (values.trace) {
    tracePath = resolve(values.trace as string);
    await writeDemoTrace(tracePath, vm.ramMiB * 256, { ...config, machine }, traces);
  }
  if (json) {
    const ok = runs.every((r) => r.status === "completed" && r.verified);
    printJson("demo", "result", { ok, config, machine, runs: runs.map(demoRunRecord), ratios: { "total-time": ratios.totalTime, downtime: ratios.downtime, transferred: ratios.transferredBytes }, ...(tracePath ? { trace: tracePath } : {}) });
    return;
  }
  const row = (k: string, f: (r: DemoRun) => string, ratio?: number) =>
    console.log(`${k.padEnd(22)}${f(b).padStart(16)}${f(p).padStart(16)}${ratio !== undefined ? `${ratio.toFixed(2).padStart(10)}x` : ""}`);
  console.log(`\n${"".padEnd(22)}${"plain pre-copy".padStart(16)}${"pagetwin".padStart(16)}${"ratio".padStart(11)}`);
  row("total time", (r) => `${r.totalTimeMs.toFixed(0)} ms`, ratios.totalTime);
  row("downtime", (r) => `${r.downtimeMs.toFixed(0)} ms`, ratios.downtime);
  row("bytes on the link", (r) => fmtBytes(r.transferredBytes), ratios.transferredBytes);
  row("iterations", (r) => String(r.iterations));
  row("pages sent in full", (r) => String(r.pages.normal));
  row("pages as NAS refs", (r) => String(r.pages.twin));
  row("zero pages", (r) => String(r.pages.zero));
  row("pages resent", (r) => String(r.pages.resent));
  row("compressed frames", (r) => (r.compression.algorithm ? `${r.compression.framesCompressed}/${r.compression.framesCompressed + r.compression.framesRaw} ${r.compression.algorithm}` : "off"));
  row("RAM identical", (r) => (r.verified ? "yes" : "NO"));
  if (tracePath) console.log(`\ntrace: ${tracePath} (open it in the visualizer: npm run web)`);
}

/** Both runs into one trace file, each a migration of mode "embedded". */
async function writeDemoTrace(path: string, pages: number, config: Record<string, unknown>, runs: { run: DemoRun; iterations: IterationRecord[] }[]): Promise<void> {
  const file = new FileTraceSink(path);
  for (const { run: r, iterations } of runs) {
    const label = r.mode === "baseline" ? "plain pre-copy" : "pagetwin";
    const t = new AgentTracer([file], { mode: "embedded", method: r.mode, label, pages, config });
    for (const it of iterations) t.iteration(it);
    t.end({
      ok: r.status === "completed", ...(r.error ? { error: r.error } : {}), totalTimeMs: r.totalTimeMs, downtimeMs: r.downtimeMs,
      transferredBytes: r.transferredBytes, iterations: r.iterations, pages: r.pages, verified: r.verified, convergence: r.convergence,
    });
  }
  await file.close();
}

function round(n: number): number {
  return Math.round(n * 10) / 10;
}

const CLI = fileURLToPath(new URL("../main.js", import.meta.url));

/** `pagetwin demo ... --run-only MODE` in a child process: its progress on our stderr, its result from its stdout. */
function runInOwnProcess(args: string[]): Promise<{ run: DemoRun; iterations: unknown[] }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [CLI, "demo", ...args], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout!.on("data", (d: Buffer) => { out += d.toString(); });
    child.once("error", (err) => reject(new Error(`cannot start the demo run: ${err.message}`)));
    child.once("close", (code) => {
      try {
        resolvePromise(JSON.parse(out.trim().split("\n").pop()!));
      } catch {
        reject(new Error(`the demo run (${args.join(" ")}) exited with code ${code} without a result`));
      }
    });
  });
}
