// How much of QEMU's stream stream-out lets in: only as much as keeps the
// link busy. QEMU decides when to stop the guest from the rate at which its
// socket takes the stream; if stream-out read ahead of the link, that rate
// would be the local socket's and QEMU would stop the guest with seconds of
// link time still queued here. So the queue toward the link (what the link's
// socket has not yet taken into the kernel) may hold only `queueMs` of the
// link's rate; above that QEMU's socket is not read until the queue drains,
// and QEMU then measures the rate of the deduplicated, compressed link. The
// replay window (pages kept for resends) is a separate limit.

import type { Socket } from "node:net";
import type { LinkMeter } from "../link/rate.js";
import { SEND_QUEUE_BYTES } from "../link/channel.js";

export interface PacerOptions {
  /** Link time the queue may hold, ms (default 5). */
  queueMs?: number;
  /** The link's rate if known, bytes/s (0: measured by `meter`). */
  bandwidth?: number;
  /** Bounds of the queue, bytes (defaults 64 KiB and SEND_QUEUE_BYTES). */
  minBytes?: number;
  maxBytes?: number;
}

/** Queue limit until the meter has timed the link (about 2 ms of a 1 Gbit/s link). */
const UNMEASURED_BYTES = 256 * 1024;

export class LinkPacer {
  readonly queueMs: number;
  private readonly bandwidth: number;
  private readonly minBytes: number;
  private readonly maxBytes: number;

  constructor(private readonly meter: LinkMeter, o: PacerOptions = {}) {
    this.queueMs = o.queueMs ?? 5;
    this.bandwidth = o.bandwidth ?? 0;
    this.minBytes = o.minBytes ?? 64 * 1024;
    this.maxBytes = o.maxBytes ?? SEND_QUEUE_BYTES;
  }

  /** Bytes the queue toward the link may hold before QEMU's socket waits. */
  get limit(): number {
    const rate = this.bandwidth > 0 ? this.bandwidth : this.meter.measured;
    const bytes = rate > 0 ? (rate * this.queueMs) / 1000 : UNMEASURED_BYTES;
    return Math.min(this.maxBytes, Math.max(this.minBytes, Math.round(bytes)));
  }

  /** True when `link` holds more than the limit: stop reading QEMU's socket and wait(). */
  over(link: Socket): boolean {
    return link.writableLength > this.limit;
  }

  /** Waits until the link's socket has taken its queue, timing the link on the way. */
  wait(link: Socket): Promise<void> {
    return this.meter.drain(link);
  }
}
