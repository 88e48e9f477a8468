// The service's one peer port: every connection from another service
// (authenticated by TLS before a byte is read) says in its first frame what
// it is: a lease (PREPARE) or a stream session of a prepared migration
// (HELLO with its id). The first frame is read here and put back, so the
// connection's owner reads the whole conversation from its start.

import type * as net from "node:net";
import { Listener } from "../link/listen.js";
import type { Endpoint } from "../link/endpoint.js";
import type { Security } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { FrameReader, HANDSHAKE_FRAME_MAX, ProtocolError, jsonFrame, parseJson, type Frame } from "../wire/envelope.js";
import { SFrame } from "../stream/frames.js";
import { PEER_FRAMES, PeerFrame } from "./frames.js";
import type { Log } from "../log.js";

export interface PeerHandlers {
  /** A lease: its first frame is PREPARE (put back, unread). */
  lease(sock: net.Socket): void;
  /** A stream session of migration `id` (its HELLO put back, unread); the socket is paused until its owner wires it. */
  session(sock: net.Socket, id: string): void;
  refused(reason: string): void;
}

/** Reads a connection's first frame, then pauses it and puts every byte read back. */
export function peekFirstFrame(sock: net.Socket, timeoutMs: number = TIMEOUTS.helloMs): Promise<Frame> {
  const reader = new FrameReader({ ...PEER_FRAMES, handshakeMax: HANDSHAKE_FRAME_MAX });
  const chunks: Buffer[] = [];
  return new Promise((resolve, reject) => {
    const done = (err: Error | null, f?: Frame) => {
      clearTimeout(timer);
      sock.off("data", onData);
      sock.off("close", onClose);
      if (err) reject(err);
      else resolve(f!);
    };
    const onData = (c: Buffer) => {
      chunks.push(c);
      let frames: Frame[];
      try {
        frames = reader.push(c);
      } catch (err) {
        done(err as Error);
        return;
      }
      if (!frames.length) return;
      // paused before the listener goes: a flowing socket without one would drop data
      sock.pause();
      done(null, frames[0]!);
      sock.unshift(Buffer.concat(chunks));
    };
    const onClose = () => done(new ProtocolError("the peer closed the connection before its first frame"));
    const timer = setTimeout(() => done(new ProtocolError(`no first frame from the peer within ${timeoutMs} ms`)), timeoutMs);
    sock.on("data", onData);
    sock.once("close", onClose);
  });
}

export async function openPeerPort(at: Endpoint, security: Security, log: Log, h: PeerHandlers): Promise<Listener> {
  return Listener.open({
    at, security, peer: "peer pagetwin serve", allowHalfOpen: true, log: (m) => log.info(m),
    onRefused: (reason) => h.refused(reason),
    refusalFrame: (why) => jsonFrame(SFrame.Abort, { reason: `pagetwin serve refused this peer: ${why}` }),
    onSession: (sock) => { void route(sock, h, log); },
  });
}

async function route(sock: net.Socket, h: PeerHandlers, log: Log): Promise<void> {
  sock.on("error", () => {}); // its owner reports; a reset before that is not news
  let f: Frame;
  try {
    f = await peekFirstFrame(sock);
  } catch (err) {
    log.warn(`peer ${sock.remoteAddress ?? "?"}: ${(err as Error).message}`);
    sock.destroy();
    return;
  }
  if (f.type === PeerFrame.Prepare) { h.lease(sock); return; }
  if (f.type === SFrame.Hello) {
    let id: unknown;
    try {
      id = parseJson<{ migration?: unknown }>(f, "HELLO").migration;
    } catch { /* said below */ }
    if (typeof id === "string") { h.session(sock, id); return; }
  }
  const why = `the first frame on pagetwin serve's peer port must be PREPARE or a HELLO naming a migration, not ${PEER_FRAMES.name(f.type)}`;
  log.warn(why);
  sock.end(jsonFrame(SFrame.Abort, { reason: why, code: "PAGETWIN_PROTOCOL" }));
  setTimeout(() => sock.destroy(), TIMEOUTS.refuseLingerMs).unref();
}
