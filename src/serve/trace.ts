// The service's traces (docs/TRACE.md): with --trace-dir, each outgoing
// migration's trace in its own file there; with --ui, every migration's
// records on one live view. Only the source side traces: the trace is what
// stream-out reads of QEMU's stream.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { FileTraceSink, type TraceSink } from "../trace/sink.js";
import { LiveTraceServer } from "../trace/live.js";

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

  /** The file `<id>.<direction>.ndjson` (a later migration with the same id replaces it) and the live view. */
  open(id: string, direction: "out" | "in"): MigrationTrace {
    const file = this.dir ? new FileTraceSink(join(this.dir, `${id}.${direction}.ndjson`)) : null;
    const sinks: TraceSink[] = [file, this.live].filter((s): s is FileTraceSink | LiveTraceServer => s !== null);
    return { sinks, close: async () => { await file?.close(); } };
  }

  async close(): Promise<void> {
    await this.live?.close();
  }
}
