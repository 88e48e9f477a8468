// The visualizer's migrations view in headless Chromium: traces written by
// each mode replay with the totals the commands reported; a real guest
// migrated in stream mode while the page is open shows live, and its final
// numbers equal the proxies' stats; a synthetic 16M-page (64 GiB) trace
// renders within a generous bound (the time is printed). Skips, saying why,
// without Chromium, vite or playwright-core; the real-guest part without
// QEMU or the guest.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { launchChromium, pageProblems, serveDir, serverUrl, type Browser, type Page } from "./helpers/browser.js";
import { assertShows, buildPage, DIST, num, settled, value } from "./helpers/trace-page.js";
import { cliPath, jsonResult } from "./helpers/cli.js";
import { makeFixture } from "./helpers/ram-fixture.js";
import { freePort, TEST_KEY } from "./helpers/stream.js";
import { guest, skipRealGuest } from "./helpers/guest.js";
import { encodeRuns, TRACE_VERSION, type TraceRecord } from "../src/trace/format.js";
import { FileTraceSink } from "../src/trace/sink.js";
import { LiveTraceServer } from "../src/trace/live.js";
import { TraceModel } from "../src/trace/model.js";
import { QemuVm } from "../src/adapters/qemu/vm.js";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import { randomBytes } from "node:crypto";

type FullPage = Page & { click(sel: string): Promise<void> };

let browser: Browser | null = null;
let why: string | false = false;
let work = "";

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-webtrace-"));
  // built afresh: the page under test is this checkout's
  const noVite = await buildPage(true);
  if (noVite) { why = noVite; return; }
  const b = await launchChromium();
  if (typeof b === "string") why = b;
  else browser = b;
});

