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
export { PagetwinError, QmpError, QmpProtocolError, QmpCommandError, QmpTimeoutError, QmpClosedError } from "../errors.js";
