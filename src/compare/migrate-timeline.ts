// What the source QEMU says of its migration while it runs (query-migrate,
// polled): the rate it measures, what it still has to send, its expected
// downtime. Through the proxies, QEMU's switchover decision rests on these.

import type { QmpClient } from "../adapters/qemu/qmp.js";

/** One query-migrate answer, reduced (bytes, ms since `migrate`). */
export interface MigrateSample {
  t: number;
  status: string;
  transferred: number;
  remaining: number;
  /** QEMU's measured rate over its last ~100 ms, Mbit/s. */
  mbps: number;
  dirtyPagesRate: number;
  expectedDowntimeMs: number;
  syncs: number;
}

/** A proxy's progress line (docs/JSON.md, phase "stream"): running totals, `at` when it arrived. */
export interface ProxyProgress { at: number; bytesFromQemu: number; bytesOutLink: number; busyMs: number; drainWaitMs: number; windowWaitMs: number }

const DONE = new Set(["completed", "failed", "cancelled"]);

/** Polls query-migrate every `everyMs` until the migration ends; the last answer, and the samples before it. */
export async function pollMigration(qmp: QmpClient, t0: number, everyMs = 50): Promise<{ info: any; samples: MigrateSample[] }> {
  const samples: MigrateSample[] = [];
  for (;;) {
    const info = await qmp.execute("query-migrate") as any;
    const ram = info.ram ?? {};
    samples.push({
      t: Date.now() - t0, status: String(info.status), transferred: ram.transferred ?? 0, remaining: ram.remaining ?? 0,
      mbps: ram.mbps ?? 0, dirtyPagesRate: ram["dirty-pages-rate"] ?? 0, expectedDowntimeMs: info["expected-downtime"] ?? 0,
      syncs: ram["dirty-sync-count"] ?? 0,
    });
    if (DONE.has(info.status)) return { info, samples };
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** The samples as lines: time, status, MB sent and remaining, QEMU's rate, dirty rate, expected downtime, syncs. */
export function formatTimeline(samples: readonly MigrateSample[]): string[] {
  const mb = (b: number) => (b / 1e6).toFixed(1).padStart(6);
  return samples.map((s) =>
    `${String(s.t).padStart(6)} ms ${s.status.padEnd(15)} sent ${mb(s.transferred)} MB  remaining ${mb(s.remaining)} MB  ` +
    `${s.mbps.toFixed(0).padStart(5)} Mbit/s  dirty ${String(s.dirtyPagesRate).padStart(6)} p/s  expected ${String(s.expectedDowntimeMs).padStart(5)} ms  syncs ${s.syncs}`);
}

/** stream-out's time per progress interval: what it took from QEMU and sent, working, waiting for credit, and the rest (waiting for QEMU). */
export function formatProxyIntervals(progress: readonly ProxyProgress[]): string[] {
  const lines: string[] = [];
  let prev: ProxyProgress = { at: 0, bytesFromQemu: 0, bytesOutLink: 0, busyMs: 0, drainWaitMs: 0, windowWaitMs: 0 };
  for (const p of progress) {
    const d = (k: keyof ProxyProgress) => p[k] - prev[k];
    const waits = d("busyMs") + d("drainWaitMs") + d("windowWaitMs");
    const times = Number.isFinite(waits) // an older stream-out's lines have no times
      ? `; busy ${d("busyMs").toFixed(0)} ms, waiting for credit ${d("drainWaitMs").toFixed(0)}, for the window ${d("windowWaitMs").toFixed(0)}, for QEMU ${Math.max(0, d("at") - waits).toFixed(0)}`
      : "";
    lines.push(`  stream-out ${String(p.at).padStart(6)} ms: +${(d("bytesFromQemu") / 1e6).toFixed(1)} MB from QEMU, +${(d("bytesOutLink") / 1e6).toFixed(1)} MB on the link${times}`);
    prev = p;
  }
  return lines;
}

/** A run's timeline with its times and, through the proxies, stream-out's busy and waiting times. */
export function formatRunTimeline(title: string, run: {
  timeline?: readonly MigrateSample[]; outProgress?: readonly ProxyProgress[]; downtimeMs: number; observedDowntimeMs: number; endToEndMs: number;
  proxies?: { out: { busyMs: number; drainWaitMs: number; windowWaitMs: number } | null };
}): string {
  const o = run.proxies?.out;
  const head = `${title}: end-to-end ${run.endToEndMs.toFixed(0)} ms, downtime ${run.downtimeMs} ms (observed ${run.observedDowntimeMs.toFixed(0)})` +
    (o ? `; stream-out busy ${o.busyMs.toFixed(0)} ms, waiting for stream-in ${o.drainWaitMs.toFixed(0)} ms, for the replay window ${o.windowWaitMs.toFixed(0)} ms` : "");
  return [head, ...formatTimeline(run.timeline ?? []), ...formatProxyIntervals(run.outProgress ?? [])].join("\n");
}
