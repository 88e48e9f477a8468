// Trace records read back into migrations: rounds with their totals and a
// page map aggregated into at most MAX_CELLS cells (counts per class), so a
// 64 GiB guest's map costs what a 256 MiB one's does. No DOM and no Node
// APIs: the visualizer and the Node tests both use it.

import {
  CLASS_COUNT, TRACE_FORMAT, TRACE_VERSION, emptyPages, forEachRun,
  type EndRecord, type ProgressRecord, type RoundRecord, type StartRecord, type SwitchoverRecord, type TraceRecord,
} from "./format.js";
import { TraceFormatError } from "../errors.js";

export { TraceFormatError };

export const MAX_CELLS = 65536;

/** A round as the page shows it: the round record's numbers (so far, until `done`) and its page map in cells. */
export interface RoundView extends Omit<RoundRecord, "type" | "id" | "dirty"> {
  /** The round's record came: its numbers are final. */
  done: boolean;
  /** Pages of each class in each cell: cells[cell * CLASS_COUNT + class] (class 0 unused: clean is the rest). */
  cells: Uint32Array;
  /** Pages the round's map has covered so far. */
  mapped: number;
}

export class MigrationModel {
  pages = 0;
  /** Pages a map cell holds. */
  cellPages = 1;
  cellCount = 0;
  readonly rounds: RoundView[] = [];
  progress: ProgressRecord | null = null;
  switchover: SwitchoverRecord | null = null;
  end: EndRecord | null = null;

  constructor(readonly start: StartRecord) {
    this.setPages(start.pages);
  }

  private setPages(pages: number): void {
    if (!(pages > 0) || this.pages === pages) return;
    this.pages = pages;
    this.cellPages = Math.max(1, Math.ceil(pages / MAX_CELLS));
    this.cellCount = Math.ceil(pages / this.cellPages);
  }

  get running(): boolean {
    return this.end === null;
  }

  round(iteration: number): RoundView {
    let r = this.rounds.find((x) => x.iteration === iteration);
    if (!r) {
      const prev = this.rounds[this.rounds.length - 1];
      const startMs = prev ? prev.startMs + prev.durationMs : 0;
      r = {
        iteration, final: false, startMs, durationMs: 0, pages: emptyPages(), transferredBytes: 0, baselineBytes: 0, done: false,
        cells: new Uint32Array(this.cellCount * CLASS_COUNT), mapped: 0,
      };
      this.rounds.push(r);
      this.rounds.sort((a, b) => a.iteration - b.iteration);
    }
    return r;
  }

  private mark(r: RoundView, start: number, length: number, cls: number): void {
    if (r.cells.length !== this.cellCount * CLASS_COUNT) r.cells = new Uint32Array(this.cellCount * CLASS_COUNT);
    const g = this.cellPages, end = Math.min(this.pages, start + length);
    for (let a = start; a < end;) {
      const cell = Math.floor(a / g);
      const b = Math.min(end, (cell + 1) * g);
      r.cells[cell * CLASS_COUNT + cls]! += b - a;
      a = b;
    }
  }

  apply(rec: TraceRecord): void {
    switch (rec.type) {
      case "layout": this.setPages(rec.pages); return;
      case "pages": {
        const r = this.round(rec.iteration);
        r.mapped += forEachRun(rec.runs, rec.first, (s, n, c) => { if (c !== 0) this.mark(r, s, n, c); });
        return;
      }
      case "resend": {
        const r = this.round(rec.iteration);
        for (const p of rec.pages) this.mark(r, p, 1, 4);
        return;
      }
      case "progress": this.progress = rec; this.round(rec.iteration); return;
      case "round": {
        const r = this.round(rec.iteration);
        Object.assign(r, {
          final: rec.final, startMs: rec.startMs, durationMs: rec.durationMs, pages: { ...emptyPages(), ...rec.pages },
          transferredBytes: rec.transferredBytes, baselineBytes: rec.baselineBytes, done: true,
        });
        return;
      }
      case "switchover": this.switchover = rec; return;
      case "end": this.end = rec; return;
      case "start": return;
    }
  }

  /** Bytes so far (the end's totals once it came): on the link, and what QEMU alone would have sent. */
  totals(): { tMs: number; transferredBytes: number; baselineBytes: number } {
    if (this.end) return { tMs: this.end.totalTimeMs, transferredBytes: this.end.transferredBytes, baselineBytes: this.end.baselineBytes };
    let t = 0, tx = 0, bl = 0;
    for (const r of this.rounds) if (r.done) { t = r.startMs + r.durationMs; tx += r.transferredBytes; bl += r.baselineBytes; }
    const p = this.progress;
    if (p && p.transferredBytes >= tx) return { tMs: Math.max(t, p.tMs), transferredBytes: p.transferredBytes, baselineBytes: p.baselineBytes };
    return { tMs: t, transferredBytes: tx, baselineBytes: bl };
  }
}

/** Migrations from records, in the order they started; records of an unknown migration are an error. */
export class TraceModel {
  readonly migrations = new Map<string, MigrationModel>();

  apply(rec: TraceRecord): MigrationModel {
    if (rec.type === "start") {
      if (rec.format !== TRACE_FORMAT) throw new TraceFormatError(`not a pagetwin trace (format "${String(rec.format)}")`);
      if (rec.version !== TRACE_VERSION) throw new TraceFormatError(`a version ${String(rec.version)} trace; this reads version ${TRACE_VERSION}`);
      const m = new MigrationModel(rec);
      this.migrations.set(rec.id, m);
      return m;
    }
    const m = this.migrations.get(rec.id);
    if (!m) throw new TraceFormatError(`a "${rec.type}" record of migration "${rec.id}" before its start record`);
    m.apply(rec);
    return m;
  }

  /** A trace file's text (one record a line). */
  static parse(text: string): TraceModel {
    const model = new TraceModel();
    let n = 0;
    for (const line of text.split("\n")) {
      n++;
      if (!line.trim()) continue;
      let rec: TraceRecord;
      try {
        rec = JSON.parse(line) as TraceRecord;
      } catch (err) {
        throw new TraceFormatError(`line ${n} is not JSON: ${(err as Error).message}`);
      }
      model.apply(rec);
    }
    if (model.migrations.size === 0) throw new TraceFormatError("no migration in the trace (no start record)");
    return model;
  }
}
