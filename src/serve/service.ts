// `pagetwin serve`: one service per host for every stream-mode migration on
// it, both directions at once. Local tools talk to it on the control socket
// (control.ts); services talk to each other on one peer port (peer.ts),
// inside TLS. Indexes and images are opened once per path and shared by the
// migrations that use them (shared.ts).

import { EventEmitter } from "node:events";
import { statSync } from "node:fs";
import type * as net from "node:net";
import { openNasIndex, type NasIndex } from "../adapters/nas/index-file.js";
import { parseEndpoint } from "../link/endpoint.js";
import type { Listener } from "../link/listen.js";
import { INSECURE_WARNING, checkSecurity, describeSecurity, resolveSecurity, type Security, type SecurityOptions } from "../link/security.js";
import { ServeError, UsageError } from "../errors.js";
import { jsonFrame } from "../wire/envelope.js";
import { SFrame } from "../stream/frames.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { toLog, type Log, type LogOption } from "../log.js";
import { ControlServer } from "./control.js";
import { IncomingMigration, openDestDisk, type OpenDestDisk } from "./incoming.js";
import { type MigrationRecord, type MigrationStatus, type ServeEvent } from "./migration.js";
import { OutgoingMigration, type OutgoingReady, type OutgoingRequest } from "./outgoing.js";
import { openPeerPort } from "./peer.js";
import { SERVE_PROTOCOL_VERSION } from "./frames.js";
import { Shared } from "./shared.js";
import { ServeTraces, type ServeTraceOptions } from "./trace.js";
import { QemuSockets } from "./qemu-sockets.js";

export interface ServeServiceOptions extends SecurityOptions, ServeTraceOptions {
  /** The control socket's path (created 0600; a stale socket there is replaced). */
  control: string;
  /** HOST:PORT of the peer port other services connect to (absent: this service only sends). */
  peerListen?: string;
  /** How long an index or image stays open after its last migration, ms (default 0: closed at once; `pagetwin serve`: KEEP_OPEN_MS). */
  keepOpenMs?: number;
  /** Outgoing migrations' pacing, ms of the link's rate on its way beyond stream-in's credit (stream-out's --queue-ms; default: its default). */
  queueMs?: number;
  /** Worker threads per migration for its sessions' per-byte work (stream-out's and stream-in's --workers; default 0: none). */
  workers?: number;
  /** Where QEMU's unix sockets go when a migration asks for "unix" (default: QemuSockets.resolve(), /run/pagetwin-qemu). */
  qemuSockets?: QemuSockets;
  log?: LogOption;
}

/**
 * `pagetwin serve`'s default: an index no migration uses stays open 5 min, so the next migration of the
 * same images (often the same VM moving on or back) starts without loading them again.
 */
export const KEEP_OPEN_MS = 300_000;

/** Index files as they were when opened: an idle one whose file changed since is opened again. */
const indexFiles = {
  seen: new WeakMap<object, string>(),
  signature(path: string): string {
    try { const s = statSync(path); return `${s.ino}:${s.size}:${s.mtimeMs}`; } catch { return "missing"; }
  },
  opened<V extends { indexPath: string }>(v: V): V {
    indexFiles.seen.set(v, indexFiles.signature(v.indexPath));
    return v;
  },
  current(v: { indexPath: string }): boolean {
    return indexFiles.seen.get(v) === indexFiles.signature(v.indexPath);
  },
};

/** Ended migrations kept for `status` and `list`. */
const HISTORY = 64;

export class ServeService {
  private readonly bus = new EventEmitter();
  private readonly out = new Map<string, OutgoingMigration>();
  private readonly in = new Map<string, IncomingMigration>();
  private readonly history: MigrationRecord[] = [];
  private readonly indexes: Shared<NasIndex>;
  private readonly destDisks: Shared<OpenDestDisk>;
  private readonly qemuSockets: QemuSockets;
  private control: ControlServer | null = null;
  private peer: Listener | null = null;
  private traces: ServeTraces | null = null;
  private stopping: Promise<void> | null = null;
  /** Ends shutdown's wait for running migrations now (a second SIGTERM). */
  private hurry: (() => void) | null = null;
  /** Peers refused before they authenticated (a wrong key, a foreign certificate). */
  readonly refused: string[] = [];

