/**
 * `pagetwin/trace`: the trace format (docs/TRACE.md) and its reader. A
 * trace is NDJSON, one record a line, written by every mode (`migrate`,
 * `send`, `stream-out`/`stream-in`, `serve --trace-dir`, `libvirt migrate
 * --trace`, the demo) and streamed by the live view. TraceModel reads it
 * back into migrations: rounds with their totals and a page map aggregated
 * into at most MAX_CELLS cells. No Node APIs: it works in browsers too.
 * (Writing traces: `FileTraceSink` and `LiveTraceServer` in `pagetwin/stream`.)
 *
 * @example
 * ```ts
 * import { TraceModel } from "pagetwin/trace";
 * const model = TraceModel.parse(await readFile("migration.ndjson", "utf8"));
 * for (const m of model.migrations.values()) {
 *   console.log(m.start.label, m.rounds.length, "rounds", m.end?.transferredBytes, "bytes on the link");
 * }
 * ```
 * @packageDocumentation
 */

/** The reader: migrations, rounds and cells from records. */
export { TraceModel, MigrationModel, MAX_CELLS, TraceFormatError, type RoundView } from "../trace/model.js";
/** The format: records, page classes, the page map's run-length coding. */
export {
  TRACE_FORMAT, TRACE_VERSION, PAGE_BYTES, PAGE_CLASS, CLASS_COUNT, emptyPages, qemuBytesEstimate, encodeRuns, forEachRun,
  type TraceMode, type TracePages, type TraceRecord, type StartRecord, type LayoutRecord, type PagesRecord, type ResendRecord,
  type ProgressRecord, type RoundRecord, type SwitchoverRecord, type EndRecord,
} from "../trace/format.js";
/** The errors this entry throws on purpose. */
export { PagetwinError } from "../errors.js";
