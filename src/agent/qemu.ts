// Agent mode with a real QEMU guest: pagetwin moves the guest's RAM (the
// memory-backend-file, share=on, on both sides) while the guest runs; at
// switchover the source is stopped (QMP `stop`), the last round is sent, the
// destination's RAM digest is checked against the source's, and only then
// does QEMU migrate the device state with capability x-ignore-shared (the
// shared RAM is skipped); the destination is resumed with `cont`.
//
// Any failure leaves the source running: the destination QEMU is stopped
// first (its RAM is incomplete), then the source gets `cont` if it was paused.

import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Listener } from "../link/listen.js";
import type { DeviceTunnel } from "./device.js";
import { PSK_BYTES, type SecurityOptions, type TlsFiles } from "../link/security.js";
import { openNasIndex } from "../adapters/nas/index-file.js";
import { BackgroundRefresh } from "../adapters/nas/refresh.js";
import type { DiskFormat } from "../adapters/nas/image.js";
import { RamFile } from "../adapters/ram/ram-file.js";
import type { QmpClient } from "../adapters/qemu/qmp.js";
import { DestinationAgent, type DestinationResult } from "./destination.js";
import { EnginePool } from "../pool/pool.js";
import { migrateSource, MigrationError, type IterationRecord, type MigrationResult, type RamReader, type WorkersWhen } from "./source.js";
import type { ConvergenceOptions } from "../plan/convergence.js";
import type { CompressionMode, CompressionStats } from "../codec/compress.js";
import { throwIfAborted } from "../abort.js";
import { toLog, type LogOption, type Progress } from "../log.js";

/** One side of the migration: its QMP connection and how to get rid of it after a failure. */
export interface QemuSide {
  qmp: QmpClient;
  /** Stop this QEMU for good (default: QMP `quit`). Used on the destination after a failure. */
  kill?: () => Promise<void>;
}

export interface AgentMigrationOptions {
  source: QemuSide;
  destination: QemuSide;
  /** The source guest's RAM file (its memory-backend-file mem-path). Read only. */
  srcRam: string;
  /** The destination guest's RAM file; needed when this process runs the destination agent. */
  dstRam?: string;
  /** The guest's raw disk image on the NAS (its block index sits beside it, or at indexPath). */
  image: string;
  indexPath?: string;
  /** The image's format (default: told by its first bytes). */
  format?: DiskFormat | undefined;
  /**
   * A stale index (the image was written since indexing) is used as it is and
   * re-read in the background at this many bytes/s while the VM migrates (0 or absent: not re-read).
   */
  refreshRate?: number;
  /** Send twin pages as NAS references (default true); false: plain pre-copy by pagetwin. */
  dedup?: boolean;
  /** A destination agent already listening (`pagetwin listen`); default: one in this process on 127.0.0.1. */
  agent?: { host: string; port: number };
  /**
   * By default the device state travels through pagetwin's own link (TLS): the source QEMU migrates
   * into a private unix socket of this process, the destination agent hands it to its QEMU. With
   * this, QEMU sends it itself, unprotected unless QEMU has TLS of its own: where the destination
   * QEMU takes it (`migrate-incoming`) and the source sends it (`migrate`), e.g. tcp:10.0.0.2:4444.
   */
  incomingUri?: string;
  /** Rate limit of the pagetwin link, bytes/s (0: none, the link decides). */
  bandwidth?: number;
  /** Compression of the pages sent in full (default "auto"). */
  compress?: CompressionMode;
  convergence?: ConvergenceOptions;
  /** Hash on this many worker threads (0: on this thread); they scan the next window while one is on the link. */
  workers?: number;
  /** Whether the workers hash every pass or only the final one, with the guest stopped (see SourceOptions). */
  workersWhen?: WorkersWhen;
  /**
   * The link to a remote destination agent (`agent`): its pre-shared key, TLS
   * certificates, or an explicit insecure. A local agent (in this process)
   * uses these when given, else a fresh random key of this migration's own.
   */
  psk?: Uint8Array | null;
  tls?: TlsFiles | null;
  insecure?: boolean;
  /**
   * When the migrate command started (a performance.now() time; default: this
   * call). total-time and setup-time count from here, as QEMU's from its
   * migrate command: the CLI passes its process's start.
   */
  startedAt?: number;
  /** Time allowed for QEMU's device-state migration (default 60 s). */
  handoverTimeoutMs?: number;
  onIteration?: (it: IterationRecord) => void;
  /** Keep each round's page map (IterationRecord.pageMap), for a trace. */
  trace?: boolean;
  /** Progress: "index" while the NAS image is hashed, "iteration"/"final" per window of each pass, "handover" for QEMU's device state. */
  onProgress?: (p: Progress) => void;
  /**
   * Cancels the migration at any point before the destination runs: QEMU's
   * own migration is cancelled, the destination QEMU stopped, the source
   * left running (as after any failure); the call rejects with an AbortError.
   */
  signal?: AbortSignal;
  /**
   * Called at switchover with both guests stopped, after the device state arrived and before the
   * destination's `cont` (the destination must have been started with -S for it to still be paused).
   */
  beforeResume?: () => Promise<void>;
  /** Where warnings and notes go (level-aware, or a function that gets every message). */
  log?: LogOption;
}

