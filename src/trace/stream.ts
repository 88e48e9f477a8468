// Stream mode's trace, from what stream-out sees of QEMU's stream: each RAM
// record (a page sent in full, as a NAS reference, or a ZERO record) is a
// page of the map, in stream order (the parser reports records as it reads
// them; stream-out says later, page by page, which went as references); a
// round is one sweep of QEMU over its RAM, seen as the page addresses going
// back; the RAM END section is the final round (guest stopped). Bytes: the link's (stream-out's counters) against
// QEMU's own stream (what QEMU alone sends). With the source's QMP, the
// STOP event and QEMU's query-migrate at the end add QEMU's numbers.

import type { RunStateWatch } from "../adapters/qemu/run-state.js";
import type { QemuStreamParser } from "../stream/qemu-stream.js";
import type { StreamStats } from "../stream/stats.js";
import { PAGE_BYTES, PAGE_CLASS, emptyPages, encodeRuns, type TracePages } from "./format.js";
import { TraceRecorder, type TraceSink } from "./sink.js";

const SEGMENT_MAX = 1 << 16; // pages per "pages" record
const GAP_MAX = 1024; // a gap this short joins two segments (as clean pages)
const PROGRESS_EVERY_MS = 250;

/** What stream-out calls; one per QEMU migration connection. */
export interface StreamTraceHook {
  /** The session's parser: the tracer reads its RAM blocks and gets its records in order. */
  attach(parser: QemuStreamParser): void;
  /** The next RAM page record of the stream went as a reference (`ref`) or in full. */
  page(ref: boolean): void;
  /** stream-in asked for reference #seq again: the page went in full. */
  resend(seq: number): void;
  /** The session is over (stats as they stand; error if it failed). */
  end(error?: string): Promise<void>;
}

export interface StreamTracerOptions {
  label: string;
  stats: StreamStats;
  /** Replay window size: references #seq are kept (and resent) within it. */
  windowPages: number;
  /** The source QEMU's QMP (--qmp): STOP time and query-migrate. */
  watch: RunStateWatch | null;
  config?: Record<string, unknown>;
}

interface Round {
  iteration: number;
  startMs: number;
  pages: TracePages;
  link0: number;
  qemu0: number;
}

export class StreamTracer implements StreamTraceHook {
  private readonly rec: TraceRecorder;
  private parser: QemuStreamParser | null = null;
  private base: Map<string, number> | null = null;
  private round: Round | null = null;
  private last = -1;
  private segFirst = -1;
  private segLen = 0;
  private readonly seg = new Uint8Array(SEGMENT_MAX);
  private resends: number[] = [];
  private readonly refPage: Int32Array;
  private refSeq = 0;
  private lastProgress = 0;
  private final = false;
  private readonly link0: number;
  private readonly qemu0: number;
  private ticks = 0;
  /** Records parsed, in order, until their class is known: page g, the final section, the class (-1: a page not classed yet). */
  private queue: { g: number; final: boolean; cls: number }[] = [];
  private head = 0;
  /** Index in queue of the next page waiting for page(). */
  private nextPage = 0;
  private readonly rounds: TracePages[] = [];

  constructor(sinks: readonly TraceSink[], private readonly o: StreamTracerOptions) {
    this.link0 = o.stats.bytesOutLink;
    this.qemu0 = o.stats.bytesFromQemu;
    this.refPage = new Int32Array(Math.max(1, o.windowPages));
    this.rec = new TraceRecorder(sinks, { mode: "stream", method: "pagetwin", label: o.label, pages: 0, baseline: "measured", ...(o.config ? { config: o.config } : {}) });
  }

  get id(): string {
    return this.rec.id;
  }

  attach(parser: QemuStreamParser): void {
    this.parser = parser;
    parser.onRecord = (block, offset, zero, final) => {
      const base = this.base ?? this.layout();
      this.queue.push({ g: (base.get(block) ?? 0) + Math.floor(offset / PAGE_BYTES), final, cls: zero ? PAGE_CLASS.zero : -1 });
      if (zero) this.drain();
    };
  }

  page(ref: boolean): void {
    const q = this.queue;
    while (this.nextPage < q.length && q[this.nextPage]!.cls !== -1) this.nextPage++;
    const e = q[this.nextPage];
    if (!e) return;
    e.cls = ref ? PAGE_CLASS.twin : PAGE_CLASS.sent;
    if (ref) this.refPage[this.refSeq++ % this.refPage.length] = e.g;
    this.drain();
  }

  /** Records the queue's head while its class is known. */
  private drain(): void {
    const q = this.queue;
    while (this.head < q.length && q[this.head]!.cls !== -1) {
      const e = q[this.head++]!;
      this.record(e.g, e.cls, e.final);
    }
    if (this.head > 4096) {
      q.splice(0, this.head);
      this.nextPage = Math.max(0, this.nextPage - this.head);
      this.head = 0;
    }
  }

  resend(seq: number): void {
    const r = this.round;
    if (!r) return;
    r.pages.resent++;
    this.resends.push(this.refPage[seq % this.refPage.length]!);
  }

  private linkBytes(): number {
    return this.o.stats.bytesOutLink - this.link0;
  }

  private qemuBytes(): number {
    return this.o.stats.bytesFromQemu - this.qemu0;
  }

