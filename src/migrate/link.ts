// A framed, rate-limited connection between the agents. Frames to send wait
// in a queue that a pump feeds to the socket as the token bucket (the link's
// bandwidth) and socket backpressure allow, so that the sender reads, hashes
// and compresses the next frames while the link carries these; send() waits
// only when the queue is full. Reads come out as whole frames in order. A
// closed or failed socket rejects every waiter with a message that says which
// side and what happened.

import type { Socket } from "node:net";
import { FrameReader, FrameType, ProtocolError, encodeJson, type Frame } from "./protocol.js";

/** The reason an Abort frame gives (it may be garbled: the link is failing). */
function abortReason(f: Frame): string {
  try {
    const r = JSON.parse(Buffer.from(f.payload).toString("utf8")).reason;
    return typeof r === "string" ? r : "no reason given";
  } catch {
    return "no reason given";
  }
}

export class LinkClosedError extends Error {
  override name = "LinkClosedError";
}

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

/** Bytes of frames queued for the link before send() waits (about 30 ms of a 1 Gbit/s link). */
export const SEND_QUEUE_BYTES = 4 * 1024 * 1024;

export class FrameLink {
  private readonly reader = new FrameReader();
  private readonly queue: Frame[] = [];
  private waiters: { resolve: (f: Frame) => void; reject: (e: Error) => void }[] = [];
  private failure: Error | null = null;
  private corrupt = false;
  private aborting = false;
  /** Frames accepted by send() and not yet written to the socket. */
  private readonly outbox: Uint8Array[] = [];
  private outboxBytes = 0;
  private pumping = false;
  private ending = false;
  /** Woken when the outbox has room again, empties, or the link fails. */
  private roomWaiters: (() => void)[] = [];
  /** Bytes accepted by send(), queued ones included. */
  bytesOut = 0;
  /** Bytes handed to the socket (what the link has carried, or holds in its buffers). */
  bytesWritten = 0;
  bytesIn = 0;

  constructor(readonly socket: Socket, readonly peer: string, private readonly limiter = new RateLimiter(0),
    private readonly queueBytes = SEND_QUEUE_BYTES) {
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => {
      this.bytesIn += chunk.length;
      if (this.corrupt || this.aborting) return;
      let frames: Frame[];
      try {
        frames = this.reader.push(chunk);
      } catch (err) {
        // a corrupt stream: stop reading frames; the owner tells the peer why (abort) and closes
        this.corrupt = true;
        this.fail(err as Error);
        return;
      }
      for (const f of frames) {
        if (f.type === FrameType.Abort && this.waiters.length === 0) {
          // the peer gave up while we were sending: keep its reason for the next send or wait
          this.fail(new ProtocolError(`${this.peer} aborted the migration: ${abortReason(f)}`));
          continue;
        }
        const w = this.waiters.shift();
        if (w) w.resolve(f);
        else this.queue.push(f);
      }
    });
    socket.on("error", (err) => this.fail(new LinkClosedError(`connection to ${peer} failed: ${err.message}`)));
    socket.on("close", () => this.fail(new LinkClosedError(`connection to ${peer} closed${this.reader.pending ? ` in the middle of a frame (${this.reader.pending} bytes pending)` : ""}`)));
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const w of this.waiters) w.reject(err);
    this.waiters = [];
    this.outbox.length = 0;
    this.outboxBytes = 0;
    this.wakeRoom();
  }

  private wakeRoom(): void {
    const ws = this.roomWaiters;
    this.roomWaiters = [];
    for (const w of ws) w();
  }

  get failed(): Error | null {
    return this.failure;
  }

  /**
   * Queues a frame for the link; waits only while the queue holds more than
   * its limit (the frame must not change afterwards: it is written later).
   */
  async send(buf: Uint8Array): Promise<void> {
    if (this.failure) throw this.failure;
    this.bytesOut += buf.length;
    this.outbox.push(buf);
    this.outboxBytes += buf.length;
    if (!this.pumping) void this.pump();
    while (this.outboxBytes > this.queueBytes && !this.failure) await new Promise<void>((r) => this.roomWaiters.push(r));
    if (this.failure) throw this.failure;
  }

  /** Resolves when every queued frame is on the socket (rejects if the link failed first). */
  async flush(): Promise<void> {
    while ((this.pumping || this.outbox.length) && !this.failure) await new Promise<void>((r) => this.roomWaiters.push(r));
    if (this.failure) throw this.failure;
  }

  private async pump(): Promise<void> {
    this.pumping = true;
    try {
      while (this.outbox.length && !this.failure) {
        const buf = this.outbox[0]!;
        await this.limiter.take(buf.length);
        if (this.failure) break;
        this.outbox.shift();
        this.outboxBytes -= buf.length;
        this.bytesWritten += buf.length;
        if (this.outboxBytes <= this.queueBytes) this.wakeRoom();
        if (!this.socket.write(buf)) await drained(this.socket);
      }
    } finally {
      this.pumping = false;
      this.wakeRoom();
      if (this.ending && !this.failure) this.socket.end();
    }
  }

  /** The next frame; with `expect`, anything else (but Abort, reported as such) is a protocol error. */
  async next(expect?: FrameType, timeoutMs = 0): Promise<Frame> {
    let f: Frame;
    const q = this.queue.shift();
    if (q) f = q;
    else {
      if (this.failure) throw this.failure;
      f = await new Promise<Frame>((resolve, reject) => {
        let timer: NodeJS.Timeout | undefined;
        const w = {
          resolve: (x: Frame) => { clearTimeout(timer); resolve(x); },
          reject: (e: Error) => { clearTimeout(timer); reject(e); },
        };
        this.waiters.push(w);
        if (timeoutMs > 0) {
          timer = setTimeout(() => {
            this.waiters = this.waiters.filter((x) => x !== w);
            reject(new LinkClosedError(`no answer from ${this.peer} within ${timeoutMs} ms`));
          }, timeoutMs);
        }
      });
    }
    if (f.type === FrameType.Abort && expect !== FrameType.Abort) {
      throw new ProtocolError(`${this.peer} aborted the migration: ${abortReason(f)}`);
    }
    if (expect !== undefined && f.type !== expect) {
      throw new ProtocolError(`expected a ${FrameType[expect]} frame from ${this.peer}, got ${FrameType[f.type] ?? f.type}`);
    }
    return f;
  }

  /** Frames already received and not yet taken (non-blocking). */
  poll(): Frame | undefined {
    return this.queue.shift();
  }

  /** Half-closes the socket once the queued frames are written. */
  close(): void {
    if (this.pumping) this.ending = true;
    else this.socket.end();
  }

  /**
   * Ends the migration from this side: tells the peer why (an Abort frame,
   * when the socket can still write), then half-closes and keeps draining
   * what the peer still sends for a moment, so that the peer reads the reason
   * instead of a reset; the socket is destroyed after `lingerMs`.
   */
  abort(reason: string, lingerMs = 2000): void {
    if (this.aborting) return;
    this.aborting = true;
    this.fail(new ProtocolError(`migration aborted here: ${reason}`));
    const s = this.socket;
    if (!s.destroyed && s.writable) {
      s.write(encodeJson(FrameType.Abort, { reason }));
      s.end();
      s.resume();
      setTimeout(() => s.destroy(), lingerMs).unref();
    } else s.destroy();
  }

  destroy(): void {
    this.socket.destroy();
  }
}
