// A libvirt guest migrated with plain `virsh migrate --live` and with
// `pagetwin libvirt migrate`, side by side, over the same 1 Gbit/s namespace
// link between two libvirt daemons (test/helpers/libvirt.ts): bytes on the
// veth, wall time of the migration command, libvirt's downtime, and where a
// pagetwin run's time goes (the command's phases, the services' steps).
//   node dist/bench/libvirt.js [--runs N] [--json] [--switchover] [--old DIST]...
// Plain runs go from host a to b, pagetwin runs back from b to a (the link is
// shaped the same both ways), alternating, on the same running guest.
// --old DIST: another pagetwin build (its dist directory, with node_modules
// reachable from it) also migrates back, through its own services, in the same
// run; given more than once, each build does.
import { parseArgs } from "node:util";
import { spawn } from "node:child_process";
import { join, resolve } from "node:path";
import { readFileSync } from "node:fs";
import { LibvirtPair, cpuMs, skipLibvirt, type LibvirtHost, type PairService } from "../test/helpers/libvirt.js";
import { cliPath } from "../test/helpers/cli.js";
import { parseSize } from "../src/libvirt/job.js";
import { isMain } from "./cli.js";
import { median } from "../src/compare/stats.js";
import { SwitchoverSampler, describeSwitchover, type Switchover } from "./libvirt-switchover.js";

const HELP = `node dist/bench/libvirt.js [--runs N] [--json] [--switchover] [--old DIST]...
  --runs N     rounds of (virsh there, pagetwin back) (default 1)
  --json       rows, medians and ratios as JSON
  --switchover where each run's downtime went, sampled every ~50 ms (libvirt-switchover.ts; the sampling
               costs CPU, in every mode alike)
  --old DIST   another build's dist directory: its pagetwin also migrates back each round, through its own
               services, after a virsh run of its own (repeatable: each build in turn)`;
const G = "pt-bench";

/** "virsh", "pagetwin", or "pagetwin-old" (one --old build; with several, "pagetwin-old-1", ...). */
type Mode = string;
interface Row {
  mode: Mode; run: number; ok: boolean; linkBytes: number; wallMs: number; downtimeMs?: number; streamBytes?: number;
  /** libvirt's own figures of the job (destination, --completed): its whole time and its setup. */
  jobMs?: number; setupMs?: number;
  /** The command's phases (pagetwin) and the two services' steps. */
  phases?: Record<string, number>; timings?: Record<string, number>; destTimings?: Record<string, number>;
  /** Where each service's time went (busy, waiting for the link or QEMU, for acks), and QEMU's stream bytes as the source service counted them. */
  waits?: Record<string, number>; destWaits?: Record<string, number>; bytesFromQemu?: number;
  /** What compression did to the pages that travelled raw (the source service's figures). */
  compression?: { algorithm: string | null; bytesBefore: number; bytesAfter: number; note?: string };
  /** From the result line to the command's exit, ms. */
  exitMs?: number;
  /** CPU time of both services during the run, and of the destination QEMU from its start to the command's end, ms. */
  serviceCpuMs?: number; destQemuCpuMs?: number;
  /** Where the downtime went: QEMU's query-migrate on both sides and the services' status, sampled (libvirt-switchover.ts). */
  switchover?: Switchover;
  note?: string;
}

/** Runs a command to its end; `resultAt`: when a result line appeared on its stdout (performance.now()). */
function run(cmd: string, args: string[]): Promise<{ code: number | null; out: string; err: string; resultAt?: number }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "", err = "", resultAt: number | undefined;
    p.stdout.on("data", (d: Buffer) => { out += d; if (resultAt === undefined && out.includes('"result"')) resultAt = performance.now(); });
    p.stderr.on("data", (d: Buffer) => { err += d; });
    p.on("close", (code) => resolve({ code, out, err, ...(resultAt !== undefined ? { resultAt } : {}) }));
  });
}

const ms = (s: string | undefined) => { const d = /^(\d+)/.exec(s ?? "")?.[1]; return d ? Number(d) : undefined; };

