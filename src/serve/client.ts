// A client of `pagetwin serve`'s control socket, for tools (`pagetwin
// libvirt`, an orchestrator's agent): requests answered by id, and watches
// that yield the service's events as they come.

import * as net from "node:net";
import { ServeError } from "../errors.js";

/** Where `pagetwin serve` listens for local tools unless told otherwise. */
export const DEFAULT_CONTROL = "/run/pagetwin/control.sock";
import type { ServeEvent } from "./migration.js";

type Pending = { resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void };

/** A watch: an async iterable of events; close() ends it (and the loop over it). */
export interface ServeWatch extends AsyncIterable<ServeEvent> {
  close(): Promise<void>;
}

export class ServeClient {
  private nextId = 1;
  private buf = "";
  private readonly pending = new Map<number, Pending>();
  private readonly watchers = new Map<number, (e: ServeEvent | null) => void>();
  private closedWith: Error | null = null;

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding("utf8");
    sock.on("data", (s: string) => this.onData(s));
    sock.on("error", (e) => this.closeAll(e));
    sock.on("close", () => this.closeAll(new ServeError("PAGETWIN_SERVE_CLOSED", "the pagetwin serve control connection closed")));
  }

  /** Connects to a service's control socket. */
  static connect(path: string, timeoutMs = 10_000): Promise<ServeClient> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ path });
      const t = setTimeout(() => { sock.destroy(); reject(new ServeError("PAGETWIN_SERVE_UNREACHABLE", `no answer from pagetwin serve at ${path} within ${timeoutMs} ms`)); }, timeoutMs);
      sock.once("connect", () => { clearTimeout(t); sock.removeAllListeners("error"); resolve(new ServeClient(sock)); });
      sock.once("error", (e: NodeJS.ErrnoException) => {
        clearTimeout(t);
        reject(new ServeError("PAGETWIN_SERVE_UNREACHABLE", `cannot reach pagetwin serve at ${path}: ${e.code ?? e.message} (is the service running, and may this user open its socket?)`, { cause: e }));
      });
    });
  }

  /** One request; resolves with the answer's fields, rejects with a ServeError carrying the service's code. */
  request<T extends object = Record<string, unknown>>(op: string, args: object = {}): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: (v) => resolve(v as T), reject });
      this.sock.write(JSON.stringify({ ...args, id, op }) + "\n");
    });
  }

  /** The service's events (of one migration, or all), from now until close(); `trace`: its trace records too. */
  async watch(migration?: string, o: { trace?: boolean } = {}): Promise<ServeWatch> {
    const id = this.nextId;
    const queue: (ServeEvent | null)[] = [];
    let wake: (() => void) | null = null;
    this.watchers.set(id, (e) => { queue.push(e); wake?.(); });
    try {
      await this.request("watch", { ...(migration ? { migration } : {}), ...(o.trace ? { trace: true } : {}) });
    } catch (err) {
      this.watchers.delete(id);
      throw err;
    }
    const stop = async () => {
      if (!this.watchers.has(id)) return;
      this.watchers.delete(id);
      queue.push(null);
      wake?.();
      if (!this.closedWith) await this.request("unwatch", { watch: id }).catch(() => {});
    };
    return {
      close: stop,
      [Symbol.asyncIterator]: async function* () {
        for (;;) {
          const e = queue.shift();
          if (e === null) return;
          if (e) { yield e; continue; }
          await new Promise<void>((r) => { wake = r; });
          wake = null;
        }
      },
    };
  }

  close(): void {
    this.sock.end();
    this.sock.destroy();
  }

  private onData(s: string): void {
    this.buf += s;
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      if (line.trim()) this.onLine(line);
    }
  }

  private onLine(line: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    const id = m["id"] as number;
    if (typeof m["event"] === "string") {
      const { id: _id, ...e } = m;
      this.watchers.get(id)?.(e as unknown as ServeEvent);
      return;
    }
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    if (m["ok"] === true) {
      const { id: _i, ok: _o, ...rest } = m;
      p.resolve(rest);
    } else {
      const e = (m["error"] ?? {}) as { code?: string; message?: string };
      p.reject(new ServeError(e.code ?? "PAGETWIN_FAILED", e.message ?? "the service gave no reason"));
    }
  }

  private closeAll(err: Error): void {
    if (this.closedWith) return;
    this.closedWith = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const w of this.watchers.values()) w(null);
    this.watchers.clear();
  }
}
