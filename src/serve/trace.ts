// The service's traces (docs/TRACE.md): with --trace-dir, each migration's
// trace in its own file there (the source's view as MIGRATION.out.ndjson,
// the destination's as MIGRATION.in.ndjson); with --ui, every migration's
// records on one live view; for a control client that asked (`outgoing`
// with `trace`), the records as `trace` events of its watch.

import type { EventEmitter } from "node:events";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { FileTraceSink, type TraceSink } from "../trace/sink.js";
import { LiveTraceServer } from "../trace/live.js";
import type { TraceRecord } from "../trace/format.js";
import type { Direction, ServeEvent } from "./migration.js";

export interface ServeTraceOptions {
  /** A directory for one trace file per migration (created 0700 when missing). */
  traceDir?: string;
  /** Serve the live view on 127.0.0.1:port (0: any free port). */
  ui?: { port: number };
}

/** One migration's sinks; close() once its sessions have ended. */
export interface MigrationTrace {
  sinks: TraceSink[];
  close(): Promise<void>;
}

export class ServeTraces {
  private constructor(private readonly dir: string | undefined, readonly live: LiveTraceServer | null) {}

  static async open(o: ServeTraceOptions): Promise<ServeTraces> {
    if (o.traceDir) mkdirSync(o.traceDir, { recursive: true, mode: 0o700 });
    const live = o.ui ? await LiveTraceServer.start({ port: o.ui.port }) : null;
    return new ServeTraces(o.traceDir, live);
  }

  /** The page's URL, with its token (null without --ui). */
  get url(): string | null {
    return this.live?.url ?? null;
  }

  /**
   * The file `<id>.<direction>.ndjson` (a later migration with the same id replaces it), the live view,
   * and with `bus` the service's events (a control client asked for the trace).
   */
  open(id: string, direction: Direction, bus?: EventEmitter): MigrationTrace {
    const file = this.dir ? new FileTraceSink(join(this.dir, `${id}.${direction}.ndjson`)) : null;
    const events = bus ? new EventTraceSink(bus, id, direction) : null;
    const sinks: TraceSink[] = [file, this.live, events].filter((s): s is FileTraceSink | LiveTraceServer | EventTraceSink => s !== null);
    return { sinks, close: async () => { await file?.close(); } };
  }

  async close(): Promise<void> {
    await this.live?.close();
  }
}

/** A migration's trace records as the service's `trace` events. */
class EventTraceSink implements TraceSink {
  constructor(private readonly bus: EventEmitter, private readonly migration: string, private readonly direction: Direction) {}

  write(record: TraceRecord): void {
    this.bus.emit("event", { event: "trace", migration: this.migration, direction: this.direction, record } satisfies ServeEvent);
  }
}
