// --trace FILE and --ui [PORT], shared by the commands that migrate: the
// sinks their migrations' trace records go to (docs/TRACE.md).

import { FileTraceSink, type TraceSink } from "../trace/sink.js";
import { LiveTraceServer } from "../trace/live.js";
import { int, type CommandSpec } from "./args.js";

export const traceOptions: CommandSpec["options"] = {
  trace: { type: "string", help: "write the migration's trace here (NDJSON, docs/TRACE.md; the visualizer replays it)" },
  ui: { type: "string", help: "serve the visualizer with this migration live on 127.0.0.1:PORT (--ui alone: a free port); the URL, with its random token, goes to stderr" },
};

/** `--ui` without a value means any free port: parseArgs wants one, so it gets "0". */
export function withUiDefault(argv: readonly string[]): string[] {
  const out = [...argv];
  for (let i = 0; i < out.length; i++) {
    if (out[i] === "--ui" && (i + 1 === out.length || out[i + 1]!.startsWith("-"))) out.splice(i + 1, 0, "0");
  }
  return out;
}

export interface TraceOutputs {
  sinks: TraceSink[];
  live: LiveTraceServer | null;
  close(): Promise<void>;
}

/** Opens the trace file and the live view the options ask for; `say` gets the live view's URL. */
export async function openTraceOutputs(values: Record<string, string | boolean | undefined>, say: (m: string) => void): Promise<TraceOutputs> {
  const file = typeof values.trace === "string" && values.trace ? new FileTraceSink(values.trace) : null;
  let live: LiveTraceServer | null = null;
  if (typeof values.ui === "string") {
    try {
      live = await LiveTraceServer.start({ port: int(values, "ui", 0, 65535) });
    } catch (err) {
      await file?.close();
      throw err;
    }
    say(`live view: ${live.url}`);
  }
  return {
    sinks: [file, live].filter((s): s is FileTraceSink | LiveTraceServer => s !== null),
    live,
    async close() {
      await live?.close();
      await file?.close();
    },
  };
}
