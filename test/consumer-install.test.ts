// The package as a core-only user installs it: `npm pack` of this checkout,
// installed into a fresh project with optional dependencies omitted. Nothing
// is compiled (no zstd-napi, no node-gyp), no @types/node lands in the
// consumer, the core works in Node and page compression falls back to what
// this Node has (node:zlib's zstd, else brotli). The tarball holds the
// LICENSE, the docs the README links to, and source maps that carry their
// sources.

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import zlib from "node:zlib";
import { installedPackage, npm, packAndInstall } from "./helpers/pack.js";

/** Run in the consumer: the core through "pagetwin", compression through the installed files. */
const CHECK = `import { createEngine } from "pagetwin";
import { pathToFileURL } from "node:url";
const engine = await createEngine();
const hash = Buffer.from(engine.hashPages(new Uint8Array(4096).fill(7))).toString("hex");
const c = await import(pathToFileURL("node_modules/pagetwin/dist/src/codec/compress.js").href);
const page = Buffer.alloc(8 * 4096, "pagetwin ");
const roundTrips = {};
for (const algo of c.availableAlgorithms()) {
  const z = c.createCompressor(algo);
  const dst = Buffer.alloc(z.bound(page.length));
  const packed = dst.subarray(0, z.compressInto(page, dst));
  const out = Buffer.alloc(page.length);
  z.decompressInto(packed, out);
  roundTrips[algo] = out.equals(page) && packed.length < page.length;
}
let zstdError = "";
try { c.createCompressor("zstd"); } catch (err) { zstdError = err.message; }
console.log(JSON.stringify({ hash, flavor: engine.flavor, provider: c.zstdProvider(), algorithms: c.availableAlgorithms(), roundTrips, zstdError }));
`;

/** Run in the consumer: the live view of an installed package serves the built page (web/dist, from the tarball), and the trace reader reads what it streams. */
const LIVE = `import { LiveTraceServer } from "pagetwin/stream";
import { TraceModel, TRACE_FORMAT, TRACE_VERSION } from "pagetwin/trace";
const live = await LiveTraceServer.start();
try {
  const base = live.url.replace(/\\?live$/, "");
  const html = await (await fetch(base)).text();
  const script = /<script[^>]+src="\\.\\/([^"]+)"/.exec(html)?.[1];
  const js = script ? await fetch(base + script) : null;
  live.write({ type: "start", format: TRACE_FORMAT, version: TRACE_VERSION, id: "m", mode: "stream", method: "pagetwin", label: "x", pages: 0, startedAt: 0, baseline: "measured" });
  const ac = new AbortController();
  const events = await fetch(base + "events", { signal: ac.signal });
  const reader = events.body.getReader();
  let text = "";
  while (!text.includes("\\n\\n")) text += new TextDecoder().decode((await reader.read()).value);
  ac.abort();
  const model = TraceModel.parse(text.replace(/^data: /gm, ""));
  console.log(JSON.stringify({ page: html.includes("<title>"), script, scriptStatus: js?.status, scriptType: js?.headers.get("content-type"), migrations: [...model.migrations.keys()] }));
} finally {
  await live.close();
}
`;

function mapsUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile() && e.name.endsWith(".js.map")).map((e) => join(e.parentPath, e.name));
}

