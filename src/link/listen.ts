// Listening for peers: TCP or a unix socket (0600), inside TLS unless
// --insecure. A peer gets a session only once it is authenticated; before
// that it gets a TLS handshake and nothing else: a cap on concurrent
// handshakes, a deadline for each, refused sockets destroyed.

import * as net from "node:net";
import * as tls from "node:tls";
import { chmodSync, lstatSync, unlinkSync } from "node:fs";
import { type Endpoint, formatEndpoint, isLocal } from "./endpoint.js";
import { type Security, INSECURE_WARNING, serverOptions, unverifiedPeer, describeSecurity } from "./security.js";
import { MAX_PENDING_HANDSHAKES, TIMEOUTS } from "./timeouts.js";
import { tuneSocket } from "./dial.js";
import { UsageError } from "../errors.js";

/** A local listener (QEMU's side of stream-out): no TLS, and only this host can reach it. */
export type ListenSecurity = Security | { kind: "local" };

export interface ListenOptions {
  at: Endpoint;
  security: ListenSecurity;
  /** Who connects, for messages ("source agent", "stream-out", "source QEMU"). */
  peer: string;
  /** An authenticated peer (any peer when insecure or local). */
  onSession: (sock: net.Socket) => void;
  /** A peer turned away before it authenticated; `reason` is printable. */
  onRefused?: (reason: string) => void;
  /** What a peer whose certificate failed is sent before the door closes (the mode's refusal frame). */
  refusalFrame?: (reason: string) => Buffer;
  allowHalfOpen?: boolean;
  maxPending?: number;
  authTimeoutMs?: number;
  log?: (msg: string) => void;
}

export class Listener {
  /** Connections in their handshake, oldest first. */
  private readonly pending = new Set<net.Socket>();

  private constructor(private readonly server: net.Server, readonly endpoint: Endpoint, private readonly o: ListenOptions) {}

  /** The bound TCP port (0 for a unix socket). */
  get port(): number {
    return this.endpoint.kind === "tcp" ? this.endpoint.port : 0;
  }

  static open(o: ListenOptions): Promise<Listener> {
    if (o.security.kind === "local" && !isLocal(o.at)) {
      throw new UsageError(`${o.peer} must connect over loopback or a unix socket (got ${formatEndpoint(o.at)})`);
    }
    const server = Listener.createServer(o);
    if (o.at.kind === "unix") removeStaleSocket(o.at.path);
    return new Promise((resolve, reject) => {
      server.once("error", (err) => reject(new UsageError(`pagetwin: cannot listen on ${formatEndpoint(o.at)}: ${err.message}`)));
      const bound = () => {
        let at = o.at;
        if (at.kind === "unix") chmodSync(at.path, 0o600);
        else at = { ...at, port: (server.address() as net.AddressInfo).port };
        const l = new Listener(server, at, o);
        l.wire();
        o.log?.(`listening on ${formatEndpoint(at)} (${o.security.kind === "local" ? "local only" : describeSecurity(o.security)})`);
        if (o.security.kind === "insecure") o.log?.(INSECURE_WARNING);
        resolve(l);
      };
      if (o.at.kind === "unix") server.listen(o.at.path, bound);
      else server.listen(o.at.port, o.at.host, bound);
    });
  }

  private static createServer(o: ListenOptions): net.Server {
    const allowHalfOpen = o.allowHalfOpen ?? false;
    const s = o.security;
    if (s.kind === "local" || s.kind === "insecure") return net.createServer({ allowHalfOpen });
    return tls.createServer({ ...serverOptions(s), allowHalfOpen, handshakeTimeout: o.authTimeoutMs ?? TIMEOUTS.authMs } as tls.TlsOptions);
  }

  private refuse(reason: string): void {
    this.o.log?.(`refused: ${reason}`);
    this.o.onRefused?.(reason);
  }

  private wire(): void {
    const { server, o } = this;
    if (o.security.kind === "local" || o.security.kind === "insecure") {
      server.on("connection", (sock: net.Socket) => { tuneSocket(sock); o.onSession(sock); });
      return;
    }
    server.on("connection", (raw: net.Socket) => this.admit(raw));
    server.on("tlsClientError", (err: Error, sock: tls.TLSSocket) => {
      const raw = parentOf(sock);
      const peer = peerAt.get(raw!) ?? peerOf(sock);
      this.settle(raw);
      // a peer this side dropped (too many handshakes) was reported already
      if (!dropped.has(raw!)) this.refuse(`a peer at ${peer} failed the TLS handshake: ${err.message.trim()}`);
      sock.destroy();
    });
    server.on("secureConnection", (sock: tls.TLSSocket) => this.authenticated(sock));
  }

  /** A new TCP connection starts its handshake; when too many are under way, the oldest gives way. */
  private admit(raw: net.Socket): void {
    const max = this.o.maxPending ?? MAX_PENDING_HANDSHAKES;
    if (this.pending.size >= max) {
      // the oldest, not the newcomer: otherwise a few idle peers would keep every real one out until their deadline
      const oldest = this.pending.values().next().value as net.Socket, peer = peerAt.get(oldest);
      this.settle(oldest);
      dropped.add(oldest);
      this.refuse(`a peer at ${peer}: dropped before it authenticated, the oldest of ${max} handshakes under way`);
      oldest.destroy();
    }
    peerAt.set(raw, peerOf(raw));
    this.pending.add(raw);
    raw.once("close", () => this.settle(raw));
  }

  /** The handshake of `raw` is over (done, failed or dropped). */
  private settle(raw: net.Socket | undefined): void {
    if (raw) this.pending.delete(raw);
  }

  private authenticated(sock: tls.TLSSocket): void {
    const o = this.o;
    this.settle(parentOf(sock));
    const why = unverifiedPeer(sock, o.security as Security);
    if (why) {
      this.refuse(`a peer at ${peerOf(sock)}: ${why}`);
      if (o.refusalFrame) sock.end(o.refusalFrame(why));
      else sock.end();
      setTimeout(() => sock.destroy(), TIMEOUTS.refuseLingerMs).unref();
      return;
    }
    tuneSocket(sock);
    o.onSession(sock);
  }

  /** Stops listening at once and drops connections still in their handshake; sessions are their owners' to end. */
  close(): void {
    for (const r of this.pending) r.destroy();
    // not awaited: net.Server.close() calls back only once every session has ended
    if (this.server.listening) this.server.close();
    if (this.endpoint.kind === "unix") { try { unlinkSync(this.endpoint.path); } catch { /* gone already */ } }
  }

  /** Handshakes under way now. */
  get handshakes(): number {
    return this.pending.size;
  }
}

/**
 * The peer of each accepted connection, kept: a destroyed socket forgets its
 * address, and a peer that leaves in its handshake has its TLS error after its close.
 */
const peerAt = new WeakMap<net.Socket, string>();

/** Connections this side dropped at the handshake limit (their TLS error is no news). */
const dropped = new WeakSet<net.Socket>();

/** The accepted TCP socket under a TLS socket: Node's TLSSocket keeps it as _parent. */
function parentOf(sock: tls.TLSSocket): net.Socket | undefined {
  return (sock as unknown as { _parent?: net.Socket })._parent;
}

function peerOf(s: net.Socket): string {
  return s.remoteAddress ? `${s.remoteAddress}:${s.remotePort}` : "the unix socket";
}

/** A socket file left by an earlier run is removed; anything else at the path is an error. */
function removeStaleSocket(path: string): void {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new UsageError(`pagetwin: ${path} exists and is not a socket: choose another path`);
  unlinkSync(path);
}

/** A free TCP port on `host` (closed again at once). */
export function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, host, () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}