after(async () => {
  await browser?.close();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

/** A 16M-page guest's trace: 3 rounds, the first over every page in short runs of every class. */
function bigTrace(): { text: string; pages: { normal: number; twin: number; zero: number }; records: number } {
  const pages = 1 << 24, id = "big", CH = 1 << 20;
  const recs: TraceRecord[] = [{ type: "start", format: "pagetwin-trace", version: TRACE_VERSION, id, mode: "stream", method: "pagetwin", label: "synthetic 64 GiB guest", pages, startedAt: Date.now(), baseline: "measured" }];
  const tot = { normal: 0, twin: 0, zero: 0 };
  let x = 12345, t = 0;
  const map = new Uint8Array(CH);
  for (let it = 1; it <= 3; it++) {
    if (it === 3) recs.push({ type: "switchover", id, iteration: 3, tMs: t, reason: "synthetic" });
    const round = { normal: 0, twin: 0, zero: 0 };
    const span = it === 1 ? pages : pages >> (it * 2);
    for (let first = 0; first < span; first += CH) {
      for (let i = 0; i < CH;) {
        x = (x * 1103515245 + 12345) & 0x7fffffff;
        const len = Math.min(CH - i, 1 + (x % 64)), c = it === 1 ? 1 + (x % 3) : (x % 4 === 0 ? 3 : 0);
        map.fill(c, i, i + len);
        if (c === 1) round.zero += len; else if (c === 2) round.twin += len; else if (c === 3) round.normal += len;
        i += len;
      }
      recs.push({ type: "pages", id, iteration: it, first, count: CH, runs: encodeRuns(map) });
    }
    const bytes = round.normal * 4104 + round.twin * 40 + round.zero * 9;
    recs.push({ type: "round", id, iteration: it, final: it === 3, startMs: t, durationMs: 1000, pages: { ...round, resent: 0 }, transferredBytes: bytes, baselineBytes: (round.normal + round.twin) * 4104 + round.zero * 9 });
    t += 1000;
    tot.normal += round.normal; tot.twin += round.twin; tot.zero += round.zero;
  }
  const all = recs.filter((r): r is Extract<TraceRecord, { type: "round" }> => r.type === "round");
  recs.push({
    type: "end", id, ok: true, totalTimeMs: t, downtimeMs: 1000, iterations: 3, pages: { ...tot, resent: 0 },
    transferredBytes: all.reduce((s, r) => s + r.transferredBytes, 0), baselineBytes: all.reduce((s, r) => s + r.baselineBytes, 0), verified: true,
  });
  return { text: recs.map((r) => JSON.stringify(r)).join("\n") + "\n", pages: tot, records: recs.length };
}

function keyFile(dir: string): string {
  const p = path.join(dir, "key");
  fs.writeFileSync(p, randomBytes(32));
  fs.chmodSync(p, 0o600);
  return p;
}

/** `listen --once` and `send --trace` on a 16 MiB fixture: send's result and its trace. */
async function sendTrace(dir: string): Promise<{ result: Record<string, any>; trace: string }> {
  const f = makeFixture(dir, 16);
  const key = keyFile(dir);
  const port = await freePort();
  const l = spawn(process.execPath, [cliPath, "listen", "--ram", path.join(dir, "dst.bin"), "--create-ram", "--image", f.image, "--port", String(port), "--psk-file", key, "--once", "--json"], { stdio: ["ignore", "pipe", "ignore"] });
  try {
    await new Promise<void>((resolve, reject) => {
      let out = "";
      l.stdout!.on("data", (d: Buffer) => { out += d; if (/"listening"/.test(out)) resolve(); });
      l.once("exit", (c) => reject(new Error(`listen exited ${c}`)));
    });
    const trace = path.join(dir, "send.ndjson");
    const s = spawnSync(process.execPath, [cliPath, "send", "--ram", f.ram, "--image", f.image, "--to", `127.0.0.1:${port}`, "--psk-file", key, "--bandwidth", "0", "--json", "--trace", trace], { encoding: "utf8" });
    assert.equal(s.status, 0, s.stderr);
    return { result: jsonResult(s.stdout), trace: fs.readFileSync(trace, "utf8") };
  } finally {
    if (l.exitCode === null) l.kill("SIGKILL");
  }
}

test("replay: the traces of agent mode (send) and the embedded demo show the commands' totals; a 16M-page trace renders in time", { timeout: 400_000 }, async (t) => {
  if (!browser) return t.skip(String(why));
  const dir = fs.mkdtempSync(path.join(work, "replay-"));
  const send = await sendTrace(dir);
  const demoTrace = path.join(dir, "demo.ndjson");
  const d = spawnSync(process.execPath, [cliPath, "demo", "--ram-mib", "8", "--json", "--trace", demoTrace], { encoding: "utf8" });
  assert.equal(d.status, 0, d.stderr);
  const demo = jsonResult(d.stdout);
  const big = bigTrace();
  const server = await serveDir(DIST, { "/send.ndjson": send.trace, "/demo.ndjson": fs.readFileSync(demoTrace, "utf8"), "/big.ndjson": big.text });
  const base = serverUrl(server);
  const page = await browser.newPage({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 }) as FullPage;
  const problems = pageProblems(page);
  try {
    await page.goto(`${base}/?trace=/send.ndjson`);
    await settled(page);
    const r = send.result;
    await assertShows(page, { transferred: r.ram.transferred, iterations: r.ram["dirty-sync-count"], twin: r.ram.twin, zero: r.ram.duplicate, resent: r.ram.resent, downtime: r.downtime }, "send");

    await page.goto(`${base}/?trace=/demo.ndjson`);
    await settled(page);
    for (const mode of ["pagetwin", "baseline"]) {
      const run = (demo.runs as Record<string, any>[]).find((x) => x.mode === mode)!;
      if (mode === "baseline") {
        await page.click('[data-testid="migration-item"]:has-text("plain pre-copy")');
        await page.waitForSelector('[data-testid="migration-item"][aria-selected="true"]:has-text("plain pre-copy")');
      }
      await assertShows(page, { transferred: run.ram.transferred, iterations: run.ram["dirty-sync-count"], twin: run.ram.twin, zero: run.ram.duplicate, resent: run.ram.resent, downtime: run.downtime }, `demo ${mode}`);
    }

    const t0 = Date.now();
    await page.goto(`${base}/?trace=/big.ndjson`);
    await settled(page, 120_000);
    await page.waitForSelector("#mig-view[data-render-ms]");
    const loadMs = Date.now() - t0;
    await assertShows(page, { transferred: Number(JSON.parse(big.text.trim().split("\n").at(-1)!).transferredBytes), iterations: 3, normal: big.pages.normal, twin: big.pages.twin, zero: big.pages.zero, resent: 0 }, "16M pages");
    assert.equal(await num(page, "mig-map-caption"), 256, "one cell holds 256 pages");
    // a redraw (another round on the slider) as the user scrubs
    const redraw = await page.evaluate(() => new Promise<number>((resolve) => {
      const s = document.querySelector<HTMLInputElement>('[data-testid="mig-round-slider"]')!;
      const t = performance.now();
      s.value = "1";
      s.dispatchEvent(new Event("input"));
      requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now() - t)));
    }));
    const renderMs = Number(await page.locator("#mig-view").getAttribute("data-render-ms"));
    t.diagnostic(`16M-page trace (${(big.text.length / 1e6).toFixed(1)} MB, ${big.records} records): loaded and drawn in ${loadMs} ms; one redraw ${renderMs.toFixed(1)} ms, slider to next frame ${redraw.toFixed(1)} ms`);
    assert.ok(loadMs < 60_000, `loaded in ${loadMs} ms`);
    assert.ok(renderMs < 1000, `a redraw took ${renderMs} ms`);
    await page.screenshot({ path: fileURLToPath(new URL("../web-trace-big.png", import.meta.url)), fullPage: true });
    assert.deepEqual(problems, []);
  } finally {
    await page.close();
    server.close();
  }
});

