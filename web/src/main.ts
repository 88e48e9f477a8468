// The visualizer's page: live mode drives two workers (pagetwin and plain
// pre-copy, each with the real core) round by round; replay mode reads a
// trace file. Both end in the same View, drawn on canvases. Every number
// shown that a test may read sits in an element with a data-testid and its
// exact value in data-value.

// @ts-ignore -- comlink 4.4.2 has no exports map; types come from its declarations below
import * as comlinkEsm from "comlink/dist/esm/comlink.mjs";
import type * as ComlinkTypes from "comlink";
import type { WorkerApi } from "./worker.js";
import {
  base64Decode, toTrace,
  type PageCounts, type SimConfig, type SimIteration, type SimResult, type SimSetup, type Trace,
} from "./sim.js";
import { COLORS, drawBars, drawCumulative, drawPageMap, MAP_LEGEND, type ChartRun } from "./draw.js";
import { MigrationsView } from "./traces.js";

const { wrap } = comlinkEsm as typeof ComlinkTypes;
type Remote<T> = ComlinkTypes.Remote<T>;

type ModeKey = "pagetwin" | "baseline";
const MODES: ModeKey[] = ["pagetwin", "baseline"];
const MODE_LABEL: Record<ModeKey, string> = { pagetwin: "pagetwin", baseline: "plain pre-copy" };

interface IterView {
  iteration: number;
  final: boolean;
  startMs: number;
  durationMs: number;
  dirty: number;
  pages: PageCounts;
  transferredBytes: number;
  guestWrites?: number;
  map: Uint8Array | string | null; // bytes, or base64 from a trace (decoded when drawn)
}

interface ResultView {
  totalTimeMs: number;
  downtimeMs: number;
  transferredBytes: number;
  iterations: number;
  pages: PageCounts;
  verified?: boolean;
  convergence?: string;
}

interface RunView {
  mode: ModeKey;
  result: ResultView | null;
  iterations: IterView[];
  setup?: SimSetup;
}

interface View {
  kind: "live" | "trace";
  pages: number;
  caption: string;
  runs: Partial<Record<ModeKey, RunView>>;
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

// ---- formatting ---------------------------------------------------------------

const MiB = 1024 * 1024;
function fmtBytes(n: number): string {
  if (n >= 1024 * MiB) return `${(n / 1024 / MiB).toFixed(2)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(n >= 100 * MiB ? 0 : 1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${Math.round(n)} B`;
}
function fmtMs(ms: number): string {
  if (ms >= 10_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  return `${ms.toFixed(ms >= 100 ? 0 : 1)} ms`;
}
const fmtInt = (n: number) => Math.round(n).toLocaleString("en-US");
const fmtPct = (x: number) => `${x > 0 ? "+" : x < 0 ? "−" : ""}${Math.abs(x * 100).toFixed(1)} %`;

// ---- state ----------------------------------------------------------------------

let view: View | null = null;
let selected = 1; // iteration shown in the page maps
let following = true; // the slider follows new iterations while a run is live
let playing: number | null = null;
let lastLive: { config: SimConfig; runs: Partial<Record<ModeKey, { result: SimResult | null; iterations: SimIteration[] }>> } | null = null;

function setStatus(state: "idle" | "running" | "done" | "error", text: string): void {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
}

function showError(msg: string | null): void {
  const e = $("error");
  e.hidden = msg === null;
  e.textContent = msg ?? "";
  if (msg !== null) setStatus("error", "error");
}

// ---- rendering ------------------------------------------------------------------

let renderQueued = false;
function render(): void {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderNow();
  });
}

function maxIterations(v: View): number {
  return Math.max(0, ...MODES.map((m) => v.runs[m]?.iterations.length ?? 0));
}

