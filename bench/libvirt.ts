// A libvirt guest migrated with plain `virsh migrate --live` and with
// `pagetwin libvirt migrate`, side by side, over the same 1 Gbit/s namespace
// link between two libvirt daemons (test/helpers/libvirt.ts): bytes on the
// veth, wall time of the migration command, libvirt's downtime, and where a
// pagetwin run's time goes (the command's phases, the services' steps).
//   node dist/bench/libvirt.js [--runs N] [--json] [--old DIST]
// Plain runs go from host a to b, pagetwin runs back from b to a (the link is
// shaped the same both ways), alternating, on the same running guest.
// --old DIST: another pagetwin build (its dist directory, with node_modules
// reachable from it) also migrates back, through its own services, in the same run.
import { parseArgs } from "node:util";
import { spawn } from "node:child_process";
import { join, resolve } from "node:path";
import { readFileSync } from "node:fs";
import { LibvirtPair, cpuMs, skipLibvirt, type LibvirtHost, type PairService } from "../test/helpers/libvirt.js";
import { cliPath } from "../test/helpers/cli.js";
import { parseSize } from "../src/libvirt/job.js";
import { isMain } from "./cli.js";

const HELP = `node dist/bench/libvirt.js [--runs N] [--json] [--old DIST]
  --runs N     rounds of (virsh there, pagetwin back) (default 1)
  --json       rows, medians and ratios as JSON
  --old DIST   another build's dist directory: its pagetwin also migrates back each round, through its own services`;
const G = "pt-bench";

