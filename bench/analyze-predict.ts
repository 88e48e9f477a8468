// `pagetwin analyze` against the migration it predicts, on the real guest
// (scripts/build-guest.sh, 512 MiB under TCG): analyze on the running guest's
// RAM, then an agent-mode migration at the same bandwidth; prints predicted /
// actual for round 1's bytes and time and for the whole migration's time
// (total-time without QEMU's device-state step, which analyze leaves out),
// and whether each is within 25%. Needs root-free QEMU and the guest; the
// destination agent shares this host (analyze's time assumes a host each).
// Analyze reads the RAM as it is: the guest's writer fills a buffer of random
// data for its first seconds (pt_dirty_ws / pt_dirty), so analyze runs once
// that buffer is full (the guest's usual state), right before the migration,
// the destination QEMU already started.
//
//   node dist/bench/analyze-predict.js [--json] [--runs 1] [--bandwidth-mbit 1000]

import os from "node:os";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { QemuVm, findGuest, qemuAvailable } from "../src/adapters/qemu/vm.js";
import { migrateQemuAgentMode } from "../src/agent/qemu.js";
import { argValue, benchArgs, isMain } from "./cli.js";

const CLI = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

export interface PredictRow {
  predicted: { bytes: number; roundMs: number; timeMs: number; oneHostMs: number; setupMs: number; rounds: number; linkMs: number; sourceMs: number; destinationMs: number; laterScanMs: number; dirtyPages: number };
  actual: { bytes: number; roundMs: number; timeMs: number; rounds: number; setupMs: number; deviceMs: number; roundsMs: number[]; roundsDirty: number[] };
  /** Predicted / actual; the times as analyze's oneHostMs (both agents on this host, as here) and its round 1 with the sum of source and destination. */
  ratio: { bytes: number; roundMs: number; timeMs: number };
}

