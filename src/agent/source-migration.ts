// One source-side migration as a small state machine: connect and agree,
// live rounds until the convergence policy says switch over, then the final
// round with the guest stopped and the digest check. Any failure resumes the
// source VM, whose RAM this agent never writes.

import { PAGE_SIZE } from "../core/engine.js";
import { Planner, estimateDirtyPages } from "../plan/planner.js";
import { ConvergencePolicy, type ConvergenceDecision } from "../plan/convergence.js";
import { FrameLink } from "../link/channel.js";
import { RateLimiter } from "../link/rate.js";
import { dial } from "../link/dial.js";
import { isTls, resolveSecurity, type Security } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { DeviceTunnel } from "./device.js";
import { AckedLink } from "./acks.js";
import { LazyPool } from "./lazy-pool.js";
import { PageSender } from "./page-sender.js";
import { PassWindows } from "./pass-windows.js";
import { ProtocolError, jsonFrame, parseJson, printable } from "../wire/envelope.js";
import { UsageError, MigrationError } from "../errors.js";
import { abortError, onAbort, throwIfAborted } from "../abort.js";
import { AGENT_FRAMES, DEFAULT_FRAME_PAGES, FrameType, PROTOCOL_VERSION, decodeIterAck } from "./protocol.js";
import { PAGE_CLASS, type IterationRecord, type MigrationResult, type SourceOptions } from "./source-types.js";

type Pages = IterationRecord["pages"];

export class SourceMigration {
  private readonly t0: number;
  private readonly security: Security;
  private readonly policy: ConvergencePolicy;
  private readonly planner: Planner;
  private readonly sender: PageSender;
  private readonly pool: LazyPool;
  private readonly answerTimeout: number;
  private readonly totals = { normal: 0, zero: 0, twin: 0, resent: 0 };
  private readonly result: MigrationResult;
  private link: FrameLink | null = null;
  private acks: AckedLink | null = null;
  private paused = false;
  /** The live round whose IterAck has not been taken yet (null: none). */
  private unacked: number | null = null;

  constructor(private readonly o: SourceOptions) {
    this.t0 = o.startedAt ?? performance.now();
    this.security = resolveSecurity(o, "pagetwin source agent");
    if (o.pool && !o.ramPath) throw new UsageError("pagetwin: a pool needs ramPath (its workers read the RAM file themselves)");
    throwIfAborted(o.signal, "the migration");
    this.policy = new ConvergencePolicy(o.convergence);
    this.answerTimeout = o.answerTimeoutMs ?? TIMEOUTS.answerMs;
    this.planner = new Planner(o.engine, { pages: o.ram.pages, windowPages: o.windowPages, index: o.index });
    try {
      this.sender = new PageSender(o.engine, this.planner, o.ram, o.framePages ?? DEFAULT_FRAME_PAGES, o.compress ?? "auto");
    } catch (e) {
      this.planner.free();
      throw e;
    }
    this.pool = new LazyPool(o.pool, o.engine.seed);
    this.result = {
      status: "failed", mode: o.index ? "pagetwin" : "baseline", totalTimeMs: 0, downtimeMs: 0, setupTimeMs: 0,
      transferredBytes: 0, receivedBytes: 0, iterations: 0, pages: { ...this.totals, total: o.ram.pages }, mbps: 0,
      convergence: "", expectedDowntimeMs: 0, verified: false, digest: "", iterationLog: [], compression: this.sender.stats, frameCrc: true,
    };
  }

  /** Rejects with a MigrationError (with its result) on failure, an AbortError when the signal fired; either way the VM was resumed if it had been paused. */
  async run(): Promise<MigrationResult> {
    const o = this.o, result = this.result;
    const stopListening = onAbort(o.signal, () => this.link?.abort("the migration was cancelled at the source"));
    try {
      // a pool hashing every pass is needed now; one for the final pass only may go on starting
      if (o.workersWhen !== "switchover") await this.pool.session();
      const device = await this.connect();
      // workers for the final pass only start now, during the live rounds: not competing with the handshake
      if (o.workersWhen === "switchover") this.pool.warm();
      const iterations = await this.liveRounds();
      await this.switchover(iterations + 1, device);
      result.status = "completed";
      this.link!.close();
    } catch (err) {
      await this.fail(err as Error);
    } finally {
      await this.finish();
      stopListening();
    }
    if (result.status !== "completed" && o.signal?.aborted) throw abortError(o.signal, "the migration");
    if (result.status !== "completed") throw new MigrationError(`pagetwin: migration failed: ${result.error}`, result);
    return result;
  }