  private constructor(private readonly o: ServeServiceOptions, private readonly security: Security, private readonly log: Log) {
    this.bus.setMaxListeners(0);
    this.qemuSockets = o.qemuSockets ?? QemuSockets.resolve();
    const idle = { idleMs: o.keepOpenMs ?? 0, current: (_: string, v: { indexPath: string }) => indexFiles.current(v) };
    this.indexes = new Shared<NasIndex>((path) => this.openIndex(path).then(indexFiles.opened), (n) => { n.index.free(); n.image.close(); }, idle);
    this.destDisks = new Shared<OpenDestDisk>((path) => openDestDisk(path).then(indexFiles.opened), (d) => d.image.close(), idle);
  }

  static async start(o: ServeServiceOptions): Promise<ServeService> {
    const log = toLog(o.log);
    const security = resolveSecurity(o, "pagetwin serve");
    checkSecurity(security);
    const workers = o.workers ?? 0;
    if (!(Number.isInteger(workers) && workers >= 0)) throw new UsageError(`pagetwin serve: workers must be a whole number >= 0 (got ${workers})`);
    if (security.kind === "insecure") log.warn(INSECURE_WARNING);
    const s = new ServeService(o, security, log);
    try {
      s.traces = await ServeTraces.open(o);
      if (o.peerListen) {
        s.peer = await openPeerPort(parseEndpoint(o.peerListen, "--peer-listen"), security, log, {
          lease: (sock) => void s.lease(sock),
          session: (sock, id) => s.session(sock, id),
          refused: (r) => { s.refused.push(r); if (s.refused.length > HISTORY) s.refused.shift(); },
        });
      }
      s.control = await ControlServer.open({ path: o.control, log, handle: (op, args) => s.handle(op, args), subscribe: (cb) => s.subscribe(cb) });
    } catch (err) {
      s.peer?.close();
      await s.traces?.close();
      throw err;
    }
    return s;
  }

  /** The peer port's TCP port (0 without one). */
  get peerPort(): number {
    return this.peer?.port ?? 0;
  }

  /** The live view's URL with its token (with `ui`), else null. */
  get uiUrl(): string | null {
    return this.traces?.url ?? null;
  }

  subscribe(cb: (e: ServeEvent) => void): () => void {
    this.bus.on("event", cb);
    return () => this.bus.off("event", cb);
  }

  /** Prepares both ends of a migration from this host; see OutgoingRequest. */
  async outgoing(req: OutgoingRequest): Promise<OutgoingReady> {
    return new OutgoingMigration(req, this.outParts()).prepare();
  }

  list(): MigrationStatus[] {
    return [...this.out.values(), ...this.in.values()].map((m) => m.record.status()).concat(this.history.map((r) => r.status()));
  }

  status(id: string, direction?: string): MigrationStatus {
    const r = this.find(id, direction);
    if (!r) throw new ServeError("PAGETWIN_SERVE_UNKNOWN_MIGRATION", `no migration ${JSON.stringify(id)}${direction ? ` (${direction})` : ""} on this service`);
    return r.status();
  }

  /** Ends a migration that has not ended: the source QEMU's migration fails and its VM keeps running. */
  cancel(id: string, direction?: string): MigrationStatus {
    const m = (direction !== "in" ? this.out.get(id) : undefined) ?? (direction !== "out" ? this.in.get(id) : undefined);
    if (!m) return this.status(id, direction); // ended already (or unknown: that error)
    m.cancel(new ServeError("PAGETWIN_SERVE_CANCELLED", "cancelled by a control client"));
    return m.record.status();
  }

  /**
   * Stops the service without stranding a migration: no new ones (the
   * control socket and the peer port close), those not yet started are
   * called off, those running may finish for `drainMs`; after that they are
   * failed (each source QEMU's migration fails and its VM keeps running).
   */
  shutdown(drainMs = 600_000): Promise<void> {
    if (this.stopping) {
      if (drainMs === 0) this.hurry?.();
      return this.stopping;
    }
    this.stopping = this.drain(drainMs);
    return this.stopping;
  }

  private async drain(drainMs: number): Promise<void> {
    this.control?.close();
    this.peer?.close();
    const all = () => [...this.out.values(), ...this.in.values()];
    const off = new ServeError("PAGETWIN_SERVE_SHUTTING_DOWN", "the service is shutting down");
    for (const m of all()) if (m.record.state !== "running") m.cancel(off);
    const ended = Promise.all(all().map((m) => m.record.ended));
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<"late">((r) => { timer = setTimeout(() => r("late"), drainMs); this.hurry = () => r("late"); });
    if (all().length) this.log.info(`shutting down: waiting up to ${Math.round(drainMs / 1000)} s for ${all().length} migration(s) to finish`);
    if (await Promise.race([ended, late]) === "late") {
      for (const m of all()) m.cancel(new ServeError("PAGETWIN_SERVE_SHUTTING_DOWN", `the service is shutting down and the migration did not finish within ${drainMs} ms`));
      await ended;
    }
    clearTimeout(timer);
    this.control?.dropAll();
    this.indexes.closeIdle();
    this.destDisks.closeIdle();
    await this.traces?.close();
  }

