// Loads the core's WebAssembly: the SIMD build where the runtime validates it,
// the scalar build otherwise (as ChainSafe's as-sha256 picks at load time).
// Browsers fetch the .wasm by URL; Node reads the file. The compiled module is
// cached per build, each engine gets its own instance (its own memory).

import { CoreLoadError } from "../errors.js";

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

async function bytesOf(url: URL, given: boolean): Promise<ArrayBuffer | Uint8Array> {
  if (url.protocol === "file:") {
    const { readFile } = await import("node:fs/promises");
    try {
      return await readFile(url);
    } catch (err) {
      const fix = given ? "check the path given as `source`" : "the package's build/ folder is incomplete: reinstall pagetwin, or pass createEngine({ source })";
      throw new CoreLoadError(`pagetwin: cannot read the core ${url.pathname}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; ${fix}`, { cause: err });
    }
  }
  let res: Response;
  try {
    res = await fetch(url);
  } catch (err) {
    throw new CoreLoadError(`pagetwin: cannot fetch the core ${url}: ${(err as Error).message}`, { cause: err });
  }
  if (!res.ok) throw new CoreLoadError(`pagetwin: cannot fetch the core ${url}: HTTP ${res.status}; serve the .wasm file there or pass createEngine({ source })`);
  return res.arrayBuffer();
}

const URL_SCHEMES = new Set(["file:", "http:", "https:", "data:", "blob:"]);

/**
 * Where a `source` string points. An absolute URL is taken as it is. Any
 * other string is a path, as a user means it: in Node relative to the
 * current directory, in a browser relative to the page.
 */
export async function resolveSource(source: string): Promise<URL> {
  try {
    const u = new URL(source);
    if (URL_SCHEMES.has(u.protocol)) return u;
  } catch {
    // not an absolute URL: a path
  }
  const proc = (globalThis as { process?: { versions?: { node?: string } } }).process;
  if (proc?.versions?.node) {
    const [{ pathToFileURL }, { resolve }] = await Promise.all([import("node:url"), import("node:path")]);
    return pathToFileURL(resolve(source));
  }
  const base = (globalThis as { location?: { href: string } }).location?.href;
  if (!base) throw new CoreLoadError(`pagetwin: cannot tell what the core source "${source}" is relative to here; give a URL`);
  return new URL(source, base);
}

async function compileBytes(bytes: BufferSource, where: string): Promise<WebAssembly.Module> {
  try {
    return await WebAssembly.compile(bytes);
  } catch (err) {
    throw new CoreLoadError(`pagetwin: the core from ${where} is not valid WebAssembly here: ${(err as Error).message}`, { cause: err });
  }
}

export function compileCore(flavor: CoreFlavor, source?: CoreSource): Promise<WebAssembly.Module> {
  if (source instanceof WebAssembly.Module) return Promise.resolve(source);
  if (source === undefined) {
    let m = modules.get(flavor);
    if (!m) {
      const url = coreUrl(flavor);
      m = bytesOf(url, false).then((b) => compileBytes(b as BufferSource, url.href));
      m.catch(() => modules.delete(flavor)); // a failed load is not cached
      modules.set(flavor, m);
    }
    return m;
  }
  if (source instanceof URL || typeof source === "string") {
    return (source instanceof URL ? Promise.resolve(source) : resolveSource(source))
      .then(async (url) => compileBytes(await bytesOf(url, true) as BufferSource, url.href));
  }
  return compileBytes(source, "the bytes given");
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