  /** Dial, HELLO, and agree on compression and the device tunnel. */
  private async connect(): Promise<DeviceTunnel | null> {
    const o = this.o;
    const to = o.socketPath ? { kind: "unix" as const, path: o.socketPath } : { kind: "tcp" as const, host: o.host, port: o.port };
    const socket = await dial(to, this.security, { peer: "destination agent", timeoutMs: o.connectTimeoutMs ?? TIMEOUTS.connectMs, hint: "Is `pagetwin listen` running there?" });
    if (o.signal?.aborted) {
      socket.destroy();
      throw abortError(o.signal, "the migration");
    }
    const link = this.link = new FrameLink(socket, `destination agent ${o.socketPath ?? `${o.host}:${o.port}`}`, AGENT_FRAMES, new RateLimiter(o.bandwidth));
    // the link's rate from what the destination says it received (no --bandwidth needed for compression to weigh it)
    this.acks = new AckedLink(link, (total) => this.sender.recordAcked(total));
    this.sender.measure(this.acks.meter, o.bandwidth);
    await link.send(jsonFrame(FrameType.Hello, {
      version: PROTOCOL_VERSION, pages: o.ram.pages, pageSize: PAGE_SIZE, dedup: !!o.index, indexId: o.indexId, compression: this.sender.offer,
      ...(o.deviceTunnel ? { device: true } : {}),
      // inside TLS, which refuses any changed record, the data frames' CRC would only cost both ends a pass over every byte
      ...(isTls(socket) ? { noFrameCrc: true } : {}),
    }));
    type Ack = { ok: boolean; error?: string; version?: number; ready?: boolean; compression?: unknown; device?: unknown; noFrameCrc?: unknown };
    const ack = parseJson<Ack>(await link.next(FrameType.HelloAck, TIMEOUTS.helloMs), "HelloAck");
    if (!ack.ok) throw new ProtocolError(`the destination refused the migration: ${printable(String(ack.error ?? "no reason given"))}`);
    if (!ack.ready) throw new ProtocolError("the destination did not say it is ready (does it run the same pagetwin version?)");
    link.handshakeDone();
    if (o.deviceTunnel && typeof ack.device !== "string") throw new ProtocolError("the destination agent cannot take the device state through the link (does it run the same pagetwin version?)");
    this.sender.agree(ack.compression);
    this.sender.frameCrc = this.result.frameCrc = !(isTls(socket) && ack.noFrameCrc === true);
    return o.deviceTunnel ? new DeviceTunnel(link, ack.device as string) : null;
  }

  /** Live rounds until the policy says switch over (or abort): the number of rounds run. */
  private async liveRounds(): Promise<number> {
    const o = this.o, link = this.link!;
    let iteration = 0;
    let decision: ConvergenceDecision;
    for (;;) {
      iteration++;
      const rec = await this.round(iteration, false);
      const nextRoundBytes = iteration === 1 && o.sampleFirstRound !== false ? estimateDirtyPages(this.planner, (first, count, into) => o.ram.readPages(first, count, into)).pages * PAGE_SIZE : undefined;
      const elapsed = (performance.now() - this.t0 - this.result.setupTimeMs) / 1000;
      decision = this.policy.decide({
        iteration, wireBytes: rec.transferredBytes, scanMs: rec.scanMs,
        // what the destination received, not what waits in a queue or a socket's buffers; at most the rate it was given
        bytesPerSecond: Math.min(this.acks!.acked / Math.max(elapsed, 1e-3), o.bandwidth > 0 ? o.bandwidth : Infinity),
        totalBytes: link.bytesOut, ramBytes: o.ram.pages * PAGE_SIZE,
        ...(nextRoundBytes !== undefined ? { nextRoundBytes } : {}),
      });
      if (decision.action !== "continue") break;
    }
    this.result.convergence = decision.reason;
    this.result.expectedDowntimeMs = decision.expectedDowntimeMs;
    if (decision.action === "abort") {
      throw new ProtocolError(`the migration did not converge (${decision.reason}: expected downtime ${decision.expectedDowntimeMs.toFixed(0)} ms > target ${this.policy.downtimeMs} ms); aborted as configured, the source VM keeps running`);
    }
    return iteration;
  }