function renderNow(): void {
  if (!view) return;
  const v = view;
  const n = maxIterations(v);
  const slider = $<HTMLInputElement>("iter");
  slider.max = String(Math.max(1, n));
  if (following) selected = Math.max(1, n);
  selected = Math.min(Math.max(1, selected), Math.max(1, n));
  slider.value = String(selected);
  $("iter-out").textContent = n ? `${selected} of ${n}` : "–";
  renderSummary(v);
  renderMaps(v);
  const chartRuns: ChartRun[] = MODES.filter((m) => v.runs[m]).map((m) => ({
    label: MODE_LABEL[m], color: m === "pagetwin" ? COLORS.pagetwin : COLORS.baseline,
    iterations: v.runs[m]!.iterations, done: v.runs[m]!.result !== null,
  }));
  drawBars($<HTMLCanvasElement>("bars"), chartRuns, selected);
  drawCumulative($<HTMLCanvasElement>("cumulative"), chartRuns);
  renderTable(v);
}

function cell(testid: string, value: number | string | boolean | undefined, text: string): string {
  const dv = value === undefined ? "" : ` data-value="${String(value)}"`;
  return `<td data-testid="${testid}"${dv}>${text}</td>`;
}

function renderSummary(v: View): void {
  const pt = v.runs.pagetwin, bl = v.runs.baseline;
  const val = (r: RunView | undefined, f: (r: ResultView) => number) => (r?.result ? f(r.result) : undefined);
  const partial = (r: RunView | undefined, f: (i: IterView) => number) => r ? r.iterations.reduce((s, i) => s + f(i), 0) : undefined;
  type Row = [string, string, (r: ResultView) => number, (n: number) => string, ((i: IterView) => number) | null];
  const rows: Row[] = [
    ["Bytes on the wire", "total-bytes", (r) => r.transferredBytes, fmtBytes, (i) => i.transferredBytes],
    ["Migration time", "total-time", (r) => r.totalTimeMs, fmtMs, (i) => i.durationMs],
    ["Downtime (final round)", "downtime", (r) => r.downtimeMs, fmtMs, null],
    ["Iterations (incl. final)", "iterations", (r) => r.iterations, fmtInt, () => 1],
    ["Pages sent in full", "pages-normal", (r) => r.pages.normal + r.pages.resent, (n) => `${fmtInt(n)} pages`, (i) => i.pages.normal + i.pages.resent],
    ["Pages mapped to NAS blocks", "pages-twin", (r) => r.pages.twin, (n) => `${fmtInt(n)} pages`, (i) => i.pages.twin],
    ["  of which resent (block changed)", "pages-resent", (r) => r.pages.resent, (n) => `${fmtInt(n)} pages`, (i) => i.pages.resent],
    ["Pages that became zero (marker only)", "pages-zero", (r) => r.pages.zero, (n) => `${fmtInt(n)} pages`, (i) => i.pages.zero],
  ];
  let html = `<table class="cmp"><thead><tr><th></th><th class="pt">pagetwin</th><th class="bl">plain pre-copy</th><th>pagetwin vs plain</th></tr></thead><tbody>`;
  for (const [label, key, f, fmt, running] of rows) {
    const a = val(pt, f) ?? (running ? partial(pt, running) : undefined);
    const b = val(bl, f) ?? (running ? partial(bl, running) : undefined);
    const done = (r: RunView | undefined) => (r?.result ? "" : " …");
    const change = a !== undefined && b !== undefined && b > 0 && pt?.result && bl?.result && (key === "total-bytes" || key === "total-time" || key === "downtime")
      ? cell(`saving-${key}`, (a - b) / b, `<b>${fmtPct((a - b) / b)}</b>`) : "<td></td>";
    html += `<tr><th>${label}</th>${cell(`pagetwin-${key}`, pt?.result ? a : undefined, a === undefined ? "–" : fmt(a) + done(pt))}`
      + `${cell(`baseline-${key}`, bl?.result ? b : undefined, b === undefined ? "–" : fmt(b) + done(bl))}${change}</tr>`;
  }
  const ver = (r: RunView | undefined) => r?.result?.verified === undefined ? "–" : r.result.verified ? "✔ destination = source" : "✘ differs";
  const conv = (r: RunView | undefined) => r?.result?.convergence ?? "–";
  html += `<tr><th>Stopped because</th>${cell("pagetwin-convergence", conv(pt), conv(pt))}${cell("baseline-convergence", conv(bl), conv(bl))}<td></td></tr>`;
  html += `<tr><th>RAM check at the end</th>${cell("pagetwin-verified", pt?.result?.verified, ver(pt))}${cell("baseline-verified", bl?.result?.verified, ver(bl))}<td></td></tr>`;
  html += `</tbody></table>`;
  const iters = pt?.result?.iterations;
  html += `<p class="caption">${v.caption} <span hidden data-testid="iterations"${iters === undefined ? "" : ` data-value="${iters}"`}>${iters ?? ""}</span></p>`;
  $("summary").innerHTML = html;
}

