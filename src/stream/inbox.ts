// The handshake's mailbox: the frame handler drops a HELLO or HELLO_ACK
// here and the session waits for it with a deadline. Only stream mode needs
// it: agent mode's FrameLink has its own next(type, timeout).

import { ProtocolError, type Frame } from "../wire/envelope.js";

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
