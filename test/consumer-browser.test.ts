// The core in a browser, as a user gets it: `npm pack` of this checkout is
// installed into a fresh project next to Vite and esbuild (the repo's exact
// versions), and a page that imports only "pagetwin" hashes a known page.
// The page is built with Vite, served by the Vite dev server, bundled with
// esbuild, and loaded as a plain <script type="module"> from the installed
// package (an import map names it); each runs in headless Chromium, none with
// any configuration, and each must print the XXH3-128 that hash-wasm computes
// here. Also: the page type-checks against the browser entry without
// @types/node, the browser entry reaches nothing of Node's and fetches no .wasm,
// and the sizes of the bundles (JS with the wasm inlined), printed as diagnostics.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { createServer as netServer } from "node:net";
import type { Server } from "node:http";
import { createRequire } from "node:module";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { xxhash128 } from "hash-wasm";
import { packAndInstall, type PackedProject } from "./helpers/pack.js";
import { launchChromium, pageProblems, serveDir, serverUrl, type Browser } from "./helpers/browser.js";

const REPO_PKG = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { devDependencies: Record<string, string> };
const VITE = `vite@${REPO_PKG.devDependencies["vite"]}`;
const ESBUILD = `esbuild@${REPO_PKG.devDependencies["esbuild"]}`;
const SEED = 0x0123456789abcdefn;
const TSC = createRequire(import.meta.url).resolve("typescript/bin/tsc");

/** The consumer's page: imports only "pagetwin", hashes one known page, shows the digest. */
const MAIN_JS = `import { createEngine, PAGE_SIZE } from "pagetwin";
const out = document.getElementById("out");
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
(async () => {
  try {
    const engine = await createEngine({ seed: ${SEED}n });
    const page = new Uint8Array(PAGE_SIZE);
    for (let i = 0; i < page.length; i++) page[i] = (i * 31 + 7) & 255;
    out.dataset.hash = hex(engine.hashPages(page));
    out.dataset.flavor = engine.flavor;
    out.dataset.state = "done";
  } catch (err) {
    out.textContent = String((err && err.stack) || err);
    out.dataset.state = "error";
  }
})();
`;
const html = (head = "") =>
  `<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">${head}</head><body><output id="out"></output><script type="module" src="./main.js"></script></body></html>`;

function knownPage(): Uint8Array {
  const page = new Uint8Array(4096);
  for (let i = 0; i < page.length; i++) page[i] = (i * 31 + 7) & 255;
  return page;
}

/** Runs an installed tool's CLI in the project; returns its output (stdout and stderr). */
function tool(project: string, bin: string, args: string[]): string {
  return execFileSync(process.execPath, [join(project, "node_modules", bin), ...args], { cwd: project, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = netServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

/** `vite <root>` (the dev server) in its own process group; resolves with its URL once it listens. */
async function viteDev(project: string, root: string): Promise<{ url: string; child: ChildProcess; log: () => string }> {
  const port = await freePort();
  const child = spawn(process.execPath, [join(project, "node_modules/vite/bin/vite.js"), root, "--host", "127.0.0.1", "--port", String(port), "--strictPort"], {
    // Vite colours its output when CI is set (picocolors), splitting the URL with escape codes.
    cwd: project, detached: true, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "1", FORCE_COLOR: "0" },
  });
  let log = "";
  child.stdout!.on("data", (d) => (log += d));
  child.stderr!.on("data", (d) => (log += d));
  const url = `http://127.0.0.1:${port}/`;
  const started = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`vite dev did not start in 60 s:\n${log}`)), 60_000);
    // eslint-disable-next-line no-control-regex
    const check = () => { if (log.replace(/\x1b\[[0-9;]*m/g, "").includes(`:${port}/`)) { clearTimeout(timer); resolve(); } };
    child.stdout!.on("data", check);
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`vite dev exited (${code}):\n${log}`)); });
  });
  // A server that never said it listens is stopped here, or its pipes keep this test file alive.
  await started.catch((err: unknown) => { stopGroup(child); throw err; });
  return { url, child, log: () => log };
}

