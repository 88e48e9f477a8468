// Progress of long commands, one module for all: a bar on stderr when it is a
// terminal, and with --json `{"event":"progress",...}` lines on stdout (before
// the final result line). Driven by the callbacks the work already has
// (openNasIndex onProgress, the agent's onIteration, a proxy's live stats).

import { printJson } from "./json.js";

export interface ProgressReporterOptions {
  json: boolean;
  /** No bar and no progress events (--quiet). */
  quiet?: boolean;
  /** Where the bar goes (default process.stderr); a bar is drawn only on a TTY. */
  tty?: NodeJS.WriteStream;
  /** At most one event per phase this often, ms (the first and the last always). */
  everyMs?: number;
}

const BAR = 24;

export class ProgressReporter {
  private readonly tty: NodeJS.WriteStream | null;
  private readonly everyMs: number;
  private last = new Map<string, number>();
  private barOpen = false;

  constructor(readonly command: string, private readonly o: ProgressReporterOptions) {
    const t = o.tty ?? process.stderr;
    this.tty = !o.json && !o.quiet && t.isTTY ? t : null;
    this.everyMs = o.everyMs ?? 250;
  }

  /** `done` of `total` `unit`s of `phase` (indexing, scanning, ...); extra fields go into the event. */
  update(phase: string, done: number, total: number, unit: string, extra: object = {}): void {
    const finished = done >= total;
    if (!finished && !this.due(phase)) return;
    if (this.o.json && !this.o.quiet) {
      printJson(this.command, "progress", { phase, done, total, unit, percent: total > 0 ? (100 * done) / total : 100, ...extra });
    }
    if (this.tty) this.bar(phase, done, total, unit, finished);
  }

  /** A step without a known total (a pre-copy round, a proxy's running counters): an event, or a line on stderr. */
  step(phase: string, fields: object, line: string): void {
    if (this.o.quiet) return;
    if (this.o.json) {
      printJson(this.command, "progress", { phase, ...fields });
      return;
    }
    this.closeBar();
    process.stderr.write(`${line}\n`);
  }

  /** Running counters without a total (a proxy's stream): an event, or a line redrawn in place on a TTY. */
  status(phase: string, fields: object, line: string): void {
    if (this.o.quiet || !this.due(phase)) return;
    if (this.o.json) printJson(this.command, "progress", { phase, ...fields });
    else if (this.tty) {
      this.tty.write(`\r${line}\x1b[K`);
      this.barOpen = true;
    }
  }

  /** Ends an open bar line, so what follows starts on a line of its own. */
  closeBar(): void {
    if (this.barOpen && this.tty) this.tty.write("\n");
    this.barOpen = false;
  }

  private due(phase: string): boolean {
    const now = performance.now();
    const prev = this.last.get(phase);
    if (prev !== undefined && now - prev < this.everyMs) return false;
    this.last.set(phase, now);
    return true;
  }

  private bar(phase: string, done: number, total: number, unit: string, finished: boolean): void {
    const f = total > 0 ? Math.min(done / total, 1) : 1;
    const full = Math.round(f * BAR);
    this.tty!.write(`\r${phase.padEnd(10)} [${"#".repeat(full)}${"-".repeat(BAR - full)}] ${(f * 100).toFixed(0).padStart(3)}% ${done}/${total} ${unit}`);
    this.barOpen = !finished;
    if (finished) this.tty!.write("\n");
  }
}