test("a lean install (no optional dependencies) compiles nothing, leaks no @types/node, and works with compression falling back", { timeout: 300_000 }, async () => {
  const consumer = packAndInstall();
  try {
    const p = consumer.project;
    const pkg = installedPackage(p);
    for (const f of ["LICENSE", "README.md", "build/pagetwin-simd.wasm", "dist/src/browser.js", "dist/src/core/embedded-simd.js", "dist/src/core/embedded-scalar.js", "web/dist/index.html", "dist/src/entry/trace.js"]) {
      assert.ok(consumer.files.includes(f), `the tarball holds ${f}`);
    }
    assert.match(readFileSync(join(pkg, "LICENSE"), "utf8"), /MIT License/);
    assert.ok(!consumer.files.some((f) => f.startsWith("dist/test/") || f.startsWith("src/")), "no tests and no TypeScript sources in the tarball");

    // nothing compiled, nothing of zstd-napi's, no @types/node in the consumer's tree
    for (const name of ["zstd-napi", "node-gyp", "prebuild-install", "@types"]) assert.ok(!existsSync(join(p, "node_modules", name)), `${name} is not installed`);
    type Tree = { dependencies?: Record<string, Tree & { version?: string }> };
    const ls = JSON.parse(npm(["ls", "--all", "--json"], p)) as Tree;
    // an optional dependency left out is listed as {}
    const installed = Object.entries(ls.dependencies?.["pagetwin"]?.dependencies ?? {}).filter(([, d]) => d.version !== undefined).map(([n]) => n);
    assert.deepEqual(installed, ["comlink"], "pagetwin brings comlink only");

    // the core, and compression with what this Node has
    writeFileSync(join(p, "check.mjs"), CHECK);
    const got = JSON.parse(execFileSync(process.execPath, ["check.mjs"], { cwd: p, encoding: "utf8" })) as {
      hash: string; flavor: string; provider: string | null; algorithms: string[]; roundTrips: Record<string, boolean>; zstdError: string;
    };
    assert.equal(got.hash.length, 32);
    const nodeZstd = typeof (zlib as unknown as { zstdCompressSync?: unknown }).zstdCompressSync === "function";
    assert.equal(got.provider, nodeZstd ? "node:zlib" : null);
    assert.deepEqual(got.algorithms, nodeZstd ? ["zstd", "brotli"] : ["brotli"]);
    for (const a of got.algorithms) assert.equal(got.roundTrips[a], true, `${a} round-trips`);
    if (!nodeZstd) assert.match(got.zstdError, /zstd is not available here: zstd-napi did not load .* no zlib zstd \(Node >= 22\.15\); use --compress brotli or auto/);

    // `--ui` from an installed package: the page ships in it, the live view serves it, the trace reader reads its events
    writeFileSync(join(p, "live.mjs"), LIVE);
    const live = JSON.parse(execFileSync(process.execPath, ["live.mjs"], { cwd: p, encoding: "utf8" })) as { page: boolean; script?: string; scriptStatus?: number; scriptType?: string; migrations: string[] };
    assert.equal(live.page, true, "the live view serves the built page");
    assert.ok(live.script, "the page loads its script");
    assert.equal(live.scriptStatus, 200, `${live.script} is served from the installed package`);
    assert.equal(live.scriptType, "text/javascript");
    assert.deepEqual(live.migrations, ["m"]);

    // source maps resolve without the TypeScript sources: each carries its sources
    const maps = mapsUnder(join(pkg, "dist", "src"));
    assert.ok(maps.length > 20, `${maps.length} source maps`);
    for (const m of maps) {
      const map = JSON.parse(readFileSync(m, "utf8")) as { sources: string[]; sourcesContent?: (string | null)[] };
      assert.equal(map.sourcesContent?.length, map.sources.length, `${m}: sourcesContent`);
      assert.ok(map.sourcesContent!.every((s) => typeof s === "string" && s.length > 0), `${m}: every source inlined`);
    }

    // the README's relative links point at files in the package (images aside: the screenshot is
    // not worth 300 kB in every install, and npm's site shows relative images only from a repository URL)
    const readme = readFileSync(join(pkg, "README.md"), "utf8");
    const links = [...readme.matchAll(/(?<!!\[[^\]]*)\]\((?!https?:|#|mailto:)([^)#\s]+)/g)].map((x) => x[1]!);
    assert.ok(links.length > 0, "the README links to the docs");
    for (const l of links) assert.ok(existsSync(join(pkg, l)), `README links to ${l}, which the package ships`);
  } finally {
    consumer.cleanup();
  }
});
