// Where the core's .wasm files sit in the installed package, for callers who
// serve or read them themselves. Kept apart from wasm.ts: bundlers emit the
// files a `new URL(..., import.meta.url)` names, and the browser entry loads
// the inlined builds instead.
import type { CoreFlavor } from "./wasm.js";

/** The URL of build/pagetwin-<flavor>.wasm in this package. */
export function coreUrl(flavor: CoreFlavor): URL {
  return new URL(`../../../build/pagetwin-${flavor}.wasm`, import.meta.url);
}
