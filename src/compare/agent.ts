// Three migrations of the same real QEMU guest across a real 1 Gbit/s link
// between two network namespaces: QEMU's own pre-copy, pagetwin agent mode
// without dedup, and pagetwin agent mode. Each run boots a fresh source guest
// in the source namespace, lets it read its files into the page cache, starts
// the destination QEMU in the destination namespace, migrates, and checks that
// the guest's serial counter goes on at the destination from where it stopped.
// The pagetwin agents run as child processes inside the namespaces (as on two
// hosts), so both tools cross the same veth pair and tc tbf shaping.

import { spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createKeyFile } from "../link/security.js";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { QemuVm, QEMU_UNTHROTTLED, findGuest, qemuAvailable, type GuestImage } from "../adapters/qemu/vm.js";
import { openNasIndex } from "../adapters/nas/index-file.js";
import { createNetnsLink, netnsAvailable, type NetnsLink } from "../adapters/netns/link.js";
import { waitMigration, type AgentMigrationResult, type QueryMigrate } from "../agent/qemu.js";
import { firstCounter, lastCounter, readBytes } from "./guest.js";
import { median } from "./stats.js";
import type { WorkersWhen } from "../agent/source.js";

export type CompareMode = "qemu" | "qemu-multifd-zstd" | "pagetwin-nodedup" | "pagetwin";
export const COMPARE_MODES: CompareMode[] = ["qemu", "qemu-multifd-zstd", "pagetwin-nodedup", "pagetwin"];

export interface CompareOptions {
  modes?: CompareMode[];
  /** Runs of each mode (the table shows medians). */
  repeat?: number;
  memoryMiB?: number;
  /** Link rate (tc tbf), default 1gbit. */
  rate?: string;
  /** Downtime target for both tools, ms (QEMU's downtime-limit; default 300). */
  downtimeMs?: number;
  /** QEMU's max-bandwidth, bytes/s (default QEMU_UNTHROTTLED: the link is the limit; 0 keeps QEMU's own, 128 MiB/s in 7.2). */
  qemuMaxBandwidth?: number;
  /** pagetwin hashes on this many worker threads (default 0). */
  workers?: number;
  workersWhen?: WorkersWhen;
  /** Guest kernel command line (default: quiet, 1 MiB/s of memory writes over 16 MiB). */
  append?: string;
  /** Where scripts/build-guest.sh keeps the guest (default $PAGETWIN_CACHE or <repo>/.cache). */
  cacheDir?: string;
  /** Build the guest when it is missing (default true). */
  build?: boolean;
  log?: (msg: string) => void;
}

export interface CompareRun {
  mode: CompareMode;
  run: number;
  status: "completed" | "failed";
  /** ms, query-migrate total-time (QEMU) or pagetwin's same measure (first connection to destination running). */
  totalTimeMs: number;
  /** ms with the guest stopped (query-migrate downtime; pagetwin: stop to destination cont). */
  downtimeMs: number;
  /** Bytes the source's veth end sent during the migration (the link's own counter: headers included). */
  linkBytes: number;
  /** Bytes the destination's veth end sent back (acks). */
  linkBytesBack: number;
  /** What the tool counts: QEMU ram.transferred; pagetwin RAM frames + QEMU's device state. */
  transferredBytes: number;
  pages: { normal: number; zero: number; twin: number };
  iterations: number;
  /** pagetwin: RAM digest checked at switchover. */
  verified: boolean | null;
  counter: { sourceLast: number; destinationFirst: number; continued: boolean };
  guestReadyMs: number;
  /** The machine's 1-minute load average when the migration started (the machines here are shared). */
  loadAvg: number;
  /** pagetwin: wall time of the `pagetwin migrate` process, node start-up and index load included. */
  commandWallMs?: number;
  details: unknown;
  error?: string;
}

export interface CompareResult {
  qemuVersion: string;
  link: { rate: string; srcIp: string; dstIp: string };
  guest: { memoryMiB: number; readBytes: number; append: string };
  downtimeTargetMs: number;
  /** QEMU's max-bandwidth during its run, bytes/s (query-migrate-parameters). */
  qemuMaxBandwidth: number;
  workers: number;
  workersWhen: WorkersWhen;
  runs: CompareRun[];
  /** Median of each mode's completed runs. */
  summary: { mode: CompareMode; runs: number; totalTimeMs: number; downtimeMs: number; linkBytes: number; continued: boolean }[];
}