type Mode = "virsh" | "pagetwin" | "pagetwin-old";
interface Row {
  mode: Mode; run: number; ok: boolean; linkBytes: number; wallMs: number; downtimeMs?: number; streamBytes?: number;
  /** libvirt's own figures of the job (destination, --completed): its whole time and its setup. */
  jobMs?: number; setupMs?: number;
  /** The command's phases (pagetwin) and the two services' steps. */
  phases?: Record<string, number>; timings?: Record<string, number>; destTimings?: Record<string, number>;
  /** Where each service's time went (busy, waiting for the link or QEMU, for acks), and QEMU's stream bytes as the source service counted them. */
  waits?: Record<string, number>; destWaits?: Record<string, number>; bytesFromQemu?: number;
  /** From the result line to the command's exit, ms. */
  exitMs?: number;
  /** CPU time of both services during the run, and of the destination QEMU from its start to the command's end, ms. */
  serviceCpuMs?: number; destQemuCpuMs?: number;
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
function resultOf(out: string): Pick<Row, "phases" | "timings" | "destTimings" | "waits" | "destWaits" | "bytesFromQemu"> {
  const line = out.split("\n").reverse().find((l) => l.includes('"result"'));
  if (!line) return {};
  type N = Record<string, number>;
  const r = JSON.parse(line) as { phases?: N; report?: { timings?: N; destinationTimings?: N; waits?: N; destinationWaits?: N; bytesFromQemu?: number } };
  const rep = r.report ?? {};
  return {
    ...(r.phases ? { phases: r.phases } : {}), ...(rep.timings ? { timings: rep.timings } : {}), ...(rep.destinationTimings ? { destTimings: rep.destinationTimings } : {}),
    ...(rep.waits ? { waits: rep.waits } : {}), ...(rep.destinationWaits ? { destWaits: rep.destinationWaits } : {}), ...(rep.bytesFromQemu ? { bytesFromQemu: rep.bytesFromQemu } : {}),
  };
}

/** The command's own time: its phases, the check and the report counted once (they run at once). */
function inCommand(p: Record<string, number>): number {
  const { checkMs = 0, reportMs = 0, ...rest } = p;
  return Object.values(rest).reduce((a, b) => a + b, 0) + Math.max(checkMs, reportMs);
}

interface Ends { cli: string; services: Map<LibvirtHost, PairService> }

async function migrate(pair: LibvirtPair, mode: Mode, from: LibvirtHost, to: LibvirtHost, ends: Ends | undefined, i: number): Promise<Row> {
  const xml = await pair.destXml(G, from, to);
  const tx0 = pair.link.txBytes(from.ns);
  const pids = ends ? [...ends.services.values()].map((s) => s.pid) : [];
  const cpu0 = pids.reduce((a, p) => a + cpuMs(p), 0);
  const t0 = performance.now();
  const r = !ends
    ? await run("virsh", ["-c", from.uri, "migrate", "--live", G, to.uri, "--migrateuri", `tcp://${to.ip}:49400`, "--xml", xml])
    : await run(process.execPath, [ends.cli, "libvirt", "migrate", G, to.uri, "-c", from.uri, "--control", ends.services.get(from)!.control, "--peer", ends.services.get(to)!.peer, "--xml", xml, "--json"]);
  const t1 = performance.now();
  const wallMs = t1 - t0;
  const linkBytes = pair.link.txBytes(from.ns) - tx0;
  const serviceCpuMs = pids.reduce((a, p) => a + cpuMs(p), 0) - cpu0;
  let destQemuCpuMs: number | undefined;
  try { destQemuCpuMs = cpuMs(Number(readFileSync(join(to.dir, "run", "qemu", `${G}.pid`), "utf8"))); } catch { /* not there */ }
  return {
    ...(ends ? { serviceCpuMs } : {}), ...(r.resultAt !== undefined ? { exitMs: t1 - r.resultAt } : {}), ...(destQemuCpuMs ? { destQemuCpuMs } : {}),
    mode, run: i, ok: r.code === 0, linkBytes, wallMs, ...(await completed(to)), ...(ends && r.code === 0 ? resultOf(r.out) : {}),
    ...(r.code === 0 ? {} : { note: r.err.trim().slice(-300) }),
  };
}

export interface LibvirtBenchOptions {
  runs?: number;
  /** Another build's dist directory, compared in the same run. */
  old?: string;
  /** Print nothing (the caller prints the result). */
  quiet?: boolean;
}

export type LibvirtBench = { rows: Row[]; summary: Summary[]; ratios: Record<string, { linkBytes: number; wallMs: number }> } | { skipped: string };
interface Summary { mode: Mode; runs: number; linkBytes: number; wallMs: number; downtimeMs: number; jobMs: number; setupMs: number }

/** Runs the comparison (root, libvirtd, QEMU and the guest; a few minutes) and prints its tables unless `quiet`. */
export async function benchLibvirt(o: LibvirtBenchOptions = {}): Promise<LibvirtBench> {
  const skip = skipLibvirt();
  if (skip) {
    if (!o.quiet) console.log(`libvirt bench skipped: ${skip}`);
    return { skipped: skip };
  }
  const rows = await measure(o.runs ?? 1, o.old);
  const modes: Mode[] = o.old ? ["virsh", "pagetwin", "pagetwin-old"] : ["virsh", "pagetwin"];
  const summary = modes.map((mode) => summarize(mode, rows.filter((r) => r.mode === mode && r.ok)));
  const v = summary[0]!;
  const ratios = Object.fromEntries(summary.slice(1).map((p) => [p.mode, { linkBytes: p.linkBytes / v.linkBytes, wallMs: p.wallMs / v.wallMs }]));
  if (!o.quiet) print(rows, summary, ratios, o.old);
  return { rows, summary, ratios };
}

async function measure(runs: number, oldDist: string | undefined): Promise<Row[]> {
  const pair = await LibvirtPair.start();
  const rows: Row[] = [];
  try {
    const start = async (cli: string, peerPort?: number): Promise<Ends> => {
      const services = new Map<LibvirtHost, PairService>();
      for (const h of pair.hosts) services.set(h, await pair.startService(h, { cli, ...(peerPort ? { peerPort } : {}) }));
      return { cli, services };
    };
    const ours = await start(cliPath);
    const old = oldDist ? await start(join(resolve(oldDist), "src", "cli", "main.js"), 4448) : undefined;
    await pair.startGuest(pair.a, G);
    for (let i = 1; i <= runs; i++) {
      rows.push(await migrate(pair, "virsh", pair.a, pair.b, undefined, i));
      rows.push(await migrate(pair, "pagetwin", pair.b, pair.a, ours, i));
      if (old) {
        rows.push(await migrate(pair, "virsh", pair.a, pair.b, undefined, i));
        rows.push(await migrate(pair, "pagetwin-old", pair.b, pair.a, old, i));
      }
    }
  } finally {
    await pair.close();
  }
  return rows;
}

const median = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.floor((s.length - 1) / 2)]! : NaN; };

