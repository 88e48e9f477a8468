// When to stop pre-copy: QEMU's rule (the remaining work fits the downtime
// target at the measured bandwidth) with Xen's caps (iterations, bytes sent
// as a multiple of RAM).

export interface ConvergenceOptions {
  /** Downtime target in ms (QEMU's downtime-limit default: 300). */
  downtimeMs?: number;
  /** Most pre-copy iterations before switching over anyway (Xen: 29-30). */
  maxIterations?: number;
  /** Most bytes sent, as a multiple of RAM size, before switching over anyway (Xen: 3). */
  maxSentFactor?: number;
  /** What to do at a cap: switch over anyway (as Xen) or abort, leaving the source running. */
  onCap?: "switchover" | "abort";
}

export type ConvergenceDecision =
  | { action: "continue" }
  | { action: "switchover"; reason: "converged" | CapReason; expectedDowntimeMs: number }
  | { action: "abort"; reason: CapReason; expectedDowntimeMs: number };

/** Why pre-copy stopped without converging: the caps, or no progress (another round would not shorten the downtime). */
export type CapReason = "max-iterations" | "max-traffic" | "no-progress";

export interface IterationMeasure {
  iteration: number;
  /** Bytes the last iteration put on the wire. */
  wireBytes: number;
  /** Time the last iteration took to scan (read + hash + plan) all of RAM, ms. */
  scanMs: number;
  /** Bandwidth measured so far, bytes per second. */
  bytesPerSecond: number;
  /**
   * Bytes the next round is expected to send, from a sample of RAM: after the
   * first round, whose wireBytes are all of RAM and say nothing about the
   * dirty rate. Given, it stands in for wireBytes and allows switching over
   * after the first round.
   */
  nextRoundBytes?: number;
  /** Bytes sent so far in all. */
  totalBytes: number;
  ramBytes: number;
}

/** Decides after each pre-copy iteration whether to go on, switch over or abort (see decide()). */
export class ConvergencePolicy {
  readonly downtimeMs: number;
  readonly maxIterations: number;
  readonly maxSentFactor: number;
  readonly onCap: "switchover" | "abort";

  constructor(o: ConvergenceOptions = {}) {
    this.downtimeMs = o.downtimeMs ?? 300;
    this.maxIterations = o.maxIterations ?? 30;
    this.maxSentFactor = o.maxSentFactor ?? 3;
    this.onCap = o.onCap ?? "switchover";
    if (!(this.downtimeMs > 0) || !(this.maxIterations >= 1) || !(this.maxSentFactor > 0)) {
      throw new RangeError("pagetwin: downtime, iteration cap and traffic cap must be positive");
    }
  }

  /**
   * The final round re-scans all of RAM with the guest stopped and sends what
   * was dirtied meanwhile, which the last iteration estimates.
   */
  expectedDowntimeMs(m: IterationMeasure): number {
    const bytes = m.nextRoundBytes ?? m.wireBytes;
    return m.scanMs + (m.bytesPerSecond > 0 ? (bytes / m.bytesPerSecond) * 1000 : Infinity);
  }

  private best = Infinity;
  private stale = 0;

  /**
   * Call once per finished iteration, in order. Besides the target and the
   * caps, it stops when three rounds in a row did not bring the expected
   * downtime below 90% of the best so far: the scan of RAM alone, or a guest
   * dirtying as fast as the link, keeps it there, and more rounds only cost.
   */
  decide(m: IterationMeasure): ConvergenceDecision {
    const expected = this.expectedDowntimeMs(m);
    if ((m.iteration >= 2 || m.nextRoundBytes !== undefined) && expected <= this.downtimeMs) return { action: "switchover", reason: "converged", expectedDowntimeMs: expected };
    if (m.iteration >= 2) {
      if (expected < 0.9 * this.best) this.stale = 0;
      else this.stale++;
    }
    this.best = Math.min(this.best, expected);
    const cap: CapReason | null = m.iteration >= this.maxIterations ? "max-iterations"
      : m.totalBytes >= this.maxSentFactor * m.ramBytes ? "max-traffic"
      : this.stale >= 3 ? "no-progress" : null;
    if (cap) return this.onCap === "abort" ? { action: "abort", reason: cap, expectedDowntimeMs: expected } : { action: "switchover", reason: cap, expectedDowntimeMs: expected };
    return { action: "continue" };
  }
}
