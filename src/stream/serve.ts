// A stream proxy's listening side: every connection is a session (QEMU
// opens one per migration, more with multifd); the proxy is done when the
// last session of its first migration has ended, unless told to keep going.

import type * as net from "node:net";
import { Listener, type ListenSecurity } from "../link/listen.js";
import type { Endpoint } from "../link/endpoint.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { jsonFrame } from "../wire/envelope.js";
import { SFrame } from "./frames.js";
import { verdictOf, type StreamProxy, type StreamStats } from "./stats.js";
import type { Log } from "../log.js";
import { abortError, onAbort } from "../abort.js";

export interface Listen {
  at: Endpoint;
  security: ListenSecurity;
  /**
   * Who connects: the other proxy (after a failure it gets a moment to read
   * the ABORT), or the source QEMU (its socket is closed at once: QEMU must
   * see its migration fail, never a stream that was read to the end).
   */
  peer: "proxy" | "qemu";
}

export type Session = (sock: net.Socket, channel: number) => Promise<void>;

export interface ServeOptions {
  stats: StreamStats;
  keep: boolean;
  log: Log;
  session: Session;
  onClose: () => void;
  /** Closes the proxy, cutting sessions in flight; `done` then rejects with an AbortError. */
  signal?: AbortSignal | undefined;
}

export async function serve(l: Listen, o: ServeOptions): Promise<StreamProxy> {
  const sessions = new Sessions(l, o);
  try {
    await sessions.open();
  } catch (err) {
    o.onClose(); // what the caller opened for the sessions (an index, workers) goes too
    throw err;
  }
  return sessions.proxy();
}

/**
 * Sessions from another proxy handed in one by one (pagetwin serve's peer
 * port routes them), with serve()'s rules for when the migration is over.
 */
export function adopt(o: ServeOptions): { proxy: StreamProxy; add(sock: net.Socket): void } {
  const sessions = new Sessions(null, o);
  return { proxy: sessions.proxy(), add: (sock) => sessions.start(sock) };
}

class Sessions {
  private active = 0;
  private channels = 0;
  private ended = 0;
  private t0 = 0;
  private finished = false;
  private resolveDone!: (s: StreamStats) => void;
  private readonly done = new Promise<StreamStats>((r) => { this.resolveDone = r; });
  private readonly sockets = new Set<net.Socket>();
  private listener: Listener | null = null;

  constructor(private readonly l: Listen | null, private readonly o: ServeOptions) {}

  async open(): Promise<void> {
    if (!this.l) return;
    const l = this.l;
    this.listener = await Listener.open({
      at: l.at, security: l.security, peer: l.peer === "qemu" ? "source QEMU" : "stream-out", allowHalfOpen: true, log: (m) => this.o.log.info(m),
      onSession: (sock) => this.start(sock),
      onRefused: (reason) => this.o.stats.refused.push(reason),
      refusalFrame: (why) => jsonFrame(SFrame.Abort, { reason: `stream-in refused this stream-out: ${why}` }),
    });
  }

  proxy(): StreamProxy {
    const signal = this.o.signal;
    const stop = onAbort(signal, () => {
      this.o.stats.error ??= "aborted by the caller";
      this.finish();
    });
    const done = this.done.then((s) => {
      stop();
      if (signal?.aborted) throw abortError(signal, `${s.role}`);
      return s;
    });
    done.catch(() => {}); // the caller may only ever call close()
    return { port: this.listener?.port ?? 0, stats: this.o.stats, done, close: async () => { this.finish(); await this.done; } };
  }

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    this.listener?.close();
    for (const s of this.sockets) s.destroy();
    this.o.onClose();
    this.resolveDone(this.o.stats);
  }

  start(sock: net.Socket): void {
    const { stats, log } = this.o;
    if (this.t0 === 0) this.t0 = performance.now();
    this.sockets.add(sock);
    sock.on("close", () => this.sockets.delete(sock));
    this.active++;
    stats.sessions++;
    let failed = false;
    const channel = this.channels++;
    this.o.session(sock, channel).catch((err: Error) => {
      failed = true;
      stats.error ??= err.message;
      log.error(`error: ${err.message}`, { channel });
    }).finally(() => this.end(sock, failed));
  }

  private end(sock: net.Socket, failed: boolean): void {
    this.active--;
    this.ended++;
    // after a failure, let the other proxy read the ABORT before the socket goes (a destroy with unread data resets it)
    if (failed && (this.l?.peer ?? "proxy") === "proxy" && !sock.destroyed) {
      sock.end();
      sock.resume();
      setTimeout(() => sock.destroy(), TIMEOUTS.refuseLingerMs).unref();
    } else sock.destroy();
    if (this.t0) this.o.stats.ms = performance.now() - this.t0;
    this.o.stats.verdict = verdictOf(this.o.stats);
    if (!this.o.keep && this.active === 0 && this.ended > 0) {
      setTimeout(() => { if (this.active === 0) this.finish(); }, TIMEOUTS.lastChannelGraceMs);
    }
  }
}
