export { createEngine, Engine, TwinIndex, Region, bitBytes, PAGE_SIZE, HASH_SIZE, NO_BLOCK } from "./engine.js";
export type { EngineOptions, BitOp } from "./engine.js";
export { simdSupported, type CoreFlavor, type CoreSource } from "./wasm.js";
export { coreUrl } from "./files.js";
