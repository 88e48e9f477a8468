/**
 * `pagetwin/stream` (Node): stream mode, two proxies inside QEMU's own
 * migration stream. The source QEMU migrates to streamOut, which sends twin
 * pages as NAS references to streamIn, which rebuilds the exact stream into
 * the destination QEMU. Each resolves to a running proxy; `done` settles
 * when its first migration is over (or it was closed).
 *
 * @example
 * ```ts
 * import { loadKey, streamIn, streamOut } from "pagetwin/stream";
 * const psk = loadKey("key"); // the same 32-byte file at both ends
 * const dst = await streamIn({ listenHost: "0.0.0.0", listenPort: 4447, qemu: "127.0.0.1:49200", image: "/nas/vm.img", psk });
 * const src = await streamOut({ listenPort: 49201, to: "dst-host:4447", image: "/nas/vm.img", psk, signal });
 * // source QEMU: migrate tcp:127.0.0.1:49201
 * const stats = await src.done;
 * ```
 * @packageDocumentation
 */

/** The two proxies and what they report. */
export { streamOut, type StreamOutOptions } from "../stream/out.js";
export { streamIn, type StreamInOptions } from "../stream/in.js";
export type { StreamProxy, StreamStats } from "../stream/stats.js";
export { PSK_BYTES, loadKey, createKeyFile, type SecurityOptions, type TlsFiles } from "../link/security.js";
export type { CompressionMode, CompressionStats } from "../codec/compress.js";
/** Where a migration's trace goes (`trace` of either proxy; docs/TRACE.md): a file, the live view, or your own TraceSink. */
export { FileTraceSink, type TraceSink } from "../trace/sink.js";
export { LiveTraceServer, type LiveTraceOptions } from "../trace/live.js";
/** The errors this entry throws on purpose. */
export { PagetwinError, StreamFormatError, ProtocolError, SecurityError, UsageError, NasError, AbortError } from "../errors.js";
export type { Logger, LogOption, Progress } from "../log.js";
