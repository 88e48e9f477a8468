// Headless Chromium (Debian's, driven by playwright-core) and a static file
// server on 127.0.0.1, for the tests that load pages: the visualizer and the
// browser consumer. playwright-core is imported by name at run time, so the
// tests compile without it and skip, saying why, when it or Chromium is missing.
import { existsSync, readFileSync, statSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { extname, join, normalize, sep } from "node:path";

export const CHROMIUM = process.env.PAGETWIN_CHROMIUM ?? "/usr/bin/chromium";

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".wasm": "application/wasm", ".json": "application/json", ".png": "image/png",
};

/** Serves `dir` (index.html for "/"), plus fixed JSON bodies at `extra` paths; every request path lands in `requests`. */
export function serveDir(dir: string, extra: Record<string, string> = {}, requests: string[] = []): Promise<Server> {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname);
    requests.push(path);
    if (extra[path] !== undefined) {
      res.writeHead(200, { "content-type": "application/json" }).end(extra[path]);
      return;
    }
    const file = normalize(join(dir, path.endsWith("/") ? path + "index.html" : path));
    if (!file.startsWith(dir + sep) || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end("not found");
      return;
    }
    res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream" }).end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

export function serverUrl(server: Server): string {
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

// Minimal shapes of playwright-core's API, as these tests use it.
export interface Locator { getAttribute(name: string): Promise<string | null> }
export interface Page {
  goto(url: string): Promise<unknown>;
  waitForSelector(sel: string, o?: { timeout?: number; state?: string }): Promise<unknown>;
  locator(sel: string): Locator;
  textContent(sel: string): Promise<string | null>;
  screenshot(o: { path: string; fullPage?: boolean }): Promise<unknown>;
  on(ev: "console" | "pageerror", f: (x: { type?(): string; text?(): string; message?: string }) => void): void;
  evaluate<T>(f: () => T): Promise<T>;
  close(): Promise<void>;
}
export interface Browser { newPage(o?: { viewport?: { width: number; height: number }; deviceScaleFactor?: number }): Promise<Page>; close(): Promise<void> }
interface Playwright { chromium: { launch(o: { executablePath: string; args: string[]; timeout?: number }): Promise<Browser> } }

export async function optionalImport<T>(name: string): Promise<T | null> {
  try {
    return (await import(name)) as T;
  } catch {
    return null;
  }
}

/** Chromium headless, or why it cannot run here. */
export async function launchChromium(): Promise<Browser | string> {
  if (!existsSync(CHROMIUM)) return `no Chromium at ${CHROMIUM} (apt-get install chromium, or set PAGETWIN_CHROMIUM)`;
  const pw = await optionalImport<Playwright>("playwright-core");
  if (!pw) return "playwright-core is not installed (npm install)";
  return pw.chromium.launch({
    executablePath: CHROMIUM, timeout: 60_000,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
  });
}

/** Collects a page's uncaught errors and console errors. */
export function pageProblems(page: Page): string[] {
  const problems: string[] = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type?.() === "error") problems.push(`console error: ${m.text?.()}`); });
  return problems;
}
