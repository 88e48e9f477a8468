// The source half of a migration: open the disks' indexes (shared with
// other migrations of the same images), prepare the destination service on
// a lease, then listen where the source QEMU will connect. Each QEMU
// connection is a stream-out session of stream mode, dialling the
// destination service's peer port with the migration's id in its HELLO.

import type { EventEmitter } from "node:events";
import { availableAlgorithms, zstdUnavailableReason, type CompressionMode } from "../codec/compress.js";
import type { NasIndex } from "../adapters/nas/index-file.js";
import { dial } from "../link/dial.js";
import { RateLimiter } from "../link/rate.js";
import { formatEndpoint, isLocal, parseEndpoint, type Endpoint } from "../link/endpoint.js";
import type { Security } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { parseJson, type Frame } from "../wire/envelope.js";
import { SFrame } from "../stream/frames.js";
import { outContext, runOutSession, type OutContext } from "../stream/out.js";
import { EncoderPool, type PoolDisk } from "../stream/encoder-pool.js";
import { serve } from "../stream/serve.js";
import { newStats, type StreamProxy, type StreamStats } from "../stream/stats.js";
import { MultiDiskHasher, diskOffsets } from "../stream/disks.js";
import { ServeError, UsageError } from "../errors.js";
import type { Log } from "../log.js";
import { PeerFrame, SERVE_PROTOCOL_VERSION, type Prepare, type Prepared } from "./frames.js";
import { Lease, abortError } from "./lease.js";
import { MigrationRecord, type Timings } from "./migration.js";
import type { Shared } from "./shared.js";
import type { MigrationTrace } from "./trace.js";
import type { QemuSockets } from "./qemu-sockets.js";

/** The `outgoing` request. */
export interface OutgoingRequest {
  /** The migration's id (unique on both services while it runs): e.g. the domain's name or UUID. */
  migration: string;
  /** The VM's disk images on this host, in the domain's order. */
  disks: string[];
  /** The same images as the destination host mounts them (default: the same paths). */
  destDisks?: string[];
  /** Where the source QEMU connects: a loopback HOST:PORT (port 0: any free one), unix:PATH, or "unix": a socket of this migration in the service's socket directory. */
  qemu: string;
  /** The destination QEMU's -incoming address, as the destination host reaches it; "unix": the source's socket path (libvirt's unix:// migrate URI: one path on both hosts). */
  destQemu: string;
  /** The destination service's peer address, HOST:PORT. */
  peer: string;
  /** Compression of what travels raw: auto (default), off, zstd, brotli. */
  compress?: CompressionMode;
  /** Referenced pages kept for resends (default DEFAULT_WINDOW_PAGES, 16384). */
  windowPages?: number;
  /** Trace the migration for the asking client: its records as `trace` events to watches that ask for them (docs/TRACE.md). */
  trace?: boolean;
  /** A cap on what the migration sends on the link, bytes/s, all its connections together (absent or 0: none). */
  bandwidth?: number;
}

/** The `outgoing` answer: what QEMU (or libvirt) is given. */
export interface OutgoingReady {
  migration: string;
  /** For the source QEMU: `migrate URI` (tcp:HOST:PORT or unix:PATH). */
  migrateUri: string;
  /** For libvirt's --migrateuri: tcp://HOST:PORT, or unix:///PATH when both QEMUs use the same path (absent otherwise). */
  libvirtMigrateUri?: string;
  /** Where the source service listens for QEMU. */
  listen: string;
  /** The port of `listen` (0 for a unix socket). */
  port: number;
  /** The destination QEMU's address (libvirt: --listen-address is its host). */
  destQemu: string;
  listenAddress?: string;
  disks: { path: string; dedup: boolean; reason?: string }[];
}

/** What the service lends an outgoing migration. */
export interface OutParts {
  indexes: Shared<NasIndex>;
  security: Security;
  bus: EventEmitter;
  log: Log;
  /** The migration's trace sinks (--trace-dir, --ui, `trace` events if `events`; none without them). */
  trace(id: string, events: boolean): MigrationTrace;
  /** Where "unix" puts QEMU's socket. */
  qemuSockets: QemuSockets;
  /** Link time that may be on its way beyond stream-in's credit (stream-out's --queue-ms; undefined: its default). */
  queueMs?: number;
  /** Worker threads each migration encodes on (0: the service's own thread; a traced migration: always so). */
  workers: number;
  register(m: OutgoingMigration): void;
  unregister(m: OutgoingMigration): void;
}

