// The ends of a libvirt migration through pagetwin: the source host's
// `pagetwin serve` prepares both (it asks the destination's service over the
// peer link), listens where the source QEMU connects, and reports the
// migration's end with both sides' stats.

import { ServeClient, type ServeWatch } from "../serve/client.js";
import type { OutgoingReady } from "../serve/outgoing.js";
import type { MigrationStatus, ServeEvent } from "../serve/migration.js";
import type { StreamStats } from "../stream/stats.js";
import { UsageError } from "../errors.js";
import type { TraceSink } from "../trace/sink.js";
import { LIBVIRT_UNLIMITED_MIBS } from "../adapters/libvirt/virsh.js";
import type { EndsReport, EndsRequest, MigrationEnds, PreparedEnds } from "./ends.js";

export interface ServeEndsOptions {
  /** The source host's service control socket. */
  control: string;
  /** The destination service's peer address, HOST:PORT. */
  peer: string;
  /**
   * How the services meet the QEMUs (default "unix"): a unix socket, the same path on both hosts (libvirt's
   * unix:// migrate URI: what QEMU counts as sent is what the service took), or loopback TCP (one port number).
   */
  qemuSide?: "unix" | "tcp";
  /** unix: the socket's path on both hosts (default: one in the services' --qemu-sockets directory). */
  socketPath?: string;
  /** tcp: where the source QEMU connects (the service listens there): a loopback host (default 127.0.0.1). */
  qemuHost?: string;
  /** The port both QEMUs use (libvirt uses one port number for both ends); default 0: one the service finds free. */
  port?: number;
  /** Where the destination QEMU listens, on the destination host (default 127.0.0.1: only its service reaches it). */
  listenAddress?: string;
  /** How long to wait for the service's final report after libvirt finished, ms. */
  endTimeoutMs?: number;
  /** Where the migration's trace records go: the source service traces it for this client (docs/TRACE.md). */
  trace?: readonly TraceSink[];
}

/** The migration's id on both services: the domain's name when it is a valid id, else its UUID. */
export function migrationId(req: Pick<EndsRequest, "domain" | "uuid">): string {
  if (/^[\w.:@+-]{1,128}$/.test(req.domain)) return req.domain;
  if (req.uuid) return req.uuid;
  throw new UsageError(`domain name ${JSON.stringify(req.domain)} is not usable as a migration id and the domain has no UUID`);
}

export class ServeEnds implements MigrationEnds {
  readonly kind = "pagetwin";

  constructor(private readonly o: ServeEndsOptions) {}

  async prepare(req: EndsRequest): Promise<PreparedEnds> {
    const id = migrationId(req);
    const client = await ServeClient.connect(this.o.control);
    let watch: ServeWatch | undefined;
    try {
      const trace = this.o.trace ?? [];
      watch = await client.watch(id, { trace: trace.length > 0 });
      const ended = endOf(watch, trace);
      const ready = await this.outgoing(client, id, req);
      return { ...libvirtAddresses(ready), ...linkLimit(req), notes: [...notesOf(ready), ...limitNote(req)], finish: (ok) => this.finish(client, id, ok, ended) };
    } catch (err) {
      await watch?.close();
      client.close();
      throw err;
    }
  }

  /** Only prepares (for an orchestrator's own libvirt call): the service's answer; the migration then runs on its own. */
  async prepareOnly(req: EndsRequest): Promise<OutgoingReady> {
    const client = await ServeClient.connect(this.o.control);
    try {
      return await this.outgoing(client, migrationId(req), req);
    } finally {
      client.close();
    }
  }

  private outgoing(client: ServeClient, id: string, req: EndsRequest): Promise<OutgoingReady> {
    return client.request<OutgoingReady>("outgoing", {
      migration: id, disks: req.disks.map((d) => d.source!), ...this.qemuEnds(), peer: this.o.peer,
      ...(this.o.trace?.length ? { trace: true } : {}),
      ...(req.bandwidthMiBs ? { bandwidth: req.bandwidthMiBs * MIB } : {}),
    });
  }

  /** The `qemu` and `destQemu` of the service's `outgoing` request. */
  private qemuEnds(): { qemu: string; destQemu: string } {
    if ((this.o.qemuSide ?? "unix") === "unix") return { qemu: this.o.socketPath ? `unix:${this.o.socketPath}` : "unix", destQemu: "unix" };
    const port = this.o.port ?? 0;
    return { qemu: `${this.o.qemuHost ?? "127.0.0.1"}:${port}`, destQemu: `${this.o.listenAddress ?? "127.0.0.1"}:${port}` };
  }

