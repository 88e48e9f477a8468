// The destination half of a migration: prepared on a lease (PREPARE), fed
// by stream sessions the peer port routes here (HELLO with the migration's
// id), each rebuilt by stream mode's stream-in session into the destination
// QEMU. When the last session has ended, the outcome and stats go back on
// the lease (FINISHED).

import type * as net from "node:net";
import type { EventEmitter } from "node:events";
import { createEngine, type Engine } from "../core/engine.js";
import { defaultIndexPath, readIndexHeader } from "../adapters/nas/index-file.js";
import { openDisk } from "../adapters/nas/disk.js";
import type { GuestDisk } from "../adapters/nas/image.js";
import { parseEndpoint } from "../link/endpoint.js";
import { parseJson, printable } from "../wire/envelope.js";
import { inContext, runInSession, traceInContext, type InContext } from "../stream/in.js";
import { adopt } from "../stream/serve.js";
import { newStats, type StreamProxy } from "../stream/stats.js";
import { MultiDiskVerifier, diskOffsets, type DestDisk } from "../stream/disks.js";
import { RebuildPool, type RebuildDisk } from "../stream/rebuild-pool.js";
import { ServeError } from "../errors.js";
import type { Log } from "../log.js";
import { PeerFrame, SERVE_PROTOCOL_VERSION, type Prepare, type Prepared } from "./frames.js";
import { Lease } from "./lease.js";
import { MigrationRecord, errorInfo } from "./migration.js";
import type { Shared } from "./shared.js";
import type { MigrationTrace } from "./trace.js";
import type { QemuSockets } from "./qemu-sockets.js";

/** A destination disk open in the service: its image, and its index's seed and id (only they are needed here). */
export interface OpenDestDisk {
  engine: Engine;
  image: GuestDisk;
  indexId: string | null;
  indexError: string | null;
  indexPath: string;
}

export async function openDestDisk(path: string): Promise<OpenDestDisk> {
  const indexPath = defaultIndexPath(path);
  let seed = 0n, indexId: string | null = null, indexError: string | null = null;
  try {
    const h = readIndexHeader(indexPath);
    seed = h.seed;
    indexId = h.indexId;
  } catch (err) {
    indexError = (err as Error).message;
  }
  const image = openDisk(path);
  try {
    return { engine: await createEngine({ seed }), image, indexId, indexError, indexPath };
  } catch (err) {
    image.close();
    throw err;
  }
}

/** What the service lends an incoming migration. */
export interface InParts {
  disks: Shared<OpenDestDisk>;
  bus: EventEmitter;
  log: Log;
  /** The directory of QEMU's unix sockets: made ready when the destination QEMU is to listen there. */
  qemuSockets: QemuSockets;
  /** The migration's trace sinks (--trace-dir, --ui, a control client's; none without them). */
  trace(id: string): MigrationTrace;
  /** Worker threads each migration rebuilds on (0: the service's own thread). */
  workers: number;
  /** Registers the migration (throws ServeError when the id is taken or the service is stopping). */
  register(m: IncomingMigration): void;
  unregister(m: IncomingMigration): void;
}

export class IncomingMigration {
  private proxy!: StreamProxy;
  private add!: (sock: net.Socket) => void;
  private ctx!: InContext;
  private trace: MigrationTrace | null = null;
  /** The migration's rebuild workers once started (null: none). */
  private rebuilders: Promise<RebuildPool | null> = Promise.resolve(null);
  private constructor(readonly record: MigrationRecord, private readonly lease: Lease, private readonly paths: string[], private readonly parts: InParts) {}

