// Stream mode's trace, from what a proxy sees of QEMU's stream: each RAM
// record (a page sent in full, as a NAS reference, or a ZERO record) is a
// page of the map, in stream order; a round is one sweep of QEMU over its
// RAM, seen as the main channel's page addresses going back; the RAM END
// section is the final round (guest stopped). Bytes: the link's against
// QEMU's own stream (what QEMU alone sends). stream-out traces what it reads
// from the source QEMU; stream-in what it rebuilds for the destination QEMU
// (pages that arrived in full, references it verified, resends). With the
// source's QMP, the STOP event and QEMU's query-migrate add QEMU's numbers.
//
// A migration is all of QEMU's connections for it: the main channel and its
// multifd channels (StreamTraceGroup puts them in one tracer). Multifd
// channels carry pages only; the main channel's records and sections decide
// the rounds.

import type { RunStateWatch } from "../adapters/qemu/run-state.js";
import type { QemuStreamParser } from "../stream/qemu-stream.js";
import type { StreamStats } from "../stream/stats.js";
import { PAGE_BYTES, PAGE_CLASS, emptyPages, encodeRuns, type TracePages } from "./format.js";
import { TraceRecorder, type TraceSink } from "./sink.js";

const SEGMENT_MAX = 1 << 16; // pages per "pages" record
const GAP_MAX = 1024; // a gap this short joins two segments (as clean pages)
const PROGRESS_EVERY_MS = 250;
/** A queue entry that is the RAM END section's start, not a page. */
const FINAL_SECTION = -2;

/** What a proxy's session calls; one per QEMU migration connection. */
export interface StreamTraceHook {
  /** The main channel's parser: the tracer reads its RAM blocks and gets its records and sections in order. */
  attach(parser: QemuStreamParser): void;
  /**
   * The session's next RAM page record went (out) or arrived (in) as a reference (`ref`) or in full.
   * A multifd channel's page is placed by its block and offset; the main channel's by the parser's records.
   */
  page(ref: boolean, block: string, offset: number): void;
  /** Reference #seq of this session was sent again in full (its NAS block did not match at the destination). */
  resend(seq: number): void;
  /** The session is over (error if it failed); the migration's end record comes when its last session ends. */
  end(error?: string): Promise<void>;
}

export interface StreamTracerOptions {
  label: string;
  stats: StreamStats;
  /** Whose counters: "out" (stream-out: bytes to the link vs. read from QEMU) or "in" (stream-in: read from the link vs. handed to QEMU). */
  side?: "out" | "in";
  /** Replay window size: references #seq are kept (and resent) within it. */
  windowPages: number;
  /** The source QEMU's QMP (--qmp): STOP time and query-migrate. */
  watch: RunStateWatch | null;
  config?: Record<string, unknown>;
}

/**
 * The migrations of one proxy (or one service migration): sessions that
 * belong together share a tracer. A main channel starts a migration unless
 * the current one has none yet (its multifd channels came first); a
 * multifd channel joins the current migration unless it is over.
 */
export class StreamTraceGroup {
  private current: StreamTracer | null = null;

  constructor(private readonly sinks: readonly TraceSink[], private readonly options: () => StreamTracerOptions) {}

  /** A session joins; `since`: the counters when it connected (what it read before it knew its kind counts too). */
  join(kind: "main" | "multifd" | "unknown", since?: Counters): StreamTraceHook {
    const c = this.current;
    const fresh = !c || c.over || (kind !== "multifd" && c.hasMain);
    if (fresh) this.current = new StreamTracer(this.sinks, this.options(), since);
    return this.current!.channel(kind === "multifd");
  }
}

/** A side's byte counters: on the link, and QEMU's stream. */
export interface Counters {
  link: number;
  qemu: number;
}

interface Round {
  iteration: number;
  startMs: number;
  pages: TracePages;
  link0: number;
  qemu0: number;
}

/** A run of consecutive pages of one channel, on its way into a "pages" record. */
class Segment {
  first = -1;
  len = 0;
  readonly buf = new Uint8Array(SEGMENT_MAX);

  fits(g: number): boolean {
    const end = this.first + this.len;
    return this.first >= 0 && g >= end && g - end <= GAP_MAX && g - this.first < SEGMENT_MAX;
  }

  add(g: number, cls: number): void {
    if (this.first < 0) this.first = g;
    const at = g - this.first;
    if (at > this.len) this.buf.fill(PAGE_CLASS.clean, this.len, at);
    this.buf[at] = cls;
    this.len = at + 1;
  }
}

