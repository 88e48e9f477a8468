// A framed, rate-limited connection between two pagetwin peers. Frames to send wait
// in a queue that a pump feeds to the socket as the token bucket (the link's
// bandwidth) and socket backpressure allow, so that the sender reads, hashes
// and compresses the next frames while the link carries these; send() waits
// only when the queue is full. Reads come out as whole frames in order. A
// closed or failed socket rejects every waiter with a message that says which
// side and what happened.

import type { Socket } from "node:net";
import { Control, FrameReader, HANDSHAKE_FRAME_MAX, ProtocolError, abortReason, jsonFrame, type Frame, type ReaderOptions } from "../wire/envelope.js";
import { LinkClosedError } from "./dial.js";
import { LinkMeter, RateLimiter, drained } from "./rate.js";
import { readChunks } from "./read-buffer.js";
import { TIMEOUTS } from "./timeouts.js";

export { LinkClosedError, RateLimiter, drained };

/** Bytes queued for a socket before the producer waits (about 30 ms of a 1 Gbit/s link): both modes. */
export const SEND_QUEUE_BYTES = 4 * 1024 * 1024;
/**
 * Bytes of frames read and not yet taken by next() before the socket stops
 * being read (the kernel's buffers and TCP's window hold the rest): a
 * receiver slower than its link keeps a few frames in memory, not the link's
 * backlog, and its frame buffers are used again instead of made afresh.
 */
export const RECEIVE_QUEUE_BYTES = 4 * 1024 * 1024;

/** A mode's frames: how the reader checks them and what they are called in messages. */
export interface FrameSet extends ReaderOptions {
  name: (type: number) => string;
}

export class FrameLink {
  private readonly reader: FrameReader;
  private readonly queue: Frame[] = [];
  /** Payload bytes in `queue`, and whether this link paused the socket for them. */
  private queuedBytes = 0;
  private readPaused = false;
  private waiters: { resolve: (f: Frame) => void; reject: (e: Error) => void }[] = [];
  private failure: Error | null = null;
  private corrupt = false;
  private aborting = false;
  /** Frames accepted by send() and not yet written to the socket, each with what to call once it is written. */
  private readonly outbox: Uint8Array[] = [];
  private readonly onWritten: ((() => void) | undefined)[] = [];
  private outboxBytes = 0;
  private pumping = false;
  private ending = false;
  /** Frame types handled as they arrive (onFrame), never queued for next(). */
  private readonly handlers = new Map<number, (f: Frame) => void>();
  /** Woken when the outbox has room again, empties, or the link fails. */
  private roomWaiters: (() => void)[] = [];
  /** Bytes accepted by send(), queued ones included. */
  bytesOut = 0;
  /** Bytes handed to the socket (what the link has carried, or holds in its buffers). */
  bytesWritten = 0;
  bytesIn = 0;
  /** The link's rate, timed on the pump's waits for the socket to drain (compression weighs it). */
  readonly meter = new LinkMeter();

  constructor(readonly socket: Socket, readonly peer: string, private readonly frames: FrameSet, private readonly limiter = new RateLimiter(0),
    private readonly queueBytes = SEND_QUEUE_BYTES) {
    // until the handshake is over the peer may send only small frames; reads land in one reused
    // buffer (read-buffer.ts), each frame copied out of it into memory of its own as its bytes come
    const opts = { ...frames, handshakeMax: HANDSHAKE_FRAME_MAX };
    this.reader = new FrameReader({ ...opts, inputReused: true });
    if (!readChunks(socket, (chunk) => this.onData(chunk))) this.reader = new FrameReader(opts);
    socket.on("error", (err) => this.fail(new LinkClosedError(`connection to ${peer} failed: ${err.message}`)));
    socket.on("close", () => this.fail(new LinkClosedError(`connection to ${peer} closed${this.reader.pending ? ` in the middle of a frame (${this.reader.pending} bytes pending)` : ""}`)));
  }

