// Connecting to a peer: TCP or a unix socket, inside TLS unless --insecure.
// Resolves only once the peer is authenticated (the TLS handshake is over).

import * as net from "node:net";
import * as tls from "node:tls";
import { type Endpoint, formatEndpoint } from "./endpoint.js";
import { type Security, clientOptions } from "./security.js";
import { TIMEOUTS } from "./timeouts.js";

export { LinkClosedError } from "../errors.js";
import { LinkClosedError } from "../errors.js";

export interface DialOptions {
  /** Who is at the other end, for messages ("destination agent", "stream-in"). */
  peer: string;
  timeoutMs?: number;
  /** Keep the socket writable after the peer's FIN (stream mode's half-closes). */
  allowHalfOpen?: boolean;
  /** A hint added to "cannot connect" (e.g. "Is `pagetwin listen` running there?"). */
  hint?: string;
}

function rawConnect(to: Endpoint, allowHalfOpen: boolean): net.Socket {
  return to.kind === "unix" ? net.connect({ path: to.path, allowHalfOpen }) : net.connect({ host: to.host, port: to.port, allowHalfOpen });
}

/** Sets what every link socket wants: no Nagle delay, keepalive probes. */
export function tuneSocket(s: net.Socket): void {
  s.setNoDelay(true);
  s.setKeepAlive(true, TIMEOUTS.keepAliveMs);
}

export function dial(to: Endpoint, sec: Security, o: DialOptions): Promise<net.Socket> {
  const where = `${o.peer} at ${formatEndpoint(to)}`;
  const timeoutMs = o.timeoutMs ?? TIMEOUTS.connectMs;
  return new Promise((resolve, reject) => {
    const allowHalfOpen = o.allowHalfOpen ?? false;
    let s: net.Socket;
    if (sec.kind === "insecure") s = rawConnect(to, allowHalfOpen);
    else {
      const host = to.kind === "tcp" ? to.host : "localhost";
      const raw = rawConnect(to, allowHalfOpen);
      // (tls.connect passes allowHalfOpen on to its socket; its types do not list it)
      s = tls.connect({ ...clientOptions(sec, host), socket: raw, allowHalfOpen } as tls.ConnectionOptions);
    }
    const done = (err: Error | null) => {
      clearTimeout(timer);
      s.off("error", onError);
      if (err) { s.destroy(); reject(err); return; }
      tuneSocket(s);
      resolve(s);
    };
    const timer = setTimeout(() => done(new LinkClosedError(`pagetwin: no authenticated connection to the ${where} within ${timeoutMs} ms`)), timeoutMs);
    const onError = (e: Error) => {
      const tlsFailed = /SSL|TLS|alert|decrypt|certificate|handshake|psk/i.test(e.message) || (e as NodeJS.ErrnoException).code?.startsWith("ERR_SSL");
      const why = tlsFailed && sec.kind !== "insecure"
        ? `the TLS handshake failed (${e.message.trim()}): ${sec.kind === "psk" ? "check that both hosts use the same --psk-file key (one file, copied to both)" : "are both certificates signed by the CA the other end trusts, and does the listener's certificate name this host?"}`
        : e.message;
      done(new LinkClosedError(`pagetwin: cannot connect to the ${where}: ${why}${o.hint && !tlsFailed ? `. ${o.hint}` : ""}`));
    };
    s.once("error", onError);
    s.once(sec.kind === "insecure" ? "connect" : "secureConnect", () => done(null));
  });
}
