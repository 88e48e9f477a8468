// How a stream session takes frames off its link: one dispatch loop for both
// proxies, and the handshake's mailbox (the frame handler drops a HELLO or
// HELLO_ACK there and the session waits for it with a deadline). Agent mode's
// FrameLink does both its own way (next(type, timeout)).

import { PagetwinError } from "../errors.js";
import { ProtocolError, type Frame, type FrameReader } from "../wire/envelope.js";

/** The peer ended the migration with an ABORT: nothing to tell it back. */
export class PeerAbort extends PagetwinError {
  override readonly code: string = "PAGETWIN_PEER_ABORT";
}

/**
 * Feeds one chunk of the link to `reader` and each whole frame to `onFrame`;
 * the first problem (a corrupt frame, a frame out of place, one that throws)
 * goes to `fail`, telling the peer unless the peer itself aborted.
 */
export function dispatch(reader: FrameReader, chunk: Buffer, onFrame: (f: Frame) => Error | null, fail: (err: Error, tellPeer: boolean) => void): void {
  let frames: Frame[];
  try {
    frames = reader.push(chunk);
  } catch (err) {
    fail(err as Error, true);
    return;
  }
  for (const f of frames) {
    let problem: Error | null;
    try {
      problem = onFrame(f);
    } catch (err) {
      problem = err as Error; // e.g. a NEED or ACK of the wrong length
    }
    if (problem) { fail(problem, !(problem instanceof PeerAbort)); return; }
  }
}

export class FrameInbox {
  private queue: Frame[] = [];
  private waiter: ((f: Frame | null) => void) | null = null;
  closed = false;

  push(f: Frame): void {
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(f); } else this.queue.push(f);
  }

  close(): void {
    this.closed = true;
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(null); }
  }

  next(timeoutMs: number, what: string): Promise<Frame> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    if (this.closed) return Promise.reject(new ProtocolError(`the link closed while waiting for ${what}`));
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => { this.waiter = null; reject(new ProtocolError(`no ${what} within ${timeoutMs} ms`)); }, timeoutMs);
      this.waiter = (f) => { clearTimeout(t); f ? resolve(f) : reject(new ProtocolError(`the link closed while waiting for ${what}`)); };
    });
  }
}
