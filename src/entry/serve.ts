/**
 * `pagetwin/serve` (Node): `pagetwin serve`, one service per host for every
 * stream-mode migration on it, and the client of its control socket.
 *
 * @example
 * ```ts
 * import { ServeClient } from "pagetwin/serve";
 * const c = await ServeClient.connect("/run/pagetwin/control.sock");
 * const ready = await c.request("outgoing", {
 *   migration: "vm1", disks: ["/nas/vm1.img"], qemu: "unix", destQemu: "unix", peer: "dst-host:4447",
 * });
 * // virsh migrate --live vm1 DESTURI --migrateuri ready.libvirtMigrateUri   (unix:///run/pagetwin-qemu/vm1.sock)
 * for await (const e of await c.watch("vm1")) if (e.event === "end") break;
 * ```
 * @packageDocumentation
 */

export { ServeClient, type ServeWatch } from "../serve/client.js";
export { ServeService, type ServeServiceOptions } from "../serve/service.js";
export { QemuSockets, DEFAULT_QEMU_SOCKETS } from "../serve/qemu-sockets.js";
export type { OutgoingRequest, OutgoingReady } from "../serve/outgoing.js";
export type { MigrationStatus, MigrationState, ServeEvent, DiskReport, Direction, ErrorInfo } from "../serve/migration.js";
export type { StreamStats } from "../stream/stats.js";
export { ServeError, PagetwinError, UsageError, SecurityError } from "../errors.js";