  /** Answers a lease's PREPARE: PREPARED once the disks are open, or an ABORT saying why not. */
  static async accept(sock: net.Socket, parts: InParts): Promise<void> {
    const lease = new Lease(sock);
    let p: Prepare;
    try {
      p = checkPrepare(parseJson<Prepare>(await lease.next("PREPARE"), "PREPARE"));
    } catch (err) {
      parts.log.warn(`a peer's PREPARE: ${(err as Error).message}`);
      lease.end({ code: (err as ServeError).code ?? "PAGETWIN_PROTOCOL", reason: (err as Error).message });
      return;
    }
    const paths = p.disks.map((d) => d.path);
    const t0 = performance.now();
    const socket = qemuSocket(p.qemu, parts.qemuSockets);
    try {
      socket?.ensure();
    } catch (err) {
      lease.end({ code: errorInfo(err).code, reason: `the destination cannot make QEMU's socket directory ${parts.qemuSockets.dir}: ${(err as Error).message}` });
      return;
    }
    let disks: OpenDestDisk[];
    try {
      disks = await parts.disks.acquireAll(paths);
    } catch (err) {
      lease.end({ code: errorInfo(err).code, reason: `the destination cannot open the migration's disks: ${(err as Error).message}` });
      return;
    }
    const m = IncomingMigration.create(p, disks, lease, parts, t0);
    try {
      parts.register(m);
    } catch (err) {
      for (const path of paths) parts.disks.release(path);
      lease.end({ code: errorInfo(err).code, reason: (err as Error).message });
      return;
    }
    m.start();
  }

  private static create(p: Prepare, open: OpenDestDisk[], lease: Lease, parts: InParts, t0: number): IncomingMigration {
    const offsets = diskOffsets(p.disks.map((d) => d.blocks));
    const answers = p.disks.map((d, i) => dedupOf(d.indexId, open[i]!, offsets[i]!));
    const stats = newStats("stream-in");
    const record = new MigrationRecord(p.migration, "in", p.qemu, stats,
      p.disks.map((d, i) => ({ path: d.path, ...answers[i]! })), parts.bus);
    record.since(t0);
    record.mark("disksOpen");
    const m = new IncomingMigration(record, lease, p.disks.map((d) => d.path), parts);
    const dest: DestDisk[] = open.map((d, i) => ({ engine: d.engine, image: d.image, offset: answers[i]!.dedup ? offsets[i]! : -1, blocks: p.disks[i]!.blocks }));
    const anyDedup = answers.some((a) => a.dedup);
    const first = open[0]!;
    const ctx = inContext({
      engine: first.engine, image: first.image, indexId: null, indexError: null, indexPath: first.indexPath,
      qemu: parseEndpoint(p.qemu, "qemu"), stats, log: parts.log, watch: null,
      disks: {
        refusal: () => anyDedup ? null : `no disk of migration ${p.migration} has the source's index here: ${answers.map((a) => a.reason).join("; ")}`,
        verifier: () => new MultiDiskVerifier(dest, record.twins),
        seeds: dest.map((d) => d.engine.seed),
      },
    });
    const { proxy, add } = adopt({
      stats, keep: false, log: parts.log, onClose: () => {},
      session: (sock, channel) => { record.mark("firstSession"); record.setState("running"); return runInSession(ctx, sock, channel); },
    });
    m.proxy = proxy;
    m.add = add;
    m.ctx = ctx;
    // the sessions wait for them once they have read HELLO (their socket is read from the start)
    if (parts.workers && anyDedup) ctx.rebuilders = m.rebuilders = m.startRebuilders(dest.map((d, i) => ({ image: d.image.path, format: d.image.format, offset: d.offset, blocks: p.disks[i]!.blocks })));
    lease.send(PeerFrame.Prepared, { disks: answers } satisfies Prepared);
    record.mark("prepared");
    return m;
  }

  /** Rebuild workers with every disk's image; none (and a warning) if they do not start. */
  private async startRebuilders(disks: RebuildDisk[]): Promise<RebuildPool | null> {
    const { record, parts } = this;
    try {
      const pool = await RebuildPool.create(parts.workers, disks, record.twins);
      record.stats.workers.threads = pool.size;
      return pool;
    } catch (err) {
      const w = `migration ${record.id} (in): its ${parts.workers} rebuild workers did not start (${(err as Error).message}); its sessions rebuild on the service's thread`;
      record.stats.warnings.push(w);
      parts.log.warn(w);
      return null;
    }
  }