/** libvirt's figures of the last completed migration, as the destination keeps them. */
async function completed(host: LibvirtHost): Promise<Pick<Row, "downtimeMs" | "streamBytes" | "jobMs" | "setupMs">> {
  try {
    const info = await host.virsh.jobInfo(G, ["--completed"]);
    const r = { downtimeMs: ms(info.get("Total downtime")), streamBytes: parseSize(info.get("Data processed")), jobMs: ms(info.get("Time elapsed")), setupMs: ms(info.get("Setup time")) };
    return Object.fromEntries(Object.entries(r).filter(([, v]) => v !== undefined));
  } catch {
    return {};
  }
}

/** The --json result line of a pagetwin run: its phases and the services' timings. */
function resultOf(out: string): Pick<Row, "phases" | "timings" | "destTimings" | "waits" | "destWaits" | "bytesFromQemu" | "compression"> {
  const line = out.split("\n").reverse().find((l) => l.includes('"result"'));
  if (!line) return {};
  type N = Record<string, number>;
  const r = JSON.parse(line) as { phases?: N; report?: { timings?: N; destinationTimings?: N; waits?: N; destinationWaits?: N; bytesFromQemu?: number; compression?: Row["compression"] } };
  const rep = r.report ?? {};
  return {
    ...(r.phases ? { phases: r.phases } : {}), ...(rep.timings ? { timings: rep.timings } : {}), ...(rep.destinationTimings ? { destTimings: rep.destinationTimings } : {}),
    ...(rep.waits ? { waits: rep.waits } : {}), ...(rep.destinationWaits ? { destWaits: rep.destinationWaits } : {}), ...(rep.bytesFromQemu ? { bytesFromQemu: rep.bytesFromQemu } : {}),
    ...(rep.compression ? { compression: rep.compression } : {}),
  };
}

/** The command's own time: its phases, the check and the report counted once (they run at once). */
function inCommand(p: Record<string, number>): number {
  const { checkMs = 0, reportMs = 0, ...rest } = p;
  return Object.values(rest).reduce((a, b) => a + b, 0) + Math.max(checkMs, reportMs);
}

interface Ends { cli: string; services: Map<LibvirtHost, PairService> }


/**
 * One measured migration from `from`; a failure is a row (its note says why), not the end of the run. A failed
 * migration leaves the guest where it was (libvirt's rule): when it is not on `from`, plain virsh brings it there first.
 */
async function measureOne(pair: LibvirtPair, mode: Mode, from: LibvirtHost, to: LibvirtHost, ends: Ends | undefined, i: number, sampling: boolean): Promise<Row> {
  try {
    if ((await from.virsh.domstate(G)) !== "running") {
      const back = await run("virsh", ["-c", to.uri, "migrate", "--live", G, from.uri, "--migrateuri", `tcp://${from.ip}:49400`, "--xml", await pair.destXml(G, to, from)]);
      if (back.code !== 0) throw new Error(`the guest is not on host ${from.name} and could not be brought back: ${back.err.trim()}`);
    }
    return await migrate(pair, mode, from, to, ends, i, sampling);
  } catch (err) {
    return { mode, run: i, ok: false, linkBytes: NaN, wallMs: NaN, note: (err as Error).message };
  }
}

