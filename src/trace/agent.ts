// Agent mode's (and the embedded demo's) trace: the source agent's round
// records (with their page maps) and progress become trace records. Times
// are the agent's own (IterationRecord.startMs, from its start).

import type { IterationRecord } from "../agent/source.js";
import type { Progress } from "../log.js";
import { base64ToBytes, emptyPages, encodeRuns, qemuBytesEstimate, type TracePages } from "./format.js";
import { TraceRecorder, type StartInfo, type TraceSink } from "./sink.js";

/** Pages per "pages" record: a record stays small however big the guest. */
export const MAP_CHUNK = 1 << 20;
const PROGRESS_EVERY_MS = 250;

export interface AgentTraceEnd {
  ok: boolean;
  error?: string;
  totalTimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  iterations: number;
  pages: TracePages;
  verified?: boolean;
  convergence?: string;
  expectedDowntimeMs?: number;
  stats?: Record<string, unknown>;
  qemu?: Record<string, unknown>;
}

export class AgentTracer {
  readonly recorder: TraceRecorder;
  private doneBytes = 0;
  private baselineBytes = 0;
  private switched = false;
  private lastProgress = -Infinity;
  private roundStartMs = 0;

  constructor(sinks: readonly TraceSink[], info: Omit<StartInfo, "baseline">, t0?: number) {
    this.recorder = new TraceRecorder(sinks, { ...info, baseline: "estimated" }, t0);
  }

  private get id(): string {
    return this.recorder.id;
  }

  /** A window of a pass went out (onProgress): live bytes, and the switchover as the final pass begins. */
  progress(p: Progress): void {
    if (p.phase !== "iteration" && p.phase !== "final") return;
    const iteration = p.iteration ?? 0;
    const tMs = this.recorder.now();
    if (p.phase === "final" && !this.switched) {
      this.switched = true;
      this.recorder.emit({ type: "switchover", id: this.id, iteration, tMs: this.roundStartMs, reason: "convergence policy: the next round fits the downtime target, or a cap" });
    }
    if (tMs - this.lastProgress < PROGRESS_EVERY_MS && p.done < p.total) return;
    this.lastProgress = tMs;
    this.recorder.emit({ type: "progress", id: this.id, iteration, tMs, transferredBytes: this.doneBytes + p.bytes, baselineBytes: this.baselineBytes });
  }

  /** A round ended (onIteration). */
  iteration(it: IterationRecord): void {
    const id = this.id;
    if (it.pageMap) {
      const map = base64ToBytes(it.pageMap);
      for (let first = 0; first < map.length; first += MAP_CHUNK) {
        const to = Math.min(map.length, first + MAP_CHUNK);
        this.recorder.emit({ type: "pages", id, iteration: it.iteration, first, count: to - first, runs: encodeRuns(map, first, to) });
      }
    }
    if (it.final && !this.switched) {
      this.switched = true;
      this.recorder.emit({ type: "switchover", id, iteration: it.iteration, tMs: it.startMs, reason: "convergence policy" });
    }
    const pages = { normal: it.pages.normal, twin: it.pages.twin, zero: it.pages.zero, resent: it.pages.resent };
    const baselineBytes = qemuBytesEstimate(pages);
    this.doneBytes += it.transferredBytes;
    this.baselineBytes += baselineBytes;
    this.roundStartMs = it.startMs + it.durationMs;
    this.recorder.emit({
      type: "round", id, iteration: it.iteration, final: it.final, startMs: it.startMs, durationMs: it.durationMs,
      pages, transferredBytes: it.transferredBytes, baselineBytes, dirty: it.dirty,
    });
  }

  end(e: AgentTraceEnd): void {
    this.recorder.emit({
      type: "end", id: this.id, ok: e.ok, ...(e.error ? { error: e.error } : {}), totalTimeMs: e.totalTimeMs, downtimeMs: e.downtimeMs,
      iterations: e.iterations, pages: { ...emptyPages(), ...e.pages }, transferredBytes: e.transferredBytes, baselineBytes: this.baselineBytes,
      ...(e.verified !== undefined ? { verified: e.verified } : {}), ...(e.convergence ? { convergence: e.convergence } : {}),
      ...(e.stats ? { stats: e.stats } : {}), ...(e.qemu ? { qemu: e.qemu } : {}),
    });
  }
}
