// Loads the core's WebAssembly: the SIMD build where the runtime validates it,
// the scalar build otherwise (as ChainSafe's as-sha256 picks at load time).
// Both builds are also inlined as base64 (scripts/embed-wasm.mjs, as hash-wasm
// does), so that browsers need no fetch and bundlers no configuration: the same
// code loads in Node, in Vite, esbuild and a plain <script type="module">. Only
// the flavor in use is imported. A caller's `source` (bytes, a module, a URL)
// is used instead. Compiled modules are cached per flavor; each engine gets its
// own instance (its own memory).

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
  indexCreateForLoad(blocks: number, zeroHash: number): number;
  indexFree(idx: number): void;
  indexSetBlocks(idx: number, hashes: number, first: number, count: number): void;
  indexLoad(idx: number, hashes: number, count: number): void;
  indexReserve(idx: number, blocks: number): number;
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

const defaults = new Map<CoreFlavor, Promise<WebAssembly.Module>>();

function fromBase64(b64: string): Uint8Array {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// Named in variables so that bundlers leave them alone: only Node reaches them.
const NODE_FS = "node:fs/promises";
const NODE_URL = "node:url";
const PACKAGE_WASM = "../../../build/pagetwin-";

function inNode(): boolean {
  return typeof (globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node === "string";
}

async function readFileBytes(url: URL): Promise<Uint8Array> {
  const { readFile } = (await import(/* @vite-ignore */ NODE_FS)) as { readFile(url: URL): Promise<Uint8Array> };
  return readFile(url);
}

/**
 * Node reads the package's own .wasm file: measured 2x faster to an engine
 * than importing and decoding the inlined copy. Anywhere else, or when the
 * file is not there (a bundled Node service), the inlined build.
 */
async function defaultBytes(flavor: CoreFlavor): Promise<Uint8Array> {
  if (inNode() && import.meta.url.startsWith("file:")) {
    try {
      return await readFileBytes(new URL(PACKAGE_WASM + flavor + ".wasm", import.meta.url));
    } catch {
      // not installed next to this module: use the inlined build
    }
  }
  const { WASM_BASE64 } = flavor === "simd" ? await import("./embedded-simd.js") : await import("./embedded-scalar.js");
  return fromBase64(WASM_BASE64);
}

function defaultCore(flavor: CoreFlavor): Promise<WebAssembly.Module> {
  let m = defaults.get(flavor);
  if (!m) {
    m = defaultBytes(flavor).then((b) => WebAssembly.compile(b as BufferSource));
    defaults.set(flavor, m);
  }
  return m;
}

/** Where a string source is relative to: the page in a browser, the working directory in Node. */
async function baseUrl(): Promise<string> {
  const g = globalThis as { document?: { baseURI?: string }; location?: { href?: string }; process?: { cwd?(): string } };
  if (g.document?.baseURI) return g.document.baseURI;
  if (g.location?.href) return g.location.href;
  if (g.process?.cwd) {
    const { pathToFileURL } = (await import(/* @vite-ignore */ NODE_URL)) as { pathToFileURL(path: string): URL };
    return pathToFileURL(g.process.cwd() + "/").href;
  }
  throw new CoreLoadError("pagetwin: a relative core source needs a page or a working directory to resolve against; pass a URL");
}

/** A string source as a URL: absolute URLs as they are, paths against the page or the working directory. */
export async function resolveSource(source: string): Promise<URL> {
  return new URL(source, await baseUrl());
}

async function bytesOf(url: URL): Promise<ArrayBuffer | Uint8Array> {
  if (url.protocol === "file:") {
    try {
      return await readFileBytes(url);
    } catch (err) {
      throw new CoreLoadError(`pagetwin: cannot read the core wasm ${url.pathname}: ${(err as Error).message}`, { cause: err });
    }
  }
  const res = await fetch(url);
  if (!res.ok) throw new CoreLoadError(`pagetwin: cannot fetch the core wasm ${url}: HTTP ${res.status}`);
  return res.arrayBuffer();
}

/** The compiled core: `source` when given (a string is a path or URL relative to the page or working directory), else the inlined build. */
export async function compileCore(flavor: CoreFlavor, source?: CoreSource): Promise<WebAssembly.Module> {
  if (source === undefined) return defaultCore(flavor);
  if (source instanceof WebAssembly.Module) return source;
  if (source instanceof URL || typeof source === "string") {
    const url = source instanceof URL ? source : await resolveSource(source);
    return compileBytes((await bytesOf(url)) as BufferSource, url.href);
  }
  return compileBytes(source, "the bytes given");
}

async function compileBytes(bytes: BufferSource, where: string): Promise<WebAssembly.Module> {
  try {
    return await WebAssembly.compile(bytes);
  } catch (err) {
    throw new CoreLoadError(`pagetwin: the core from ${where} is not valid WebAssembly here: ${(err as Error).message}`, { cause: err });
  }
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
