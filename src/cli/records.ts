// The --json records of the migrating commands, named as QEMU's query-migrate
// where it has a name (total-time, downtime, setup-time, ram.*), camelCase for
// pagetwin's own fields (docs/JSON.md). Rounding is json.ts's.

import type { MigrationResult, IterationRecord } from "../agent/source.js";
import type { AgentMigrationResult } from "../agent/qemu.js";
import { PAGE_SIZE } from "../core/engine.js";
import type { CompareResult, CompareRun } from "../compare/agent.js";
import type { DemoRun } from "./commands/demo.js";

const iterations = (log: readonly Omit<IterationRecord, "pageMap">[]) => log.map(({ pageMap: _trace, ...rest }: Partial<IterationRecord>) => rest);

/** `pagetwin send`: the source agent's MigrationResult, in query-migrate's names. */
export function sendRecord(r: MigrationResult): object {
  return {
    ok: r.status === "completed", status: r.status, mode: r.mode,
    "total-time": r.totalTimeMs, downtime: r.downtimeMs, "setup-time": r.setupTimeMs, "expected-downtime": r.expectedDowntimeMs,
    ram: {
      transferred: r.transferredBytes, total: r.pages.total * PAGE_SIZE, duplicate: r.pages.zero, normal: r.pages.normal,
      "normal-bytes": r.pages.normal * PAGE_SIZE, twin: r.pages.twin, resent: r.pages.resent, mbps: r.mbps, "dirty-sync-count": r.iterations,
    },
    receivedBytes: r.receivedBytes, compression: r.compression, frameCrc: r.frameCrc, verified: r.verified, digest: r.digest, convergence: r.convergence,
    iterations: iterations(r.iterationLog),
    ...(r.error ? { error: r.error } : {}),
  };
}

/** `pagetwin migrate`: agent mode's result; its two kebab-case names of pagetwin's own become camelCase. */
export function migrateRecord(r: AgentMigrationResult): object {
  const { "received-bytes": receivedBytes, "source-status": sourceStatus, iterations: log, ...rest } = r;
  // parts that did not happen (no device step, no local agent, no compression offered) are left out, not null
  const present = Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== null));
  return { ok: r.status === "completed", ...present, receivedBytes, sourceStatus, iterations: iterations(log) };
}

/** One run of `pagetwin demo`, in query-migrate's names. */
export function demoRunRecord(r: DemoRun): object {
  return {
    mode: r.mode, status: r.status, "total-time": r.totalTimeMs, downtime: r.downtimeMs, "setup-time": r.setupTimeMs,
    ram: { transferred: r.transferredBytes, normal: r.pages.normal, duplicate: r.pages.zero, twin: r.pages.twin, resent: r.pages.resent, mbps: r.mbps, "dirty-sync-count": r.iterations },
    verified: r.verified, convergence: r.convergence, indexMs: r.indexMs, guest: r.guest, compression: r.compression,
    ...(r.error ? { error: r.error } : {}),
  };
}

function compareRunRecord(r: CompareRun): object {
  const { totalTimeMs, downtimeMs, transferredBytes, pages, iterations: rounds, ...rest } = r;
  return {
    ...rest, "total-time": totalTimeMs, downtime: downtimeMs,
    ram: { transferred: transferredBytes, normal: pages.normal, duplicate: pages.zero, twin: pages.twin, "dirty-sync-count": rounds },
  };
}

/** `pagetwin compare-qemu`: every run, and each mode's medians, in query-migrate's names. */
export function compareRecord(r: CompareResult): object {
  return {
    ok: r.runs.every((x) => x.status === "completed"), ...r,
    runs: r.runs.map(compareRunRecord),
    summary: r.summary.map(({ totalTimeMs, downtimeMs, ...rest }) => ({ ...rest, "total-time": totalTimeMs, downtime: downtimeMs })),
  };
}