const mapCache = new WeakMap<IterView, Uint8Array>();
function mapOf(i: IterView): Uint8Array | null {
  if (i.map === null) return null;
  if (typeof i.map !== "string") return i.map;
  let m = mapCache.get(i);
  if (!m) { m = base64Decode(i.map); mapCache.set(i, m); }
  return m;
}

function renderMaps(v: View): void {
  for (const m of MODES) {
    const canvas = $<HTMLCanvasElement>(`map-${m}`);
    const r = v.runs[m];
    const it = r?.iterations[Math.min(selected, r.iterations.length) - 1];
    drawPageMap(canvas, it ? mapOf(it) : null, v.pages);
    const fig = canvas.parentElement!.querySelector("figcaption")!;
    fig.textContent = it
      ? `${MODE_LABEL[m]} — iteration ${it.iteration}${it.final ? " (final, guest stopped)" : ""}: ${fmtInt(it.dirty)} dirty pages, ${fmtBytes(it.transferredBytes)} on the wire in ${fmtMs(it.durationMs)}`
      : MODE_LABEL[m];
  }
  const group = Math.max(1, Math.ceil(v.pages / 32768));
  $("map-caption").textContent = `${fmtInt(v.pages)} pages of 4 KiB, ${group === 1 ? "one cell per page" : `one cell per ${group} pages (majority)`}`;
}

function renderTable(v: View): void {
  const n = maxIterations(v);
  let html = `<table class="iters"><thead><tr><th rowspan="2">#</th><th colspan="6" class="pt">pagetwin</th><th colspan="4" class="bl">plain pre-copy</th></tr>`
    + `<tr><th>dirty</th><th>in full</th><th>to NAS</th><th>zero</th><th>wire</th><th>time</th><th>dirty</th><th>in full</th><th>wire</th><th>time</th></tr></thead><tbody>`;
  for (let k = 0; k < n; k++) {
    const a = v.runs.pagetwin?.iterations[k], b = v.runs.baseline?.iterations[k];
    const sel = k + 1 === selected ? ` class="sel"` : "";
    html += `<tr${sel} data-iteration="${k + 1}"><th>${k + 1}${(a?.final || b?.final) ? "<small> final</small>" : ""}</th>`;
    html += a ? `<td>${fmtInt(a.dirty)}</td><td>${fmtInt(a.pages.normal + a.pages.resent)}</td><td>${fmtInt(a.pages.twin)}</td><td>${fmtInt(a.pages.zero)}</td>`
      + cell(`pagetwin-iter-${k + 1}-bytes`, a.transferredBytes, fmtBytes(a.transferredBytes)) + `<td>${fmtMs(a.durationMs)}</td>` : `<td colspan="6"></td>`;
    html += b ? `<td>${fmtInt(b.dirty)}</td><td>${fmtInt(b.pages.normal + b.pages.resent)}</td>`
      + cell(`baseline-iter-${k + 1}-bytes`, b.transferredBytes, fmtBytes(b.transferredBytes)) + `<td>${fmtMs(b.durationMs)}</td>` : `<td colspan="4"></td>`;
    html += `</tr>`;
  }
  $("table").innerHTML = html + `</tbody></table>`;
  $("table").querySelectorAll<HTMLTableRowElement>("tr[data-iteration]").forEach((tr) => {
    tr.onclick = () => { following = false; selected = Number(tr.dataset.iteration); render(); };
  });
}

function renderLegend(): void {
  $("map-legend").innerHTML = MAP_LEGEND.map(([color, label]) => `<li><i style="background:${color}"></i>${label}</li>`).join("");
}

// ---- live mode -------------------------------------------------------------------