  private start(): void {
    const { record, lease, parts } = this;
    // opened once registered: a duplicate id leaves the running migration's trace file alone
    this.trace = parts.trace(record.id);
    traceInContext(this.ctx, this.trace.sinks, `migration ${record.id} (in)`);
    record.setState("ready");
    parts.log.info(`migration ${record.id} (in): ready, QEMU at ${record.qemu}, ${this.paths.length} disk(s)`);
    lease.watch((why) => this.cancel(why));
    void this.proxy.done.then((stats) => this.finish(stats.error));
  }

  /** A stream session of this migration, from the peer port (paused, its HELLO unread). */
  session(sock: net.Socket): void {
    if (this.record.final) {
      sock.destroy();
      return;
    }
    this.add(sock);
    sock.resume();
  }

  /** Ends it now: sessions in flight are cut (the destination QEMU's incoming migration fails). */
  cancel(why: ServeError): void {
    if (this.record.final) return;
    this.parts.log.warn(`migration ${this.record.id} (in): ${why.message}`);
    this.record.setState("cancelled", why);
    // the source hears why (an ABORT, not FINISHED): it ends its half too
    this.lease.end({ code: why.code, reason: why.message });
    void this.proxy.close();
  }

  private async finish(error: string | undefined): Promise<void> {
    const { record, lease, parts } = this;
    // every session has ended, so has its trace: the file is complete before anyone hears the end
    await this.trace?.close().catch((err: Error) => parts.log.warn(`migration ${record.id} (in): ${err.message}`));
    const ok = !error && record.stats.verdict === "verified";
    record.mark("sessionsEnded");
    if (!record.final) record.setState(ok ? "completed" : "failed", ok ? undefined : new ServeError("PAGETWIN_MIGRATION", error ?? `the end-to-end check says ${record.stats.verdict}`));
    record.mark("finished");
    lease.send(PeerFrame.Finished, { ok, ...(record.error ? { error: record.error } : {}), stats: record.stats, disks: record.status().disks, timings: record.timings });
    lease.end();
    const q = parseEndpoint(record.qemu, "qemu");
    if (q.kind === "unix") parts.qemuSockets.remove(q.path);
    await this.rebuilders.then((r) => r?.close());
    for (const p of this.paths) parts.disks.release(p);
    parts.unregister(this);
  }
}

/** The socket directory, when the destination QEMU listens in it (else null: the operator's path, left alone). */
function qemuSocket(qemu: string, sockets: QemuSockets): QemuSockets | null {
  const at = parseEndpoint(qemu, "qemu");
  return at.kind === "unix" && sockets.owns(at.path) ? sockets : null;
}

/** Whether this side can verify the source's references into a disk (and why not). */
function dedupOf(indexId: string | null, d: OpenDestDisk, offset: number): { dedup: boolean; reason?: string } {
  if (offset < 0) return { dedup: false, reason: "the migration's disks hold more blocks together than a reference can name (16 TiB)" };
  if (indexId === null) return { dedup: false, reason: "the source has no index of it" };
  if (d.indexId === null) return { dedup: false, reason: `no usable index here: ${d.indexError}` };
  if (d.indexId !== indexId) return { dedup: false, reason: `the source uses index ${printable(indexId)}, this side has ${d.indexId} (${d.indexPath}): not the same image index` };
  return { dedup: true };
}

function checkPrepare(p: Prepare): Prepare {
  if (p.v !== SERVE_PROTOCOL_VERSION) throw new ServeError("PAGETWIN_PROTOCOL", `the source service speaks serve protocol ${printable(String(p.v))}, this one ${SERVE_PROTOCOL_VERSION}: run the same pagetwin on both hosts`);
  if (typeof p.migration !== "string" || !p.migration || typeof p.qemu !== "string" || !Array.isArray(p.disks) || p.disks.length === 0) {
    throw new ServeError("PAGETWIN_PROTOCOL", "PREPARE needs a migration id, the QEMU address and at least one disk");
  }
  for (const d of p.disks) {
    if (typeof d?.path !== "string" || !Number.isInteger(d.blocks) || d.blocks < 0 || (d.indexId !== null && typeof d.indexId !== "string")) {
      throw new ServeError("PAGETWIN_PROTOCOL", "PREPARE: each disk needs a path, its blocks and its index id (or null)");
    }
  }
  parseEndpoint(p.qemu, "the destination QEMU address");
  return p;
}
