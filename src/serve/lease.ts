// A migration's lease: the peer connection on which the source service
// prepared it (PREPARE / PREPARED), which stays open until the migration is
// over (FINISHED) or off (ABORT, or the connection closes). Either side that
// sees it close early ends its half of the migration, so neither is left
// holding one the other has forgotten.

import type * as net from "node:net";
import { FrameReader, HANDSHAKE_FRAME_MAX, abortReason, jsonFrame, parseJson, type Frame } from "../wire/envelope.js";
import { SFrame } from "../stream/frames.js";
import { FrameInbox, dispatch } from "../stream/inbox.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { ServeError } from "../errors.js";
import { PEER_FRAMES, PeerFrame } from "./frames.js";

export class Lease {
  private readonly reader = new FrameReader({ ...PEER_FRAMES, handshakeMax: HANDSHAKE_FRAME_MAX });
  private readonly inbox = new FrameInbox();
  private closedBy: ServeError | null = null;
  private onEnd: ((why: ServeError) => void) | null = null;

  constructor(readonly sock: net.Socket) {
    sock.on("data", (c: Buffer) => dispatch(this.reader, c, (f) => this.onFrame(f), (err) => this.close(err)));
    sock.on("error", (e) => this.close(new ServeError("PAGETWIN_PEER_LOST", `the peer service's connection failed: ${e.message}`, { cause: e })));
    sock.on("close", () => this.close(new ServeError("PAGETWIN_PEER_LOST", "the peer service closed the migration's connection")));
    sock.resume();
  }

  /** The next frame (ABORT included: the caller tells what it means); rejects when the lease closed. */
  async next(what: string, timeoutMs: number = TIMEOUTS.helloMs): Promise<Frame> {
    try {
      return await this.inbox.next(timeoutMs, what);
    } catch (err) {
      throw this.closedBy ?? new ServeError("PAGETWIN_PEER_TIMEOUT", (err as Error).message, { cause: err });
    }
  }

  /** After the handshake: `cb` once, when the lease ends early (ABORT from the peer, or the connection closing). */
  watch(cb: (why: ServeError) => void): void {
    if (this.closedBy) { cb(this.closedBy); return; }
    this.onEnd = cb;
  }

  send(type: number, value: unknown): void {
    if (!this.sock.destroyed && this.sock.writable) this.sock.write(jsonFrame(type, value));
  }

  /** Ends the lease: with an ABORT to the peer when `abort` is given. */
  end(abort?: { code: string; reason: string }): void {
    this.onEnd = null;
    if (!this.sock.destroyed && this.sock.writable) {
      if (abort) this.sock.end(jsonFrame(SFrame.Abort, abort));
      else this.sock.end();
    }
    setTimeout(() => this.sock.destroy(), TIMEOUTS.abortLingerMs).unref();
  }

  private onFrame(f: Frame): Error | null {
    if (f.type === SFrame.Abort && this.onEnd) {
      this.close(abortError(f, "the peer service ended the migration", "PAGETWIN_PEER_ABORT"));
      return null;
    }
    // the migration is over on the peer's side: its closing the lease now is no news
    if (f.type === PeerFrame.Finished) this.onEnd = null;
    this.inbox.push(f);
    return null;
  }

  private close(why: Error): void {
    if (this.closedBy) return;
    this.closedBy = why instanceof ServeError ? why : new ServeError("PAGETWIN_PROTOCOL", why.message, { cause: why });
    this.inbox.close();
    const cb = this.onEnd;
    this.onEnd = null;
    cb?.(this.closedBy);
    if (!this.sock.destroyed) this.sock.destroy();
  }
}

/** The ServeError an ABORT frame from the peer stands for. */
export function abortError(f: Frame, what: string, fallback = "PAGETWIN_PEER_REFUSED"): ServeError {
  let code = fallback;
  try {
    const c = parseJson<{ code?: unknown }>(f, "ABORT").code;
    if (typeof c === "string" && /^PAGETWIN_[A-Z_]+$/.test(c)) code = c;
  } catch { /* the reason says what there is */ }
  return new ServeError(code, `${what}: ${abortReason(f)}`);
}
