/**
 * `pagetwin/agent` (Node): agent mode. pagetwin moves guest RAM itself, from
 * a source agent (migrateSource) to a destination agent (DestinationAgent),
 * over TLS or TLS-PSK; migrateQemuAgentMode drives two QEMUs through QMP
 * around it. Every failure, and an abort, leaves the source VM running.
 *
 * @example
 * ```ts
 * import { DestinationAgent, migrateSource } from "pagetwin/agent";
 * const psk = crypto.getRandomValues(new Uint8Array(32));
 * const dst = new DestinationAgent({ ramPath: "/dev/shm/dst.ram", imagePath: "/nas/vm.img", psk });
 * const port = await dst.listen();
 * const result = await migrateSource({ engine: nas.engine, index: nas.index, indexId: nas.header.indexId,
 *   ram, vm, host: "127.0.0.1", port, bandwidth: 0, psk, signal });
 * ```
 * @packageDocumentation
 */

/** The source side. */
export {
  migrateSource, PAGE_CLASS,
  type SourceOptions, type RamReader, type VmControl, type IterationRecord, type MigrationResult, type WorkersWhen,
} from "../agent/source.js";
/** The destination side. */
export { DestinationAgent, MAX_PAGES, DEFAULT_MAX_RAM, type DestinationOptions, type DestinationResult } from "../agent/destination.js";
/** Both sides of a QEMU migration, driven through QMP. */
export {
  migrateQemuAgentMode, waitMigration,
  type AgentMigrationOptions, type AgentMigrationResult, type QemuSide, type QueryMigrate,
} from "../agent/qemu.js";
/** The link's protection: a pre-shared key (TLS-PSK), TLS certificates, or an explicit insecure. */
export { PSK_BYTES, loadKey, createKeyFile, type SecurityOptions, type TlsFiles } from "../link/security.js";
export type { CompressionMode, CompressionStats, CompressionAlgorithm } from "../codec/compress.js";
export type { ConvergenceOptions } from "../plan/convergence.js";
/** The errors this entry throws on purpose. */
export {
  PagetwinError, MigrationError, AgentMigrationError, ProtocolError, LinkClosedError, SecurityError, UsageError, AbortError,
} from "../errors.js";
export type { Logger, LogOption, Progress } from "../log.js";
