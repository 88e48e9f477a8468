// Stream mode vs QEMU's own migration, on the real guest, across a real
// constrained link (two network namespaces, veth, tc tbf at 1 Gbit/s):
//   qemu:     source QEMU (src ns) --tcp--> destination QEMU -incoming (dst ns)
//   pagetwin: source QEMU --> stream-out (src ns) ==link==> stream-in (dst ns) --> destination QEMU
//   relay:    the same layout with a plain socket.pipe() relay in place of each proxy (changes nothing)
// Each run boots a fresh guest, waits until it has read its files, migrates,
// and checks that the guest's counter goes on at the destination.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { findGuest, type GuestImage, type QemuVm } from "../adapters/qemu/vm.js";
import { createNetnsLink, type NetnsLink } from "../adapters/netns/link.js";
import { openNasIndex } from "../adapters/nas/index-file.js";
import type { StreamStats } from "../stream/stats.js";
import { median } from "./stats.js";
import type { MigrateSample, ProxyProgress } from "./migrate-timeline.js";
import { MULTIFD_CHANNELS, runOnce } from "./stream-run.js";

export { runOnce };

export type CompareMode = "qemu" | "qemu-multifd-zstd" | "pagetwin" | "pagetwin-multifd" | "pagetwin-baseline" | "relay";
/** The modes run unless told (pagetwin-baseline needs another build: `baselineMain`). */
export const COMPARE_MODES: CompareMode[] = ["qemu", "qemu-multifd-zstd", "pagetwin", "pagetwin-multifd"];
/** Every mode, in the table's order (relay: pagetwin's layout with plain relays, for what the proxies' timing alone does). */
export const ALL_MODES: CompareMode[] = ["qemu", "qemu-multifd-zstd", "relay", "pagetwin-baseline", "pagetwin", "pagetwin-multifd"];

export interface CompareOptions {
  /** Runs per mode (median reported; default 1). */
  runs?: number;
  modes?: CompareMode[];
  guest?: GuestImage;
  memoryMiB?: number;
  /** Link rate (default "1gbit"). */
  rate?: string;
  /** QEMU max-bandwidth in bytes/s (default QEMU_UNTHROTTLED: the link is the limit). */
  maxBandwidth?: number;
  /** QEMU downtime-limit in ms for every mode (default: QEMU's own, 300). */
  downtimeLimitMs?: number;
  /** Both QEMUs of every mode allocate all guest RAM as they start (libvirt's <allocation mode='immediate'/>); default: as first written, libvirt's default. */
  prealloc?: boolean;
  /** Guest kernel command line (default: the guest's own defaults, 1 MiB/s dirtying). */
  append?: string;
  /** Counters to wait for after pagetwin-ready before migrating (default 2). */
  settleCounters?: number;
  log?: (msg: string) => void;
  workDir?: string;
  /** Index file both proxies use (default: a private file in the temp dir, removed afterwards). */
  indexPath?: string;
  /** More stream-out arguments (e.g. --queue-ms 5). */
  outArgs?: string[];
  /** Another build's dist/src/cli/main.js: its proxies run the pagetwin-baseline mode (before and after in one run). */
  baselineMain?: string;
  /** How the QEMUs reach their proxy (default unix, as docs/STREAM.md advises: loopback TCP holds MBs of the stream in the kernel, which QEMU counts as sent). */
  qemuSide?: "tcp" | "unix";
  /** Called with the destination QEMU once started, and again when the run ends (before it is stopped), for its events and serial log. */
  watchDestination?: DestinationWatch;
}

export interface DestinationWatch {
  started(dst: QemuVm): void;
  finished(dst: QemuVm, res: RunResult): Promise<void>;
}

export interface RunResult {
  mode: CompareMode;
  ok: boolean;
  error?: string;
  /** From the source's query-migrate. */
  totalTimeMs: number;
  downtimeMs: number;
  ramTransferred: number;
  normalPages: number;
  /** From the migrate command to the destination's RESUME event. */
  endToEndMs: number;
  /** Source STOP event to destination RESUME event (what the guest sees). */
  observedDowntimeMs: number;
  /** Bytes the veth ends sent during the migration (forward, return). */
  linkBytes: number;
  linkBytesReturn: number;
  lastSourceCounter: number;
  firstDestCounter: number;
  /** CPU each process used from the migrate command to the destination's RESUME, ms. */
  cpuMs: Record<string, number>;
  proxies?: { out: StreamStats | null; in: StreamStats | null };
  /** The source's query-migrate, polled every 50 ms from `migrate` on. */
  timeline?: MigrateSample[];
  /** stream-out's progress lines (about once a second), `at` in ms since `migrate`. */
  outProgress?: ProxyProgress[];
}