/** One migration's trace: its rounds, map and totals, from every session of it. */
export class StreamTracer {
  private readonly rec: TraceRecorder;
  private parser: QemuStreamParser | null = null;
  private base: Map<string, number> | null = null;
  private round: Round | null = null;
  /** The main channel's last page: a page at or below it begins a round. */
  private last = -1;
  private final = false;
  private readonly segments = new Set<Segment>();
  private resends: number[] = [];
  private lastProgress = 0;
  private ticks = 0;
  private readonly link0: number;
  private readonly qemu0: number;
  private readonly rounds: TracePages[] = [];
  private open = 0;
  private mainEnded = false;
  private error: string | undefined;
  /** A main channel joined. */
  hasMain = false;
  /** The end record went out. */
  over = false;

  constructor(sinks: readonly TraceSink[], private readonly o: StreamTracerOptions, since?: Counters) {
    this.link0 = since?.link ?? this.linkTotal();
    this.qemu0 = since?.qemu ?? this.qemuTotal();
    this.rec = new TraceRecorder(sinks, { mode: "stream", method: "pagetwin", label: o.label, pages: 0, baseline: "measured", ...(o.config ? { config: o.config } : {}) });
  }

  get id(): string {
    return this.rec.id;
  }

  /** A session joins (the hook it calls). */
  channel(multifd: boolean): StreamTraceHook {
    this.open++;
    if (!multifd) this.hasMain = true;
    const seg = new Segment();
    this.segments.add(seg);
    return new ChannelTrace(this, seg, multifd, this.o.windowPages);
  }

  private linkTotal(): number {
    return this.o.side === "in" ? this.o.stats.bytesInLink : this.o.stats.bytesOutLink;
  }

  private qemuTotal(): number {
    return this.o.side === "in" ? this.o.stats.bytesToQemu : this.o.stats.bytesFromQemu;
  }

  private linkBytes(): number {
    return this.linkTotal() - this.link0;
  }

  private qemuBytes(): number {
    return this.qemuTotal() - this.qemu0;
  }

  attach(parser: QemuStreamParser): void {
    this.parser = parser;
  }

  /** Page number of a block's offset (null until the main channel's block list is known). */
  pageOf(block: string, offset: number): number | null {
    const base = this.base ?? this.layout();
    const b = base?.get(block);
    return b === undefined ? null : b + Math.floor(offset / PAGE_BYTES);
  }

  private layout(): Map<string, number> | null {
    const blocks = this.parser?.ramBlocks;
    if (!blocks || blocks.size === 0) return null;
    const base = new Map<string, number>();
    const list: { name: string; first: number; pages: number }[] = [];
    let first = 0;
    for (const [name, bytes] of blocks) {
      const pages = Math.ceil(bytes / PAGE_BYTES);
      base.set(name, first);
      list.push({ name, first, pages });
      first += pages;
    }
    this.base = base;
    this.rec.emit({ type: "layout", id: this.id, pages: first, blocks: list });
    return base;
  }

  /** The RAM END section began (main channel): the final round. */
  finalSection(): void {
    if (!this.final) this.nextRound(true);
  }

  /** A record of page g (null: not placeable), on the main channel (rounds follow its addresses) or a multifd one. */
  record(seg: Segment, g: number | null, cls: number, main: boolean): void {
    if (main && g !== null && (!this.round || (g <= this.last && !this.final))) this.nextRound(false);
    else if (!this.round) this.nextRound(false);
    const r = this.round!;
    if (cls === PAGE_CLASS.zero) r.pages.zero++;
    else if (cls === PAGE_CLASS.twin) r.pages.twin++;
    else r.pages.normal++;
    if (g !== null) {
      if (main) this.last = g;
      if (!seg.fits(g)) this.flush(seg);
      seg.add(g, cls);
    }
    if ((++this.ticks & 255) === 0 && this.rec.now() - this.lastProgress >= PROGRESS_EVERY_MS) this.progress();
  }

  resendPage(g: number | null): void {
    const r = this.round;
    if (!r) return;
    r.pages.resent++;
    if (g !== null) this.resends.push(g);
  }

  private flush(seg: Segment): void {
    const r = this.round;
    if (r && seg.len > 0) {
      this.rec.emit({ type: "pages", id: this.id, iteration: r.iteration, first: seg.first, count: seg.len, runs: encodeRuns(seg.buf, 0, seg.len) });
    }
    seg.first = -1;
    seg.len = 0;
  }

