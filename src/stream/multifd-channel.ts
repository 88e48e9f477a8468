// Which connection of a migration a session carries, and the order the
// destination QEMU must see them in.
//
// With multifd, QEMU opens the main channel (savevm stream, "QEVM") and then
// one connection per multifd channel (MultiFDInit_t first). QEMU 7.2's
// destination takes its first incoming connection as the main channel
// (migration_ioc_process_incoming; it does not look at the magic), and the
// multifd channels after it in any order (each names its id). So stream-out
// reads a connection's first bytes before it opens the link (its HELLO
// names the kind), and stream-in connects a multifd session to its QEMU
// only once the main session's connection is open.

import type * as net from "node:net";
import { channelKind, type ChannelKind } from "./multifd-format.js";

export interface StreamStart {
  /** The bytes read to tell the kind (the start of the stream: they still have to be forwarded). */
  data: Buffer;
  kind: ChannelKind;
  /** The source closed its side while they were read. */
  ended: boolean;
}

/**
 * Reads the first 4 bytes of a paused socket (or what comes within
 * `timeoutMs`, or before its end), and pauses it again.
 */
export function readStart(sock: net.Socket, timeoutMs: number): Promise<StreamStart> {
  return new Promise((resolve) => {
    const got: Buffer[] = [];
    let bytes = 0;
    let ended = false;
    const done = () => {
      clearTimeout(timer);
      sock.off("data", onData).off("end", onEnd).off("close", done);
      sock.pause();
      const data = Buffer.concat(got);
      resolve({ data, kind: channelKind(data), ended });
    };
    const onData = (b: Buffer) => { got.push(b); bytes += b.length; if (bytes >= 4) done(); };
    const onEnd = () => { ended = true; done(); };
    const timer = setTimeout(done, timeoutMs);
    sock.on("data", onData).on("end", onEnd).on("close", done);
    sock.resume();
  });
}

/** stream-in's gate: multifd sessions reach their QEMU after the main session's. */
export class ChannelOrder {
  private open = false;
  private waiters: (() => void)[] = [];

  /** The main session's QEMU connection is open. */
  mainOpened(): void {
    this.open = true;
    for (const w of this.waiters.splice(0)) w();
  }

  /** The main session ended: the next migration's multifd sessions wait for its own main. */
  mainEnded(): void {
    this.open = false;
  }

  /** Resolves true once the main session is open, false after `timeoutMs` without one. */
  afterMain(timeoutMs: number): Promise<boolean> {
    if (this.open) return Promise.resolve(true);
    return new Promise((resolve) => {
      const w = () => { clearTimeout(t); resolve(true); };
      const t = setTimeout(() => { this.waiters = this.waiters.filter((x) => x !== w); resolve(false); }, timeoutMs);
      t.unref();
      this.waiters.push(w);
    });
  }
}

/**
 * How long stream-out waits for a new connection's first bytes before it
 * opens the link without knowing the kind (a multifd session then does not
 * wait for the main one at stream-in).
 */
export const START_WAIT_MS = 2_000;

/** How long stream-in holds a multifd session for its main session (less than stream-out waits for HELLO_ACK). */
export const MAIN_WAIT_MS = 5_000;