function stopGroup(child: ChildProcess): void {
  if (child.exitCode === null && child.pid) {
    try {
      process.kill(-child.pid, "SIGTERM");
    } catch {
      // already gone
    }
  }
}

/** Loads `url` in a fresh page; returns what the page printed, with any page errors. */
async function load(browser: Browser, url: string): Promise<{ state: string | null; hash: string | null; flavor: string | null; text: string | null; problems: string[] }> {
  const page = await browser.newPage();
  try {
    const problems = pageProblems(page);
    await page.goto(url);
    await page.waitForSelector("#out[data-state]", { timeout: 60_000, state: "attached" }).catch((err: Error) => {
      throw new Error(`${url}: the page printed nothing in 60 s (${err.message.split("\n")[0]}); page problems: ${problems.join("; ") || "none"}`);
    });
    const out = page.locator("#out");
    return {
      state: await out.getAttribute("data-state"), hash: await out.getAttribute("data-hash"), flavor: await out.getAttribute("data-flavor"),
      text: await page.textContent("#out"), problems,
    };
  } finally {
    await page.close();
  }
}

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
}

function sizes(files: string[]): { bytes: number; gzip: number } {
  let bytes = 0;
  let gzip = 0;
  for (const f of files) {
    const b = readFileSync(f);
    bytes += b.length;
    gzip += gzipSync(b, { level: 9 }).length;
  }
  return { bytes, gzip };
}