/** `sampling`: where the downtime went, sampled during the migration (--switchover). */
async function migrate(pair: LibvirtPair, mode: Mode, from: LibvirtHost, to: LibvirtHost, ends: Ends | undefined, i: number, sampling: boolean): Promise<Row> {
  const xml = await pair.destXml(G, from, to);
  const tx0 = pair.link.txBytes(from.ns);
  const pids = ends ? [...ends.services.values()].map((s) => s.pid) : [];
  const cpu0 = pids.reduce((a, p) => a + cpuMs(p), 0);
  const sampler = sampling && new SwitchoverSampler(G, from.uri, to.uri, ends ? { out: ends.services.get(from)!.control, in: ends.services.get(to)!.control } : undefined);
  const t0 = performance.now();
  const r = !ends
    ? await run("virsh", ["-c", from.uri, "migrate", "--live", G, to.uri, "--migrateuri", `tcp://${to.ip}:49400`, "--xml", xml])
    : await run(process.execPath, [ends.cli, "libvirt", "migrate", G, to.uri, "-c", from.uri, "--control", ends.services.get(from)!.control, "--peer", ends.services.get(to)!.peer, "--xml", xml, "--json"]);
  const t1 = performance.now();
  const switchover = sampler ? await sampler.stop() : undefined;
  const wallMs = t1 - t0;
  const linkBytes = pair.link.txBytes(from.ns) - tx0;
  const serviceCpuMs = pids.reduce((a, p) => a + cpuMs(p), 0) - cpu0;
  let destQemuCpuMs: number | undefined;
  try { destQemuCpuMs = cpuMs(Number(readFileSync(join(to.dir, "run", "qemu", `${G}.pid`), "utf8"))); } catch { /* not there */ }
  return {
    ...(ends ? { serviceCpuMs } : {}), ...(r.resultAt !== undefined ? { exitMs: t1 - r.resultAt } : {}), ...(destQemuCpuMs ? { destQemuCpuMs } : {}),
    mode, run: i, ok: r.code === 0, linkBytes, wallMs, ...(switchover ? { switchover } : {}), ...(await completed(to)), ...(ends && r.code === 0 ? resultOf(r.out) : {}),
    ...(r.code === 0 ? {} : { note: r.err.trim().slice(-300) }),
  };
}

export interface LibvirtBenchOptions {
  runs?: number;
  /** Other builds' dist directories, compared in the same run. */
  old?: string[];
  /** Print nothing (the caller prints the result). */
  quiet?: boolean;
  /** Sample each migration for where its downtime went (libvirt-switchover.ts). */
  switchover?: boolean;
}

type Ratios = Record<string, { linkBytes: number; wallMs: number }>;
/** maxDowntimeMs: the guest's QEMU downtime limit (virsh migrate-getmaxdowntime), which libvirt's downtime is held to. */
export type LibvirtBench = { rows: Row[]; summary: Summary[]; ratios: Ratios; maxDowntimeMs?: number } | { skipped: string };
/** Medians of the runs; maxDowntimeMs: the longest run's downtime (the limit holds for every run or not at all). */
interface Summary { mode: Mode; runs: number; linkBytes: number; wallMs: number; downtimeMs: number; maxDowntimeMs: number; jobMs: number; setupMs: number }

/** Runs the comparison (root, libvirtd, QEMU and the guest; a few minutes) and prints its tables unless `quiet`. */
export async function benchLibvirt(o: LibvirtBenchOptions = {}): Promise<LibvirtBench> {
  const skip = skipLibvirt();
  if (skip) {
    if (!o.quiet) console.log(`libvirt bench skipped: ${skip}`);
    return { skipped: skip };
  }
  const olds = oldModes(o.old ?? []);
  const { rows, maxDowntimeMs } = await measure(o.runs ?? 1, olds, o.switchover ?? false);
  const modes: Mode[] = ["virsh", "pagetwin", ...olds.keys()];
  const summary = modes.map((mode) => summarize(mode, rows.filter((r) => r.mode === mode && r.ok)));
  const v = summary[0]!;
  const ratios = Object.fromEntries(summary.slice(1).map((p) => [p.mode, { linkBytes: p.linkBytes / v.linkBytes, wallMs: p.wallMs / v.wallMs }]));
  if (!o.quiet) print(rows, summary, ratios, olds, maxDowntimeMs);
  return { rows, summary, ratios, ...(maxDowntimeMs !== undefined ? { maxDowntimeMs } : {}) };
}

/** Each --old build's mode name -> its dist directory. */
function oldModes(dists: string[]): Map<Mode, string> {
  return new Map(dists.map((d, i) => [dists.length === 1 ? "pagetwin-old" : `pagetwin-old-${i + 1}`, d]));
}

