// Where a link connects or listens: TCP HOST:PORT, or a unix socket path.

import { UsageError } from "../errors.js";

export type Endpoint = { kind: "tcp"; host: string; port: number } | { kind: "unix"; path: string };

/**
 * "HOST:PORT", "[v6]:PORT", "PORT" (on `defaultHost`), "unix:/path" or an
 * absolute path (a unix socket). `what` names the option in errors.
 */
export function parseEndpoint(s: string, what: string, defaultHost = "127.0.0.1"): Endpoint {
  if (s.startsWith("unix:")) s = s.slice(5);
  if (s.startsWith("/")) return { kind: "unix", path: s };
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(s) ?? /^()()(\d+)$/.exec(s);
  if (!m) throw new UsageError(`${what} must be HOST:PORT or unix:/PATH (got "${s}")`);
  const port = Number(m[3]);
  if (!(port >= 0 && port < 65536)) throw new UsageError(`${what} has an invalid port ${m[3]}`);
  return { kind: "tcp", host: m[1] || m[2] || defaultHost, port };
}

export function formatEndpoint(e: Endpoint): string {
  if (e.kind === "unix") return `unix:${e.path}`;
  return e.host.includes(":") ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}

/** Loopback or a unix socket: only this host can reach it. */
export function isLocal(e: Endpoint): boolean {
  return e.kind === "unix" || /^(127\.\d+\.\d+\.\d+|::1|localhost)$/.test(e.host);
}