export class OutgoingMigration {
  private proxy: StreamProxy | null = null;
  private lease: Lease | null = null;
  private acquired = false;
  private trace: MigrationTrace | null = null;
  /** The sessions' context once the destination answered (with the migration's encoder workers, if any). */
  private context: Promise<OutContext> | null = null;
  readonly record: MigrationRecord;
  private readonly stats: StreamStats = newStats("stream-out");
  private readonly qemuAt: Endpoint;
  private destQemu: Endpoint;
  private readonly peerAt: Endpoint;

  constructor(private readonly req: OutgoingRequest, private readonly parts: OutParts) {
    checkRequest(req);
    this.qemuAt = parseEndpoint(req.qemu === "unix" ? `unix:${parts.qemuSockets.pathFor(req.migration)}` : req.qemu, "qemu");
    if (!isLocal(this.qemuAt)) throw new UsageError(`qemu: the source QEMU connects over loopback or a unix socket (got ${req.qemu})`);
    if (req.destQemu === "unix" && this.qemuAt.kind !== "unix") throw new UsageError(`destQemu "unix" is the source QEMU's socket path: qemu must be a unix socket too (got ${req.qemu})`);
    this.destQemu = req.destQemu === "unix" ? this.qemuAt : parseEndpoint(req.destQemu, "destQemu");
    this.peerAt = parseEndpoint(req.peer, "peer", "");
    this.stats.compression.mode = req.compress ?? "auto";
    this.record = new MigrationRecord(req.migration, "out", formatEndpoint(this.qemuAt), this.stats,
      req.disks.map((path) => ({ path, dedup: false })), parts.bus, formatEndpoint(this.peerAt));
  }

  /** Prepares both ends; resolves once the source QEMU may connect. On failure nothing stays open. */
  async prepare(): Promise<OutgoingReady> {
    this.parts.register(this);
    try {
      const ready = await this.prepareBoth();
      // cancelled meanwhile (a control client, or the service stopping): no URI for a migration that is off
      if (this.record.final) throw new ServeError(this.record.error?.code ?? "PAGETWIN_SERVE_CANCELLED", this.record.error?.message ?? "cancelled while it was prepared");
      this.record.setState("ready");
      this.record.mark("ready");
      this.parts.log.info(`migration ${this.req.migration} (out): ready, QEMU migrates to ${ready.migrateUri}`);
      void this.proxy!.done.then((s) => this.finish(s.error));
      return ready;
    } catch (err) {
      this.lease?.end({ code: "PAGETWIN_SERVE_CANCELLED", reason: `the source service could not prepare the migration: ${(err as Error).message}` });
      void this.proxy?.close();
      this.release();
      void this.closeTrace();
      this.record.setState("failed", err);
      this.parts.unregister(this);
      throw err;
    }
  }

  // The source side listens first, so that a destination QEMU port given as 0
  // can be the port chosen here (libvirt uses one port number for both QEMUs);
  // a QEMU connection waits until the destination has answered.
  private async prepareBoth(): Promise<OutgoingReady> {
    const { req, parts } = this;
    const nas = await parts.indexes.acquireAll(req.disks);
    this.acquired = true;
    this.record.mark("indexesOpen");
    const blocks = nas.map((n) => n.header.blocks);
    let prepared!: (lookup: PoolDisk[]) => void;
    const lookup = new Promise<PoolDisk[]>((r) => { prepared = r; });
    const sockets = this.qemuAt.kind === "unix" && parts.qemuSockets.owns(this.qemuAt.path) ? parts.qemuSockets : null;
    sockets?.ensure();
    this.proxy = await this.listen(nas[0]!, lookup);
    if (this.qemuAt.kind === "unix") sockets?.grant(this.qemuAt.path);
    if (this.destQemu.kind === "tcp" && this.destQemu.port === 0 && this.proxy.port) this.destQemu = { ...this.destQemu, port: this.proxy.port };
    const answer = await this.prepareDestination(nas, blocks);
    const offsets = diskOffsets(blocks);
    answer.disks.forEach((d, i) => Object.assign(this.record.disks[i]!, d.dedup ? { dedup: true } : { dedup: false, reason: d.reason ?? "refused" }));
    // opened only now: a refused or duplicate migration leaves no trace file behind
    this.trace = parts.trace(req.migration, req.trace === true);
    prepared(nas.flatMap((n, i) => answer.disks[i]?.dedup ? [{ engine: n.engine, index: n.index, blocks: blocks[i]!, offset: offsets[i]!, slot: i }] : []));
    return this.answer();
  }

