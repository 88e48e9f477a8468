// Agent mode with a real QEMU guest: pagetwin moves the guest's RAM (the
// memory-backend-file, share=on, on both sides) while the guest runs; at
// switchover the source is stopped (QMP `stop`), the last round is sent, the
// destination's RAM digest is checked against the source's, and only then
// does QEMU migrate the device state with capability x-ignore-shared (the
// shared RAM is skipped); the destination is resumed with `cont`.
//
// Any failure leaves the source running: the destination QEMU is stopped
// first (its RAM is incomplete), then the source gets `cont` if it was paused.

import type { TlsFiles } from "../link/security.js";
import type { DiskFormat } from "../adapters/nas/image.js";
import type { QmpClient } from "../adapters/qemu/qmp.js";
import type { DestinationResult } from "./destination.js";
import type { IterationRecord, WorkersWhen } from "./source.js";
import type { ConvergenceOptions } from "../plan/convergence.js";
import type { CompressionStats, CompressionMode } from "../codec/compress.js";
import type { LogOption, Progress } from "../log.js";
import type { DeviceMigration } from "./qemu-pair.js";
import { QemuAgentMigration } from "./qemu-migration.js";

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

/** The outcome, named as query-migrate names things where there is a counterpart. */
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
  device: DeviceMigration | null;
  /** Bytes pagetwin received back from the destination (acks). */
  "received-bytes": number;
  /** How the pages sent in full travelled (compressed or raw, and why). */
  compression: CompressionStats | null;
  /** Whether the data frames carried their own CRC-32 (false: inside TLS both agents agreed to leave it out; null: no link yet). */
  frameCrc: boolean | null;
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
export { waitMigration, type QueryMigrate } from "./qemu-pair.js";

// AgentMigrationError.result is an AgentMigrationResult (errors.ts names no agent types: see there)
declare module "../errors.js" {
  interface AgentMigrationErrorResult extends AgentMigrationResult {}
}

/**
 * Migrates a running QEMU guest in agent mode. The destination QEMU must run with
 * `-incoming defer` (and -S to be checked before `cont`), the same RAM size, and its RAM in a
 * memory-backend-file with share=on; so must the source.
 */
export async function migrateQemuAgentMode(o: AgentMigrationOptions): Promise<AgentMigrationResult> {
  return new QemuAgentMigration(o).run();
}