const workers: Partial<Record<ModeKey, { worker: Worker; api: Remote<WorkerApi> }>> = {};
function workerFor(m: ModeKey): Remote<WorkerApi> {
  let w = workers[m];
  if (!w) {
    const worker = new Worker(new URL("./worker.ts", import.meta.url), { type: "module", name: `pagetwin-${m}` });
    w = { worker, api: wrap<WorkerApi>(worker) };
    workers[m] = w;
  }
  return w.api;
}

function readConfig(): SimConfig {
  const f = $<HTMLFormElement>("live-form");
  const num = (name: string) => {
    const el = f.elements.namedItem(name) as HTMLInputElement;
    const x = Number(el.value);
    if (el.value.trim() === "" || !Number.isFinite(x)) throw new RangeError(`${el.closest("label")?.firstChild?.textContent?.trim() ?? name}: not a number`);
    return x;
  };
  const ramMiB = Math.round(num("ram"));
  if (ramMiB < 1 || ramMiB > 1024) throw new RangeError("RAM: 1 to 1024 MiB in the browser (each worker holds a copy)");
  return {
    ramMiB, twinShare: num("twin") / 100, zeroShare: num("zero") / 100,
    dirtyPagesPerSecond: num("dirty"), bandwidthMbit: num("bw"), downtimeMs: num("downtime"),
    cacheFillShare: num("fill") / 100, rewriteBlocksPerSecond: num("rewrite"), maxIterations: Math.round(num("maxiter")),
    seed: (f.elements.namedItem("seed") as HTMLInputElement).value || "pagetwin",
  };
}

let running = false;
async function runLive(): Promise<void> {
  if (running) return;
  running = true;
  stopPlay();
  showError(null);
  $<HTMLButtonElement>("run").disabled = true;
  $<HTMLButtonElement>("download").disabled = true;
  const t0 = performance.now();
  try {
    const config = readConfig();
    setStatus("running", "indexing the disk image…");
    const pages = config.ramMiB * 256;
    const live: NonNullable<typeof lastLive> = { config, runs: {} };
    lastLive = null;
    view = { kind: "live", pages, caption: "", runs: {} };
    following = true;
    const starts = await Promise.all(MODES.map((m) => workerFor(m).start(config, m)));
    MODES.forEach((m, k) => {
      view!.runs[m] = { mode: m, result: null, iterations: [], setup: starts[k]!.setup };
      live.runs[m] = { result: null, iterations: [] };
    });
    const s = starts[0]!.setup;
    view.caption = `Simulated: ${fmtInt(config.ramMiB)} MiB RAM (${fmtInt(pages)} pages: ${fmtInt(s.roles.cache)} page cache, ${fmtInt(s.roles.zero)} zero, ${fmtInt(s.roles.anon)} anonymous), `
      + `disk ${fmtInt(s.blocks)} blocks indexed (${fmtInt(s.indexEntries)} entries, ${fmtBytes(s.indexBytes)} in wasm), link ${fmtInt(config.bandwidthMbit)} Mbit/s, guest ${fmtInt(config.dirtyPagesPerSecond)} pages/s; core: ${s.flavor}.`;
    render();
    setStatus("running", "migrating…");
    const done: Record<ModeKey, boolean> = { pagetwin: false, baseline: false };
    let computeMs = 0;
    while (!done.pagetwin || !done.baseline) {
      const recs = await Promise.all(MODES.map((m) => (done[m] ? Promise.resolve(null) : workerFor(m).next())));
      MODES.forEach((m, k) => {
        const r = recs[k];
        if (!r) { done[m] = true; return; }
        computeMs += r.computeMs;
        live.runs[m]!.iterations.push(r);
        view!.runs[m]!.iterations.push({ ...r, map: r.pageMap });
        if (r.final) done[m] = true;
      });
      setStatus("running", `migrating… iteration ${maxIterations(view)}`);
      render();
      await new Promise((r) => setTimeout(r, 0));
    }
    const results = await Promise.all(MODES.map((m) => workerFor(m).result()));
    MODES.forEach((m, k) => {
      view!.runs[m]!.result = results[k]!;
      live.runs[m]!.result = results[k]!;
    });
    lastLive = live;
    $<HTMLButtonElement>("download").disabled = false;
    render();
    setStatus("done", `done in ${fmtMs(performance.now() - t0)} (core ${fmtMs(computeMs)})`);
  } catch (err) {
    showError(`The simulation failed: ${(err as Error).message}`);
    console.error(err);
  } finally {
    running = false;
    $<HTMLButtonElement>("run").disabled = false;
  }
}