test("a page importing only \"pagetwin\" hashes correctly in Chromium: Vite build, Vite dev server, esbuild, plain module script", { timeout: 900_000 }, async (t) => {
  const browser = await launchChromium();
  if (typeof browser === "string") return t.skip(browser);
  let consumer: PackedProject | null = null;
  const servers: Server[] = [];
  let dev: ChildProcess | null = null;
  try {
    // optional deps: esbuild's and rollup's platform binaries; no scripts: zstd-napi is not compiled (not used here)
    consumer = packAndInstall({ with: [VITE, ESBUILD], optional: true, ignoreScripts: true });
    const p = consumer.project;
    const page = join(p, "page");
    mkdirSync(page);
    writeFileSync(join(page, "main.js"), MAIN_JS);
    writeFileSync(join(page, "index.html"), html());
    const want = await xxhash128(knownPage(), Number(SEED & 0xffffffffn), Number(SEED >> 32n));

    // the page's types: the browser entry's declarations, strict, DOM only, no @types/node
    writeFileSync(join(page, "types.ts"), `import { createEngine, type Engine } from "pagetwin";\nconst e: Engine = await createEngine({ seed: 1n });\nexport const d: Uint8Array = e.hashPages(new Uint8Array(4096));\n`);
    writeFileSync(join(p, "tsconfig.json"), JSON.stringify({
      compilerOptions: { target: "ES2022", module: "ESNext", moduleResolution: "Bundler", customConditions: ["browser"], lib: ["ES2022", "DOM"], types: [], strict: true, noEmit: true, skipLibCheck: false },
      files: ["page/types.ts"],
    }));
    execFileSync(process.execPath, [TSC, "-p", p], { cwd: p, encoding: "utf8" });

    // Vite build, no config
    const viteLog = tool(p, "vite/bin/vite.js", ["build", "page", "--outDir", join(p, "out/vite"), "--emptyOutDir", "--logLevel", "warn"]);
    assert.doesNotMatch(viteLog, /node:|externalized|could not be resolved/i, `vite build warns:\n${viteLog}`);
    // esbuild, --platform=browser, no externals
    mkdirSync(join(p, "out/esbuild"), { recursive: true });
    tool(p, "esbuild/bin/esbuild", ["page/main.js", "--bundle", "--platform=browser", "--log-level=warning", `--outfile=${join(p, "out/esbuild/main.js")}`]);
    copyFileSync(join(page, "index.html"), join(p, "out/esbuild/index.html"));
    // plain module script: the installed package's own files, named by an import map
    mkdirSync(join(p, "out/plain"), { recursive: true });
    copyFileSync(join(page, "main.js"), join(p, "out/plain/main.js"));
    writeFileSync(join(p, "out/plain/index.html"), html(`<script type="importmap">{"imports":{"pagetwin":"/node_modules/pagetwin/dist/src/browser.js"}}</script>`));

    // each output served at the root of its own server, as a user deploys it
    const requests: string[] = [];
    for (const dir of ["out/vite", "out/esbuild", "."]) servers.push(await serveDir(join(p, dir), {}, requests));
    const [viteUrl, esbuildUrl, plainUrl] = servers.map((s) => serverUrl(s));
    const devServer = await viteDev(p, "page");
    dev = devServer.child;

    for (const [name, url] of [["vite build", `${viteUrl}/`], ["esbuild", `${esbuildUrl}/`], ["plain module script", `${plainUrl}/out/plain/`], ["vite dev server", devServer.url]] as const) {
      const got = await load(browser, url);
      assert.equal(got.state, "done", `${name}: ${got.text}`);
      assert.equal(got.hash, want, `${name}: the page's XXH3-128 equals hash-wasm's`);
      assert.equal(got.flavor, "simd", `${name}: Chromium runs the SIMD build`);
      assert.deepEqual(got.problems, [], name);
    }
    assert.deepEqual(requests.filter((r) => r.endsWith(".wasm")), [], "no page fetched a .wasm file: the core is inlined");
    assert.ok(requests.includes("/node_modules/pagetwin/dist/src/core/embedded-simd.js"), "the plain page imported the SIMD build only");
    assert.ok(!requests.includes("/node_modules/pagetwin/dist/src/core/embedded-scalar.js"), "the plain page did not import the scalar build");
    assert.doesNotMatch(devServer.log(), /error|node:fs|sourcemap/i, `vite dev server:\n${devServer.log()}`);

    // sizes: esbuild minified (one file, both builds inlined); Vite build (chunks: the entry and one per build)
    tool(p, "esbuild/bin/esbuild", ["page/main.js", "--bundle", "--platform=browser", "--minify", "--log-level=warning", `--outfile=${join(p, "out/min/main.js")}`]);
    const min = sizes([join(p, "out/min/main.js")]);
    const viteJs = filesUnder(join(p, "out/vite")).filter((f) => f.endsWith(".js"));
    const vite = sizes(viteJs);
    // what a SIMD browser loads of the Vite build: every chunk but the scalar build's
    const scalar = readFileSync(new URL("../../build/pagetwin-scalar.wasm", import.meta.url)).toString("base64");
    const loaded = sizes(viteJs.filter((f) => !readFileSync(f, "utf8").includes(scalar)));
    t.diagnostic(`esbuild --minify bundle: ${min.bytes} bytes, ${min.gzip} gzipped (JS and both wasm builds inlined)`);
    t.diagnostic(`vite build: ${viteJs.length} JS files, ${vite.bytes} bytes, ${vite.gzip} gzipped; a SIMD browser loads ${loaded.bytes} bytes, ${loaded.gzip} gzipped`);
    assert.equal(viteJs.length - 1, filesUnder(join(p, "out/vite")).filter((f) => f.endsWith(".js") && !readFileSync(f, "utf8").includes(scalar)).length, "the scalar build is a chunk of its own");
    assert.equal(filesUnder(join(p, "out/vite")).filter((f) => f.endsWith(".wasm")).length, 0, "vite emits no .wasm file");
  } finally {
    if (dev) stopGroup(dev);
    for (const s of servers) s.close();
    await browser.close();
    consumer?.cleanup();
  }
});