  private flushAll(): void {
    for (const s of this.segments) this.flush(s);
    const r = this.round;
    if (r && this.resends.length) {
      this.rec.emit({ type: "resend", id: this.id, iteration: r.iteration, pages: this.resends });
      this.resends = [];
    }
  }

  private progress(): void {
    this.flushAll();
    const tMs = this.lastProgress = this.rec.now();
    this.rec.emit({ type: "progress", id: this.id, iteration: this.round?.iteration ?? 0, tMs, transferredBytes: this.linkBytes(), baselineBytes: this.qemuBytes() });
  }

  private closeRound(final: boolean): void {
    const r = this.round;
    if (!r) return;
    this.flushAll();
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

  /** A session ended; the last one (once the main channel has) writes the end record. */
  async channelEnded(main: boolean, error?: string): Promise<void> {
    this.open--;
    if (main) this.mainEnded = true;
    this.error ??= error;
    if (this.open > 0 || this.over || (!this.mainEnded && !this.error)) return;
    this.over = true;
    if (this.round) this.closeRound(this.final);
    else this.progress();
    const s = this.o.stats;
    const qemu = await this.queryQemu();
    const totals = emptyPages();
    let iterations = 0;
    for (const p of this.rounds) { iterations++; totals.normal += p.normal; totals.twin += p.twin; totals.zero += p.zero; totals.resent += p.resent; }
    const downtime = qemu && typeof qemu.downtime === "number" ? qemu.downtime : null;
    const err = this.error;
    this.rec.emit({
      type: "end", id: this.id, ok: !err, ...(err ? { error: err } : {}), totalTimeMs: this.rec.now(), downtimeMs: downtime,
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

/** One session's part: the main channel's records in stream order, or a multifd channel's pages. */
class ChannelTrace implements StreamTraceHook {
  /** Main channel: records parsed, in order, until their class is known (-1: a page not classed yet). */
  private queue: { g: number | null; cls: number }[] = [];
  private head = 0;
  /** Index in queue of the next page waiting for page(). */
  private nextPage = 0;
  /** Page of reference #seq, within the replay window. */
  private readonly refPage: Int32Array;
  private refSeq = 0;
  private ended = false;
  private sectionMarked = false;

  constructor(private readonly t: StreamTracer, private readonly seg: Segment, private readonly multifd: boolean, windowPages: number) {
    this.refPage = new Int32Array(Math.max(1, windowPages));
  }

  attach(parser: QemuStreamParser): void {
    this.t.attach(parser);
    parser.onRecord = (block, offset, zero, final) => {
      if (final) this.sectionMark();
      this.queue.push({ g: this.t.pageOf(block, offset), cls: zero ? PAGE_CLASS.zero : -1 });
      if (zero) this.drain();
    };
    parser.onRamSection = (final) => { if (final) { this.sectionMark(); this.drain(); } };
  }

  /** Queues the RAM END section's start (once), in order with the records. */
  private sectionMark(): void {
    if (this.sectionMarked) return;
    this.sectionMarked = true;
    this.queue.push({ g: null, cls: FINAL_SECTION });
  }

  page(ref: boolean, block: string, offset: number): void {
    const cls = ref ? PAGE_CLASS.twin : PAGE_CLASS.sent;
    if (this.multifd) {
      const g = this.t.pageOf(block, offset);
      if (ref) this.refPage[this.refSeq++ % this.refPage.length] = g ?? -1;
      this.t.record(this.seg, g, cls, false);
      return;
    }
    const q = this.queue;
    while (this.nextPage < q.length && q[this.nextPage]!.cls !== -1) this.nextPage++;
    const e = q[this.nextPage];
    if (!e) return;
    e.cls = cls;
    if (ref) this.refPage[this.refSeq++ % this.refPage.length] = e.g ?? -1;
    this.drain();
  }

  /** Records the queue's head while its class is known. */
  private drain(): void {
    const q = this.queue;
    while (this.head < q.length && q[this.head]!.cls !== -1) {
      const e = q[this.head++]!;
      if (e.cls === FINAL_SECTION) this.t.finalSection();
      else this.t.record(this.seg, e.g, e.cls, true);
    }
    if (this.head > 4096) {
      q.splice(0, this.head);
      this.nextPage = Math.max(0, this.nextPage - this.head);
      this.head = 0;
    }
  }

  resend(seq: number): void {
    const g = this.refPage[seq % this.refPage.length]!;
    this.t.resendPage(g < 0 ? null : g);
  }

  async end(error?: string): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.drain();
    await this.t.channelEnded(!this.multifd, error);
  }
}
