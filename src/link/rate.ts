// The link's bandwidth limit (a token bucket), waiting for a socket's drain,
// and the link's rate as measured from those waits (both modes).

import type { Socket } from "node:net";

export class RateLimiter {
  private tokens: number;
  private last = performance.now();
  private readonly burst: number;

  /** bytesPerSecond <= 0 or Infinity: no limit. */
  constructor(readonly bytesPerSecond: number) {
    // 50 ms of tokens: the pump shares its thread with reading, hashing and
    // compressing, and a shorter bucket lost the link's time whenever that
    // work held the thread for longer (the average rate is the same)
    this.burst = Math.max(256 * 1024, bytesPerSecond / 20);
    this.tokens = this.burst;
  }

  async take(bytes: number): Promise<void> {
    if (!(this.bytesPerSecond > 0) || !Number.isFinite(this.bytesPerSecond)) return;
    for (;;) {
      const now = performance.now();
      this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
      this.last = now;
      if (this.tokens >= Math.min(bytes, this.burst)) {
        this.tokens -= bytes; // may go negative for frames larger than the burst: repaid before the next
        return;
      }
      const waitMs = ((Math.min(bytes, this.burst) - this.tokens) / this.bytesPerSecond) * 1000;
      await new Promise((r) => setTimeout(r, Math.max(1, waitMs)));
    }
  }
}

/** Resolves on the socket's 'drain', or at once when it needs none or is closed (also on 'close'). */
export function drained(sock: Socket): Promise<void> {
  if (sock.destroyed || !sock.writableNeedDrain) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { sock.off("drain", done); sock.off("close", done); resolve(); };
    sock.on("drain", done);
    sock.on("close", done);
  });
}

/**
 * The link's rate, measured where the sender waits for it: a socket whose
 * write() said "full" held `writableLength` bytes, and the link carried them
 * in the time until 'drain', busy all along. A link the sender never waits
 * for is not the bottleneck: its rate reads Infinity until 4 MiB were timed.
 */
/** A link's rate as the compression policy reads it (LinkMeter; in a worker, the session's last reading of one). */
export interface LinkRates {
  /** Bytes per second, for decisions (Infinity: not measured enough). */
  readonly rate: number;
  /** Bytes per second over what was timed (0: nothing), for the stats. */
  readonly measured: number;
  record(bytes: number, ms: number): void;
}

export class LinkMeter implements LinkRates {
  private bytes = 0;
  private ms = 0;

  /** Waits for `sock` to drain, timing what its backlog took. */
  async drain(sock: Socket): Promise<void> {
    const backlog = sock.writableLength;
    const t = performance.now();
    await drained(sock);
    if (backlog > 0 && !sock.destroyed) this.record(backlog, performance.now() - t);
  }

  /** The link carried `bytes` in `ms` while busy all along. */
  record(bytes: number, ms: number): void {
    // a sliding estimate: halve the history now and then so that it follows changes
    if (this.bytes > 64 << 20) {
      this.bytes /= 2;
      this.ms /= 2;
    }
    this.bytes += bytes;
    this.ms += ms;
  }

  /** Bytes per second, for decisions (Infinity: fewer than 4 MiB timed). */
  get rate(): number {
    return this.bytes >= 4 << 20 ? this.measured : Infinity;
  }

  /** Bytes per second over what was timed (0: nothing), for the stats. */
  get measured(): number {
    return this.bytes > 0 ? this.bytes / Math.max(this.ms / 1000, 1e-6) : 0;
  }
}
