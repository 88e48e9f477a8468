// The visualizer's migrations view as the tests read it (headless Chromium):
// the built page (web/dist, built here if missing), a migration's numbers
// from its data-testid values, and a trace replayed to the numbers it shows.
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { launchChromium, optionalImport, pageProblems, serveDir, serverUrl, type Page } from "./browser.js";

const ROOT = fileURLToPath(new URL("../../..", import.meta.url));
export const WEB = path.join(ROOT, "web");
export const DIST = path.join(WEB, "dist");

interface Vite { build(o: { root: string; logLevel?: string; configFile?: string }): Promise<unknown> }

/** Builds the page into web/dist (`force`: even when it is there); a reason instead when vite is not installed. */
export async function buildPage(force = false): Promise<string | null> {
  if (!force && fs.existsSync(path.join(DIST, "index.html"))) return null;
  const vite = await optionalImport<Vite>("vite");
  if (!vite) return "vite is not installed (npm install)";
  if (!fs.existsSync(path.join(ROOT, "build", "pagetwin-simd.wasm"))) throw new Error("build/pagetwin-simd.wasm is missing: run `npm run build` first");
  await vite.build({ root: WEB, logLevel: "warn", configFile: path.join(WEB, "vite.config.ts") });
  return null;
}

/** The page's value of a data-testid (its data-value). */
export async function value(page: Page, id: string): Promise<string> {
  const v = await page.locator(`[data-testid="${id}"]`).getAttribute("data-value");
  assert.ok(v !== null && v !== "", `the page shows no value for ${id}`);
  return v;
}
export const num = async (page: Page, id: string): Promise<number> => Number(await value(page, id));

/** Waits for the selected migration to be over on the page. */
export async function settled(page: Page, timeout = 60_000): Promise<void> {
  await page.waitForSelector('[data-testid="mig-state"][data-value="done"], [data-testid="mig-state"][data-value="failed"], [data-testid="mig-error"]:not([hidden])', { timeout });
  const err = await page.locator('[data-testid="mig-error"]').getAttribute("hidden");
  assert.notEqual(err, null, `the page shows an error: ${await page.textContent('[data-testid="mig-error"]')}`);
}

export interface Totals { transferred: number; iterations: number; normal?: number; twin: number; zero: number; resent: number; downtime?: number | null }

/** The selected migration shows these totals. */
export async function assertShows(page: Page, want: Totals, what: string): Promise<void> {
  assert.equal(await num(page, "mig-transferred"), want.transferred, `${what}: bytes`);
  assert.equal(await num(page, "mig-iterations"), want.iterations, `${what}: rounds`);
  if (want.normal !== undefined) assert.equal(await num(page, "mig-pages-normal"), want.normal, `${what}: in full`);
  assert.equal(await num(page, "mig-pages-twin"), want.twin, `${what}: references`);
  assert.equal(await num(page, "mig-pages-zero"), want.zero, `${what}: zero`);
  assert.equal(await num(page, "mig-pages-resent"), want.resent, `${what}: resent`);
  // --json output rounds times to 0.1 ms (docs/JSON.md)
  if (want.downtime != null) assert.equal(Math.round((await num(page, "mig-downtime")) * 10) / 10, want.downtime, `${what}: downtime`);
}

/**
 * Replays a trace's text in a fresh Chromium and checks the page shows `want`; a reason instead
 * when there is no Chromium or vite to do it with.
 */
export async function replayShows(trace: string, want: Totals, what: string): Promise<string | null> {
  const why = await buildPage();
  if (why) return why;
  const browser = await launchChromium();
  if (typeof browser === "string") return browser;
  const server = await serveDir(DIST, { "/replay.ndjson": trace });
  try {
    const page = await browser.newPage({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
    const problems = pageProblems(page);
    await page.goto(`${serverUrl(server)}/?trace=/replay.ndjson`);
    await settled(page);
    await assertShows(page, want, what);
    assert.deepEqual(problems, []);
    return null;
  } finally {
    server.close();
    await browser.close();
  }
}