/** query-migrate's members for a QEMU migration (the ones this module reads). */
export interface QueryMigrate {
  status?: string;
  "total-time"?: number;
  downtime?: number;
  "expected-downtime"?: number;
  "setup-time"?: number;
  "error-desc"?: string;
  ram?: {
    transferred?: number;
    total?: number;
    duplicate?: number;
    skipped?: number;
    normal?: number;
    "normal-bytes"?: number;
    "dirty-sync-count"?: number;
    mbps?: number;
    [k: string]: unknown;
  };
  "socket-address"?: { type: string; host?: string; port?: string }[];
  [k: string]: unknown;
}

/** The outcome, named as query-migrate names things where there is a counterpart. */
/**
 * The source QEMU's device state into the tunnel: QEMU migrates to a unix
 * socket (0600, in a fresh 0700 directory: only this user's processes reach
 * it), which takes one connection and carries it through the link.
 */
async function carryDeviceState(src: QmpClient, tunnel: DeviceTunnel, timeoutMs: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-device-"));
  const path = join(dir, "device.sock");
  let accepted!: (s: Socket) => void;
  let timer: NodeJS.Timeout | undefined;
  const conn = new Promise<Socket>((resolve, reject) => {
    accepted = resolve;
    timer = setTimeout(() => reject(new Error(`the source QEMU did not connect for its device state within ${timeoutMs} ms`)), timeoutMs);
  });
  const listener = await Listener.open({ at: { kind: "unix", path }, security: { kind: "local" }, peer: "source QEMU (device state)", onSession: (s) => accepted(s) });
  try {
    await src.execute("migrate", { uri: `unix:${path}` });
    const sock = await conn;
    clearTimeout(timer);
    listener.close(); // one connection: nothing else gets in
    await tunnel.carry(sock);
  } finally {
    clearTimeout(timer);
    listener.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

export interface AgentMigrationResult {
  status: "completed" | "failed";
  dedup: boolean;
  /**
   * ms from the start of the migrate command (the `pagetwin migrate` process,
   * or the call) to the destination running, as query-migrate's total-time:
   * set-up included, so at least setup-time plus every round's durationMs.
   */
  "total-time": number;
  /** ms with the guest stopped: source `stop` to destination `cont` (query-migrate: downtime). */
  downtime: number;
  /** ms from that start to the first round: QMP checks, index open (or build), workers, connection and handshake (query-migrate: setup-time). */
  "setup-time": number;
  "expected-downtime": number;
  ram: {
    /** Bytes pagetwin sent for RAM, framing included. */
    transferred: number;
    total: number;
    /** Zero pages found in the source's RAM, sent as a marker or already zero at the destination (query-migrate: duplicate; see IterationRecord.pages). */
    duplicate: number;
    normal: number;
    "normal-bytes": number;
    /** Pages sent as NAS references (24 bytes each instead of 4096). */
    twin: number;
    /** Twins the destination could not verify and got in full. */
    resent: number;
    mbps: number;
    /** Pre-copy iterations including the final one (query-migrate: dirty-sync-count). */
    "dirty-sync-count": number;
  };
  /** QEMU's device-state migration (x-ignore-shared): its own query-migrate at the end. */
  device: { "total-time": number; downtime: number; transferred: number; status: string } | null;
  /** Bytes pagetwin received back from the destination (acks). */
  "received-bytes": number;
  /** How the pages sent in full travelled (compressed or raw, and why). */
  compression: CompressionStats | null;
  /** The destination's RAM digest equalled the source's at switchover. */
  verified: boolean;
  digest: string;
  convergence: string;
  /** State of the source QEMU when this returned (completed: postmigrate; failed: running). */
  "source-status": string;
  destinationAgent: DestinationResult | null;
  iterations: Omit<IterationRecord, "pageMap">[];
  error?: string;
}

export { AgentMigrationError } from "../errors.js";
import { AbortError, AgentMigrationError } from "../errors.js";

// AgentMigrationError.result is an AgentMigrationResult (errors.ts names no agent types: see there)
declare module "../errors.js" {
  interface AgentMigrationErrorResult extends AgentMigrationResult {}
}

async function status(qmp: QmpClient): Promise<string> {
  return (await qmp.execute<{ status: string }>("query-status", undefined, { timeoutMs: 10_000 })).status;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function setIgnoreShared(qmp: QmpClient, side: string): Promise<void> {
  const caps = await qmp.execute<{ capability: string; state: boolean }[]>("query-migrate-capabilities");
  if (!caps.some((c) => c.capability === "x-ignore-shared")) {
    throw new Error(`the ${side} QEMU has no migration capability x-ignore-shared (QEMU 4.0 or later is needed)`);
  }
  await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: true }] });
}

