// The browser visualizer (web/): the simulation it runs in Web Workers is
// checked in Node first; then the page is built with Vite, served on
// 127.0.0.1 and driven in Debian's headless Chromium through playwright-core:
// a live simulation's numbers on the page must equal what the same engine and
// planner compute here in Node for the same inputs, and a replayed trace must
// show the trace's numbers. Saves a screenshot to dist/web-screenshot.png
// (to web/screenshot.png, the README's, with PAGETWIN_UPDATE_SCREENSHOT=1).
// Skips the browser part, saying why, without /usr/bin/chromium (or
// PAGETWIN_CHROMIUM), vite or playwright-core.

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createEngine } from "../src/core/engine.js";
import { launchChromium, optionalImport, pageProblems, serveDir, serverUrl } from "./helpers/browser.js";
import { Simulation, toTrace, type SimConfig, type SimIteration, type SimMode, type SimResult } from "../web/src/sim.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url)); // dist/test -> the repository
const WEB = join(ROOT, "web");

// Fixed inputs of the live run (the page reads them from its URL).
const CONFIG: SimConfig = {
  ramMiB: 128, twinShare: 0.5, zeroShare: 0.2, dirtyPagesPerSecond: 30000, bandwidthMbit: 1000,
  downtimeMs: 300, cacheFillShare: 0.25, rewriteBlocksPerSecond: 200, maxIterations: 30, seed: "web-test",
};
const pct = (x: number) => Math.round(x * 100); // the page takes percentages
const QUERY = `ram=${CONFIG.ramMiB}&twin=${pct(CONFIG.twinShare)}&zero=${pct(CONFIG.zeroShare)}&dirty=${CONFIG.dirtyPagesPerSecond}`
  + `&bw=${CONFIG.bandwidthMbit}&downtime=${CONFIG.downtimeMs}&fill=${pct(CONFIG.cacheFillShare!)}&rewrite=${CONFIG.rewriteBlocksPerSecond}`
  + `&maxiter=${CONFIG.maxIterations}&seed=${CONFIG.seed}&run`;

interface Run {
  result: SimResult;
  iterations: SimIteration[];
}

async function simulate(config: SimConfig, mode: SimMode): Promise<Run> {
  const engine = await createEngine({ flavor: "simd" });
  const sim = Simulation.create(engine, config, mode);
  const result = sim.run();
  return { result, iterations: [...sim.iterations] };
}

test("the visualizer's simulation: deterministic, converges, verified, pagetwin sends less", { timeout: 120_000 }, async () => {
  const small: SimConfig = { ...CONFIG, ramMiB: 16 };
  const [pt, pt2, bl] = await Promise.all([simulate(small, "pagetwin"), simulate(small, "pagetwin"), simulate(small, "baseline")]);
  assert.deepEqual(pt.result, pt2.result);
  assert.deepEqual(pt.iterations.map((i) => i.transferredBytes), pt2.iterations.map((i) => i.transferredBytes));
  for (const r of [pt, bl]) {
    assert.equal(r.result.verified, true, `${r.result.mode}: the destination's hashes equal the source RAM's`);
    assert.equal(r.result.iterations, r.iterations.length);
    assert.ok(r.iterations[r.iterations.length - 1]!.final);
    assert.equal(r.result.transferredBytes, r.iterations.reduce((s, i) => s + i.transferredBytes, 0));
  }
  const pages = 16 * 256;
  // The first round sends every non-zero page: about half of them as twins with pagetwin.
  assert.equal(bl.iterations[0]!.pages.twin, 0);
  assert.equal(bl.iterations[0]!.pages.normal, pages - Math.round(pages * 0.2));
  assert.equal(pt.iterations[0]!.pages.twin + pt.iterations[0]!.pages.normal, pages - Math.round(pages * 0.2));
  assert.equal(pt.iterations[0]!.pages.twin, Math.round(pages * 0.5));
  assert.ok(pt.result.transferredBytes < bl.result.transferredBytes * 0.6, `${pt.result.transferredBytes} vs ${bl.result.transferredBytes}`);
  assert.ok(pt.result.totalTimeMs < bl.result.totalTimeMs);
  // A trace of it reads back as the demo's format.
  const trace = JSON.parse(JSON.stringify(toTrace(small, [pt, bl])));
  assert.equal(trace.format, "pagetwin-trace");
  assert.equal(Buffer.from(trace.runs[0].iterations[0].pageMap, "base64").length, pages);
});

// ---- the page in Chromium ----------------------------------------------------------

// Vite, imported by name at run time (so this file compiles without it and skips when it is not installed).
interface Vite { build(o: { root: string; logLevel?: string; configFile?: string }): Promise<unknown> }