function summarize(mode: Mode, ok: Row[]): Summary {
  const m = (k: keyof Row) => median(ok.flatMap((r) => (typeof r[k] === "number" ? [r[k] as number] : [])));
  return { mode, runs: ok.length, linkBytes: m("linkBytes"), wallMs: m("wallMs"), downtimeMs: m("downtimeMs"), jobMs: m("jobMs"), setupMs: m("setupMs") };
}

const fmt = (x: number, unit: string, div = 1, digits = 0) => (Number.isFinite(x) ? `${(x / div).toFixed(digits)} ${unit}` : "-");

function print(rows: Row[], summary: Summary[], ratios: Record<string, { linkBytes: number; wallMs: number }>, old: string | undefined): void {
  const LABEL: Record<Mode, string> = { virsh: "virsh migrate --live", pagetwin: "pagetwin libvirt migrate", "pagetwin-old": `pagetwin libvirt migrate (${old})` };
  console.log("| mode | runs | bytes on the link | migration command | libvirt's job (setup) | downtime (libvirt) |");
  console.log("|---|---|---|---|---|---|");
  for (const s of summary) console.log(`| ${LABEL[s.mode]} | ${s.runs} | ${fmt(s.linkBytes, "MB", 1e6, 1)} | ${fmt(s.wallMs, "s", 1000, 1)} | ${fmt(s.jobMs, "s", 1000, 1)} (${fmt(s.setupMs, "ms")}) | ${fmt(s.downtimeMs, "ms")} |`);
  console.log("");
  for (const [mode, r] of Object.entries(ratios)) console.log(`${mode} / virsh: bytes on the link ${r.linkBytes.toFixed(3)}×, time ${r.wallMs.toFixed(2)}×`);
  for (const r of rows.filter((x) => x.ok && x.phases)) {
    console.log(`\n${r.mode} run ${r.run}: command ${Math.round(r.wallMs)} ms = node start ${Math.round(r.wallMs - inCommand(r.phases!))} + ${Object.entries(r.phases!).map(([k, x]) => `${k.replace(/Ms$/, "")} ${x}`).join(" + ")} (check and report at once)`);
    console.log(`  exit after the result: ${Math.round(r.exitMs ?? NaN)} ms; QEMU's stream ${((r.bytesFromQemu ?? NaN) / 1e6).toFixed(1)} MB`);
    if (r.waits) console.log(`  source service busy/waiting for the link/for acks: ${Object.values(r.waits).join(" / ")} ms; destination busy/waiting for QEMU/-: ${Object.values(r.destWaits ?? {}).join(" / ")} ms`);
    console.log(`  CPU: both services ${Math.round(r.serviceCpuMs ?? 0)} ms, destination QEMU ${Math.round(r.destQemuCpuMs ?? 0)} ms`);
    if (r.timings) console.log(`  source service: ${Object.entries(r.timings).map(([k, x]) => `${k} ${x}`).join(", ")}`);
    if (r.destTimings) console.log(`  destination service: ${Object.entries(r.destTimings).map(([k, x]) => `${k} ${x}`).join(", ")}`);
  }
  for (const r of rows.filter((x) => x.ok && !x.phases)) console.log(`\n${r.mode} run ${r.run}: command ${Math.round(r.wallMs)} ms${r.serviceCpuMs !== undefined ? `, CPU of both services ${Math.round(r.serviceCpuMs)} ms` : ""}, destination QEMU ${Math.round(r.destQemuCpuMs ?? 0)} ms`);
  for (const r of rows.filter((x) => !x.ok)) console.log(`failed: ${r.mode} run ${r.run}: ${r.note}`);
}

if (isMain(import.meta.url)) {
  const { values } = parseArgs({ options: { runs: { type: "string", default: "1" }, json: { type: "boolean" }, old: { type: "string" }, help: { type: "boolean" } } });
  if (values.help) {
    console.log(HELP);
  } else {
    for (const sig of ["SIGINT", "SIGTERM"] as const) process.once(sig, () => process.exit(130));
    const r = await benchLibvirt({ runs: Number(values.runs), ...(values.old ? { old: values.old } : {}), quiet: !!values.json });
    if (values.json) console.log(JSON.stringify(r, null, 2));
  }
}