/** Polls query-migrate on `qmp` until the migration leaves its active states. */
export async function waitMigration(qmp: QmpClient, timeoutMs: number, pollMs = 10, signal?: AbortSignal): Promise<QueryMigrate> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    throwIfAborted(signal, "the migration");
    const q = await qmp.execute<QueryMigrate>("query-migrate", undefined, { timeoutMs: 10_000 });
    const s = q.status ?? "none";
    if (s === "completed" || s === "failed" || s === "cancelled") return q;
    if (Date.now() > deadline) throw new Error(`QEMU's migration is still '${s}' after ${timeoutMs} ms`);
    await sleep(pollMs);
  }
}

/**
 * Migrates a running QEMU guest in agent mode. The destination QEMU must run with
 * `-incoming defer` (and -S to be checked before `cont`), the same RAM size, and its RAM in a
 * memory-backend-file with share=on; so must the source.
 */
export async function migrateQemuAgentMode(o: AgentMigrationOptions): Promise<AgentMigrationResult> {
  const startedAt = o.startedAt ?? performance.now();
  const log = toLog(o.log);
  const signal = o.signal;
  throwIfAborted(signal, "the migration");
  const dedup = o.dedup ?? true;
  const src = o.source.qmp, dst = o.destination.qmp;
  const result: AgentMigrationResult = {
    status: "failed", dedup, "total-time": 0, downtime: 0, "setup-time": 0, "expected-downtime": 0,
    ram: { transferred: 0, total: 0, duplicate: 0, normal: 0, "normal-bytes": 0, twin: 0, resent: 0, mbps: 0, "dirty-sync-count": 0 },
    compression: null,
    device: null, "received-bytes": 0, verified: false, digest: "", convergence: "", "source-status": "unknown",
    destinationAgent: null, iterations: [],
  };
  let destinationGone: string | null = null;
  const onDstClose = (err: Error | undefined) => { destinationGone = `the destination QEMU's QMP connection closed${err ? ` (${err.message})` : ""}`; };
  dst.on("close", onDstClose);
  if (dst.closed) destinationGone = "the destination QEMU's QMP connection is closed";

  let sourcePaused = false;
  let qemuMigrating = false;
  let destinationKilled = false;
  const killDestination = async () => {
    if (destinationKilled) return;
    destinationKilled = true;
    try {
      if (o.destination.kill) await o.destination.kill();
      else if (!dst.closed) await dst.execute("quit", undefined, { timeoutMs: 5000 }).catch(() => undefined);
    } catch (err) {
      log.error(`stopping the destination QEMU failed: ${(err as Error).message}`);
    }
  };
  /** Leave the source running: cancel QEMU's migration, stop the destination, `cont` the source. */
  const restoreSource = async () => {
    if (qemuMigrating) {
      await src.execute("migrate_cancel").catch(() => undefined);
      try { await waitMigration(src, 10_000); } catch { /* reported by the status check below */ }
      qemuMigrating = false;
    }
    await killDestination();
    const s = await status(src);
    if (s !== "running") await src.execute("cont");
    sourcePaused = false;
  };

  let ram: RamFile | null = null;
  let nas: Awaited<ReturnType<typeof openNasIndex>> | null = null;
  let refresh: BackgroundRefresh | null = null;
  let local: DestinationAgent | null = null;
  let localResult: Promise<DestinationResult> | null = null;
  let link: SecurityOptions = { psk: o.psk ?? null, tls: o.tls ?? null, insecure: o.insecure ?? false };
  let pool: EnginePool | null = null;
  try {
    // Checks before anything moves.
    const [ss, ds] = [await status(src), await status(dst)];
    if (ss !== "running" && ss !== "paused") throw new Error(`the source QEMU is '${ss}', not running`);
    if (ds !== "inmigrate") throw new Error(`the destination QEMU is '${ds}'; start it with -incoming defer (and -S)`);
    await setIgnoreShared(src, "source");
    await setIgnoreShared(dst, "destination");

    nas = await openNasIndex(o.image, { indexPath: o.indexPath, signal, format: o.format, ...(o.onProgress ? { onProgress: o.onProgress } : {}) });
    if (nas.stale) {
      log.info(`index ${nas.indexPath} is stale (generation ${nas.header.generation}; the image was written since): used as it is, its stale entries cost resends` +
        (o.refreshRate ? `; re-read in the background at ${o.refreshRate} B/s` : ""));
      if (o.refreshRate) refresh = new BackgroundRefresh(nas, o.refreshRate, log);
    }
    ram = RamFile.open(o.srcRam);
    let target = o.agent;
    if (!target) {
      if (!o.dstRam) throw new Error("no destination agent given (--dst-agent) and no destination RAM file (--dst-ram) for a local one");
      if (!o.psk && !o.tls && !o.insecure) link = { psk: randomBytes(PSK_BYTES) };
      local = new DestinationAgent({ ramPath: o.dstRam, imagePath: o.image, indexPath: o.indexPath, host: "127.0.0.1", port: 0, log, ...link });
      target = { host: "127.0.0.1", port: await local.listen() };
      localResult = local.nextResult();
    }
    // Reads through this wrapper stop the pre-copy as soon as the destination QEMU is gone.
    const srcRam = ram;
    const reader: RamReader = {
      pages: srcRam.pages,
      readPages(first, count, into) {
        if (destinationGone) throw new Error(destinationGone);
        srcRam.readPages(first, count, into);
      },
    };

    const handover = async (tunnel: DeviceTunnel | null) => {
      if (destinationGone) throw new Error(destinationGone);
      throwIfAborted(signal, "the migration");
      o.onProgress?.({ phase: "handover", done: 0, total: 1, bytes: 0 });
      // through pagetwin's link (TLS) by default; straight from QEMU to QEMU with an explicit incomingUri
      await dst.execute("migrate-incoming", { uri: tunnel ? tunnel.incoming : o.incomingUri! });
      qemuMigrating = true;
      if (tunnel) await carryDeviceState(src, tunnel, o.handoverTimeoutMs ?? 60_000);
      else await src.execute("migrate", { uri: o.incomingUri! });
      const q = await waitMigration(src, o.handoverTimeoutMs ?? 60_000, 5, signal);
      qemuMigrating = false;
      result.device = { "total-time": q["total-time"] ?? 0, downtime: q.downtime ?? 0, transferred: q.ram?.transferred ?? 0, status: q.status ?? "" };
      if (q.status !== "completed") throw new Error(`QEMU's device-state migration ended '${q.status}'${q["error-desc"] ? `: ${q["error-desc"]}` : ""}`);
      // The source's side is done when the last byte left; wait for the destination to load it.
      const deadline = Date.now() + 30_000;
      let d = await status(dst);
      while (d === "inmigrate") {
        if (Date.now() > deadline) throw new Error("the destination QEMU is still loading the device state after 30 s");
        await sleep(5);
        d = await status(dst);
      }
      if (d !== "paused" && d !== "prelaunch" && d !== "running") throw new Error(`the destination QEMU is '${d}' after the device state arrived`);
      o.onProgress?.({ phase: "handover", done: 1, total: 1, bytes: q.ram?.transferred ?? 0 });
      if (d !== "running") {
        // the last moment to cancel: after `cont` the guest runs at the destination
        throwIfAborted(signal, "the migration");
        if (o.beforeResume) await o.beforeResume();
        await dst.execute("cont");
      } else {
        log.warn("the destination QEMU resumed by itself (started without -S): its RAM could not be checked before cont");
      }
    };

    // workers for the final pass only are started by the source agent after its handshake (and closed by it)
    const workers = o.workers ?? 0;
    const seed = nas.header.seed;
    const startPool = () => EnginePool.create({ size: workers, seed });
    if (workers && o.workersWhen !== "switchover") pool = await startPool();

    let mr: MigrationResult;
    try {
      mr = await migrateSource({
        startedAt, engine: nas.engine, index: dedup ? nas.index : null, indexId: nas.header.indexId, ram: reader, pool: workers && o.workersWhen === "switchover" ? startPool : pool, ramPath: o.srcRam, workersWhen: o.workersWhen ?? "always",
        ...link,
        vm: {
          pause: async () => { await src.execute("stop"); sourcePaused = true; },
          resume: async () => { await restoreSource(); },
        },
        host: target.host, port: target.port, bandwidth: o.bandwidth ?? 0, convergence: o.convergence, compress: o.compress, trace: o.trace,
        onIteration: (it) => {
          // Workers read RAM themselves: stop here too once the destination QEMU is gone.
          if (destinationGone) throw new Error(destinationGone);
          o.onIteration?.(it);
        },
        handover, deviceTunnel: !o.incomingUri, signal, ...(o.onProgress ? { onProgress: o.onProgress } : {}),
      });
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
      await restoreSource();
    } catch (e) {
      result.error += `; and leaving the source running failed: ${(e as Error).message} — check it with query-status and \`cont\` it by hand`;
    }
  } finally {
    dst.off("close", onDstClose);
    ram?.close();
    await refresh?.stop(); // before the image it reads is closed
    nas?.image.close();
    await pool?.close().catch(() => undefined);
    if (localResult) {
      result.destinationAgent = await Promise.race([localResult, sleep(5000).then(() => null)]);
      if (result.destinationAgent && result.status === "completed" && !result.destinationAgent.verified) {
        result.status = "failed";
        result.error = "the local destination agent did not verify the RAM";
      }
    }
    local?.close();
    result["source-status"] = await status(src).catch((e: Error) => `unknown (${e.message})`);
  }
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
  r.verified = m.verified;
  r.digest = m.digest;
  r.convergence = m.convergence;
  r.iterations = m.iterationLog.map(({ pageMap: _omit, ...rest }) => rest);
  if (m.error) r.error = m.error;
}
