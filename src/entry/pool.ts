/**
 * `pagetwin/pool` (Node): hashing on worker threads, shared by a service.
 * Each caller takes a session: its scans' hashes and page bytes are its own,
 * whatever other sessions do meanwhile. A crashed worker is replaced (the
 * call on it fails with PoolWorkerError); after close() calls fail with
 * PoolClosedError. Long calls take an AbortSignal.
 *
 * @example
 * ```ts
 * import { EnginePool } from "pagetwin/pool";
 * const pool = await EnginePool.create({ size: 4 });
 * const session = pool.session({ seed: nas.engine.seed });
 * const { hashes, zeroBits } = await session.scanFile("/dev/shm/vm1.ram", 0, 4096);
 * const bytes = await session.pagesOf(Uint32Array.from([0, 7]));
 * await session.close();
 * ```
 * @packageDocumentation
 */

/** The pool, its sessions and their options and results. */
export { EnginePool, type PoolOptions } from "../pool/pool.js";
export { PoolSession, type SessionOptions } from "../pool/session.js";
export type { ScanResult } from "../pool/worker-api.js";
/** The errors this entry throws on purpose. */
export { PagetwinError, PoolWorkerError, PoolClosedError, AbortError, UsageError } from "../errors.js";
export type { AbortOptions } from "../abort.js";
export type { Logger, LogOption } from "../log.js";