  private onData(chunk: Buffer): void {
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
      const h = this.handlers.get(f.type);
      if (h) {
        try { h(f); } catch (err) { this.corrupt = true; this.fail(err as Error); return; }
        continue;
      }
      if (f.type === Control.Abort && this.waiters.length === 0) {
        // the peer gave up while we were sending: keep its reason for the next send or wait
        this.fail(new ProtocolError(`${this.peer} aborted the migration: ${abortReason(f)}`));
        continue;
      }
      const w = this.waiters.shift();
      if (w) w.resolve(f);
      else this.enqueue(f);
    }
  }

  private enqueue(f: Frame): void {
    this.queue.push(f);
    this.queuedBytes += f.payload.length;
    if (this.queuedBytes > RECEIVE_QUEUE_BYTES && !this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    }
  }

  private dequeue(): Frame | undefined {
    const f = this.queue.shift();
    if (!f) return f;
    this.queuedBytes -= f.payload.length;
    if (this.readPaused && this.queuedBytes <= RECEIVE_QUEUE_BYTES / 2) {
      this.readPaused = false;
      if (!this.aborting) this.socket.resume();
    }
    return f;
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const w of this.waiters) w.reject(err);
    this.waiters = [];
    this.outbox.length = 0;
    this.onWritten.length = 0;
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
   * `written` is called once the socket no longer reads the frame's bytes
   * (not if the link fails first), so that its buffer can be used again.
   */
  async send(buf: Uint8Array, written?: () => void): Promise<void> {
    if (this.failure) throw this.failure;
    this.bytesOut += buf.length;
    this.outbox.push(buf);
    this.onWritten.push(written);
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
        const written = this.onWritten.shift();
        this.outboxBytes -= buf.length;
        this.bytesWritten += buf.length;
        if (this.outboxBytes <= this.queueBytes) this.wakeRoom();
        // the write callback: the socket (and TLS) is done with the bytes, on success or error
        if (!this.socket.write(buf, written && (() => written()))) await this.meter.drain(this.socket);
      }
    } finally {
      this.pumping = false;
      this.wakeRoom();
      if (this.ending && !this.failure) this.socket.end();
    }
  }

  /**
   * Frames of `type` go to `handler` the moment they arrive, in order, and
   * never to next(): a peer's acknowledgements, timed as they come rather
   * than when the owner next reads. A handler that throws fails the link.
   */
  onFrame(type: number, handler: (f: Frame) => void): void {
    this.handlers.set(type, handler);
  }

  /** Lifts the reader's small pre-handshake frame limit; `crc` false: the peer's frames from here on carry no CRC to check (agreed inside TLS). */
  handshakeDone(o: { crc?: boolean } = {}): void {
    this.reader.handshakeDone(o);
  }

  /** The next frame; with `expect`, anything else (but Abort, reported as such) is a protocol error. */
  async next(expect?: number, timeoutMs = 0): Promise<Frame> {
    let f: Frame;
    const q = this.dequeue();
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
    if (f.type === Control.Abort && expect !== Control.Abort) {
      throw new ProtocolError(`${this.peer} aborted the migration: ${abortReason(f)}`);
    }
    if (expect !== undefined && f.type !== expect) {
      throw new ProtocolError(`expected a ${this.frames.name(expect)} frame from ${this.peer}, got ${this.frames.name(f.type)}`);
    }
    return f;
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
  abort(reason: string, lingerMs = TIMEOUTS.abortLingerMs): void {
    if (this.aborting) return;
    this.aborting = true;
    this.fail(new ProtocolError(`migration aborted here: ${reason}`));
    const s = this.socket;
    if (!s.destroyed && s.writable) {
      s.write(jsonFrame(Control.Abort, { reason }));
      s.end();
      s.resume();
      setTimeout(() => s.destroy(), lingerMs).unref();
    } else s.destroy();
  }

  destroy(): void {
    this.socket.destroy();
  }
}
