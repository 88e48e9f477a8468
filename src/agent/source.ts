// Source agent: runs pre-copy iterations over a live VM's RAM, sending each
// dirty page as a zero marker, a NAS reference (twin) or in full, until the
// convergence policy says switch over; then stops the VM, sends the last
// round and checks that the destination's RAM digest equals its own.
// Any failure resumes the source VM, whose RAM this agent never writes.

import { SourceMigration } from "./source-migration.js";
import type { MigrationResult, SourceOptions } from "./source-types.js";

export * from "./source-types.js";
export { MigrationError } from "../errors.js";

// MigrationError.result is a MigrationResult (errors.ts names no agent types: see there)
declare module "../errors.js" {
  interface MigrationErrorResult extends MigrationResult {}
}

/**
 * The source side of an agent-mode migration: pre-copy iterations over `ram`
 * to the destination agent at host:port, then switchover (vm.pause, last
 * round, RAM digests compared, handover). Rejects with a MigrationError
 * (with its result) on failure, an AbortError when `signal` fired; either
 * way the VM was resumed if it had been paused.
 */
export async function migrateSource(o: SourceOptions): Promise<MigrationResult> {
  return new SourceMigration(o).run();
}
