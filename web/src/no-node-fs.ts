// Stands in for node:fs/promises in the browser bundle: the core only reads
// files for file: URLs, which the visualizer never passes (it fetches the wasm).
export function readFile(): never {
  throw new Error("pagetwin: no file system in the browser");
}