  /** Dials the destination service and asks it to get ready (PREPARE -> PREPARED). */
  private async prepareDestination(nas: NasIndex[], blocks: number[]): Promise<Prepared> {
    const { req, parts } = this;
    let sock;
    try {
      sock = await dial(this.peerAt, parts.security, { peer: "destination pagetwin serve", allowHalfOpen: false, hint: "Is `pagetwin serve` running there, with --peer-listen on that address?" });
    } catch (err) {
      throw new ServeError("PAGETWIN_PEER_UNREACHABLE", (err as Error).message, { cause: err });
    }
    this.record.mark("peerConnected");
    const lease = this.lease = new Lease(sock);
    const paths = req.destDisks ?? req.disks;
    const p: Prepare = {
      v: SERVE_PROTOCOL_VERSION, migration: req.migration, qemu: formatEndpoint(this.destQemu),
      disks: paths.map((path, i) => ({ path, indexId: nas[i]!.header.indexId, blocks: blocks[i]! })),
    };
    lease.send(PeerFrame.Prepare, p);
    const f = await lease.next("PREPARED from the destination service");
    if (f.type === SFrame.Abort) throw abortError(f, "the destination service refused the migration");
    if (f.type !== PeerFrame.Prepared) throw new ServeError("PAGETWIN_PROTOCOL", `the destination service answered PREPARE with frame ${f.type}`);
    const prepared = parseJson<Prepared>(f, "PREPARED");
    if (!Array.isArray(prepared.disks) || prepared.disks.length !== paths.length) throw new ServeError("PAGETWIN_PROTOCOL", "PREPARED does not answer for every disk");
    lease.watch((why) => this.cancel(why));
    this.record.mark("peerPrepared");
    return prepared;
  }

  private listen(first: NasIndex, disks: Promise<PoolDisk[]>): Promise<StreamProxy> {
    const { req, parts, record } = this;
    const context = this.context = disks.then(async (lookup) => {
      const trace = this.trace?.sinks;
      return outContext({
        engine: first.engine, index: first.index, indexId: first.header.indexId, stats: this.stats, log: parts.log,
        windowPages: req.windowPages, to: this.peerAt, bandwidth: req.bandwidth, queueMs: parts.queueMs,
        linkLimit: req.bandwidth ? new RateLimiter(req.bandwidth) : undefined, noDedup: lookup.length === 0, compress: req.compress,
        security: parts.security, trace, traceLabel: `migration ${req.migration} (out)`,
        lookup: () => new MultiDiskHasher(lookup, record.twins), hello: { migration: req.migration },
        // a trace follows every page on this thread (stream-out's rule)
        encoders: parts.workers && lookup.length && !trace?.length ? await this.encoders(lookup) : null,
      });
    });
    return serve({ at: this.qemuAt, security: { kind: "local" }, peer: "qemu" }, {
      stats: this.stats, keep: false, log: parts.log, onClose: () => {},
      session: async (sock, channel) => {
        record.mark("qemuConnected");
        const ctx = await context;
        record.setState("running");
        return runOutSession(ctx, sock, channel);
      },
    });
  }

  /** The migration's encoder workers, each with every deduplicated disk's index; none (and a warning) if they do not start. */
  private async encoders(disks: PoolDisk[]): Promise<EncoderPool | null> {
    try {
      const pool = await EncoderPool.create(this.parts.workers, disks, this.record.twins);
      this.stats.workers.threads = pool.size;
      return pool;
    } catch (err) {
      const w = `migration ${this.req.migration} (out): its ${this.parts.workers} encoder workers did not start (${(err as Error).message}); its sessions encode on the service's thread`;
      this.stats.warnings.push(w);
      this.parts.log.warn(w);
      return null;
    }
  }

  private answer(): OutgoingReady {
    const at = this.qemuAt.kind === "tcp" ? { ...this.qemuAt, port: this.proxy!.port } : this.qemuAt;
    const migrateUri = at.kind === "tcp" ? `tcp:${formatEndpoint(at)}` : `unix:${at.path}`;
    return {
      migration: this.req.migration, migrateUri, ...libvirtUri(at, this.destQemu),
      listen: formatEndpoint(at), port: at.kind === "tcp" ? at.port : 0, destQemu: formatEndpoint(this.destQemu),
      ...(this.destQemu.kind === "tcp" ? { listenAddress: this.destQemu.host } : {}),
      disks: this.record.disks.map((d) => ({ ...d })),
    };
  }