function downloadTrace(): void {
  if (!lastLive) return;
  const runs = MODES.filter((m) => lastLive!.runs[m]?.result).map((m) => ({ result: lastLive!.runs[m]!.result!, iterations: lastLive!.runs[m]!.iterations }));
  const blob = new Blob([JSON.stringify(toTrace(lastLive.config, runs))], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "pagetwin-sim-trace.json";
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// ---- replay mode -----------------------------------------------------------------

/** A version 2 trace (docs/TRACE.md) is NDJSON: its first line is a start record. */
function isRecordTrace(text: string): boolean {
  const first = text.slice(0, 4096).split("\n", 1)[0]!;
  try {
    return (JSON.parse(first) as { type?: unknown }).type === "start";
  } catch {
    return false;
  }
}

let migrations: MigrationsView | null = null;
function migrationsView(): MigrationsView {
  return (migrations ??= new MigrationsView(setStatus));
}

function loadTrace(text: string, name: string): void {
  stopPlay();
  showError(null);
  if (isRecordTrace(text)) {
    setTab("migrations");
    migrationsView().load(text, name);
    return;
  }
  let t: Trace;
  try {
    t = JSON.parse(text) as Trace;
  } catch (err) {
    showError(`${name} is not JSON: ${(err as Error).message}`);
    return;
  }
  if (!t || t.format !== "pagetwin-trace" || !Array.isArray(t.runs) || !(t.pages > 0)) {
    showError(`${name} is not a pagetwin trace (want {"format":"pagetwin-trace", "pages", "runs"}).`);
    return;
  }
  if (t.version !== 1) {
    showError(`${name} is a version ${String(t.version)} trace; this page reads version 1.`);
    return;
  }
  const runs: Partial<Record<ModeKey, RunView>> = {};
  for (const r of t.runs) {
    const mode: ModeKey = r.mode === "baseline" ? "baseline" : "pagetwin";
    if (runs[mode]) continue;
    const zero: PageCounts = { normal: 0, zero: 0, twin: 0, resent: 0 };
    runs[mode] = {
      mode,
      result: r.result ? {
        totalTimeMs: r.result.totalTimeMs, downtimeMs: r.result.downtimeMs, transferredBytes: r.result.transferredBytes,
        iterations: r.result.iterations, pages: { ...zero, ...r.result.pages }, verified: r.result.verified,
        convergence: typeof r.result.convergence === "string" ? r.result.convergence : undefined,
      } : null,
      iterations: (r.iterations ?? []).map((i) => ({
        iteration: i.iteration, final: !!i.final, startMs: i.startMs, durationMs: i.durationMs, dirty: i.dirty,
        pages: { ...zero, ...i.pages }, transferredBytes: i.transferredBytes, map: i.pageMap ?? null,
      })),
    };
  }
  const c = t.config ?? {};
  const bits: string[] = [];
  if (typeof c.ramMiB === "number") bits.push(`${fmtInt(c.ramMiB)} MiB RAM`);
  bits.push(`${fmtInt(t.pages)} pages`);
  if (typeof c.bandwidthBytesPerSecond === "number") bits.push(`link ${fmtInt((c.bandwidthBytesPerSecond * 8) / 1e6)} Mbit/s`);
  if (typeof c.dirtyPagesPerSecond === "number") bits.push(`guest ${fmtInt(c.dirtyPagesPerSecond)} pages/s`);
  const m = t.machine ?? {};
  const where = m.simulated ? "simulated" : `measured${typeof m.node === "string" ? ` (Node ${m.node}, ${String(m.cpus ?? "?")} CPUs)` : ""}`;
  view = { kind: "trace", pages: t.pages, caption: `Replay of ${name}, ${where}: ${bits.join(", ")}. Times are wall-clock from the run.`, runs };
  following = false;
  selected = 1;
  $("trace-info").innerHTML = Object.entries(c).map(([k, v]) => `<dt>${k}</dt><dd>${String(v)}</dd>`).join("");
  render();
  setStatus("done", `replaying ${name}`);
  if (maxIterations(view) > 1) startPlay();
}

async function loadTraceUrl(url: string): Promise<void> {
  setStatus("running", `loading ${url}…`);
  try {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    loadTrace(await res.text(), url.split("/").pop() || url);
  } catch (err) {
    showError(`Cannot load the trace ${url}: ${(err as Error).message}`);
  }
}

async function loadTraceFile(file: File): Promise<void> {
  loadTrace(await file.text(), file.name);
}

// ---- playback ------------------------------------------------------------------

function stopPlay(): void {
  if (playing !== null) clearInterval(playing);
  playing = null;
  $("play").textContent = "▶";
}

function startPlay(): void {
  if (!view) return;
  stopPlay();
  following = false;
  selected = 1;
  render();
  $("play").textContent = "❚❚";
  playing = window.setInterval(() => {
    if (!view || selected >= maxIterations(view)) { stopPlay(); return; }
    selected++;
    render();
  }, 900);
}

// ---- wiring ----------------------------------------------------------------------

function setTab(tab: "live" | "replay" | "migrations"): void {
  $("tab-live").setAttribute("aria-selected", String(tab === "live"));
  $("tab-replay").setAttribute("aria-selected", String(tab === "replay"));
  $("tab-migrations").setAttribute("aria-selected", String(tab === "migrations"));
  $("live-form").hidden = tab !== "live";
  $("replay-form").hidden = tab !== "replay";
  $("mig-form").hidden = tab !== "migrations";
  $("view").hidden = tab === "migrations";
  $("mig-view").hidden = tab !== "migrations";
  if (tab === "migrations") migrationsView().render();
}

function init(): void {
  renderLegend();
  $("tab-live").onclick = () => setTab("live");
  $("tab-replay").onclick = () => setTab("replay");
  $("tab-migrations").onclick = () => setTab("migrations");
  $<HTMLFormElement>("live-form").onsubmit = (e) => { e.preventDefault(); void runLive(); };
  $("download").onclick = downloadTrace;
  $<HTMLFormElement>("replay-form").onsubmit = (e) => {
    e.preventDefault();
    const f = $<HTMLInputElement>("trace-file").files?.[0];
    const url = $<HTMLInputElement>("trace-url").value.trim();
    if (f) void loadTraceFile(f);
    else if (url) void loadTraceUrl(url);
  };
  $<HTMLInputElement>("trace-file").onchange = (e) => {
    const f = (e.target as HTMLInputElement).files?.[0];
    if (f) void loadTraceFile(f);
  };
  // drop a trace anywhere on the page
  window.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  window.addEventListener("dragleave", (e) => { if (e.relatedTarget === null) document.body.classList.remove("dragging"); });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    const f = e.dataTransfer?.files[0];
    if (f) { setTab("replay"); void loadTraceFile(f); }
  });
  $<HTMLInputElement>("iter").oninput = (e) => {
    stopPlay();
    following = false;
    selected = Number((e.target as HTMLInputElement).value);
    render();
  };
  $("play").onclick = () => (playing !== null ? stopPlay() : startPlay());
  window.addEventListener("resize", render);

  const q = new URLSearchParams(location.search);
  const form = $<HTMLFormElement>("live-form");
  for (const name of ["ram", "twin", "zero", "dirty", "bw", "downtime", "fill", "rewrite", "maxiter", "seed"]) {
    const v = q.get(name);
    if (v !== null) (form.elements.namedItem(name) as HTMLInputElement).value = v;
  }
  const trace = q.get("trace");
  if (q.get("live") !== null) {
    // served by `pagetwin … --ui`: its events are beside the page
    setTab("migrations");
    migrationsView().live("events");
  } else if (trace) {
    setTab("replay");
    $<HTMLInputElement>("trace-url").value = trace;
    void loadTraceUrl(trace);
  } else if (q.get("run") !== null) {
    void runLive();
  }
}

init();
