// Agent mode's downtime against guest RAM: the final pass re-reads and
// re-hashes all of RAM with the guest stopped, so downtime grows with RAM.
// Migrates the embedded VM (a guest dirtying its RAM, destination agent in
// its own process, TLS on loopback) at each RAM size, alternating the final
// pass on the agent's own thread ("one thread") with the final pass on a
// pool of every core ("pool"), and prints downtime and the final scan per
// size with the pool/one-thread ratio (medians).
//
//   node dist/bench/agent-downtime.js [--json] [--mib 256,512,1024] [--runs 3] [--workers N]

import os from "node:os";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { tmpdir } from "node:os";
import { runEmbeddedMigration, type EmbeddedRunResult } from "../src/demo/embedded-run.js";
import { argString, argValue, benchArgs, isMain } from "./cli.js";

export interface DowntimeRow {
  ramMiB: number;
  /** Medians over the runs, ms. */
  oneThread: { downtimeMs: number; finalScanMs: number };
  pool: { downtimeMs: number; finalScanMs: number; workers: number };
  /** pool / one thread. */
  ratio: { downtime: number; finalScan: number };
  runs: { variant: "one thread" | "pool"; downtimeMs: number; finalScanMs: number; finalPages: number; verified: boolean }[];
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

async function once(dir: string, ramMiB: number, workers: number): Promise<EmbeddedRunResult> {
  // the last run's destination RAM file goes first: truncating it (its pages still dirty in the page cache)
  // held the next destination's handshake for seconds on a busy host
  rmSync(join(dir, "destination-ram"), { force: true });
  return runEmbeddedMigration({
    vm: { dir, ramMiB, reuse: true }, mode: "pagetwin", bandwidth: 125e6, warmupMs: 300,
    workers, workersWhen: "switchover", compress: "auto",
  });
}

export async function benchAgentDowntime(o: { quiet?: boolean; mib?: number[]; runs?: number; workers?: number } = {}): Promise<DowntimeRow[]> {
  const sizes = o.mib ?? [256, 512, 1024];
  const runs = o.runs ?? 3;
  const workers = o.workers ?? Math.max(2, os.availableParallelism());
  const say = (s: string) => { if (!o.quiet) console.log(s); };
  say(`agent mode: downtime vs guest RAM, final pass on one thread vs a pool of ${workers} workers (embedded VM, 1 Gbit/s, ${runs} runs each, alternating; medians)`);
  say(`${"RAM".padStart(8)}${"downtime 1 thread".padStart(19)}${"pool".padStart(9)}${"ratio".padStart(8)}${"final scan 1 thread".padStart(21)}${"pool".padStart(9)}${"ratio".padStart(8)}`);
  const rows: DowntimeRow[] = [];
  for (const ramMiB of sizes) {
    const dir = mkdtempSync(join(tmpdir(), "pagetwin-downtime-"));
    const row: DowntimeRow["runs"] = [];
    try {
      for (let r = 0; r < runs; r++) {
        // alternate which variant goes first, so that neither always runs on a fresher page cache
        const order: [string, number][] = r % 2 === 0 ? [["one thread", 0], ["pool", workers]] : [["pool", workers], ["one thread", 0]];
        for (const [variant, w] of order) {
          const res = await once(dir, ramMiB, w);
          const fin = res.iterationLog.at(-1);
          row.push({ variant: variant as "one thread" | "pool", downtimeMs: res.downtimeMs, finalScanMs: fin?.scanMs ?? NaN, finalPages: fin ? fin.pages.normal + fin.pages.twin + fin.pages.zero : 0, verified: res.verified });
          if (!res.verified) throw new Error(`bench: the ${variant} migration of ${ramMiB} MiB did not verify: ${res.error ?? "RAM differs"}`);
        }
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    const of = (v: string, k: "downtimeMs" | "finalScanMs") => median(row.filter((x) => x.variant === v).map((x) => x[k]));
    const one = { downtimeMs: of("one thread", "downtimeMs"), finalScanMs: of("one thread", "finalScanMs") };
    const pool = { downtimeMs: of("pool", "downtimeMs"), finalScanMs: of("pool", "finalScanMs"), workers };
    const ratio = { downtime: +(pool.downtimeMs / one.downtimeMs).toFixed(3), finalScan: +(pool.finalScanMs / one.finalScanMs).toFixed(3) };
    rows.push({ ramMiB, oneThread: one, pool, ratio, runs: row });
    say(`${`${ramMiB} MiB`.padStart(8)}${`${one.downtimeMs.toFixed(0)} ms`.padStart(19)}${`${pool.downtimeMs.toFixed(0)} ms`.padStart(9)}${`${ratio.downtime.toFixed(2)}x`.padStart(8)}` +
      `${`${one.finalScanMs.toFixed(0)} ms`.padStart(21)}${`${pool.finalScanMs.toFixed(0)} ms`.padStart(9)}${`${ratio.finalScan.toFixed(2)}x`.padStart(8)}`);
  }
  return rows;
}

if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/agent-downtime.js [--mib 512,1024,2048] [--runs N] [--workers N] [--json]: agent mode's downtime against guest RAM", ["--mib", "--runs", "--workers", "--json"]);
  const mib = argString(args, "--mib")?.split(",").map(Number);
  if (mib && mib.some((m) => !(Number.isInteger(m) && m > 0))) throw new RangeError("bench: --mib takes sizes in MiB, e.g. 256,512,1024");
  const rows = await benchAgentDowntime({ quiet: args.includes("--json"), mib, runs: argValue(args, "--runs"), workers: argValue(args, "--workers") });
  if (args.includes("--json")) console.log(JSON.stringify({ machine: { cores: os.cpus().length, loadavg: os.loadavg() }, rows }));
}