  /** A record of page g; a round ends where the addresses go back or the RAM END section begins. */
  private record(g: number, cls: number, final: boolean): void {
    if (!this.round || g <= this.last || (final && !this.final)) this.nextRound(final);
    this.last = g;
    const r = this.round!;
    if (cls === PAGE_CLASS.zero) r.pages.zero++;
    else if (cls === PAGE_CLASS.twin) r.pages.twin++;
    else r.pages.normal++;
    this.mark(g, cls);
    if ((++this.ticks & 255) === 0 && this.rec.now() - this.lastProgress >= PROGRESS_EVERY_MS) this.progress();
  }

  private layout(): Map<string, number> {
    const base = new Map<string, number>();
    const blocks: { name: string; first: number; pages: number }[] = [];
    let first = 0;
    for (const [name, bytes] of this.parser?.ramBlocks ?? []) {
      const pages = Math.ceil(bytes / PAGE_BYTES);
      base.set(name, first);
      blocks.push({ name, first, pages });
      first += pages;
    }
    this.base = base;
    this.rec.emit({ type: "layout", id: this.id, pages: first, blocks });
    return base;
  }

  private mark(g: number, cls: number): void {
    const end = this.segFirst + this.segLen;
    if (this.segFirst < 0 || g < end || g - end > GAP_MAX || g - this.segFirst >= SEGMENT_MAX) {
      this.flushPages();
      this.segFirst = g;
    }
    const at = g - this.segFirst;
    if (at > this.segLen) this.seg.fill(PAGE_CLASS.clean, this.segLen, at);
    this.seg[at] = cls;
    this.segLen = at + 1;
  }

  private flushPages(): void {
    const r = this.round;
    if (r && this.segLen > 0) {
      this.rec.emit({ type: "pages", id: this.id, iteration: r.iteration, first: this.segFirst, count: this.segLen, runs: encodeRuns(this.seg, 0, this.segLen) });
    }
    this.segFirst = -1;
    this.segLen = 0;
    if (r && this.resends.length) {
      this.rec.emit({ type: "resend", id: this.id, iteration: r.iteration, pages: this.resends });
      this.resends = [];
    }
  }

  private progress(): void {
    this.flushPages();
    const tMs = this.lastProgress = this.rec.now();
    this.rec.emit({ type: "progress", id: this.id, iteration: this.round?.iteration ?? 0, tMs, transferredBytes: this.linkBytes(), baselineBytes: this.qemuBytes() });
  }

  private closeRound(final: boolean): void {
    const r = this.round;
    if (!r) return;
    this.flushPages();
    const now = this.rec.now();
    this.rounds.push(r.pages);
    this.rec.emit({
      type: "round", id: this.id, iteration: r.iteration, final, startMs: r.startMs, durationMs: now - r.startMs,
      pages: r.pages, transferredBytes: this.linkBytes() - r.link0, baselineBytes: this.qemuBytes() - r.qemu0,
    });
  }

  private nextRound(final: boolean): void {
    const prev = this.round;
    this.closeRound(false);
    const iteration = (prev?.iteration ?? 0) + 1;
    // the first round counts from the session's start (QEMU's set-up bytes included)
    this.round = prev
      ? { iteration, startMs: this.rec.now(), pages: emptyPages(), link0: this.linkBytes(), qemu0: this.qemuBytes() }
      : { iteration, startMs: 0, pages: emptyPages(), link0: 0, qemu0: 0 };
    this.last = -1;
    if (final) this.switchover(iteration);
  }

  private switchover(iteration: number): void {
    this.final = true;
    const w = this.o.watch;
    const stopMs = w && w.stopAt > this.rec.t0 ? w.stopAt - this.rec.t0 : undefined;
    this.rec.emit({ type: "switchover", id: this.id, iteration, tMs: this.rec.now(), reason: "QEMU: the RAM END section began (the guest is stopped)", ...(stopMs !== undefined ? { stopMs } : {}) });
  }

  async end(error?: string): Promise<void> {
    this.drain();
    if (this.round) this.closeRound(this.final);
    else this.progress();
    const s = this.o.stats;
    const qemu = await this.queryQemu();
    const totals = { normal: 0, twin: 0, zero: 0, resent: 0 };
    let iterations = 0;
    for (const p of this.rounds) { iterations++; totals.normal += p.normal; totals.twin += p.twin; totals.zero += p.zero; totals.resent += p.resent; }
    const downtime = qemu && typeof qemu.downtime === "number" ? qemu.downtime : null;
    this.rec.emit({
      type: "end", id: this.id, ok: !error, ...(error ? { error } : {}), totalTimeMs: this.rec.now(), downtimeMs: downtime,
      iterations, pages: totals, transferredBytes: this.linkBytes(), baselineBytes: this.qemuBytes(),
      verified: s.streamsVerified > 0 && s.streamsFailed === 0, stats: { ...s } as unknown as Record<string, unknown>, ...(qemu ? { qemu } : {}),
    });
  }

  /** The source QEMU's query-migrate once it finished (a few seconds at most), or null without QMP. */
  private async queryQemu(): Promise<Record<string, unknown> | null> {
    const qmp = this.o.watch?.qmp;
    if (!qmp || qmp.closed) return null;
    const deadline = performance.now() + 3000;
    for (;;) {
      const q = await qmp.execute<Record<string, unknown>>("query-migrate", undefined, { timeoutMs: 2000 }).catch(() => null);
      if (!q || q.status === "completed" || q.status === "failed" || q.status === "cancelled" || performance.now() > deadline) return q;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
