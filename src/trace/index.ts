// Traces of migrations (docs/TRACE.md): the format, its writers (a file, the
// live view) and the mode adapters.
export * from "./format.js";
export { TraceModel, MigrationModel, MAX_CELLS, TraceFormatError, type RoundView } from "./model.js";
export { FileTraceSink, TraceRecorder, type TraceSink, type StartInfo } from "./sink.js";
export { AgentTracer, type AgentTraceEnd } from "./agent.js";
export { StreamTracer, type StreamTraceHook, type StreamTracerOptions } from "./stream.js";
export { LiveTraceServer, DEFAULT_WEB_ROOT, type LiveTraceOptions } from "./live.js";