  /** libvirt is done: the service's end of the migration (cancelled first if libvirt failed), as the report. */
  private async finish(client: ServeClient, id: string, ok: boolean, ended: Promise<MigrationStatus | null>): Promise<EndsReport> {
    try {
      if (!ok) await client.request("cancel", { migration: id, direction: "out" }).catch(() => {});
      const timeout = new Promise<null>((r) => setTimeout(() => r(null), this.o.endTimeoutMs ?? 15_000).unref());
      const status = await Promise.race([ended, timeout]) ?? await client.request<MigrationStatus>("status", { migration: id, direction: "out" }).catch(() => null);
      return status ? report(status) : { error: "the pagetwin service did not report the migration's end" };
    } finally {
      client.close();
    }
  }
}

/** libvirt's --migrateuri and --listen-address from the service's answer. */
export function libvirtAddresses(ready: OutgoingReady): { migrateUri: string; listenAddress?: string } {
  return { migrateUri: ready.libvirtMigrateUri ?? `tcp://${ready.listen}`, ...(ready.listenAddress ? { listenAddress: ready.listenAddress } : {}) };
}

const MIB = 1024 * 1024;

/**
 * The user's migration bandwidth caps the link, where the network is used: the
 * service paces what it sends, and QEMU's own stream (of which the link carries
 * only a part) is not limited as well, or the pages sent as references would
 * still cost the link's time.
 */
function linkLimit(req: EndsRequest): { qemuBandwidthMiBs?: number } {
  return req.bandwidthMiBs ? { qemuBandwidthMiBs: LIBVIRT_UNLIMITED_MIBS } : {};
}

function limitNote(req: EndsRequest): string[] {
  return req.bandwidthMiBs ? [`bandwidth: the link carries at most ${req.bandwidthMiBs} MiB/s; QEMU's stream, of which pages travel as references, is not limited`] : [];
}

/** The disks whose pages pass through, one sentence each. */
function notesOf(ready: OutgoingReady): string[] {
  return ready.disks.filter((d) => !d.dedup).map((d) => `${d.path}: no dedup (${d.reason ?? "refused"}); its pages pass through`);
}

/** The "end" event of the watched migration (null if the watch closed first); its trace records go to `trace`. */
async function endOf(watch: ServeWatch, trace: readonly TraceSink[]): Promise<MigrationStatus | null> {
  try {
    for await (const e of watch as AsyncIterable<ServeEvent>) {
      if (e.event === "trace") for (const s of trace) s.write(e.record);
      else if (e.event === "end" && e.direction === "out") return e.status;
    }
    return null;
  } finally {
    await watch.close();
  }
}

/** Where a side's time went, ms: its own work, waiting for the link (source) or its QEMU (destination) to drain, for acks. */
function waits(st: StreamStats): { busyMs: number; drainWaitMs: number; windowWaitMs: number } {
  return { busyMs: Math.round(st.busyMs), drainWaitMs: Math.round(st.drainWaitMs), windowWaitMs: Math.round(st.windowWaitMs) };
}

/** What compression did to the pages that travelled raw: the algorithm (null: none), bytes in and out, and why it was off. */
function compressionOf(st: StreamStats): { algorithm: string | null; bytesBefore: number; bytesAfter: number; framesCompressed: number; framesRaw: number; note?: string } {
  const c = st.compression;
  return { algorithm: c.algorithm, bytesBefore: c.bytesBefore, bytesAfter: c.bytesAfter, framesCompressed: c.framesCompressed, framesRaw: c.framesRaw, ...(c.note ? { note: c.note } : {}) };
}

/** What the command reports of the service's status: state, per-disk twins, both sides' byte counts and verdict. */
function report(s: MigrationStatus): EndsReport {
  const st = s.stats;
  return {
    migration: s.migration, state: s.state, ...(s.error ? { error: s.error.message, errorCode: s.error.code } : {}),
    disks: s.disks, verdict: st.verdict, pagesSeen: st.pagesSeen, twinsReplaced: st.twinsReplaced, zeroPages: st.zeroPages, resends: st.resends, passthrough: st.passthrough,
    bytesFromQemu: st.bytesFromQemu, bytesOutLink: st.bytesOutLink, bytesInLink: st.bytesInLink, sessions: st.sessions, multifd: st.multifd, workers: st.workers,
    compression: compressionOf(st), waits: waits(st), ...(s.peerStats ? { destinationWaits: waits(s.peerStats) } : {}),
    timings: s.timings, ...(s.peerTimings ? { destinationTimings: s.peerTimings } : {}),
    ...(s.peerStats ? { destination: { verdict: s.peerStats.verdict, bytesToQemu: s.peerStats.bytesToQemu, bytesInLink: s.peerStats.bytesInLink, twinsReplaced: s.peerStats.twinsReplaced, streamsVerified: s.peerStats.streamsVerified, workers: s.peerStats.workers } } : {}),
  };
}
