// How much of QEMU's stream stream-out lets in: only as much as keeps the
// link busy. QEMU decides when to stop the guest from the rate at which its
// socket takes the stream; if stream-out read ahead of the link, that rate
// would be the local socket's and QEMU would stop the guest with much link
// time still queued. Every buffer between stream-out and the destination QEMU
// hides link time: stream-out's own queue, the kernel's socket buffers at both
// ends (MBs on TCP), the link's queue (a router's, tc's), stream-in's queue.
// So stream-in acknowledges what it has handed on to its QEMU (CREDIT): the
// bytes of stream-out's frames, and the bytes of QEMU's stream they rebuilt
// to. stream-out lets QEMU's socket be read only while what it sent beyond
// that holds at most `queueMs` of the rate at which each is handed on (with
// floors that keep a busy link full across the credit's round trip). Both
// count: a few KB of references on the link are MBs of pages for stream-in to
// read from the NAS and for the destination QEMU to load. QEMU then measures
// the rate of the whole way, deduplicated and compressed. The replay window
// (pages kept for resends) is a separate limit.
//
// A window of `queueMs` of the rate alone would limit the rate itself once the
// credit's round trip is longer than queueMs (a busy host schedules each
// process in the way late: tens of ms): the rate measured would be the
// window over the round trip, and the window would shrink with it. So each
// window also holds the round trip (its least over the last seconds, timed
// from sending a byte to its credit), twice: what keeps the way full, and room
// for the rate to show above a noisy round trip, as BBR does (its cwnd gain of
// 2). What waits beyond the way is then queueMs of the rate plus one round
// trip, at worst. The round trip is timed only on bytes sent while no more
// than the window's floor was on its way, so never behind a queue the window
// built itself.

import type { LinkMeter } from "../link/rate.js";

export interface PacerOptions {
  /** Time that may be on its way beyond what stream-in handed on and two round trips, ms (default 10). */
  queueMs?: number;
  /** The link's rate if known, bytes/s (0: measured from the credits). */
  bandwidth?: number;
  /** Bounds of the link bytes on their way (defaults 512 KiB and 16 MiB). */
  minBytes?: number;
  maxBytes?: number;
  /** The clock, ms (default performance.now). */
  clock?: () => number;
}

/** Sends are dated in steps of this many ms: a credit's round trip is timed from the step its last byte went out in. */
const STEP_MS = 1;
/** The round trip is the least of this epoch's and the one's before, ms: it follows a slower way within seconds. */
const RTT_EPOCH_MS = 2000;
/** Round trips each window holds beyond queueMs (see the top). */
const RTT_GAIN = 2;

/**
 * From sending a byte to stream-in crediting it, ms: the least over the last 2-4 s of samples (0 until timed).
 * Only bytes sent while little was on its way are timed: a round trip timed behind a queue the window itself
 * built would widen the window, and so the queue, without end.
 */
export class RoundTrip {
  /** Per step of sends: the running total sent by its end, its first send's time, whether it went out behind little. */
  private readonly totals: number[] = [];
  private readonly times: number[] = [];
  private readonly clean: boolean[] = [];
  private head = 0;
  private credited = 0;
  private least = Infinity;
  private before = Infinity;
  private epochAt = -Infinity;

  get ms(): number {
    const m = Math.min(this.least, this.before);
    return Number.isFinite(m) ? m : 0;
  }

  /** The running total sent is `total` now; `clean`: it went out behind little (its round trip is the way's own). */
  sent(total: number, now: number, clean: boolean): void {
    const n = this.times.length;
    if (n > this.head && this.clean[n - 1] === clean && now - this.times[n - 1]! < STEP_MS) this.totals[n - 1] = total;
    else { this.totals.push(total); this.times.push(now); this.clean.push(clean); }
  }

  /** stream-in credited a running total of `total`. */
  credit(total: number, now: number): void {
    if (total <= this.credited) return;
    this.credited = total;
    // the step whose sends took the running total to `total` or past it holds the last byte credited
    while (this.head < this.totals.length && this.totals[this.head]! < total) this.head++;
    if (this.head < this.totals.length && this.clean[this.head]) this.sample(now - this.times[this.head]!, now);
    if (this.head < this.totals.length && this.totals[this.head] === total) this.head++;
    if (this.head > 1024 && this.head * 2 > this.totals.length) {
      for (const a of [this.totals, this.times, this.clean]) a.splice(0, this.head);
      this.head = 0;
    }
  }

  private sample(ms: number, now: number): void {
    if (now - this.epochAt >= RTT_EPOCH_MS) {
      this.before = this.least;
      this.least = Infinity;
      this.epochAt = now;
    }
    this.least = Math.min(this.least, ms);
  }
}

/** Credits gathered into one rate sample, ms: a busy event loop delays credits by ms, and a burst of late ones must not read as a fast link. */
const SAMPLE_MS = 100;
/** Each sample lets the peak rate fall by this much: it follows a slower link within a few seconds. */
const PEAK_DECAY = 0.95;

interface Bounds { min: number; max: number; unmeasured: number }