export interface CompareResult {
  rate: string;
  memoryMiB: number;
  /** QEMU's downtime-limit for every mode, ms (300: QEMU's default). */
  downtimeLimitMs: number;
  /** Guest RAM allocated as each QEMU started (CompareOptions.prealloc). */
  prealloc: boolean;
  runs: Record<CompareMode, RunResult[]>;
  median: Partial<Record<CompareMode, Omit<RunResult, "proxies" | "timeline" | "outProgress" | "mode" | "ok" | "error"> & { okRuns: number }>>;
  /** pagetwin's medians over QEMU's own (plain pre-copy), and over QEMU multifd+zstd; the same for pagetwin with multifd. */
  ratio?: Ratio;
  ratioVsMultifdZstd?: Ratio;
  multifdRatio?: Ratio;
  multifdRatioVsMultifdZstd?: Ratio;
  /** pagetwin's medians over the baseline build's. */
  ratioVsBaseline?: Ratio;
}

export interface Ratio { linkBytes: number; totalTime: number; endToEnd: number; downtime: number; observedDowntime: number }

const cpuCount = os.availableParallelism();

/** What every run needs: the guest, its image's index (made here unless given), the namespace link; close() removes them. */
export interface CompareSetup { guest: GuestImage; indexPath: string; link: NetnsLink; close(): void }

export async function openCompareSetup(opts: CompareOptions): Promise<CompareSetup> {
  const guest = opts.guest ?? findGuest();
  if (!guest) throw new Error("the guest is not built: run scripts/build-guest.sh");
  // Index the image first (both proxies then load it; not part of the timing).
  const indexPath = opts.indexPath ?? path.join(os.tmpdir(), `pt-cmp-index-${process.pid}`);
  const nas = await openNasIndex(guest.disk, { indexPath });
  nas.image.close();
  const link = createNetnsLink({ rate: opts.rate ?? "1gbit" });
  return {
    guest, indexPath, link,
    close: () => {
      link.destroy();
      if (!opts.indexPath) fs.rmSync(indexPath, { force: true });
    },
  };
}

export async function compareStreamMode(opts: CompareOptions = {}): Promise<CompareResult> {
  const modes = opts.modes ?? COMPARE_MODES;
  const runs = opts.runs ?? 1;
  const { guest, indexPath, link, close } = await openCompareSetup(opts);
  const out: CompareResult = { rate: link.rate, memoryMiB: opts.memoryMiB ?? 512, downtimeLimitMs: opts.downtimeLimitMs ?? 300, prealloc: opts.prealloc ?? false, runs: { qemu: [], "qemu-multifd-zstd": [], pagetwin: [], "pagetwin-multifd": [], "pagetwin-baseline": [], relay: [] }, median: {} };
  try {
    for (let i = 0; i < runs; i++) {
      for (const mode of modes) out.runs[mode].push(await runOnce(mode, link, guest, { ...opts, indexPath }, i));
    }
  } finally {
    close();
  }
  for (const mode of modes) {
    const ok = out.runs[mode].filter((r) => r.ok);
    const med = (k: keyof RunResult) => median(ok.map((r) => r[k] as number));
    out.median[mode] = {
      okRuns: ok.length, totalTimeMs: med("totalTimeMs"), downtimeMs: med("downtimeMs"), ramTransferred: med("ramTransferred"),
      normalPages: med("normalPages"), endToEndMs: med("endToEndMs"), observedDowntimeMs: med("observedDowntimeMs"),
      linkBytes: med("linkBytes"), linkBytesReturn: med("linkBytesReturn"), lastSourceCounter: med("lastSourceCounter"), firstDestCounter: med("firstDestCounter"),
      cpuMs: Object.fromEntries(Object.keys(ok[0]?.cpuMs ?? {}).map((k) => [k, median(ok.map((r) => r.cpuMs[k] ?? NaN))])),
    };
  }
  type Med = NonNullable<CompareResult["median"]["qemu"]>;
  const over = (p: Med | undefined, q: Med | undefined): Ratio | undefined => p && q && ({
    linkBytes: p.linkBytes / q.linkBytes, totalTime: p.totalTimeMs / q.totalTimeMs, endToEnd: p.endToEndMs / q.endToEndMs,
    downtime: p.downtimeMs / q.downtimeMs, observedDowntime: p.observedDowntimeMs / q.observedDowntimeMs,
  });
  const { qemu, "qemu-multifd-zstd": zstd, pagetwin, "pagetwin-multifd": pmf } = out.median;
  const ratios = {
    ratio: over(pagetwin, qemu), ratioVsMultifdZstd: over(pagetwin, zstd), multifdRatio: over(pmf, qemu), multifdRatioVsMultifdZstd: over(pmf, zstd),
    ratioVsBaseline: over(pagetwin, out.median["pagetwin-baseline"]),
  };
  for (const [k, v] of Object.entries(ratios)) if (v) out[k as keyof typeof ratios] = v;
  return out;
}

