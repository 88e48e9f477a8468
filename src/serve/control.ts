// The control interface: a unix socket (0600: only this user's processes,
// usually root's tools, connect), one JSON object per line each way.
//   request   {"id": 1, "op": "outgoing", ...arguments}
//   answer    {"id": 1, "ok": true, ...result}  or  {"id": 1, "ok": false, "error": {"code", "message"}}
//   watch     answered {"id", "ok": true, "watching": true}, then one line per
//             event {"id", "event": "state"|"progress"|"end", "migration", ...}
//             until the connection closes or {"op": "unwatch", "watch": id};
//             with "trace": true also "trace" events (a migration's trace records).
// Requests on one connection are answered as they finish, not in order.

import type * as net from "node:net";
import { Listener } from "../link/listen.js";
import { ServeError, UsageError } from "../errors.js";
import type { Log } from "../log.js";
import { errorInfo, type ServeEvent } from "./migration.js";

/** Longest request line; anything longer is refused and the connection closed. */
export const MAX_REQUEST_BYTES = 1024 * 1024;

export type Handler = (op: string, args: Record<string, unknown>) => Promise<object>;

export interface ControlOptions {
  path: string;
  log: Log;
  handle: Handler;
  /** Subscribes to the service's events; returns the unsubscribe. */
  subscribe: (cb: (e: ServeEvent) => void) => () => void;
}

export class ControlServer {
  private readonly conns = new Set<net.Socket>();

  private constructor(private readonly listener: Listener) {}

  static async open(o: ControlOptions): Promise<ControlServer> {
    let server: ControlServer | null = null;
    const listener = await Listener.open({
      at: { kind: "unix", path: o.path }, security: { kind: "local" }, peer: "control client", log: (m) => o.log.info(`control: ${m}`),
      onSession: (sock) => server!.accept(sock, o),
    });
    server = new ControlServer(listener);
    return server;
  }

  /** Stops taking connections (the socket file goes); open ones may finish what they asked. */
  close(): void {
    this.listener.close();
  }

  /** Closes every control connection (watchers included), once what was written to them is sent. */
  dropAll(): void {
    for (const c of this.conns) {
      c.end();
      setTimeout(() => c.destroy(), 1000).unref();
    }
  }

  private accept(sock: net.Socket, o: ControlOptions): void {
    this.conns.add(sock);
    new ControlConnection(sock, o).start();
    sock.on("close", () => this.conns.delete(sock));
  }
}

class ControlConnection {
  private buf = "";
  private readonly watches = new Map<unknown, () => void>();

  constructor(private readonly sock: net.Socket, private readonly o: ControlOptions) {}

  start(): void {
    const { sock } = this;
    sock.setEncoding("utf8");
    sock.on("data", (s: string) => this.onData(s));
    sock.on("error", () => {});
    sock.on("close", () => { for (const stop of this.watches.values()) stop(); this.watches.clear(); });
  }

  private onData(s: string): void {
    this.buf += s;
    if (this.buf.length > MAX_REQUEST_BYTES && !this.buf.includes("\n")) {
      this.send({ id: null, ok: false, error: { code: "PAGETWIN_SERVE_REQUEST", message: `a request line longer than ${MAX_REQUEST_BYTES} bytes` } });
      this.sock.end();
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) void this.request(line);
    }
  }

  private async request(line: string): Promise<void> {
    let id: unknown = null;
    try {
      const v = parseLine(line);
      id = v["id"] ?? null;
      const req = requestOf(v);
      if (req.op === "watch") { this.watch(id, req.args); return; }
      if (req.op === "unwatch") { this.unwatch(id, req.args); return; }
      const result = await this.o.handle(req.op, req.args);
      this.send({ ...result, id, ok: true });
    } catch (err) {
      this.send({ id, ok: false, error: errorInfo(err) });
    }
  }

  private watch(id: unknown, args: Record<string, unknown>): void {
    if (this.watches.has(id)) throw new ServeError("PAGETWIN_SERVE_REQUEST", `a watch with id ${JSON.stringify(id)} is running on this connection`);
    const only = typeof args["migration"] === "string" ? args["migration"] : null;
    const traces = args["trace"] === true;
    this.send({ id, ok: true, watching: true });
    this.watches.set(id, this.o.subscribe((e) => { if ((!only || e.migration === only) && (traces || e.event !== "trace")) this.send({ id, ...e }); }));
  }

  private unwatch(id: unknown, args: Record<string, unknown>): void {
    const stop = this.watches.get(args["watch"]);
    if (!stop) throw new ServeError("PAGETWIN_SERVE_REQUEST", `no watch ${JSON.stringify(args["watch"])} on this connection`);
    stop();
    this.watches.delete(args["watch"]);
    this.send({ id, ok: true });
  }

  private send(v: object): void {
    if (!this.sock.destroyed && this.sock.writable) this.sock.write(JSON.stringify(v) + "\n");
  }
}

function parseLine(line: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (err) {
    throw new UsageError(`a request that is not JSON: ${(err as Error).message}`);
  }
  if (!v || typeof v !== "object" || Array.isArray(v)) throw new UsageError("a request must be a JSON object {id, op, ...}");
  return v as Record<string, unknown>;
}

function requestOf(v: Record<string, unknown>): { op: string; args: Record<string, unknown> } {
  const { id: _id, op, ...args } = v;
  if (typeof op !== "string") throw new UsageError("a request needs an op (a string)");
  return { op, args };
}
