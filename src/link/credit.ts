// Credit-based flow control's bookkeeping, for any link whose receiver
// acknowledges running totals (CREDIT frames): what was sent, what came back,
// the round trip, and the peak rate at which credits came. stream-out's pacer
// (stream/pacer.ts) limits what it lets in by it; agent mode (agent/acks.ts)
// only samples the link's rate from it.

/** Sends are dated in steps of this many ms: a credit's round trip is timed from the step its last byte went out in. */
const STEP_MS = 1;
/** The round trip is the least of this epoch's and the one's before, ms: it follows a slower way within seconds. */
const RTT_EPOCH_MS = 2000;
/** Round trips each window holds beyond queueMs (why: stream/pacer.ts). */
const RTT_GAIN = 2;

/**
 * From sending a byte to the receiver crediting it, ms: the least over the last 2-4 s of samples (0 until timed).
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

  /** The receiver credited a running total of `total`. */
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

export interface Bounds { min: number; max: number; unmeasured: number }

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

  constructor(private readonly b: Bounds, private readonly queueMs: number, private readonly rate = 0, private readonly clock = () => performance.now(),
    private readonly peer = "the receiver") {}

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
      return `${this.peer} credited ${total} ${what}, outside ${this.credited}..${this.sent} (what it had credited, what was sent)`;
    }
    const now = this.clock();
    this.rtt.credit(total, now);
    let sample: { bytes: number; ms: number } | null = null;
    // what this credit covers was already sent at the previous one: the way to the receiver was never empty meanwhile
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

/** A receiver waiting for the link less than this share of the time is itself what limits the transfer. */
export const RECEIVER_BUSY_SHARE = 0.1;

/**
 * How much of its time the receiver spent waiting for the link, from the
 * running totals its credits carry (both on its own clock), over samples of
 * at least SAMPLE_MS. A receiver that seldom waits is the bottleneck: the
 * link (and the sender) deliver faster than it hands on.
 */
export class ReceiverWait {
  /** The last sample's share of time waited, 0..1 (-1: no sample yet). */
  share = -1;
  private waitMs = -1;
  private clockMs = 0;
  private sampleWaitMs = 0;
  private sampleMs = 0;

  /** A credit's running totals: ms the receiver waited for the link, and ms on its clock, since the session began. */
  record(waitMs: number, clockMs: number): void {
    if (this.waitMs >= 0 && clockMs >= this.clockMs) {
      this.sampleWaitMs += Math.max(0, waitMs - this.waitMs);
      this.sampleMs += clockMs - this.clockMs;
      if (this.sampleMs >= SAMPLE_MS) {
        this.share = Math.min(1, this.sampleWaitMs / this.sampleMs);
        this.sampleWaitMs = this.sampleMs = 0;
      }
    }
    this.waitMs = waitMs;
    this.clockMs = clockMs;
  }

  /** The last sample found the receiver busy nearly all along. */
  get busy(): boolean {
    return this.share >= 0 && this.share < RECEIVER_BUSY_SHARE;
  }
}