  /** Ends it now: the source QEMU's migration fails (the VM keeps running), the destination drops its half. */
  cancel(why: ServeError): void {
    if (this.record.final) return;
    this.parts.log.warn(`migration ${this.req.migration} (out): ${why.message}`);
    this.record.setState(why.code === "PAGETWIN_SERVE_CANCELLED" ? "cancelled" : "failed", why);
    this.lease?.end({ code: why.code, reason: why.message });
    void this.proxy?.close();
  }

  private async finish(error: string | undefined): Promise<void> {
    const { record } = this;
    // every session has ended, so has its trace: the file is complete before anyone hears the end
    record.mark("sessionsEnded");
    await this.closeTrace();
    if (!record.final) {
      await this.peerFinished();
      const ok = !error && this.stats.verdict === "verified";
      record.setState(ok ? "completed" : "failed", ok ? undefined : new ServeError("PAGETWIN_MIGRATION", error ?? `the end-to-end check says ${this.stats.verdict}`));
    }
    this.lease?.end();
    await this.context?.then((c) => c.encoders?.close(), () => {});
    this.release();
    this.parts.unregister(this);
  }

  private async closeTrace(): Promise<void> {
    const t = this.trace;
    this.trace = null;
    await t?.close().catch((err: Error) => this.parts.log.warn(`migration ${this.req.migration} (out): ${err.message}`));
  }

  /** The destination's FINISHED (its stats), if it comes soon. */
  private async peerFinished(): Promise<void> {
    if (!this.lease) return;
    let f: Frame;
    try {
      f = await this.lease.next("FINISHED from the destination service", TIMEOUTS.closeWaitMs);
    } catch {
      return;
    }
    if (f.type !== PeerFrame.Finished) return;
    this.record.mark("peerFinished");
    const fin = parseJson<{ stats?: StreamStats; timings?: Timings }>(f, "FINISHED");
    if (fin.stats && typeof fin.stats === "object") this.record.peerStats = fin.stats;
    if (fin.timings && typeof fin.timings === "object") this.record.peerTimings = fin.timings;
  }

  private release(): void {
    if (!this.acquired) return;
    this.acquired = false;
    for (const p of this.req.disks) this.parts.indexes.release(p);
  }
}

/**
 * libvirt's --migrateuri: libvirt gives both QEMUs one port (tcp://HOST:PORT, the destination listening on
 * --listen-address) or one socket path (unix:///PATH on both hosts); none when the two ends differ in path.
 */
function libvirtUri(at: Endpoint, dest: Endpoint): { libvirtMigrateUri?: string } {
  if (at.kind === "tcp") return { libvirtMigrateUri: `tcp://${formatEndpoint(at)}` };
  return dest.kind === "unix" && dest.path === at.path ? { libvirtMigrateUri: `unix://${at.path}` } : {};
}

function checkRequest(r: OutgoingRequest): void {
  const strings = (v: unknown) => Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === "string" && x.length > 0);
  if (typeof r.migration !== "string" || !/^[\w.:@+-]{1,128}$/.test(r.migration)) throw new UsageError("migration: an id of 1-128 characters of letters, digits and . _ : @ + -");
  if (!strings(r.disks)) throw new UsageError("disks: one or more image paths");
  if (r.destDisks !== undefined && (!strings(r.destDisks) || r.destDisks.length !== r.disks.length)) throw new UsageError("destDisks: one path per disk");
  for (const k of ["qemu", "destQemu", "peer"] as const) if (typeof r[k] !== "string") throw new UsageError(`${k}: HOST:PORT or unix:PATH`);
  if (r.compress !== undefined && r.compress !== "auto" && r.compress !== "off" && !availableAlgorithms().includes(r.compress)) {
    throw new UsageError(`compress: auto, off or an available algorithm (${zstdUnavailableReason()})`);
  }
  if (r.windowPages !== undefined && !(Number.isInteger(r.windowPages) && r.windowPages >= 64)) throw new UsageError("windowPages: an integer >= 64");
  if (r.trace !== undefined && typeof r.trace !== "boolean") throw new UsageError("trace: true or false");
  if (r.bandwidth !== undefined && !(typeof r.bandwidth === "number" && Number.isFinite(r.bandwidth) && r.bandwidth >= 0)) throw new UsageError("bandwidth: bytes per second, a number >= 0 (0: no cap)");
}
