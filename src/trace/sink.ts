// Where trace records go: the TraceSink interface (a file, the live view,
// any service that wants them), and TraceRecorder, which stamps one
// migration's records and hands them to its sinks.

import { createWriteStream, type WriteStream } from "node:fs";
import { randomBytes } from "node:crypto";
import { TRACE_FORMAT, TRACE_VERSION, type StartRecord, type TraceRecord } from "./format.js";

export interface TraceSink {
  write(rec: TraceRecord): void;
}

/** A trace file: one record a line, written as the migration runs. */
export class FileTraceSink implements TraceSink {
  private readonly out: WriteStream;
  private failure: Error | null = null;

  constructor(readonly path: string) {
    this.out = createWriteStream(path, { flags: "w", mode: 0o600 });
    this.out.on("error", (e) => { this.failure ??= e; });
  }

  write(rec: TraceRecord): void {
    if (!this.failure) this.out.write(JSON.stringify(rec) + "\n");
  }

  /** Flushes and closes; rejects if a write failed. */
  close(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.out.end(() => (this.failure ? reject(new Error(`trace file ${this.path}: ${this.failure.message}`, { cause: this.failure })) : resolve()));
    });
  }
}

export type StartInfo = Omit<StartRecord, "type" | "format" | "version" | "id" | "startedAt">;

/** One migration's records: its id on each, times from its start (performance.now() `t0`). */
export class TraceRecorder {
  readonly id: string;

  constructor(private readonly sinks: readonly TraceSink[], start: StartInfo, readonly t0 = performance.now()) {
    this.id = `${start.mode}-${randomBytes(4).toString("hex")}`;
    this.emit({ type: "start", format: TRACE_FORMAT, version: TRACE_VERSION, id: this.id, startedAt: Date.now() - (performance.now() - t0), ...start });
  }

  /** ms since the start. */
  now(): number {
    return performance.now() - this.t0;
  }

  emit(rec: TraceRecord): void {
    for (const s of this.sinks) s.write(rec);
  }
}