  /**
   * Stop the guest, last round, compare digests, hand over. The last live
   * round's answer is taken first, with the guest still running, so that the
   * final round does not wait for the destination's backlog.
   */
  private async switchover(iteration: number, device: DeviceTunnel | null): Promise<void> {
    const o = this.o, link = this.link!, result = this.result;
    // The last live round has been reported: these resends count in the final round's record.
    const carried = { since: link.bytesOut, resent: 0 };
    await this.settlePrevious(carried, null);
    const pausedAt = performance.now();
    await o.vm.pause();
    this.paused = true;
    await this.round(iteration, true, carried);
    result.digest = Buffer.from(o.engine.digest(this.planner.sentHashes())).toString("hex");
    await link.send(jsonFrame(FrameType.Switchover, { digest: result.digest }));
    // The destination's own verdict, inside the authenticated channel: only ok:true with our digest lets the destination run.
    const done = parseJson<{ ok: unknown; digest?: unknown; error?: unknown }>(await link.next(FrameType.Done, this.answerTimeout), "Done");
    if (done.ok !== true) throw new ProtocolError(`the destination could not finish: ${printable(String(done.error ?? "no reason given"))}`);
    if (done.digest !== result.digest) throw new ProtocolError(`the destination's RAM digest ${printable(String(done.digest))} differs from the source's ${result.digest}`);
    result.verified = true;
    if (o.handover) await o.handover(device);
    result.downtimeMs = performance.now() - pausedAt;
  }

  /** One round. `carried`: what was sent for it before it began (the final round: the last live round's resends, sent with the guest running). */
  private async round(iteration: number, final: boolean, carried?: { since: number; resent: number }): Promise<IterationRecord> {
    const l = this.link!;
    const start = performance.now();
    if (iteration === 1) this.result.setupTimeMs = start - this.t0;
    const bytes0 = carried?.since ?? l.bytesOut;
    const rec: IterationRecord = {
      iteration, final, startMs: start - this.t0, durationMs: 0, scanMs: 0, hashWorkers: 0, ackWaitMs: 0, dirty: 0,
      pages: { normal: 0, zero: 0, twin: 0, clean: 0, resent: carried?.resent ?? 0 }, transferredBytes: 0,
    };
    const map = this.o.trace ? new Uint8Array(this.o.ram.pages) : null;
    await this.sendPass(rec, map, bytes0);
    const ackFrom = performance.now();
    // The previous round's answer (the twins it could not verify) has come
    // back while this round was read and sent: resend those pages now.
    await this.settlePrevious(rec.pages, map);
    await this.close(rec, map);
    rec.ackWaitMs = performance.now() - ackFrom;
    rec.durationMs = performance.now() - start;
    rec.transferredBytes = l.bytesOut - bytes0;
    if (map) rec.pageMap = Buffer.from(map.buffer, map.byteOffset, map.length).toString("base64");
    this.count(rec.pages);
    this.result.iterationLog.push(rec);
    this.o.onIteration?.(rec);
    return rec;
  }

