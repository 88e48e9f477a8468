// The source agent's options and results: what a caller passes to
// migrateSource and what it gets back (names as QEMU's query-migrate).

import type { Engine, TwinIndex } from "../core/engine.js";
import type { ConvergenceOptions } from "../plan/convergence.js";
import type { SecurityOptions } from "../link/security.js";
import type { EnginePool } from "../pool/pool.js";
import type { Progress } from "../log.js";
import type { CompressionMode, CompressionStats } from "../codec/compress.js";
import type { DeviceTunnel } from "./device.js";

/** When the pool hashes: every pass, or only the final one (see SourceOptions.workersWhen). */
export type WorkersWhen = "always" | "switchover";

/** Reads the source VM's RAM (a file adapter, or anything page-addressable). */
export interface RamReader {
  readonly pages: number;
  readPages(first: number, count: number, into: Uint8Array): void;
}

/** Controls the source VM around switchover. */
export interface VmControl {
  /** Stop the guest's vCPUs (QEMU `stop`). */
  pause(): Promise<void>;
  /** Resume it on the source after a failure (QEMU `cont`). */
  resume(): Promise<void>;
}

export interface SourceOptions extends SecurityOptions {
  engine: Engine;
  /**
   * When the migration started (a performance.now() time; default: this
   * call): total-time and setup-time count from here, as QEMU's count from
   * its migrate command, so that the caller's own preparation (QMP checks,
   * opening the index, starting workers) is part of them.
   */
  startedAt?: number;
  /** Block index of the NAS image; null: plain pre-copy (zero pages skipped, every other dirty page sent). */
  index: TwinIndex | null;
  /** The index file's id, which the destination checks against its own copy (the seed never travels). */
  indexId: string | null;
  ram: RamReader;
  /**
   * Hash with these workers (in a session of the engine's seed), which read
   * `ramPath` themselves. Or a function that starts them: called when they
   * are first needed, which with workersWhen "switchover" is after the
   * handshake (their start-up then overlaps the live rounds, not the
   * connection); if they fail to start, the agent's own thread hashes
   * (hashWorkers 0). A pool this call started, it also closes.
   */
  pool?: EnginePool | (() => Promise<EnginePool>) | null;
  /**
   * When the pool hashes: every pass ("always", default), or only the final
   * pass, with the guest stopped ("switchover"): on a host with few cores the
   * workers compete with the agent's own thread (and a local destination
   * agent) during the live passes, and help most when the guest is stopped.
   */
  workersWhen?: WorkersWhen;
  ramPath?: string;
  vm: VmControl;
  /** The destination agent: a host with `port`, or a unix socket path with `socketPath`. */
  host: string;
  port: number;
  socketPath?: string;
  /** Link bandwidth cap, bytes per second (0: none). */
  bandwidth: number;
  convergence?: ConvergenceOptions;
  windowPages?: number;
  /**
   * After the first round, estimate from a sample of RAM what the next round
   * would send, and switch over at once when that fits the downtime target
   * (default true); false: always at least two live rounds.
   */
  sampleFirstRound?: boolean;
  /** Pages per Pages frame. */
  framePages?: number;
  /** Keep a per-page class map of every iteration (for the visualizer). */
  trace?: boolean;
  onIteration?: (it: IterationRecord) => void;
  /** Called after every window of every pass: pages done of the pass and bytes it put on the link so far. */
  onProgress?: (p: Progress) => void;
  /**
   * Cancels the migration: the link is aborted, the VM resumed if it was
   * paused (vm.resume), and the call rejects with an AbortError.
   */
  signal?: AbortSignal;
  /**
   * Called with the VM paused after the destination verified its RAM (QEMU:
   * device state handover). With `deviceTunnel`, it gets the tunnel through
   * this link that carries the device state to the destination agent.
   */
  handover?: (device: DeviceTunnel | null) => Promise<void>;
  /** Ask the destination agent to take the device state through the link (it says where its QEMU must listen). */
  deviceTunnel?: boolean;
  connectTimeoutMs?: number;
  /** Longest wait for an answer from the destination, ms (default 120000). */
  answerTimeoutMs?: number;
  /**
   * Compression of the pages sent in full: "auto" (default) compresses a
   * batch only when the compressor outruns the link and the batch compresses;
   * an algorithm compresses every batch that compresses; "off" never.
   */
  compress?: CompressionMode;
}

/** Page classes in a trace map. */
export const PAGE_CLASS = { clean: 0, zero: 1, twin: 2, sent: 3, resent: 4 } as const;

export interface IterationRecord {
  iteration: number;
  final: boolean;
  startMs: number;
  durationMs: number;
  scanMs: number;
  /** Worker threads that hashed this pass (0: the agent's own thread). */
  hashWorkers: number;
  /** Time from the end of this round's frames to the end of its closing: the previous live round's acknowledgement and resends, and in the final round its own acknowledgement, ms. */
  ackWaitMs: number;
  /** Pages whose content changed since the destination got it (its RAM starts zeroed). */
  dirty: number;
  /**
   * Every page of RAM, once per round: normal + twin + zero + clean = the
   * VM's pages. normal: sent in full (QEMU: ram.normal); twin: sent as a NAS
   * reference; zero: found all zero (QEMU: ram.duplicate), sent as a zero
   * marker when it changed, not sent when the destination holds zeros
   * already, which in the first round is every zero page (as QEMU's first
   * pass counts every zero page); clean: unchanged since the destination got
   * it (a zero page after its first round included), not sent. resent: twins
   * of the previous round (or this final one) sent again in full, on top.
   */
  pages: { normal: number; zero: number; twin: number; clean: number; resent: number };
  /** Bytes this iteration put on the link. */
  transferredBytes: number;
  /** One byte per page (PAGE_CLASS), base64, when tracing. */
  pageMap?: string;
}

export interface MigrationResult {
  status: "completed" | "failed";
  mode: "baseline" | "pagetwin";
  /**
   * As query-migrate's total-time: from the start (`startedAt`: the migrate
   * command) to the destination running, ms; at least setupTimeMs plus every
   * round's durationMs.
   */
  totalTimeMs: number;
  /** As query-migrate's downtime: VM stopped to destination verified (and handed over), ms. */
  downtimeMs: number;
  /** As query-migrate's setup-time: from the start to the first round (checks, index, workers, connection, handshake), ms. */
  setupTimeMs: number;
  /** Bytes this agent sent on the link (as ram.transferred, plus framing). */
  transferredBytes: number;
  /** Bytes received from the destination. */
  receivedBytes: number;
  iterations: number;
  /** Sums over the rounds (see IterationRecord.pages; clean is per round only); total: the VM's pages. */
  pages: { normal: number; zero: number; twin: number; resent: number; total: number };
  /** Link throughput over the whole migration, Mbit/s (query-migrate: mbps). */
  mbps: number;
  convergence: string;
  expectedDowntimeMs: number;
  /** The destination's RAM digest equalled the source's at switchover. */
  verified: boolean;
  digest: string;
  iterationLog: IterationRecord[];
  /** How the pages sent in full travelled: compressed or raw, and why. */
  compression: CompressionStats;
  /** Whether the data frames carried their own CRC-32 (false: inside TLS both agents agreed to leave it out). */
  frameCrc: boolean;
  error?: string;
}