async function measure(runs: number, olds: Map<Mode, string>, sampling: boolean): Promise<{ rows: Row[]; maxDowntimeMs?: number }> {
  const pair = await LibvirtPair.start();
  const rows: Row[] = [];
  let maxDowntimeMs: number | undefined;
  try {
    const start = async (cli: string, peerPort?: number): Promise<Ends> => {
      const services = new Map<LibvirtHost, PairService>();
      for (const h of pair.hosts) services.set(h, await pair.startService(h, { cli, ...(peerPort ? { peerPort } : {}) }));
      return { cli, services };
    };
    const ours = await start(cliPath);
    const others = new Map<Mode, Ends>();
    for (const [mode, dist] of olds) others.set(mode, await start(join(resolve(dist), "src", "cli", "main.js"), 4448 + others.size));
    await pair.startGuest(pair.a, G);
    maxDowntimeMs = await pair.a.virsh.run(["migrate-getmaxdowntime", G]).then((s) => Number(s.trim()) || undefined, () => undefined);
    const one = (mode: Mode, from: LibvirtHost, to: LibvirtHost, ends: Ends | undefined, i: number) => measureOne(pair, mode, from, to, ends, i, sampling).then((r) => { rows.push(r); });
    for (let i = 1; i <= runs; i++) {
      await one("virsh", pair.a, pair.b, undefined, i);
      await one("pagetwin", pair.b, pair.a, ours, i);
      for (const [mode, ends] of others) {
        await one("virsh", pair.a, pair.b, undefined, i);
        await one(mode, pair.b, pair.a, ends, i);
      }
    }
  } finally {
    await pair.close();
  }
  return { rows, ...(maxDowntimeMs !== undefined ? { maxDowntimeMs } : {}) };
}

function summarize(mode: Mode, ok: Row[]): Summary {
  const all = (k: keyof Row) => ok.flatMap((r) => (typeof r[k] === "number" ? [r[k] as number] : []));
  const m = (k: keyof Row) => median(all(k));
  return {
    mode, runs: ok.length, linkBytes: m("linkBytes"), wallMs: m("wallMs"), downtimeMs: m("downtimeMs"), maxDowntimeMs: Math.max(...all("downtimeMs")),
    jobMs: m("jobMs"), setupMs: m("setupMs"),
  };
}

function compressed(c: Row["compression"]): string {
  if (!c) return "compression: -";
  return c.algorithm && c.bytesBefore ? `compressed ${(c.bytesBefore / 1e6).toFixed(1)} MB of pages to ${(c.bytesAfter / 1e6).toFixed(1)} MB (${c.algorithm})` : `no compression${c.note ? ` (${c.note})` : ""}`;
}

const fmt = (x: number, unit: string, div = 1, digits = 0) => (Number.isFinite(x) ? `${(x / div).toFixed(digits)} ${unit}` : "-");

/** Issue 17's goals for this build against virsh: bytes ≤ 0.35×, time no worse, libvirt's downtime within the guest's limit. */
function goals(summary: Summary[], ratios: Ratios, maxDowntimeMs: number | undefined): string {
  const r = ratios["pagetwin"], p = summary.find((s) => s.mode === "pagetwin"), v = summary[0];
  if (!r || !p || !v) return "goals: no successful pagetwin run";
  const met = (ok: boolean) => (ok ? "met" : "not met");
  const downtime = maxDowntimeMs === undefined ? `${fmt(p.downtimeMs, "ms")} (QEMU's limit unknown)`
    : `${met(p.maxDowntimeMs <= maxDowntimeMs)} in every run (median ${fmt(p.downtimeMs, "ms")}, longest ${fmt(p.maxDowntimeMs, "ms")}, limit ${maxDowntimeMs} ms; virsh's own median ${fmt(v.downtimeMs, "ms")})`;
  return `goals: bytes on the link ≤ 0.35× virsh: ${met(r.linkBytes <= 0.35)} (${r.linkBytes.toFixed(3)}×); time no worse: ${met(r.wallMs <= 1)} (${r.wallMs.toFixed(2)}×); ` +
    `downtime within QEMU's limit: ${downtime}`;
}