  /** Every window of RAM once: planned (with the pool when this pass uses it), sent, counted. */
  private async sendPass(rec: IterationRecord, map: Uint8Array | null, bytes0: number): Promise<void> {
    const o = this.o, l = this.link!, planner = this.planner, { iteration, final } = rec;
    const pool = final || o.workersWhen !== "switchover" ? await this.pool.session() : null;
    rec.hashWorkers = pool ? this.pool.size : 0;
    const windows = new PassWindows(planner, o.ram, pool, o.ramPath);
    for (let first = 0; first < planner.pages; first += planner.windowPages) {
      throwIfAborted(o.signal, "the migration");
      const s = performance.now();
      const count = planner.windowCount(first);
      const { plan, bytesOf } = await windows.plan(first);
      rec.scanMs += performance.now() - s;
      await this.sender.sendWindow(l, plan, bytesOf);
      rec.dirty += plan.dirty;
      rec.pages.normal += plan.send.length;
      // the first round accounts for every zero page: those the destination holds already too
      const held = iteration === 1 ? plan.zeroHeld : 0;
      rec.pages.zero += plan.zero.length + held;
      rec.pages.clean += count - plan.dirty - held;
      rec.pages.twin += plan.twinPages.length;
      o.onProgress?.({ phase: final ? "final" : "iteration", iteration, done: first + count, total: planner.pages, bytes: l.bytesOut - bytes0 });
      if (map) {
        for (const p of plan.zero) map[p] = PAGE_CLASS.zero;
        for (const p of plan.twinPages) map[p] = PAGE_CLASS.twin;
        for (const p of plan.send) map[p] = PAGE_CLASS.sent;
      }
    }
  }

  /**
   * End of the round. A live round's answer is taken at the end of the next
   * one, so that the next scan overlaps the link's tail; the final round
   * waits for it (and for answers to its resends).
   */
  private async close(rec: IterationRecord, map: Uint8Array | null): Promise<void> {
    const l = this.link!, { iteration, final } = rec;
    for (let round = 0; ; round++) {
      await l.send(jsonFrame(FrameType.IterEnd, { iteration, final, round }));
      if (!final) {
        this.unacked = iteration;
        return;
      }
      const resend = await this.takeIterAck(iteration);
      if (resend.length === 0) return;
      if (round > 3) throw new ProtocolError(`the destination keeps asking for pages sent in full (${resend.length} pages)`);
      await this.resend(resend, rec.pages, map);
    }
  }

  /** Takes the unacknowledged round's IterAck and resends the pages it lists (counted in `counts`). */
  private async settlePrevious(counts: { resent: number }, map: Uint8Array | null): Promise<void> {
    if (this.unacked === null) return;
    const resend = await this.takeIterAck(this.unacked);
    this.unacked = null;
    await this.resend(resend, counts, map);
  }

  private async resend(pages: Uint32Array, counts: { resent: number }, map: Uint8Array | null): Promise<void> {
    await this.sender.resendPages(this.link!, pages);
    counts.resent += pages.length;
    if (map) for (const p of pages) map[p] = PAGE_CLASS.resent;
  }

  private async takeIterAck(iteration: number): Promise<Uint32Array> {
    const { iteration: acked, resend } = decodeIterAck(await this.link!.next(FrameType.IterAck, this.answerTimeout), this.planner.pages);
    if (acked !== iteration) throw new ProtocolError(`the destination acknowledged iteration ${acked}, expected ${iteration}`);
    return resend;
  }

  private count(p: Pages): void {
    this.totals.normal += p.normal;
    this.totals.zero += p.zero;
    this.totals.twin += p.twin;
    this.totals.resent += p.resent;
  }

  private async fail(err: Error): Promise<void> {
    const result = this.result;
    result.error = err.message;
    this.link?.abort(result.error);
    if (!this.paused) return;
    try { await this.o.vm.resume(); } catch (e) { result.error += `; and resuming the source VM failed: ${(e as Error).message}`; }
  }

  private async finish(): Promise<void> {
    const result = this.result, link = this.link;
    result.totalTimeMs = performance.now() - this.t0;
    result.iterations = result.iterationLog.length;
    result.pages = { ...this.totals, total: this.o.ram.pages };
    if (link) {
      result.transferredBytes = link.bytesOut;
      result.receivedBytes = link.bytesIn;
    }
    result.mbps = (result.transferredBytes * 8) / 1e6 / Math.max(result.totalTimeMs / 1000, 1e-3);
    this.sender.finish();
    this.planner.free();
    this.sender.free();
    await this.pool.close();
  }
}
