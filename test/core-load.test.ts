// Where the core's wasm comes from: the inlined builds (what browsers and
// bundlers load) are the build's bytes; a caller's source decides the flavor;
// a string source is relative to the working directory; errors name the file.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { relative } from "node:path";
import { fileURLToPath } from "node:url";
import { createEngine, coreUrl } from "../src/index.js";
import { WASM_BASE64 as SIMD_BASE64 } from "../src/core/embedded-simd.js";
import { WASM_BASE64 as SCALAR_BASE64 } from "../src/core/embedded-scalar.js";

const page = new Uint8Array(4096).map((_, i) => (i * 13) & 255);

test("the inlined builds are build/pagetwin-*.wasm byte for byte, and hash as the default engine does", async () => {
  for (const [flavor, b64] of [["simd", SIMD_BASE64], ["scalar", SCALAR_BASE64]] as const) {
    const bytes = Buffer.from(b64, "base64");
    assert.deepEqual(bytes, readFileSync(coreUrl(flavor)), flavor);
    const inlined = await createEngine({ source: bytes, seed: 9n });
    const usual = await createEngine({ flavor, seed: 9n });
    assert.equal(inlined.flavor, flavor);
    assert.deepEqual(inlined.hashPages(page), usual.hashPages(page), flavor);
  }
});

test("a given source decides the flavor; asking for a flavor other than the source's is an error", async () => {
  const scalar = readFileSync(coreUrl("scalar"));
  assert.equal((await createEngine({ source: scalar })).flavor, "scalar");
  assert.equal((await createEngine({ source: await WebAssembly.compile(scalar) })).flavor, "scalar");
  await assert.rejects(createEngine({ source: scalar, flavor: "simd" }), /flavor "simd" was asked for, but the core source given is the scalar build/);
});

test("a string source is relative to the working directory; a missing one names the file, not a build step", async () => {
  const rel = relative(process.cwd(), fileURLToPath(coreUrl("scalar")));
  assert.ok(!rel.startsWith("/"));
  assert.equal((await createEngine({ source: rel })).flavor, "scalar");
  await assert.rejects(createEngine({ source: "no-such-dir/core.wasm" }), (e: Error) =>
    /cannot read the core wasm .*no-such-dir\/core\.wasm: ENOENT/.test(e.message) && !/npm run build/.test(e.message));
});