function print(rows: Row[], summary: Summary[], ratios: Ratios, olds: Map<Mode, string>, maxDowntimeMs: number | undefined): void {
  const LABEL = new Map<Mode, string>([["virsh", "virsh migrate --live"], ["pagetwin", "pagetwin libvirt migrate"], ...[...olds].map(([m, d]) => [m, `pagetwin libvirt migrate (${d})`] as [Mode, string])]);
  console.log("| mode | runs | bytes on the link | migration command | libvirt's job (setup) | downtime (libvirt) |");
  console.log("|---|---|---|---|---|---|");
  for (const s of summary) console.log(`| ${LABEL.get(s.mode)} | ${s.runs} | ${fmt(s.linkBytes, "MB", 1e6, 1)} | ${fmt(s.wallMs, "s", 1000, 1)} | ${fmt(s.jobMs, "s", 1000, 1)} (${fmt(s.setupMs, "ms")}) | ${fmt(s.downtimeMs, "ms")} |`);
  console.log("");
  for (const [mode, r] of Object.entries(ratios)) console.log(`${mode} / virsh: bytes on the link ${r.linkBytes.toFixed(3)}×, time ${r.wallMs.toFixed(2)}×`);
  console.log(goals(summary, ratios, maxDowntimeMs));
  for (const r of rows.filter((x) => x.ok && x.phases)) {
    console.log(`\n${r.mode} run ${r.run}: command ${Math.round(r.wallMs)} ms = node start ${Math.round(r.wallMs - inCommand(r.phases!))} + ${Object.entries(r.phases!).map(([k, x]) => `${k.replace(/Ms$/, "")} ${x}`).join(" + ")} (check and report at once)`);
    console.log(`  downtime ${fmt(r.downtimeMs ?? NaN, "ms")}; exit after the result: ${Math.round(r.exitMs ?? NaN)} ms; QEMU's stream ${((r.bytesFromQemu ?? NaN) / 1e6).toFixed(1)} MB; ${compressed(r.compression)}`);
    if (r.waits) console.log(`  source service busy/waiting for the link/for acks: ${Object.values(r.waits).join(" / ")} ms; destination busy/waiting for QEMU/-: ${Object.values(r.destWaits ?? {}).join(" / ")} ms`);
    console.log(`  CPU: both services ${Math.round(r.serviceCpuMs ?? 0)} ms, destination QEMU ${Math.round(r.destQemuCpuMs ?? 0)} ms${r.switchover ? `\n  switchover: ${describeSwitchover(r.switchover)}` : ""}`);
    if (r.timings) console.log(`  source service: ${Object.entries(r.timings).map(([k, x]) => `${k} ${x}`).join(", ")}`);
    if (r.destTimings) console.log(`  destination service: ${Object.entries(r.destTimings).map(([k, x]) => `${k} ${x}`).join(", ")}`);
  }
  for (const r of rows.filter((x) => x.ok && !x.phases)) console.log(`\n${r.mode} run ${r.run}: command ${Math.round(r.wallMs)} ms, downtime ${fmt(r.downtimeMs ?? NaN, "ms")}${r.serviceCpuMs !== undefined ? `, CPU of both services ${Math.round(r.serviceCpuMs)} ms` : ""}, destination QEMU ${Math.round(r.destQemuCpuMs ?? 0)} ms${r.switchover ? `\n  switchover: ${describeSwitchover(r.switchover)}` : ""}`);
  for (const r of rows.filter((x) => !x.ok)) console.log(`failed: ${r.mode} run ${r.run}: ${r.note}`);
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({ options: { runs: { type: "string", default: "1" }, json: { type: "boolean" }, switchover: { type: "boolean" }, old: { type: "string", multiple: true }, help: { type: "boolean" } } });
  if (values.help) {
    console.log(HELP);
  } else {
    for (const sig of ["SIGINT", "SIGTERM"] as const) process.once(sig, () => process.exit(130));
    const r = await benchLibvirt({ runs: Number(values.runs), ...(values.old ? { old: values.old } : {}), quiet: !!values.json, switchover: !!values.switchover });
    if (values.json) console.log(JSON.stringify(r, null, 2));
  }
}
