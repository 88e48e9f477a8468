/**
 * `pagetwin/qemu` (Node): a strict QMP client (QEMU Machine Protocol) over a
 * unix socket, with typed errors and per-command timeouts.
 *
 * @example
 * ```ts
 * import { QmpClient, QmpCommandError } from "pagetwin/qemu";
 * const qmp = await QmpClient.connect("/run/vm1.qmp");
 * const { status } = await qmp.execute<{ status: string }>("query-status");
 * qmp.close();
 * ```
 * @packageDocumentation
 */

/** The client and what it exchanges. */
export {
  QmpClient, type QmpEvent, type QmpGreeting, type QmpTimestamp, type QmpConnectOptions, type QmpExecuteOptions,
} from "../adapters/qemu/qmp.js";
/** Its errors: all are QmpError (and PagetwinError). */
/** Refreshes an index from the VM's own write tracking: a dirty bitmap on its drive, read through QEMU's NBD server. */
export { DirtyTracker, type DirtyTrackerOptions, type DirtyRefreshResult } from "../adapters/qemu/dirty-tracker.js";
export { PagetwinError, DirtyTrackerError, NbdProtocolError, NbdServerError, QmpError, QmpProtocolError, QmpCommandError, QmpTimeoutError, QmpClosedError } from "../errors.js";
