// pagetwin: live migration of VMs whose disks sit on shared storage, sending
// RAM pages that are copies of disk blocks as references.
export * from "./core/index.js";
// Every error class, so a caller can catch by class or by `code` from the main entry.
export * from "./errors.js";
export type { Logger, LogOption, LogLevel, LogFields, Progress } from "./log.js";
export type { AbortOptions } from "./abort.js";