/** The medians side by side, one row per mode (with each process's CPU), and pagetwin's ratios. */
export function formatCompare(r: CompareResult): string {
  const names: Record<CompareMode, string> = {
    qemu: "QEMU pre-copy", "qemu-multifd-zstd": `QEMU multifd+zstd (${MULTIFD_CHANNELS})`, pagetwin: "pagetwin stream-out/in", "pagetwin-baseline": "pagetwin, baseline build",
    "pagetwin-multifd": `pagetwin, multifd (${MULTIFD_CHANNELS})`, relay: "plain relays (socket.pipe)",
  };
  const f = (x: number, d = 0) => (Number.isFinite(x) ? x.toFixed(d) : "-");
  const s = (ms: number | undefined) => (ms === undefined ? "-" : f(ms / 1000, 2));
  const rows = [["migration", "runs ok", "total-time", "end-to-end", "downtime", "observed downtime", "bytes on the link",
    "CPU s: src QEMU", "dst QEMU", "stream-out", "stream-in", "all"]];
  for (const mode of ALL_MODES) {
    const m = r.median[mode];
    if (!m) continue;
    const c = m.cpuMs;
    rows.push([names[mode], `${m.okRuns}/${r.runs[mode].length}`, `${f(m.totalTimeMs)} ms`, `${f(m.endToEndMs)} ms`, `${f(m.downtimeMs)} ms`, `${f(m.observedDowntimeMs)} ms`, `${f(m.linkBytes / 1e6, 1)} MB`,
      s(c["source QEMU"]), s(c["destination QEMU"]), s(c["stream-out"]), s(c["stream-in"]), s(Object.values(c).reduce((a, b) => a + b, 0))]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const lines = rows.map((row) => row.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd());
  lines.splice(1, 0, w.map((x) => "-".repeat(x)).join("  "));
  const ratio = (who: string, what: string, x: Ratio | undefined) => x &&
    `${who} vs ${what}: total-time ${f(x.totalTime, 2)}x (end-to-end ${f(x.endToEnd, 2)}x), downtime ${f(x.downtime, 2)}x (observed ${f(x.observedDowntime, 2)}x), bytes on the link ${f(x.linkBytes, 2)}x`;
  return [`stream mode, ${r.memoryMiB} MiB guest${r.prealloc ? " (RAM allocated as QEMU starts)" : ""}, link ${r.rate}, QEMU downtime-limit ${r.downtimeLimitMs} ms (medians; total-time and downtime from the source's query-migrate, which`,
    "through the proxies end at the local stream-out; end-to-end: migrate to the destination's RESUME; observed downtime: source STOP to it;",
    `CPU: each process's from migrate to RESUME, ${cpuCount} cores here; the plain relays' in the stream-out and stream-in columns)`, ...lines,
    ratio("pagetwin", "QEMU pre-copy", r.ratio), ratio("pagetwin", "QEMU multifd+zstd", r.ratioVsMultifdZstd),
    ratio("pagetwin multifd", "QEMU pre-copy", r.multifdRatio), ratio("pagetwin multifd", "QEMU multifd+zstd", r.multifdRatioVsMultifdZstd),
    ratio("pagetwin", "the baseline build", r.ratioVsBaseline)].filter(Boolean).join("\n");
}
