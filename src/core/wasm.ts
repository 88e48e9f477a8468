// Loads the core's WebAssembly: the SIMD build where the runtime validates it,
// the scalar build otherwise (as ChainSafe's as-sha256 picks at load time).
// Browsers fetch the .wasm by URL; Node reads the file. The compiled module is
// cached per build, each engine gets its own instance (its own memory).

export type CoreFlavor = "simd" | "scalar";

/** The exports of build/pagetwin-*.wasm (see assembly/index.ts). Pointers are i32. */
export interface CoreExports {
  readonly memory: WebAssembly.Memory;
  readonly SIMD: WebAssembly.Global;
  alloc(bytes: number): number;
  free(ptr: number): void;
  setSeed(seed: bigint): void;
  currentSeed(): bigint;
  zeroHashPtr(): number;
  hashPages(pages: number, count: number, out: number, zeroBits: number): number;
  bitsCombine(op: number, out: number, a: number, b: number, nbits: number): void;
  bitsPopcount(bits: number, nbits: number): number;
  bitsExtract(bits: number, nbits: number, out: number, base: number): number;
  bitsDiff(out: number, a: number, b: number, count: number): number;
  bitsFill(bits: number, first: number, count: number, on: number): void;
  copyRecordsMasked(dst: number, src: number, bits: number, count: number): void;
  indexCreate(blockCapacity: number, zeroHash: number): number;
  indexFree(idx: number): void;
  indexSetBlocks(idx: number, hashes: number, first: number, count: number): void;
  indexLookup(idx: number, hashes: number, count: number, candidates: number, outBlocks: number, outBits: number): number;
  indexCount(idx: number): number;
  indexBlocks(idx: number): number;
  indexHashesPtr(idx: number): number;
  indexPresentPtr(idx: number): number;
  indexBytes(idx: number): number;
}

/** Where the wasm comes from: bytes, a compiled module, or a URL to fetch. */
export type CoreSource = BufferSource | WebAssembly.Module | URL | string;

// A tiny module using one SIMD instruction (v128.const + drop); validates only
// where WebAssembly SIMD is supported.
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 4, 1, 96, 0, 0, 3, 2, 1, 0, 10, 23, 1, 21, 0,
  253, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 26, 11,
]);

export function simdSupported(): boolean {
  try {
    return WebAssembly.validate(SIMD_PROBE);
  } catch {
    return false;
  }
}

export function coreUrl(flavor: CoreFlavor): URL {
  return new URL(`../../../build/pagetwin-${flavor}.wasm`, import.meta.url);
}

const modules = new Map<CoreFlavor, Promise<WebAssembly.Module>>();

async function bytesOf(url: URL): Promise<ArrayBuffer | Uint8Array> {
  if (url.protocol === "file:") {
    const { readFile } = await import("node:fs/promises");
    try {
      return await readFile(url);
    } catch (err) {
      throw new Error(`pagetwin: cannot read the core ${url.pathname}: run \`npm run build\` first (${(err as Error).message})`);
    }
  }
  const res = await fetch(url);
  if (!res.ok) throw new Error(`pagetwin: cannot fetch the core ${url}: HTTP ${res.status}`);
  return res.arrayBuffer();
}

export function compileCore(flavor: CoreFlavor, source?: CoreSource): Promise<WebAssembly.Module> {
  if (source instanceof WebAssembly.Module) return Promise.resolve(source);
  if (source === undefined) {
    let m = modules.get(flavor);
    if (!m) {
      m = bytesOf(coreUrl(flavor)).then((b) => WebAssembly.compile(b as BufferSource));
      modules.set(flavor, m);
    }
    return m;
  }
  if (source instanceof URL || typeof source === "string") {
    return bytesOf(new URL(source, import.meta.url)).then((b) => WebAssembly.compile(b as BufferSource));
  }
  return WebAssembly.compile(source);
}

export async function instantiateCore(flavor: CoreFlavor, source?: CoreSource): Promise<CoreExports> {
  const module = await compileCore(flavor, source);
  const instance = await WebAssembly.instantiate(module, {
    env: {
      abort(_msg: number, _file: number, line: number, col: number) {
        throw new Error(`pagetwin core aborted at ${line}:${col}`);
      },
    },
  });
  return instance.exports as unknown as CoreExports;
}