  private async handle(op: string, a: Record<string, unknown>): Promise<object> {
    const id = typeof a["migration"] === "string" ? a["migration"] : "";
    const dir = typeof a["direction"] === "string" ? a["direction"] : undefined;
    switch (op) {
      case "hello":
        return { service: "pagetwin serve", protocol: SERVE_PROTOCOL_VERSION, peerPort: this.peerPort, security: describeSecurity(this.security), ui: this.uiUrl };
      case "outgoing":
        if (this.stopping) throw new ServeError("PAGETWIN_SERVE_SHUTTING_DOWN", "the service is shutting down: it takes no new migration");
        return this.outgoing(a as unknown as OutgoingRequest);
      case "list":
        return { migrations: this.list(), indexes: this.indexes.users(), refused: this.refused };
      case "status":
        return this.status(id, dir);
      case "cancel":
        return this.cancel(id, dir);
      default:
        throw new ServeError("PAGETWIN_SERVE_UNKNOWN_OP", `unknown op ${JSON.stringify(op)}: hello, outgoing, list, status, cancel, watch, unwatch`);
    }
  }

  private find(id: string, direction?: string): MigrationRecord | undefined {
    const live = (direction !== "in" ? this.out.get(id)?.record : undefined) ?? (direction !== "out" ? this.in.get(id)?.record : undefined);
    return live ?? [...this.history].reverse().find((r) => r.id === id && (!direction || r.direction === direction));
  }

  private outParts() {
    return {
      indexes: this.indexes, security: this.security, bus: this.bus, log: this.log, qemuSockets: this.qemuSockets, workers: this.o.workers ?? 0, ...(this.o.queueMs !== undefined ? { queueMs: this.o.queueMs } : {}),
      trace: (id: string, events: boolean) => this.traces!.open(id, "out", events ? this.bus : undefined),
      register: (m: OutgoingMigration) => this.register(this.out, m),
      unregister: (m: OutgoingMigration) => this.unregister(this.out, m),
    };
  }

  private register<M extends { record: MigrationRecord }>(map: Map<string, M>, m: M): void {
    if (this.stopping) throw new ServeError("PAGETWIN_SERVE_SHUTTING_DOWN", "the service is shutting down: it takes no new migration");
    if (map.has(m.record.id)) throw new ServeError("PAGETWIN_SERVE_DUPLICATE", `migration ${m.record.id} (${m.record.direction}) is under way on this service already`);
    map.set(m.record.id, m);
  }

  private unregister<M extends { record: MigrationRecord }>(map: Map<string, M>, m: M): void {
    if (map.get(m.record.id) !== m) return;
    map.delete(m.record.id);
    this.history.push(m.record);
    if (this.history.length > HISTORY) this.history.shift();
  }

  private lease(sock: net.Socket): Promise<void> {
    return IncomingMigration.accept(sock, {
      disks: this.destDisks, bus: this.bus, log: this.log, qemuSockets: this.qemuSockets, workers: this.o.workers ?? 0,
      trace: (id: string) => this.traces!.open(id, "in"),
      register: (m) => this.register(this.in, m),
      unregister: (m) => this.unregister(this.in, m),
    });
  }

  private session(sock: net.Socket, id: string): void {
    const m = this.in.get(id);
    if (m) { m.session(sock); return; }
    const why = `migration ${JSON.stringify(id).slice(0, 140)} is not prepared on the destination service (cancelled, ended, or never asked for)`;
    this.log.warn(`a stream session: ${why}`);
    sock.end(jsonFrame(SFrame.Abort, { reason: why }));
    setTimeout(() => sock.destroy(), TIMEOUTS.refuseLingerMs).unref();
  }

  private async openIndex(path: string): Promise<NasIndex> {
    const t0 = performance.now();
    const nas = await openNasIndex(path);
    this.log.info(`index ${nas.indexPath}: ${nas.header.blocks} blocks, ${nas.built ? "built" : "loaded"} in ${(performance.now() - t0).toFixed(0)} ms`);
    return nas;
  }
}
