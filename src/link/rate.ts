// The link's bandwidth limit (a token bucket) and waiting for a socket's drain.

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
