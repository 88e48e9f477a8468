// Source agent: runs pre-copy iterations over a live VM's RAM, sending each
// dirty page as a zero marker, a NAS reference (twin) or in full, until the
// convergence policy says switch over; then stops the VM, sends the last
// round and checks that the destination's RAM digest equals its own.
// Any failure resumes the source VM, whose RAM this agent never writes.

import { Engine, HASH_SIZE, PAGE_SIZE, TwinIndex } from "../core/engine.js";
import { Planner, estimateDirtyPages, type WindowPlan } from "../plan/planner.js";
import { ConvergencePolicy, type ConvergenceOptions } from "../plan/convergence.js";
import { FrameLink } from "../link/channel.js";
import { RateLimiter } from "../link/rate.js";
import { FrameBuffers } from "../link/buffers.js";
import { dial } from "../link/dial.js";
import { resolveSecurity, type SecurityOptions } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { DeviceTunnel } from "./device.js";
import { AckedLink } from "./acks.js";
import { ProtocolError, jsonFrame, parseJson, printable } from "../wire/envelope.js";
import type { EnginePool } from "../pool/pool.js";
import type { PoolSession } from "../pool/session.js";
import { UsageError } from "../errors.js";
import { abortError, onAbort, throwIfAborted } from "../abort.js";
import type { Progress } from "../log.js";
import {
  AGENT_FRAMES, DEFAULT_FRAME_PAGES, FrameType, PROTOCOL_VERSION, decodeIterAck, encodePageList, encodePagesMaybeCompressed, encodeRefs, pagesFrameSize,
} from "./protocol.js";
import {
  ALGORITHM_ID, CompressionPolicy, availableAlgorithms, contiguousRuns, createCompressor, emptyCompressionStats, zstdUnavailableReason,
  type CompressionAlgorithm, type CompressionMode, type CompressionStats, type PageCompressor,
} from "../codec/compress.js";

/** Raw frames that time a link the compressed frames never filled (CompressionPolicy's linkProbeFrames): 8 MiB, twice the send queue. */
const LINK_PROBE_FRAMES = 8;

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
  error?: string;
}

export { MigrationError } from "../errors.js";
import { MigrationError } from "../errors.js";

// MigrationError.result is a MigrationResult (errors.ts names no agent types: see there)
declare module "../errors.js" {
  interface MigrationErrorResult extends MigrationResult {}
}

/**
 * The source side of an agent-mode migration: pre-copy iterations over `ram`
 * to the destination agent at host:port, then switchover (vm.pause, last
 * round, RAM digests compared, handover). Rejects with a MigrationError
 * (with its result) on failure, an AbortError when `signal` fired; either
 * way the VM was resumed if it had been paused.
 */