const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const AGENT_MAIN = fileURLToPath(new URL("../cli/main.js", import.meta.url));
const CLI_MAIN = fileURLToPath(new URL("../cli/main.js", import.meta.url));
export const DEFAULT_APPEND = "console=ttyS0 quiet panic=1 no_timer_check pt_dirty=1 pt_dirty_ws=16";
const INCOMING_PORT = 4444;


/** The guest, built with scripts/build-guest.sh when missing. */
export function ensureGuest(cacheDir: string, build: boolean, log: (m: string) => void): GuestImage {
  const found = findGuest(cacheDir);
  if (found) return found;
  if (!build) throw new Error(`pagetwin: no guest in ${cacheDir}; run scripts/build-guest.sh`);
  log(`building the guest into ${cacheDir} (scripts/build-guest.sh; minutes the first time)`);
  const r = spawnSync("bash", [join(REPO, "scripts", "build-guest.sh")], {
    cwd: REPO, env: { ...process.env, PAGETWIN_CACHE: cacheDir }, stdio: ["ignore", 2, 2],
  });
  if (r.status !== 0) throw new Error(`pagetwin: scripts/build-guest.sh failed (exit ${r.status ?? r.signal})`);
  const g = findGuest(cacheDir);
  if (!g) throw new Error(`pagetwin: scripts/build-guest.sh ran but ${cacheDir} holds no guest`);
  return g;
}

/** Runs a child to its end, collecting stdout; rejects after timeoutMs (and kills it). */
function collect(child: ChildProcess, timeoutMs: number, what: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    let stdout = "", stderr = "";
    child.stdout?.on("data", (d: Buffer) => { stdout += d.toString("utf8"); });
    child.stderr?.on("data", (d: Buffer) => { stderr = (stderr + d.toString("utf8")).slice(-16_000); });
    const t = setTimeout(() => { child.kill("SIGKILL"); reject(new Error(`${what} did not finish within ${timeoutMs} ms`)); }, timeoutMs);
    child.once("error", (e) => { clearTimeout(t); reject(e); });
    child.once("exit", (code) => { clearTimeout(t); resolve({ code, stdout, stderr }); });
  });
}

/** Starts `pagetwin listen` in the destination namespace; resolves with its port once it listens. */
function startDestinationAgent(link: NetnsLink, ramPath: string, image: string, keyPath: string): Promise<{ child: ChildProcess; port: number }> {
  const child = link.spawn(link.dstNs, process.execPath, [CLI_MAIN, "listen", "--ram", ramPath, "--image", image, "--host", link.dstIp, "--port", "0", "--once", "--json", "--psk-file", keyPath], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => { err = (err + d.toString("utf8")).slice(-4000); });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { child.kill("SIGKILL"); reject(new Error("the destination agent did not start listening within 30 s")); }, 30_000);
    child.once("exit", (code) => { clearTimeout(t); reject(new Error(`the destination agent exited (code ${code}) before listening: ${err.trim()}`)); });
    createInterface({ input: child.stdout! }).on("line", (line) => {
      try {
        const ev = JSON.parse(line) as { event?: string; port?: number };
        if (ev.event === "listening") { clearTimeout(t); resolve({ child, port: ev.port! }); }
      } catch { /* not JSON */ }
    });
  });
}