/** One running total sent and its running total credited back, with the peak rate at which credits came. */
export class CreditWindow {
  sent = 0;
  credited = 0;
  readonly rtt = new RoundTrip();
  /** Highest rate sampled (a window that limits the rate would otherwise shrink itself). */
  private peak = 0;
  private sampleBytes = 0;
  private sampleMs = 0;
  private lastCreditAt = 0;
  private sentAtCredit = 0;

  constructor(private readonly b: Bounds, private readonly queueMs: number, private readonly rate = 0, private readonly clock = () => performance.now()) {}

  get outstanding(): number {
    return this.sent - this.credited;
  }

  get limit(): number {
    const rate = this.rate > 0 ? this.rate : this.peak;
    const bytes = rate > 0 ? (rate * (this.queueMs + RTT_GAIN * this.rtt.ms)) / 1000 : this.b.unmeasured;
    return Math.min(this.b.max, Math.max(this.b.min, Math.round(bytes)));
  }

  over(): boolean {
    return this.outstanding > this.limit;
  }

  /** `bytes` more were sent. */
  add(bytes: number): void {
    // with no more than the floor on its way, itself included: its round trip is the way's own
    const clean = this.outstanding + bytes <= this.b.min;
    this.sent += bytes;
    this.rtt.sent(this.sent, this.clock(), clean);
  }

  /** A new running total credited: an error message when it cannot be one; else the sample it gave (bytes in ms), if any. */
  credit(total: number, what: string): string | { bytes: number; ms: number } | null {
    if (!(total >= this.credited && total <= this.sent)) {
      return `stream-in credited ${total} ${what}, outside ${this.credited}..${this.sent} (what it had credited, what was sent)`;
    }
    const now = this.clock();
    this.rtt.credit(total, now);
    let sample: { bytes: number; ms: number } | null = null;
    // what this credit covers was already sent at the previous one: the way to stream-in was never empty meanwhile
    if (this.lastCreditAt > 0 && this.sentAtCredit >= total) sample = this.sample(total - this.credited, now - this.lastCreditAt);
    else this.sampleBytes = this.sampleMs = 0;
    this.credited = total;
    this.lastCreditAt = now;
    this.sentAtCredit = this.sent;
    return sample;
  }

  private sample(bytes: number, ms: number): { bytes: number; ms: number } {
    this.sampleBytes += bytes;
    this.sampleMs += ms;
    if (this.sampleMs >= SAMPLE_MS) {
      this.peak = Math.max(this.sampleBytes / (this.sampleMs / 1000), this.peak * PEAK_DECAY);
      this.sampleBytes = this.sampleMs = 0;
    }
    return { bytes, ms };
  }
}

export class LinkPacer {
  readonly queueMs: number;
  /** Bytes of frames on the link, and of QEMU's stream taken from the source QEMU. */
  private readonly link: CreditWindow;
  private readonly stream: CreditWindow;
  private waiter: (() => void) | null = null;
  private closed = false;

  constructor(private readonly meter: LinkMeter, o: PacerOptions = {}) {
    this.queueMs = o.queueMs ?? 10;
    const clock = o.clock ?? (() => performance.now());
    this.link = new CreditWindow({ min: o.minBytes ?? 512 * 1024, max: o.maxBytes ?? 16 << 20, unmeasured: 2 << 20 }, this.queueMs, o.bandwidth ?? 0, clock);
    // stream-in's queue alone holds 4 MiB of the rebuilt stream: a smaller floor would starve it
    this.stream = new CreditWindow({ min: 4 << 20, max: 64 << 20, unmeasured: 8 << 20 }, this.queueMs, 0, clock);
  }

  /** Link bytes that may be on their way beyond the credit before QEMU's socket waits. */
  get limit(): number {
    return this.link.limit;
  }

  /** Bytes of QEMU's stream that may be taken beyond what stream-in handed its QEMU. */
  get streamLimit(): number {
    return this.stream.limit;
  }

  /** Link bytes sent, not yet handed on by stream-in. */
  get outstanding(): number {
    return this.link.outstanding;
  }

  /** `bytes` more went to the link. */
  onSent(bytes: number): void {
    this.link.add(bytes);
  }

  /** `bytes` more of QEMU's stream were taken from the source QEMU. */
  onTaken(bytes: number): void {
    this.stream.add(bytes);
  }

  /** True when more than a limit is on its way: stop reading QEMU's socket and wait(). */
  over(): boolean {
    return this.link.over() || this.stream.over();
  }

  /** stream-in's CREDIT (running totals); an error message when it cannot be one. */
  credit(linkBytes: number, streamBytes: number): string | null {
    const l = this.link.credit(linkBytes, "link bytes");
    if (typeof l === "string") return l;
    const s = this.stream.credit(streamBytes, "bytes of QEMU's stream");
    if (typeof s === "string") return s;
    // the link's rate (or what is beyond it, whichever is slowest), for the compression policy
    if (l) this.meter.record(l.bytes, l.ms);
    if (!this.over()) this.wake();
    return null;
  }

  /** Resolves once what is on its way is back within the limits, or close() was called. */
  wait(): Promise<void> {
    // a wait chained before the session failed may only start after close()
    if (this.closed || !this.over()) return Promise.resolve();
    return new Promise((r) => { this.waiter = r; });
  }

  /** The session ended: nothing waits any longer. */
  close(): void {
    this.closed = true;
    this.wake();
  }

  private wake(): void {
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(); }
  }
}
