// What the service knows of one migration, either direction: its state,
// disks, stats, and the events `watch` streams (state changes, progress
// about once a second while bytes move, the end with the final status).

import type { EventEmitter } from "node:events";
import type { StreamStats } from "../stream/stats.js";
import { errorCode } from "../cli/json.js";
import type { TraceRecord } from "../trace/format.js";

export type Direction = "out" | "in";
export type MigrationState = "preparing" | "ready" | "running" | "completed" | "failed" | "cancelled";

export interface DiskReport {
  path: string;
  /** Pages of this disk's blocks looked up here can travel as references. */
  dedup: boolean;
  reason?: string;
  /** out: pages found with a twin on this disk; in: pages rebuilt from a verified block of it. */
  twins: number;
}

export interface ErrorInfo {
  code: string;
  message: string;
}

export interface MigrationStatus {
  migration: string;
  direction: Direction;
  state: MigrationState;
  /** out: where the source QEMU connects; in: the destination QEMU's -incoming address. */
  qemu: string;
  /** out: the destination service's peer address. */
  peer?: string;
  disks: DiskReport[];
  stats: StreamStats;
  /** out: the destination side's stats, once it reported them (FINISHED). */
  peerStats?: StreamStats;
  /** When each step was reached, ms after startedAt (Timings' names); where a migration's time goes. */
  timings: Timings;
  /** out: the destination side's timings (FINISHED), ms after its own start. */
  peerTimings?: Timings;
  error?: ErrorInfo;
  startedAt: string;
  endedAt?: string;
}

export type ServeEvent =
  | { event: "state"; migration: string; direction: Direction; state: MigrationState; error?: ErrorInfo }
  | { event: "progress"; migration: string; direction: Direction; stats: StreamStats }
  | { event: "end"; migration: string; direction: Direction; ok: boolean; status: MigrationStatus }
  /** A trace record of the migration (docs/TRACE.md): only to watches that asked for them (`trace: true`). */
  | { event: "trace"; migration: string; direction: Direction; record: TraceRecord };

/**
 * Steps of a migration, each the ms after the record's start when it was first reached.
 * out: indexesOpen, peerConnected (TLS done), peerPrepared, ready, qemuConnected (first QEMU connection),
 * sessionsEnded (every session had its verdict), peerFinished.
 * in: disksOpen, prepared, firstSession, sessionsEnded, finished.
 */
export type Timings = Record<string, number>;

export const FINAL: readonly MigrationState[] = ["completed", "failed", "cancelled"];

export function errorInfo(err: unknown): ErrorInfo {
  return { code: errorCode(err), message: err instanceof Error ? err.message : String(err) };
}

export class MigrationRecord {
  state: MigrationState = "preparing";
  error: ErrorInfo | undefined;
  peerStats: StreamStats | undefined;
  peerTimings: Timings | undefined;
  readonly timings: Timings = {};
  private t0 = performance.now();
  readonly startedAt = new Date();
  endedAt: Date | undefined;
  /** Twins per disk (see DiskReport.twins), filled by the sessions' lookups or verifiers. */
  readonly twins: number[];
  private progress: NodeJS.Timeout | null = null;
  private settled!: () => void;
  /** Resolves when the migration reached a final state. */
  readonly ended = new Promise<void>((r) => { this.settled = r; });

  constructor(
    readonly id: string, readonly direction: Direction, readonly qemu: string, readonly stats: StreamStats,
    readonly disks: { path: string; dedup: boolean; reason?: string }[], private readonly bus: EventEmitter, readonly peer?: string,
  ) {
    this.twins = disks.map(() => 0);
  }

  get final(): boolean {
    return FINAL.includes(this.state);
  }

  setState(state: MigrationState, err?: unknown): void {
    if (this.final || this.state === state) return;
    this.state = state;
    if (err !== undefined) this.error = errorInfo(err);
    this.emit({ event: "state", migration: this.id, direction: this.direction, state, ...(this.error ? { error: this.error } : {}) });
    if (state === "running") this.startProgress();
    if (!this.final) return;
    this.endedAt = new Date();
    this.stopProgress();
    this.emit({ event: "end", migration: this.id, direction: this.direction, ok: state === "completed", status: this.status() });
    this.settled();
  }

  /** The migration began at `t` (performance.now()), before its record was made. */
  since(t: number): void {
    this.t0 = Math.min(this.t0, t);
  }

  /** Step `name` reached now (the first time counts). */
  mark(name: string): void {
    this.timings[name] ??= Math.round(performance.now() - this.t0);
  }

  status(): MigrationStatus {
    return {
      migration: this.id, direction: this.direction, state: this.state, qemu: this.qemu, ...(this.peer ? { peer: this.peer } : {}),
      disks: this.disks.map((d, i) => ({ ...d, twins: this.twins[i]! })),
      stats: this.stats, ...(this.peerStats ? { peerStats: this.peerStats } : {}),
      timings: { ...this.timings }, ...(this.peerTimings ? { peerTimings: this.peerTimings } : {}), ...(this.error ? { error: this.error } : {}),
      startedAt: this.startedAt.toISOString(), ...(this.endedAt ? { endedAt: this.endedAt.toISOString() } : {}),
    };
  }

  private emit(e: ServeEvent): void {
    this.bus.emit("event", e);
  }

  private startProgress(): void {
    let seen = -1;
    this.progress = setInterval(() => {
      const s = this.stats;
      const moved = s.bytesFromQemu + s.bytesToQemu + s.bytesInLink;
      if (moved === seen) return;
      seen = moved;
      this.emit({ event: "progress", migration: this.id, direction: this.direction, stats: s });
    }, 1000);
    this.progress.unref();
  }

  private stopProgress(): void {
    if (this.progress) clearInterval(this.progress);
    this.progress = null;
  }
}