test("the visualizer in headless Chromium shows what the engine computes in Node", { timeout: 600_000 }, async (t) => {
  const vite = await optionalImport<Vite>("vite");
  if (!vite) return t.skip("vite is not installed (npm install)");
  if (!existsSync(join(ROOT, "build", "pagetwin-simd.wasm"))) throw new Error("build/pagetwin-simd.wasm is missing: run `npm run build` first");

  await vite.build({ root: WEB, logLevel: "warn", configFile: join(WEB, "vite.config.ts") });
  const expected = await Promise.all([simulate(CONFIG, "pagetwin"), simulate(CONFIG, "baseline")]);
  const trace = toTrace(CONFIG, expected);
  const server = await serveDir(join(WEB, "dist"), { "/test-trace.json": JSON.stringify(trace) });
  const base = serverUrl(server);
  const browser = await launchChromium();
  if (typeof browser === "string") {
    server.close();
    return t.skip(browser);
  }
  try {
    const page = await browser.newPage({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
    const problems = pageProblems(page);

    // Live: two workers run the real core on the same inputs.
    await page.goto(`${base}/?${QUERY}`);
    await page.waitForSelector('[data-testid="status"][data-state="done"], [data-testid="status"][data-state="error"]', { timeout: 300_000 });
    assert.equal(await page.locator('[data-testid="status"]').getAttribute("data-state"), "done", `status: ${await page.textContent('[data-testid="error"]')}`);
    const value = async (id: string) => {
      const v = await page.locator(`[data-testid="${id}"]`).getAttribute("data-value");
      assert.ok(v !== null && v !== "", `the page shows no value for ${id}`);
      return v;
    };
    const num = async (id: string) => Number(await value(id));
    for (const { result, iterations } of expected) {
      const m = result.mode;
      assert.equal(await num(`${m}-total-bytes`), result.transferredBytes, `${m} bytes`);
      assert.equal(await num(`${m}-iterations`), result.iterations, `${m} iterations`);
      assert.equal(await num(`${m}-total-time`), result.totalTimeMs, `${m} time`);
      assert.equal(await num(`${m}-downtime`), result.downtimeMs, `${m} downtime`);
      assert.equal(await num(`${m}-pages-normal`), result.pages.normal + result.pages.resent, `${m} pages in full`);
      assert.equal(await num(`${m}-pages-twin`), result.pages.twin, `${m} twins`);
      assert.equal(await num(`${m}-pages-resent`), result.pages.resent, `${m} resent`);
      assert.equal(await num(`${m}-pages-zero`), result.pages.zero, `${m} zero`);
      assert.equal(await value(`${m}-verified`), "true");
      assert.equal(await value(`${m}-convergence`), result.convergence);
      for (const i of iterations) assert.equal(await num(`${m}-iter-${i.iteration}-bytes`), i.transferredBytes, `${m} iteration ${i.iteration}`);
    }
    assert.equal(await num("iterations"), expected[0].result.iterations);
    assert.equal(await num("saving-total-bytes"), (expected[0].result.transferredBytes - expected[1].result.transferredBytes) / expected[1].result.transferredBytes);
    assert.ok(expected[0].result.pages.twin > 0 && expected[0].result.pages.resent > 0, "the inputs exercise twins and resends");
    // The page map shows the first round's twins (teal) where the simulation has them.
    const painted = await page.evaluate(() => {
      const c = document.querySelector<HTMLCanvasElement>('[data-testid="map-pagetwin"]')!;
      return c.width > 0 && c.height > 0;
    });
    assert.ok(painted);
    // The screenshot shows the first round, where the twins are.
    await page.evaluate(() => {
      const s = document.querySelector<HTMLInputElement>('[data-testid="iteration-slider"]')!;
      s.value = "1";
      s.dispatchEvent(new Event("input"));
      return new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    });
    mkdirSync(WEB, { recursive: true });
    const shot = process.env.PAGETWIN_UPDATE_SCREENSHOT === "1" ? join(WEB, "screenshot.png") : fileURLToPath(new URL("../web-screenshot.png", import.meta.url));
    await page.screenshot({ path: shot, fullPage: true });

    // Replay: the same runs as a trace file, loaded by ?trace=URL.
    await page.goto(`${base}/?trace=/test-trace.json`);
    await page.waitForSelector('[data-testid="status"][data-state="done"], [data-testid="status"][data-state="error"]', { timeout: 60_000 });
    assert.equal(await page.locator('[data-testid="status"]').getAttribute("data-state"), "done", `status: ${await page.textContent('[data-testid="error"]')}`);
    for (const { result } of expected) {
      assert.equal(await num(`${result.mode}-total-bytes`), result.transferredBytes);
      assert.equal(await num(`${result.mode}-iterations`), result.iterations);
      assert.equal(await num(`${result.mode}-total-time`), result.totalTimeMs);
    }
    assert.deepEqual(problems, []);
  } finally {
    await browser.close();
    server.close();
  }
});