export async function runComparison(o: CompareOptions = {}): Promise<CompareResult> {
  const log = o.log ?? (() => {});
  if (!qemuAvailable()) throw new Error("pagetwin: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
  if (!netnsAvailable()) throw new Error("pagetwin: the comparison needs root with iproute2 and tc, to make two network namespaces joined by a shaped veth pair");
  const cacheDir = o.cacheDir ?? process.env["PAGETWIN_CACHE"] ?? join(REPO, ".cache");
  const guest = ensureGuest(cacheDir, o.build ?? true, log);
  // Index the NAS image once here, so the agents only load it.
  const nas = await openNasIndex(guest.disk);
  nas.image.close();
  if (nas.built) log(`indexed the NAS image ${guest.disk} in ${nas.ms.toFixed(0)} ms`);
  const dir = mkdtempSync(join(tmpdir(), "pt-agentcmp-"));
  const link = createNetnsLink({ rate: o.rate ?? "1gbit" });
  log(`link: ${link.srcNs} (${link.srcIp}) <-> ${link.dstNs} (${link.dstIp}), veth shaped with tc tbf ${link.rate}`);
  const cmp = new AgentComparison(o, guest, link, dir, log);
  try {
    const modes = o.modes ?? COMPARE_MODES;
    let n = 0;
    for (let rep = 1; rep <= (o.repeat ?? 1); rep++) {
      for (const mode of modes) await cmp.run(mode, rep, ++n);
    }
    return cmp.summarize(modes);
  } finally {
    link.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
}

type Pair = { src: QemuVm; dst: QemuVm };

/** One comparison's runs: each boots a fresh guest pair, migrates in one mode, and checks the guest goes on. */
class AgentComparison {
  readonly result: CompareResult;
  private readonly append: string;
  private readonly memoryMiB: number;
  private readonly downtimeMs: number;
  /** The agents' link in TLS-PSK, as an operator would run it. */
  private readonly keyPath: string;

  constructor(private readonly o: CompareOptions, private readonly guest: GuestImage, private readonly link: NetnsLink, private readonly dir: string, private readonly log: (m: string) => void) {
    this.append = o.append ?? DEFAULT_APPEND;
    this.memoryMiB = o.memoryMiB ?? 512;
    this.downtimeMs = o.downtimeMs ?? 300;
    this.keyPath = createKeyFile(join(dir, "link.key"));
    this.result = {
      qemuVersion: "", link: { rate: link.rate, srcIp: link.srcIp, dstIp: link.dstIp },
      guest: { memoryMiB: this.memoryMiB, readBytes: -1, append: this.append }, downtimeTargetMs: this.downtimeMs, qemuMaxBandwidth: 0,
      workers: o.workers ?? 0, workersWhen: o.workersWhen ?? "always", runs: [], summary: [],
    };
  }

  async run(mode: CompareMode, rep: number, n: number): Promise<void> {
    const vms: QemuVm[] = [];
    const children: ChildProcess[] = [];
    const run: CompareRun = {
      mode, run: rep, status: "failed", totalTimeMs: 0, downtimeMs: 0, linkBytes: 0, linkBytesBack: 0, transferredBytes: 0,
      pages: { normal: 0, zero: 0, twin: 0 }, iterations: 0, verified: null,
      counter: { sourceLast: -1, destinationFirst: -1, continued: false }, guestReadyMs: 0, loadAvg: 0, details: null,
    };
    this.result.runs.push(run);
    try {
      const pair = await this.boot(mode, rep, n, run, vms);
      run.loadAvg = Math.round(loadavg()[0]! * 100) / 100;
      const link = this.link;
      const tx0 = [link.txBytes(link.srcNs), link.txBytes(link.dstNs)] as const;
      if (mode === "qemu" || mode === "qemu-multifd-zstd") await this.migrateQemu(pair, mode, run);
      else await this.migrateAgent(pair, mode, run, children);
      run.linkBytes = link.txBytes(link.srcNs) - tx0[0];
      run.linkBytesBack = link.txBytes(link.dstNs) - tx0[1];
      await this.checkCounter(pair, run);
      run.status = "completed";
      this.log(`[${mode} #${rep}] total-time ${run.totalTimeMs} ms, downtime ${run.downtimeMs} ms, ${(run.linkBytes / 1e6).toFixed(1)} MB on the link (load ${run.loadAvg}); counter ${run.counter.sourceLast} -> ${run.counter.destinationFirst}`);
    } catch (err) {
      run.error = (err as Error).message;
      this.log(`[${mode} #${rep}] failed: ${run.error}`);
    } finally {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
      for (const vm of vms) await vm.cleanup();
    }
  }

  /** The source guest booted with its files read, and the destination QEMU waiting for it. */
  private async boot(mode: CompareMode, rep: number, n: number, run: CompareRun, vms: QemuVm[]): Promise<Pair> {
    const { guest, append, memoryMiB, dir, link } = this;
    const tag = `${process.pid}-${n}`;
    const t0 = Date.now();
    const agent = mode !== "qemu" && mode !== "qemu-multifd-zstd";
    const src = await QemuVm.start({
      ...guest, append, memoryMiB, memPath: `/dev/shm/pt-agentcmp-${tag}-src`, qmpSocket: join(dir, `${n}-src.qmp`),
      extraQmpSockets: [join(dir, `${n}-src-tool.qmp`)], serialLog: join(dir, `${n}-src.log`), netns: link.srcNs, name: "pt-agentcmp-src",
    });
    vms.push(src);
    this.result.qemuVersion = src.qmp.qemuVersion ?? "";
    this.log(`[${mode} #${rep}] booting the source guest in ${link.srcNs}`);
    await src.waitForSerial(/pagetwin-ready/, 400_000);
    await src.waitForSerial(/pagetwin-counter 2\b/, 60_000);
    run.guestReadyMs = Date.now() - t0;
    this.result.guest.readBytes = readBytes(src.serialLog());
    const dst = await QemuVm.start({
      ...guest, append, memoryMiB, memPath: `/dev/shm/pt-agentcmp-${tag}-dst`, qmpSocket: join(dir, `${n}-dst.qmp`),
      extraQmpSockets: [join(dir, `${n}-dst-tool.qmp`)], serialLog: join(dir, `${n}-dst.log`), netns: link.dstNs, name: "pt-agentcmp-dst",
      incoming: agent || mode === "qemu-multifd-zstd" ? "defer" : `tcp:${link.dstIp}:${INCOMING_PORT}`, extraArgs: agent ? ["-S"] : [],
    });
    vms.push(dst);
    this.log(`[${mode} #${rep}] guest ready after ${(run.guestReadyMs / 1000).toFixed(1)} s; migrating`);
    return { src, dst };
  }

  /** QEMU's own migration; QEMU's best configuration is multifd, 2 channels, zstd, both sides set before the stream starts. */
  private async migrateQemu({ src, dst }: Pair, mode: CompareMode, run: CompareRun): Promise<void> {
    const uri = `tcp:${this.link.dstIp}:${INCOMING_PORT}`;
    if (mode === "qemu-multifd-zstd") {
      for (const vm of [src, dst]) await vm.useMultifdZstd();
      await dst.qmp.execute("migrate-incoming", { uri });
    }
    const maxBandwidth = this.o.qemuMaxBandwidth ?? QEMU_UNTHROTTLED;
    await src.qmp.execute("migrate-set-parameters", {
      "downtime-limit": this.downtimeMs, ...(maxBandwidth ? { "max-bandwidth": Math.round(maxBandwidth) } : {}),
    });
    const params = await src.qmp.execute<Record<string, number>>("query-migrate-parameters");
    this.result.qemuMaxBandwidth = params["max-bandwidth"] ?? 0;
    await src.qmp.execute("migrate", { uri });
    const q: QueryMigrate = await waitMigration(src.qmp, 600_000, 50);
    run.details = { "query-migrate": q, "query-migrate-parameters": { "max-bandwidth": params["max-bandwidth"], "downtime-limit": params["downtime-limit"] } };
    if (q.status !== "completed") throw new Error(`QEMU's migration ended '${q.status}': ${q["error-desc"] ?? ""}`);
    run.totalTimeMs = q["total-time"] ?? 0;
    run.downtimeMs = q.downtime ?? 0;
    run.transferredBytes = q.ram?.transferred ?? 0;
    run.pages = { normal: q.ram?.normal ?? 0, zero: q.ram?.duplicate ?? 0, twin: 0 };
    run.iterations = q.ram?.["dirty-sync-count"] ?? 0;
  }

  /** `pagetwin migrate` in the source namespace to `pagetwin listen` in the destination's, as on two hosts. */
  private async migrateAgent({ src, dst }: Pair, mode: CompareMode, run: CompareRun, children: ChildProcess[]): Promise<void> {
    const { link, keyPath, guest } = this;
    const d = await startDestinationAgent(link, dst.options.memPath, guest.disk, keyPath);
    children.push(d.child);
    const args = [AGENT_MAIN, "migrate", "--src-qmp", src.options.extraQmpSockets![0]!, "--dst-qmp", dst.options.extraQmpSockets![0]!,
      "--src-ram", src.options.memPath, "--dst-agent", `${link.dstIp}:${d.port}`, "--psk-file", keyPath, "--image", guest.disk,
      // no --bandwidth: pagetwin measures the link as a user's default run does
      "--downtime", String(this.downtimeMs), "--workers", String(this.result.workers), "--workers-when", this.result.workersWhen, "--json", ...(mode === "pagetwin-nodedup" ? ["--no-dedup"] : [])];
    const w0 = Date.now();
    const child = link.spawn(link.srcNs, process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
    children.push(child);
    const out = await collect(child, 600_000, "pagetwin migrate");
    run.commandWallMs = Date.now() - w0;
    let r: AgentMigrationResult;
    try {
      r = JSON.parse(out.stdout.trim().split("\n").pop() ?? "") as AgentMigrationResult;
    } catch {
      throw new Error(`pagetwin migrate printed no result (exit ${out.code}): ${out.stderr.trim()}`);
    }
    run.details = { ...r, iterations: r.iterations };
    run.verified = r.verified;
    if (r.status !== "completed") throw new Error(`pagetwin migrate failed: ${r.error ?? out.stderr.trim()}`);
    run.totalTimeMs = r["total-time"];
    run.downtimeMs = r.downtime;
    run.transferredBytes = r.ram.transferred + (r.device?.transferred ?? 0);
    run.pages = { normal: r.ram.normal, zero: r.ram.duplicate, twin: r.ram.twin };
    run.iterations = r.ram["dirty-sync-count"];
    await collect(d.child, 10_000, "the destination agent").catch(() => undefined);
  }

  /** The guest goes on at the destination from where it stopped. */
  private async checkCounter({ src, dst }: Pair, run: CompareRun): Promise<void> {
    const stopped = lastCounter(src.serialLog());
    run.counter.sourceLast = stopped;
    await dst.waitForSerial(/pagetwin-counter \d+\r?\n/, 60_000);
    const st = await dst.qmp.execute<{ status: string }>("query-status");
    run.counter.destinationFirst = firstCounter(dst.serialLog());
    run.counter.continued = st.status === "running" && run.counter.destinationFirst === stopped + 1;
    if (!run.counter.continued) throw new Error(`the guest did not go on counting at the destination: source stopped at ${stopped}, destination printed ${run.counter.destinationFirst} first (status ${st.status})`);
  }

  summarize(modes: CompareMode[]): CompareResult {
    for (const mode of modes) {
      const ok = this.result.runs.filter((r) => r.mode === mode && r.status === "completed");
      this.result.summary.push({
        mode, runs: ok.length, totalTimeMs: median(ok.map((r) => r.totalTimeMs)), downtimeMs: median(ok.map((r) => r.downtimeMs)),
        linkBytes: median(ok.map((r) => r.linkBytes)), continued: ok.length > 0 && ok.every((r) => r.counter.continued),
      });
    }
    return this.result;
  }
}

/** The comparison as a text table. */
export function formatComparison(r: CompareResult): string {
  const mb = (b: number) => (Number.isFinite(b) ? `${(b / 1e6).toFixed(1)} MB` : "-");
  const ms = (x: number) => (Number.isFinite(x) ? `${Math.round(x)} ms` : "-");
  const base = r.summary.find((s) => s.mode === "qemu");
  const best = r.summary.find((s) => s.mode === "qemu-multifd-zstd");
  const rows = [["migration", "runs", "total time", "downtime", "bytes on the link", "vs QEMU (time / bytes)", "vs multifd+zstd", "guest counts on"]];
  const vs = (b: typeof base, s: NonNullable<typeof base>) => b && s.mode !== b.mode && b.runs > 0 && s.runs > 0
    ? `${(s.totalTimeMs / b.totalTimeMs).toFixed(2)}x / ${(s.linkBytes / b.linkBytes).toFixed(2)}x` : "";
  for (const s of r.summary) {
    const rel = vs(base, s);
    const relBest = s.mode.startsWith("pagetwin") ? vs(best, s) : "";
    const name = s.mode === "qemu" ? "QEMU pre-copy" : s.mode === "qemu-multifd-zstd" ? "QEMU multifd+zstd" : s.mode === "pagetwin-nodedup" ? "pagetwin, dedup off" : "pagetwin";
    rows.push([name, String(s.runs), ms(s.totalTimeMs), ms(s.downtimeMs), mb(s.linkBytes), rel, relBest, s.runs ? (s.continued ? "yes" : "NO") : "-"]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const lines = rows.map((row) => row.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd());
  lines.splice(1, 0, w.map((x) => "-".repeat(x)).join("  "));
  const failed = r.runs.filter((x) => x.status !== "completed");
  return [
    `QEMU ${r.qemuVersion} (TCG), ${r.guest.memoryMiB} MiB guest that read ${(r.guest.readBytes / 1e6).toFixed(0)} MB of files from its NAS disk;`,
    `link ${r.link.rate} (veth between two network namespaces, tc tbf); downtime target ${r.downtimeTargetMs} ms;`,
    `QEMU max-bandwidth ${(r.qemuMaxBandwidth / 1e6).toFixed(0)} MB/s; pagetwin: defaults (link rate measured, no --bandwidth), ${r.workers} hash workers${r.workers ? ` (${r.workersWhen === "switchover" ? "final pass only" : "every pass"})` : ""}; medians.`,
    "",
    ...lines,
    ...failed.map((f) => `failed: ${f.mode} run ${f.run}: ${f.error}`),
  ].join("\n");
}
