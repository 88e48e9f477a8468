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
import { CreditWindow } from "../link/credit.js";

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
    this.link = new CreditWindow({ min: o.minBytes ?? 512 * 1024, max: o.maxBytes ?? 16 << 20, unmeasured: 2 << 20 }, this.queueMs, o.bandwidth ?? 0, clock, "stream-in");
    // stream-in's queue alone holds 4 MiB of the rebuilt stream: a smaller floor would starve it
    this.stream = new CreditWindow({ min: 4 << 20, max: 64 << 20, unmeasured: 8 << 20 }, this.queueMs, 0, clock, "stream-in");
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