export async function benchAnalyzePredict(o: { quiet?: boolean; runs?: number; bandwidth?: number } = {}): Promise<PredictRow[] | { skipped: string }> {
  const g = findGuest();
  if (!qemuAvailable() || !g) return { skipped: "needs qemu-system-x86_64 and the guest of scripts/build-guest.sh" };
  const bandwidth = o.bandwidth ?? 125e6;
  const say = (s: string) => { if (!o.quiet) console.log(s); };
  say(`analyze's prediction vs an agent-mode migration of the real guest (512 MiB, TCG), ${(bandwidth * 8 / 1e6).toFixed(0)} Mbit/s, both agents on this host`);
  const rows: PredictRow[] = [];
  for (let run = 0; run < (o.runs ?? 1); run++) {
    const dir = mkdtempSync(join(os.tmpdir(), "pagetwin-predict-"));
    const vms: QemuVm[] = [];
    const boot = async (name: string, incoming?: string) => {
      const vm = await QemuVm.start({
        ...g, memoryMiB: 512, memPath: `/dev/shm/pagetwin-predict-${process.pid}-${name}`,
        qmpSocket: join(dir, `${name}.qmp`), serialLog: join(dir, `${name}.log`), name: `pt-predict-${name}`,
        ...(incoming ? { incoming, extraArgs: ["-S"] } : {}),
      });
      vms.push(vm);
      return vm;
    };
    try {
      const a = await boot("a");
      await a.waitForSerial(/pagetwin-ready/, 300_000);
      const b = await boot("b", "defer");
      const settled = steadyCounter(a.serialLog());
      await a.waitForSerial(new RegExp(`pagetwin-counter ${settled}\\b`), 30_000 + settled * 3000);
      const an = spawnSync(process.execPath, [CLI, "analyze", "--ram", a.options.memPath, "--image", g.disk, "--bandwidth", `${bandwidth}B`, "--json"], { encoding: "utf8" });
      if (an.status !== 0) throw new Error(`bench: analyze failed: ${an.stderr}`);
      const result = JSON.parse(an.stdout.trim().split("\n").pop()!) as { normal: number; compression: { frames: number; framesCompressed: number }; pagetwin: PredictRow["predicted"] & { bytes: number } };
      const p = result.pagetwin;
      const r = await migrateQemuAgentMode({
        source: { qmp: a.qmp }, destination: { qmp: b.qmp, kill: async () => { await b.kill(); } },
        srcRam: a.options.memPath, dstRam: b.options.memPath, image: g.disk, bandwidth,
      });
      if (r.status !== "completed") throw new Error(`bench: the migration failed: ${r.error}`);
      const first = r.iterations[0]!;
      // total-time without QEMU's device-state step after the final round (analyze leaves it out)
      const deviceMs = r.device?.["total-time"] ?? 0;
      const timeMs = r["total-time"] - deviceMs;
      const oneHostRound = Math.max(p.linkMs, p.sourceMs + p.destinationMs);
      const row: PredictRow = {
        predicted: { bytes: p.bytes, roundMs: p.roundMs, timeMs: p.timeMs, oneHostMs: p.oneHostMs, setupMs: p.setupMs, rounds: p.rounds, linkMs: p.linkMs, sourceMs: p.sourceMs, destinationMs: p.destinationMs, laterScanMs: Math.round(p.laterScanMs), dirtyPages: p.dirtyPages },
        actual: { bytes: first.transferredBytes, roundMs: first.durationMs, timeMs, rounds: r.iterations.length, setupMs: r["setup-time"], deviceMs, roundsMs: r.iterations.map((it) => Math.round(it.durationMs)), roundsDirty: r.iterations.map((it) => it.dirty) },
        ratio: { bytes: +(p.bytes / first.transferredBytes).toFixed(3), roundMs: +(oneHostRound / first.durationMs).toFixed(3), timeMs: +(p.oneHostMs / timeMs).toFixed(3) },
      };
      rows.push(row);
      const within = (x: number) => (Math.abs(x - 1) <= 0.25 ? "within 25%" : "OFF by more than 25%");
      const c = r.compression;
      say(`  round 1 bytes: predicted ${(p.bytes / 1e6).toFixed(1)} MB, sent ${(first.transferredBytes / 1e6).toFixed(1)} MB: ${row.ratio.bytes}x (${within(row.ratio.bytes)})`);
      say(`    pages in full: predicted ${result.normal}, sent ${first.pages.normal}; frames compressed: predicted ${result.compression.framesCompressed} of ${result.compression.frames}, ` +
        `the migration (all rounds) ${c ? `${c.framesCompressed} of ${c.framesCompressed + c.framesRaw} (raw: ${c.rawSlow} slow, ${c.rawPoorRatio} poor ratio)` : "none"}`);
      say(`  round 1 time, one host: predicted ${oneHostRound.toFixed(0)} ms (link ${p.linkMs.toFixed(0)}, source ${p.sourceMs.toFixed(0)} + destination ${p.destinationMs.toFixed(0)}; a host each: ${p.roundMs.toFixed(0)}), took ${first.durationMs.toFixed(0)} ms: ${row.ratio.roundMs}x (${within(row.ratio.roundMs)})`);
      say(`  total-time without the device state, one host: predicted ${p.oneHostMs.toFixed(0)} ms (set-up ${p.setupMs.toFixed(0)}, ${p.rounds} rounds), took ${timeMs.toFixed(0)} ms (set-up ${r["setup-time"]}, rounds ${row.actual.roundsMs.join(" + ")}): ${row.ratio.timeMs}x (${within(row.ratio.timeMs)}; load average ${os.loadavg()[0]!.toFixed(1)})`);
    } finally {
      for (const vm of vms) await vm.cleanup().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  }
  return rows;
}

/** The counter line after which the guest's random-data buffer is full ("pagetwin-dirty 1MiB/s over 16MiB": 16 writes, a second apart), with 2 to spare. */
function steadyCounter(serial: string): number {
  const m = serial.match(/pagetwin-dirty (\d+)MiB\/s over (\d+)MiB/);
  return m ? Math.ceil(Number(m[2]) / Math.max(Number(m[1]), 1)) + 2 : 1;
}

if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/analyze-predict.js [--bandwidth-mbit N] [--runs N] [--json]: pagetwin analyze against the migration it predicts, on the real guest", ["--bandwidth-mbit", "--runs", "--json"]);
  const mbit = argValue(args, "--bandwidth-mbit");
  const rows = await benchAnalyzePredict({ quiet: args.includes("--json"), runs: argValue(args, "--runs"), bandwidth: mbit ? (mbit * 1e6) / 8 : undefined });
  if (args.includes("--json")) console.log(JSON.stringify({ machine: { cores: os.cpus().length, loadavg: os.loadavg() }, rows }));
}
