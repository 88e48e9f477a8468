// How much of QEMU's stream stream-out lets in: only as much as keeps the
// link busy. QEMU decides when to stop the guest from the rate at which its
// socket takes the stream; if stream-out read ahead of the link, that rate
// would be the local socket's and QEMU would stop the guest with much link
// time still queued. Every buffer between stream-out and the destination QEMU
// hides link time: stream-out's own queue, the kernel's socket buffers at both
// ends (MBs on TCP), the link's queue (a router's, tc's), stream-in's queue.
// So stream-in acknowledges the bytes of stream-out's frames it has handed on
// to its QEMU (CREDIT), and stream-out lets QEMU's socket be read only while
// what it sent beyond that holds at most `queueMs` of the link's rate (with a
// floor that keeps a busy link full across the credit's round trip). QEMU
// then measures the rate of the deduplicated, compressed link, end to end.
// The replay window (pages kept for resends) is a separate limit.

import type { LinkMeter } from "../link/rate.js";

export interface PacerOptions {
  /** Link time that may be on its way beyond what stream-in handed on, ms (default 10). */
  queueMs?: number;
  /** The link's rate if known, bytes/s (0: measured from the credits). */
  bandwidth?: number;
  /** Bounds of what may be on its way, bytes (defaults 512 KiB and 16 MiB). */
  minBytes?: number;
  maxBytes?: number;
}

/** What may be on its way until the link's rate has been measured. */
const UNMEASURED_BYTES = 2 * 1024 * 1024;
/** Credits gathered into one rate sample, ms: a busy event loop delays credits by ms, and a burst of late ones must not read as a fast link. */
const SAMPLE_MS = 100;
/** Each sample lets the peak rate fall by this much: it follows a slower link within a few seconds. */
const PEAK_DECAY = 0.95;

export class LinkPacer {
  readonly queueMs: number;
  private readonly bandwidth: number;
  private readonly minBytes: number;
  private readonly maxBytes: number;
  /** Bytes of frames written to the link, and how many of them stream-in has handed on. */
  private sent = 0;
  private credited = 0;
  /** Highest rate sampled while the window was full (a window that limits the rate would otherwise shrink itself). */
  private peak = 0;
  private sampleBytes = 0;
  private sampleMs = 0;
  private lastCreditAt = 0;
  private sentAtCredit = 0;
  private waiter: (() => void) | null = null;

  constructor(private readonly meter: LinkMeter, o: PacerOptions = {}) {
    this.queueMs = o.queueMs ?? 10;
    this.bandwidth = o.bandwidth ?? 0;
    this.minBytes = o.minBytes ?? 512 * 1024;
    this.maxBytes = o.maxBytes ?? 16 * 1024 * 1024;
  }

  /** Bytes that may be on their way beyond the credit before QEMU's socket waits. */
  get limit(): number {
    const rate = this.bandwidth > 0 ? this.bandwidth : this.peak;
    const bytes = rate > 0 ? (rate * this.queueMs) / 1000 : UNMEASURED_BYTES;
    return Math.min(this.maxBytes, Math.max(this.minBytes, Math.round(bytes)));
  }

  /** Sent, not yet handed on by stream-in. */
  get outstanding(): number {
    return this.sent - this.credited;
  }

  /** `bytes` more went to the link. */
  onSent(bytes: number): void {
    this.sent += bytes;
  }

  /** True when more than the limit is on its way: stop reading QEMU's socket and wait(). */
  over(): boolean {
    return this.outstanding > this.limit;
  }

  /** stream-in's CREDIT (a running total); an error message when it cannot be one. */
  credit(total: number): string | null {
    if (!(total >= this.credited && total <= this.sent)) {
      return `stream-in credited ${total} bytes, outside ${this.credited}..${this.sent} (what it had credited, what was sent)`;
    }
    const now = performance.now();
    // what this credit covers was already sent at the previous one: the way to stream-in was never empty meanwhile
    if (this.lastCreditAt > 0 && this.sentAtCredit >= total) this.sample(total - this.credited, now - this.lastCreditAt);
    else this.sampleBytes = this.sampleMs = 0;
    this.credited = total;
    this.lastCreditAt = now;
    this.sentAtCredit = this.sent;
    if (!this.over()) this.wake();
    return null;
  }

  /** Resolves once what is on its way is back within the limit, or close() was called. */
  wait(): Promise<void> {
    if (!this.over()) return Promise.resolve();
    return new Promise((r) => { this.waiter = r; });
  }

  /** The session ended: nothing waits any longer. */
  close(): void {
    this.wake();
  }

  private wake(): void {
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(); }
  }

  // The link (or stream-in, or its QEMU: whichever is slowest) carried these bytes in that time.
  private sample(bytes: number, ms: number): void {
    this.meter.record(bytes, ms);
    this.sampleBytes += bytes;
    this.sampleMs += ms;
    if (this.sampleMs < SAMPLE_MS) return;
    const rate = this.sampleBytes / Math.max(this.sampleMs / 1000, 1e-6);
    this.peak = Math.max(rate, this.peak * PEAK_DECAY);
    this.sampleBytes = this.sampleMs = 0;
  }
}
