// One agent-mode migration of a real QEMU guest: open the NAS index and the
// source's RAM file, start a local destination agent when none is given, run
// the source agent with QEMU's stop and device-state handover as its VM
// control, and on any failure leave the source running (QemuPair).

import { randomBytes } from "node:crypto";
import { PSK_BYTES, type SecurityOptions } from "../link/security.js";
import { openNasIndex } from "../adapters/nas/index-file.js";
import { BackgroundRefresh } from "../adapters/nas/refresh.js";
import { RamFile } from "../adapters/ram/ram-file.js";
import { DestinationAgent, type DestinationResult } from "./destination.js";
import { EnginePool } from "../pool/pool.js";
import { migrateSource, MigrationError, type MigrationResult, type RamReader, type SourceOptions } from "./source.js";
import { QemuPair } from "./qemu-pair.js";
import { throwIfAborted } from "../abort.js";
import { AbortError, AgentMigrationError } from "../errors.js";
import { toLog, type Log } from "../log.js";
import type { AgentMigrationOptions, AgentMigrationResult } from "./qemu.js";

type NasIndex = Awaited<ReturnType<typeof openNasIndex>>;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class QemuAgentMigration {
  private readonly startedAt: number;
  private readonly log: Log;
  private readonly pair: QemuPair;
  private readonly result: AgentMigrationResult;
  private link: SecurityOptions;
  private ram: RamFile | null = null;
  private nas: NasIndex | null = null;
  private refresh: BackgroundRefresh | null = null;
  private local: DestinationAgent | null = null;
  private localResult: Promise<DestinationResult> | null = null;
  private pool: EnginePool | null = null;

  constructor(private readonly o: AgentMigrationOptions) {
    this.startedAt = o.startedAt ?? performance.now();
    this.log = toLog(o.log);
    throwIfAborted(o.signal, "the migration");
    this.pair = new QemuPair(o.source.qmp, o.destination.qmp, o.destination.kill, this.log);
    this.link = { psk: o.psk ?? null, tls: o.tls ?? null, insecure: o.insecure ?? false };
    this.result = {
      status: "failed", dedup: o.dedup ?? true, "total-time": 0, downtime: 0, "setup-time": 0, "expected-downtime": 0,
      ram: { transferred: 0, total: 0, duplicate: 0, normal: 0, "normal-bytes": 0, twin: 0, resent: 0, mbps: 0, "dirty-sync-count": 0 },
      compression: null, frameCrc: null,
      device: null, "received-bytes": 0, verified: false, digest: "", convergence: "", "source-status": "unknown",
      destinationAgent: null, iterations: [],
    };
  }

  async run(): Promise<AgentMigrationResult> {
    const result = this.result;
    try {
      await this.pair.check();
      const nas = await this.openIndex();
      this.ram = RamFile.open(this.o.srcRam);
      const target = await this.destination();
      let mr: MigrationResult;
      try {
        mr = await migrateSource(await this.sourceOptions(nas, this.ram, target));
      } catch (err) {
        if (err instanceof MigrationError) mr = err.result;
        else throw err;
      }
      fill(result, mr);
      if (mr.status !== "completed") throw new Error(mr.error ?? "the migration failed");
      result.status = "completed";
    } catch (err) {
      result.error = (err as Error).message;
      try {
        await this.pair.restoreSource();
      } catch (e) {
        result.error += `; and leaving the source running failed: ${(e as Error).message} — check it with query-status and \`cont\` it by hand`;
      }
    } finally {
      await this.cleanUp();
    }
    return this.verdict();
  }

  /** The NAS image's block index; a stale one is used as it is, and re-read in the background when asked. */
  private async openIndex(): Promise<NasIndex> {
    const o = this.o;
    const nas = this.nas = await openNasIndex(o.image, { indexPath: o.indexPath, signal: o.signal, format: o.format, ...(o.onProgress ? { onProgress: o.onProgress } : {}) });
    if (nas.stale) {
      this.log.info(`index ${nas.indexPath} is stale (generation ${nas.header.generation}; the image was written since): used as it is, its stale entries cost resends` +
        (o.refreshRate ? `; re-read in the background at ${o.refreshRate} B/s` : ""));
      if (o.refreshRate) this.refresh = new BackgroundRefresh(nas, o.refreshRate, this.log);
    }
    return nas;
  }

  /** The destination agent given, or one in this process (with a fresh key of this migration's own unless told one). */
  private async destination(): Promise<{ host: string; port: number }> {
    const o = this.o;
    if (o.agent) return o.agent;
    if (!o.dstRam) throw new Error("no destination agent given (--dst-agent) and no destination RAM file (--dst-ram) for a local one");
    if (!o.psk && !o.tls && !o.insecure) this.link = { psk: randomBytes(PSK_BYTES) };
    this.local = new DestinationAgent({ ramPath: o.dstRam, imagePath: o.image, indexPath: o.indexPath, host: "127.0.0.1", port: 0, log: this.log, ...this.link });
    const port = await this.local.listen();
    this.localResult = this.local.nextResult();
    return { host: "127.0.0.1", port };
  }

  private async sourceOptions(nas: NasIndex, ram: RamFile, target: { host: string; port: number }): Promise<SourceOptions> {
    const o = this.o, pair = this.pair;
    // Reads through this wrapper stop the pre-copy as soon as the destination QEMU is gone.
    const reader: RamReader = {
      pages: ram.pages,
      readPages(first, count, into) {
        pair.throwIfGone();
        ram.readPages(first, count, into);
      },
    };
    // workers for the final pass only are started by the source agent after its handshake (and closed by it)
    const workers = o.workers ?? 0;
    const seed = nas.header.seed;
    const startPool = () => EnginePool.create({ size: workers, seed });
    const later = workers > 0 && o.workersWhen === "switchover";
    if (workers && !later) this.pool = await startPool();
    return {
      startedAt: this.startedAt, engine: nas.engine, index: this.result.dedup ? nas.index : null, indexId: nas.header.indexId, ram: reader,
      pool: later ? startPool : this.pool, ramPath: o.srcRam, workersWhen: o.workersWhen ?? "always",
      ...this.link,
      vm: { pause: () => pair.pauseSource(), resume: () => pair.restoreSource() },
      host: target.host, port: target.port, bandwidth: o.bandwidth ?? 0, convergence: o.convergence, compress: o.compress, trace: o.trace,
      onIteration: (it) => {
        // Workers read RAM themselves: stop here too once the destination QEMU is gone.
        pair.throwIfGone();
        o.onIteration?.(it);
      },
      handover: (tunnel) => pair.handover(tunnel, { incomingUri: o.incomingUri, timeoutMs: o.handoverTimeoutMs ?? 60_000, signal: o.signal, onProgress: o.onProgress, beforeResume: o.beforeResume }),
      deviceTunnel: !o.incomingUri, signal: o.signal, ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    };
  }

  private async cleanUp(): Promise<void> {
    const result = this.result;
    this.pair.detach();
    result.device = this.pair.device;
    this.ram?.close();
    await this.refresh?.stop(); // before the image it reads is closed
    this.nas?.image.close();
    await this.pool?.close().catch(() => undefined);
    if (this.localResult) {
      result.destinationAgent = await Promise.race([this.localResult, sleep(5000).then(() => null)]);
      if (result.destinationAgent && result.status === "completed" && !result.destinationAgent.verified) {
        result.status = "failed";
        result.error = "the local destination agent did not verify the RAM";
      }
    }
    this.local?.close();
    result["source-status"] = await this.pair.sourceStatus();
  }

  private verdict(): AgentMigrationResult {
    const result = this.result, signal = this.o.signal;
    if (result.status !== "completed" && signal?.aborted) {
      throw new AbortError(`pagetwin migrate: aborted; the source VM is ${result["source-status"]}, the destination QEMU was stopped`, { cause: signal.reason });
    }
    if (result.status !== "completed") {
      throw new AgentMigrationError(
        `pagetwin migrate: failed: ${result.error}. The source VM is ${result["source-status"]}; ` +
        `the destination QEMU was stopped (its RAM is incomplete): start a new one with -incoming defer -S and retry.`, result);
    }
    return result;
  }
}

function fill(r: AgentMigrationResult, m: MigrationResult): void {
  r["total-time"] = Math.round(m.totalTimeMs);
  r.downtime = Math.round(m.downtimeMs);
  r["setup-time"] = Math.round(m.setupTimeMs);
  r["expected-downtime"] = Math.round(m.expectedDowntimeMs);
  r.ram = {
    transferred: m.transferredBytes, total: m.pages.total * 4096, duplicate: m.pages.zero, normal: m.pages.normal,
    "normal-bytes": m.pages.normal * 4096, twin: m.pages.twin, resent: m.pages.resent, mbps: m.mbps, "dirty-sync-count": m.iterations,
  };
  r["received-bytes"] = m.receivedBytes;
  r.compression = m.compression;
  r.frameCrc = m.frameCrc;
  r.verified = m.verified;
  r.digest = m.digest;
  r.convergence = m.convergence;
  r.iterations = m.iterationLog.map(({ pageMap: _omit, ...rest }) => rest);
  if (m.error) r.error = m.error;
}