export async function migrateSource(o: SourceOptions): Promise<MigrationResult> {
  const t0 = o.startedAt ?? performance.now();
  const security = resolveSecurity(o, "pagetwin source agent");
  if (o.pool && !o.ramPath) throw new UsageError("pagetwin: a pool needs ramPath (its workers read the RAM file themselves)");
  throwIfAborted(o.signal, "the migration");
  const policy = new ConvergencePolicy(o.convergence);
  const planner = new Planner(o.engine, { pages: o.ram.pages, windowPages: o.windowPages, index: o.index });
  const framePages = o.framePages ?? DEFAULT_FRAME_PAGES;
  const answerTimeout = o.answerTimeoutMs ?? TIMEOUTS.answerMs;
  const ramBytes = o.ram.pages * PAGE_SIZE;
  const totals = { normal: 0, zero: 0, twin: 0, resent: 0 };
  const log: IterationRecord[] = [];
  const result: MigrationResult = {
    status: "failed", mode: o.index ? "pagetwin" : "baseline", totalTimeMs: 0, downtimeMs: 0, setupTimeMs: 0,
    transferredBytes: 0, receivedBytes: 0, iterations: 0, pages: { ...totals, total: o.ram.pages }, mbps: 0,
    convergence: "", expectedDowntimeMs: 0, verified: false, digest: "", iterationLog: log,
    compression: emptyCompressionStats(o.compress ?? "auto"),
  };
  const cstats = result.compression;
  const cmode = o.compress ?? "auto";
  // what this source offers: auto, every algorithm available here (preferred first); an algorithm, that one
  let offer: CompressionAlgorithm[] = [];
  if (cmode === "auto") offer = availableAlgorithms();
  else if (cmode !== "off") {
    if (!availableAlgorithms().includes(cmode)) throw new RangeError(`pagetwin: --compress ${cmode}: not available here (${zstdUnavailableReason()})`);
    offer = [cmode];
  }
  let compressor: PageCompressor | null = null;
  let link: FrameLink | null = null;
  let cpolicy: CompressionPolicy | null = null;
  let paused = false;
  let pausedAt = 0;
  // Pages frames are built in buffers used again once the link has written them
  const frameBuffers = new FrameBuffers(pagesFrameSize(framePages));
  const resendRegion = o.engine.alloc(framePages * PAGE_SIZE);
  const resendHashes = o.engine.alloc(framePages * HASH_SIZE);
  let scans: PoolSession | null = null;
  let poolSize = 0;
  /** A pool this call starts (o.pool a function): started once, closed at the end. */
  let started: Promise<EnginePool | null> | null = null;
  /** The pool's session, once the pool has started (null: no pool, or it failed to start). */
  const sessionNow = async (): Promise<PoolSession | null> => {
    if (scans || !o.pool) return scans;
    let pool: EnginePool | null;
    if (typeof o.pool === "function") {
      started ??= o.pool().catch(() => null);
      pool = await started;
    } else pool = o.pool;
    if (pool && !scans) {
      scans = pool.session({ seed: o.engine.seed });
      poolSize = pool.size;
    }
    return scans;
  };
  const stopListening = onAbort(o.signal, () => link?.abort("the migration was cancelled at the source"));
  try {
    // a pool hashing every pass is needed now; one for the final pass only may go on starting
    if (o.workersWhen !== "switchover") await sessionNow();
    const to = o.socketPath ? { kind: "unix" as const, path: o.socketPath } : { kind: "tcp" as const, host: o.host, port: o.port };
    const socket = await dial(to, security, { peer: "destination agent", timeoutMs: o.connectTimeoutMs ?? TIMEOUTS.connectMs, hint: "Is `pagetwin listen` running there?" });
    if (o.signal?.aborted) {
      socket.destroy();
      throw abortError(o.signal, "the migration");
    }
    link = new FrameLink(socket, `destination agent ${o.socketPath ?? `${o.host}:${o.port}`}`, AGENT_FRAMES, new RateLimiter(o.bandwidth));
    // the link's rate from what the destination says it received (no --bandwidth needed for compression to weigh it)
    const acks = new AckedLink(link, (total) => cpolicy?.recordAcked(total));
    cpolicy = new CompressionPolicy({ mode: cmode === "auto" ? "auto" : "always", bandwidth: o.bandwidth, meter: acks.meter, linkProbeFrames: LINK_PROBE_FRAMES });
    await link.send(jsonFrame(FrameType.Hello, {
      version: PROTOCOL_VERSION, pages: o.ram.pages, pageSize: PAGE_SIZE, dedup: !!o.index, indexId: o.indexId, compression: offer,
      ...(o.deviceTunnel ? { device: true } : {}),
    }));
    type Ack = { ok: boolean; error?: string; version?: number; ready?: boolean; compression?: unknown; device?: unknown };
    const ack = parseJson<Ack>(await link.next(FrameType.HelloAck, TIMEOUTS.helloMs), "HelloAck");
    if (!ack.ok) throw new ProtocolError(`the destination refused the migration: ${printable(String(ack.error ?? "no reason given"))}`);
    if (!ack.ready) throw new ProtocolError("the destination did not say it is ready (does it run the same pagetwin version?)");
    link.handshakeDone();
    if (o.deviceTunnel && typeof ack.device !== "string") throw new ProtocolError("the destination agent cannot take the device state through the link (does it run the same pagetwin version?)");
    const device = o.deviceTunnel ? new DeviceTunnel(link, ack.device as string) : null;
    if (offer.length) {
      const accepted = Array.isArray(ack.compression) ? ack.compression : [];
      const algo = offer.find((a) => accepted.includes(a)) ?? null;
      if (algo) {
        compressor = createCompressor(algo);
        cstats.algorithm = algo;
      } else cstats.note = `the destination decompresses none of ${offer.join(", ")}: pages travel raw`;
    } else cstats.note = "compression off";
    // workers for the final pass only start now, during the live rounds: not competing with the handshake
    if (o.workersWhen === "switchover") void sessionNow().catch(() => {});

    /** `carried`: what was sent for this round before it began (the final round: the last live round's resends, sent with the guest running). */
    const runIteration = async (iteration: number, final: boolean, carried?: { since: number; resent: number }): Promise<IterationRecord> => {
      const l = link!;
      const start = performance.now();
      if (iteration === 1) result.setupTimeMs = start - t0;
      const bytes0 = carried?.since ?? l.bytesOut;
      const rec: IterationRecord = {
        iteration, final, startMs: start - t0, durationMs: 0, scanMs: 0, hashWorkers: 0, ackWaitMs: 0, dirty: 0,
        pages: { normal: 0, zero: 0, twin: 0, clean: 0, resent: carried?.resent ?? 0 }, transferredBytes: 0,
      };
      const map = o.trace ? new Uint8Array(o.ram.pages) : null;
      let scanMs = 0;
      // With a pool, workers hash the next window while this one is on the link.
      const pool = final || o.workersWhen !== "switchover" ? await sessionNow() : null;
      let pending = pool ? pool.scanFile(o.ramPath!, 0, planner.windowCount(0)) : null;
      pending?.catch(() => {}); // awaited in the loop; an abort before that must not go unhandled
      rec.hashWorkers = pool ? poolSize : 0;
      for (let first = 0; first < planner.pages; first += planner.windowPages) {
        throwIfAborted(o.signal, "the migration");
        const s = performance.now();
        const count = planner.windowCount(first);
        let plan: WindowPlan;
        let bytesOf: (i: number) => Uint8Array;
        if (pool) {
          const scan = await pending!;
          plan = planner.planWindowHashed(first, count, scan.hashes, scan.zeroBits);
          const bytes = await pool.pagesOf(plan.send);
          bytesOf = (i) => bytes.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
          const next = first + planner.windowPages;
          if (next < planner.pages) {
            pending = pool.scanFile(o.ramPath!, next, planner.windowCount(next));
            pending.catch(() => {}); // awaited above on the next turn; a failure before that must not go unhandled
          }
        } else {
          o.ram.readPages(first, count, planner.window.view(0, count * PAGE_SIZE));
          plan = planner.planWindow(first, count);
          const win = planner.window.view();
          bytesOf = (i) => {
            const off = planner.pageOffset(first, plan.send[i]!);
            return win.subarray(off, off + PAGE_SIZE);
          };
        }
        scanMs += performance.now() - s;
        await sendWindow(l, plan, bytesOf);
        rec.dirty += plan.dirty;
        rec.pages.normal += plan.send.length;
        // the first round accounts for every zero page: those the destination holds already too
        const zero = plan.zero.length + (iteration === 1 ? plan.zeroHeld : 0);
        rec.pages.zero += zero;
        rec.pages.clean += count - plan.dirty - (iteration === 1 ? plan.zeroHeld : 0);
        rec.pages.twin += plan.twinPages.length;
        o.onProgress?.({ phase: final ? "final" : "iteration", iteration, done: first + count, total: planner.pages, bytes: l.bytesOut - bytes0 });
        if (map) {
          for (const p of plan.zero) map[p] = PAGE_CLASS.zero;
          for (const p of plan.twinPages) map[p] = PAGE_CLASS.twin;
          for (const p of plan.send) map[p] = PAGE_CLASS.sent;
        }
      }
      rec.scanMs = scanMs;
      const ackFrom = performance.now();
      // The previous round's answer (the twins it could not verify) has come
      // back while this round was read and sent: resend those pages now.
      await settlePrevious(l, rec.pages, map);
      // End of the round. A live round's answer is taken at the end of the
      // next one, so that the next scan overlaps the link's tail; the final
      // round waits for it (and for answers to its resends).
      for (let round = 0; ; round++) {
        await l.send(jsonFrame(FrameType.IterEnd, { iteration, final, round }));
        if (!final) {
          unacked = iteration;
          break;
        }
        const resend = await takeIterAck(l, iteration);
        if (resend.length === 0) break;
        if (round > 3) throw new ProtocolError(`the destination keeps asking for pages sent in full (${resend.length} pages)`);
        await resendPages(l, resend);
        rec.pages.resent += resend.length;
        if (map) for (const p of resend) map[p] = PAGE_CLASS.resent;
      }
      rec.ackWaitMs = performance.now() - ackFrom;
      rec.durationMs = performance.now() - start;
      rec.transferredBytes = l.bytesOut - bytes0;
      if (map) rec.pageMap = Buffer.from(map.buffer, map.byteOffset, map.length).toString("base64");
      totals.normal += rec.pages.normal;
      totals.zero += rec.pages.zero;
      totals.twin += rec.pages.twin;
      totals.resent += rec.pages.resent;
      log.push(rec);
      o.onIteration?.(rec);
      return rec;
    };

    /** The round whose IterAck has not been taken yet (null: none). */
    let unacked: number | null = null;
    /** Takes that round's IterAck and resends the pages it lists (counted in `rec`). */
    const settlePrevious = async (l: FrameLink, counts: { resent: number }, map: Uint8Array | null): Promise<number> => {
      if (unacked === null) return 0;
      const resend = await takeIterAck(l, unacked);
      unacked = null;
      await resendPages(l, resend);
      counts.resent += resend.length;
      if (map) for (const p of resend) map[p] = PAGE_CLASS.resent;
      return resend.length;
    };
    const takeIterAck = async (l: FrameLink, iteration: number): Promise<Uint32Array> => {
      const { iteration: acked, resend } = decodeIterAck(await l.next(FrameType.IterAck, answerTimeout), planner.pages);
      if (acked !== iteration) throw new ProtocolError(`the destination acknowledged iteration ${acked}, expected ${iteration}`);
      return resend;
    };

    const sendWindow = async (l: FrameLink, plan: WindowPlan, bytesOf: (i: number) => Uint8Array) => {
      if (plan.zero.length) await l.send(encodePageList(FrameType.Zeros, plan.zero));
      for (let i = 0; i < plan.twinPages.length; i += 4096) {
        const pages = plan.twinPages.subarray(i, i + 4096), blocks = plan.twinBlocks.subarray(i, i + 4096);
        await l.send(encodeRefs(pages, blocks, (k) => planner.windowHash(plan.first, pages[k]!)));
      }
      for (let i = 0; i < plan.send.length; i += framePages) {
        const pages = plan.send.subarray(i, i + framePages);
        // the frame holds the bytes (compressed or copied) before the next window overwrites them
        await sendPages(l, pages, (k) => bytesOf(i + k));
      }
    };

    /** One batch of full pages: compressed straight from `bytesOf` into the frame when that pays, else raw. */
    const sendPages = async (l: FrameLink, pages: Uint32Array, bytesOf: (i: number) => Uint8Array) => {
      const raw = pages.length * PAGE_SIZE;
      let compress: ((dst: Uint8Array) => number) | null = null;
      let compressMs = 0;
      const policy = cpolicy!;
      const verdict = compressor ? policy.decide() : "off";
      if (compressor && verdict === "compress") {
        const c = compressor;
        compress = (dst) => {
          const t = performance.now();
          const got = c.compressChunks(contiguousRuns(pages.length, bytesOf), dst);
          compressMs = performance.now() - t;
          return got;
        };
      }
      const { frame, compressed } = encodePagesMaybeCompressed(pages, bytesOf, compressor ? ALGORITHM_ID[compressor.algorithm] : 0, compress, policy.maxRatio, (size) => frameBuffers.take(size));
      if (compress) policy.recordCompress(raw, compressed >= 0 ? compressed : raw, compressMs);
      if (compressed >= 0) {
        cstats.framesCompressed++;
        cstats.bytesBefore += raw;
        cstats.bytesAfter += compressed;
      } else {
        cstats.framesRaw++;
        if (verdict === "slow") cstats.rawSlow++;
        else if (verdict === "poor" || compress) cstats.rawPoorRatio++;
      }
      await l.send(frame, () => frameBuffers.give(frame));
      policy.recordFrame(l.bytesOut);
    };

    const resendPages = async (l: FrameLink, pages: Uint32Array) => {
      for (let i = 0; i < pages.length; i += framePages) {
        const batch = pages.subarray(i, i + framePages);
        const v = resendRegion.view();
        batch.forEach((p, k) => o.ram.readPages(p, 1, v.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE)));
        o.engine.hashPagesAt(resendRegion.ptr, batch.length, resendHashes.ptr);
        const hv = resendHashes.view();
        batch.forEach((p, k) => planner.recordSent(p, hv.subarray(k * HASH_SIZE, (k + 1) * HASH_SIZE)));
        const data = resendRegion.view();
        await sendPages(l, batch, (k) => data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE));
      }
    };

    let iteration = 0;
    let decision;
    for (;;) {
      iteration++;
      const rec = await runIteration(iteration, false);
      const nextRoundBytes = iteration === 1 && o.sampleFirstRound !== false ? estimateDirtyPages(planner, (first, count, into) => o.ram.readPages(first, count, into)).pages * PAGE_SIZE : undefined;
      const elapsed = (performance.now() - t0 - result.setupTimeMs) / 1000;
      decision = policy.decide({
        iteration, wireBytes: rec.transferredBytes, scanMs: rec.scanMs,
        // what the destination received, not what waits in a queue or a socket's buffers; at most the rate it was given
        bytesPerSecond: Math.min(acks.acked / Math.max(elapsed, 1e-3), o.bandwidth > 0 ? o.bandwidth : Infinity),
        totalBytes: link.bytesOut, ramBytes,
        ...(nextRoundBytes !== undefined ? { nextRoundBytes } : {}),
      });
      if (decision.action !== "continue") break;
    }
    result.convergence = decision.reason;
    result.expectedDowntimeMs = decision.expectedDowntimeMs;
    if (decision.action === "abort") {
      throw new ProtocolError(`the migration did not converge (${decision.reason}: expected downtime ${decision.expectedDowntimeMs.toFixed(0)} ms > target ${policy.downtimeMs} ms); aborted as configured, the source VM keeps running`);
    }

    // Switchover: stop the guest, last round, compare digests. The last live
    // round's answer is taken first, with the guest still running, so that the
    // final round does not wait for the destination's backlog.
    // The last live round has been reported: these resends count in the final round's record.
    const carried = { since: link.bytesOut, resent: 0 };
    await settlePrevious(link, carried, null);
    pausedAt = performance.now();
    await o.vm.pause();
    paused = true;
    await runIteration(iteration + 1, true, carried);
    const digest = o.engine.digest(planner.sentHashes());
    result.digest = Buffer.from(digest).toString("hex");
    await link.send(jsonFrame(FrameType.Switchover, { digest: result.digest }));
    // The destination's own verdict, inside the authenticated channel: only ok:true with our digest lets the destination run.
    const done = parseJson<{ ok: unknown; digest?: unknown; error?: unknown }>(await link.next(FrameType.Done, answerTimeout), "Done");
    if (done.ok !== true) throw new ProtocolError(`the destination could not finish: ${printable(String(done.error ?? "no reason given"))}`);
    if (done.digest !== result.digest) throw new ProtocolError(`the destination's RAM digest ${printable(String(done.digest))} differs from the source's ${result.digest}`);
    result.verified = true;
    if (o.handover) await o.handover(device);
    result.downtimeMs = performance.now() - pausedAt;
    result.status = "completed";
    link.close();
  } catch (err) {
    result.error = (err as Error).message;
    link?.abort(result.error);
    if (paused) {
      try { await o.vm.resume(); } catch (e) { result.error += `; and resuming the source VM failed: ${(e as Error).message}`; }
    }
  } finally {
    result.totalTimeMs = performance.now() - t0;
    result.iterations = log.length;
    result.pages = { ...totals, total: o.ram.pages };
    if (link) {
      result.transferredBytes = link.bytesOut;
      result.receivedBytes = link.bytesIn;
    }
    result.mbps = (result.transferredBytes * 8) / 1e6 / Math.max(result.totalTimeMs / 1000, 1e-3);
    cstats.compressMBs = (cpolicy?.compressRate ?? 0) / 1e6;
    cstats.linkMBs = (cpolicy?.measuredLinkRate ?? 0) / 1e6;
    planner.free();
    resendRegion.free();
    resendHashes.free();
    stopListening();
    await (scans as PoolSession | null)?.close(); // set by sessionNow(), which TypeScript does not follow
    await (started as Promise<EnginePool | null> | null)?.then((p) => p?.close());
  }
  if (result.status !== "completed" && o.signal?.aborted) throw abortError(o.signal, "the migration");
  if (result.status !== "completed") throw new MigrationError(`pagetwin: migration failed: ${result.error}`, result);
  return result;
}
