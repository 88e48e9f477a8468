// pagetwin in a browser (the "browser" condition of "pagetwin" and
// "pagetwin/core"): the core with its wasm inlined, nothing that needs Node.
// Everything but coreUrl (a bundler would copy both .wasm files it names).
export { createEngine, Engine, TwinIndex, Region, bitBytes, PAGE_SIZE, HASH_SIZE, NO_BLOCK } from "./core/engine.js";
export type { EngineOptions, BitOp } from "./core/engine.js";
export { simdSupported, type CoreFlavor, type CoreSource } from "./core/wasm.js";
// The error classes (src/errors.ts has no runtime imports), as from the Node entry.
export * from "./errors.js";
export type { Logger, LogOption, LogLevel, LogFields, Progress } from "./log.js";
export type { AbortOptions } from "./abort.js";