test("live: a real guest migrated in stream mode while the page is open shows live, ends with the proxies' numbers, and its trace replays the same; then agent mode (`migrate --trace`)", { skip: skipRealGuest, timeout: 600_000 }, async (t) => {
  if (!browser) return t.skip(String(why));
  const g = guest!;
  const dir = fs.mkdtempSync(path.join(work, "live-"));
  const nas = path.join(dir, "disk.img");
  fs.copyFileSync(g.disk, nas);
  const vms: QemuVm[] = [];
  const boot = async (name: string, extra: Partial<Parameters<typeof QemuVm.start>[0]> = {}) => {
    const vm = await QemuVm.start({
      ...g, memoryMiB: 256, memPath: `/dev/shm/pt-webtrace-${process.pid}-${name}`, qmpSocket: path.join(dir, `${name}.qmp`),
      serialLog: path.join(dir, `${name}.log`), name: `pt-webtrace-${name}`, extraQmpSockets: [path.join(dir, `${name}-tool.qmp`)], ...extra,
    });
    vms.push(vm);
    return vm;
  };
  const live = await LiveTraceServer.start({ webRoot: DIST });
  const traceFile = path.join(dir, "stream.ndjson");
  const file = new FileTraceSink(traceFile);
  const inFile = path.join(dir, "stream-in.ndjson");
  const fileIn = new FileTraceSink(inFile);
  const page = await browser.newPage({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 }) as FullPage;
  const problems = pageProblems(page);
  try {
    const src = await boot("src");
    await src.waitForSerial(/pagetwin-ready/, 240_000);
    await src.waitForSerial(/pagetwin-counter 2\b/, 30_000);
    const qport = await freePort();
    const dst = await boot("dst", { incoming: `tcp:127.0.0.1:${qport}` });
    const si = await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${qport}`, image: nas, psk: TEST_KEY, trace: [fileIn] });
    const so = await streamOut({ listenPort: 0, to: `127.0.0.1:${si.port}`, image: nas, psk: TEST_KEY, qmp: path.join(dir, "src-tool.qmp"), trace: [live, file] });

    await page.goto(live.url);
    await page.waitForSelector('[data-testid="mig-source"]:has-text("live")');
    const seenLive = page.waitForSelector('[data-testid="migration-item"][data-state="running"]', { timeout: 180_000 });
    const seenMap = page.waitForSelector('[data-testid="mig-round-1-bytes"]', { timeout: 180_000, state: "attached" });
    // slow enough that the page sees it run: 20 MB/s
    await src.qmp.execute("migrate-set-parameters", { "max-bandwidth": 20_000_000 });
    await src.qmp.execute("migrate", { uri: `tcp:127.0.0.1:${so.port}` });
    await seenLive;
    await seenMap;
    let info: Record<string, any>;
    for (;;) {
      info = await src.qmp.execute("query-migrate");
      if (info.status === "completed" || info.status === "failed") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(info.status, "completed");
    const [o, i] = await Promise.all([so.done, si.done]);
    assert.equal(o.error, undefined);
    assert.equal(o.verdict, "verified");
    await settled(page);
    const want = {
      transferred: o.bytesOutLink, iterations: -1, normal: o.pagesSeen - o.twinsReplaced, twin: o.twinsReplaced, zero: o.zeroPages, resent: o.resends,
      downtime: info.downtime as number,
    };
    assert.equal(o.bytesOutLink, i.bytesInLink, "what stream-out put on the link is what stream-in read");
    want.iterations = await num(page, "mig-iterations");
    assert.ok(want.iterations >= 2, `${want.iterations} rounds: QEMU's first pass and the final one at least`);
    await assertShows(page, want, "live");
    assert.equal(await num(page, "mig-baseline"), o.bytesFromQemu, "QEMU alone: the source QEMU's own stream");
    assert.equal(await value(page, "mig-verified"), "true");
    assert.ok(await num(page, "mig-stopped-at") > 0, "the page shows when the guest stopped");
    await page.screenshot({ path: fileURLToPath(new URL("../web-trace-live.png", import.meta.url)), fullPage: true });
    const q = (JSON.parse(fs.readFileSync(traceFile, "utf8").trim().split("\n").at(-1)!) as { qemu?: Record<string, any> }).qemu;
    t.diagnostic(`stream mode: ${want.iterations} rounds seen in the stream (QEMU: dirty-sync-count ${String(q?.ram?.["dirty-sync-count"])}), ` +
      `${o.pagesSeen} pages, ${o.twinsReplaced} references, ${o.zeroPages} zero; link ${o.bytesOutLink} B for ${o.bytesFromQemu} B of QEMU's stream; downtime ${info.downtime} ms`);
    await Promise.all([so.close(), si.close()]);

    // the same migration's trace file, replayed; and stream-in's (the destination's view: what it read, its own rounds)
    await file.close();
    await fileIn.close();
    const server = await serveDir(DIST, { "/stream.ndjson": fs.readFileSync(traceFile, "utf8"), "/stream-in.ndjson": fs.readFileSync(inFile, "utf8") });
    try {
      await page.goto(`${serverUrl(server)}/?trace=/stream.ndjson`);
      await settled(page);
      await assertShows(page, want, "stream trace replayed");
      await page.goto(`${serverUrl(server)}/?trace=/stream-in.ndjson`);
      await settled(page);
      const inRounds = await num(page, "mig-iterations");
      assert.equal(inRounds, want.iterations, "the same stream, the same rounds");
      await assertShows(page, { ...want, transferred: i.bytesInLink, iterations: inRounds, twin: i.twinsReplaced + i.resends, downtime: null }, "stream-in's trace replayed");
    } finally {
      server.close();
    }

    // agent mode: the guest, now on dst, to a third QEMU with `pagetwin migrate --trace`
    await dst.waitForSerial(/pagetwin-counter \d+/, 30_000);
    const c = await boot("c", { incoming: "defer", extraArgs: ["-S"] });
    const agentTrace = path.join(dir, "agent.ndjson");
    const key = keyFile(dir);
    const m = spawnSync(process.execPath, [cliPath, "migrate", "--src-qmp", path.join(dir, "dst-tool.qmp"), "--dst-qmp", path.join(dir, "c-tool.qmp"),
      "--src-ram", dst.options.memPath, "--dst-ram", c.options.memPath, "--image", nas, "--psk-file", key, "--json", "--trace", agentTrace], { encoding: "utf8", timeout: 240_000 });
    assert.equal(m.status, 0, m.stderr);
    const r = jsonResult(m.stdout);
    const model = TraceModel.parse(fs.readFileSync(agentTrace, "utf8"));
    assert.equal([...model.migrations.values()][0]!.start.mode, "agent");
    const server2 = await serveDir(DIST, { "/agent.ndjson": fs.readFileSync(agentTrace, "utf8") });
    try {
      await page.goto(`${serverUrl(server2)}/?trace=/agent.ndjson`);
      await settled(page);
      await assertShows(page, { transferred: r.ram.transferred, iterations: r.ram["dirty-sync-count"], twin: r.ram.twin, zero: r.ram.duplicate, resent: r.ram.resent, downtime: r.downtime }, "migrate --trace");
    } finally {
      server2.close();
    }
    assert.deepEqual(problems, []);
  } finally {
    await page.close();
    await live.close();
    await file.close().catch(() => {});
    await fileIn.close().catch(() => {});
    for (const vm of vms) await vm.cleanup();
  }
});
