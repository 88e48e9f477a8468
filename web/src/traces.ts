// The migrations view: traces of real migrations (docs/TRACE.md), from a
// file or live from a `--ui` server's events. Lists the migrations, shows
// one: its page map round by round (cells of pages, however big the guest),
// bytes per round and cumulative bytes against QEMU alone, downtime.
// Numbers a test reads carry a data-testid and their exact value in data-value.

import { TraceModel, type MigrationModel, type RoundView } from "../../src/trace/model.js";
import { CLASS_COUNT, emptyPages, type TracePages, type TraceRecord } from "../../src/trace/format.js";
import { CELL_LEGEND, COLORS, cellGrid, drawBars, drawCellMap, drawCumulative, type ChartIteration, type ChartRun } from "./draw.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const MiB = 1024 * 1024;
const fmtInt = (n: number) => Math.round(n).toLocaleString("en-US");
function fmtBytes(n: number): string {
  if (n >= 1024 * MiB) return `${(n / 1024 / MiB).toFixed(2)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(1)} MiB`;
  return n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${Math.round(n)} B`;
}
const fmtMs = (ms: number) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`);
const esc = (s: string) => s.replace(/[&<>"]/g, (c) => `&${({ "&": "amp", "<": "lt", ">": "gt", '"': "quot" } as Record<string, string>)[c]};`);

function stateOf(m: MigrationModel): "running" | "done" | "failed" {
  return m.end ? (m.end.ok ? "done" : "failed") : "running";
}

function sumPages(rounds: readonly RoundView[]): TracePages {
  const s = emptyPages();
  for (const r of rounds) { s.normal += r.pages.normal; s.twin += r.pages.twin; s.zero += r.pages.zero; s.resent += r.pages.resent; }
  return s;
}

export class MigrationsView {
  private model = new TraceModel();
  private selected: string | null = null;
  private round = 0;
  private followRound = true;
  private queued = false;
  private events: EventSource | null = null;

  constructor(private readonly onStatus: (state: "running" | "done" | "error", text: string) => void) {
    $("mig-legend").innerHTML = CELL_LEGEND.map(([c, l]) => `<li><i style="background:${c}"></i>${l}</li>`).join("");
    $<HTMLInputElement>("mig-round").oninput = (e) => {
      this.followRound = false;
      this.round = Number((e.target as HTMLInputElement).value);
      this.render();
    };
    $("mig-map").addEventListener("mousemove", (e) => this.describeCell(e));
    window.addEventListener("resize", () => this.render());
  }

  /** A trace file's text (NDJSON of version 2). */
  load(text: string, name: string): void {
    this.stopLive();
    const t0 = performance.now();
    try {
      this.model = TraceModel.parse(text);
    } catch (err) {
      this.fail(`${name}: ${(err as Error).message}`);
      return;
    }
    $("mig-view").dataset.loadMs = String(performance.now() - t0);
    $("mig-source").textContent = `replay of ${name}`;
    this.selected = this.pickDefault();
    this.followRound = false;
    this.round = 1;
    this.render();
    this.onStatus("done", `replaying ${name}`);
  }

  /** The events of a live view (`pagetwin … --ui`): records as they happen. */
  live(url: string): void {
    this.stopLive();
    this.model = new TraceModel();
    $("mig-source").textContent = "live: waiting for a migration…";
    const es = new EventSource(url);
    this.events = es;
    es.onopen = () => { $("mig-source").textContent = "live"; this.onStatus("running", "live: connected"); };
    es.onmessage = (e) => {
      try {
        this.model.apply(JSON.parse(e.data as string) as TraceRecord);
      } catch (err) {
        this.fail(`a live record: ${(err as Error).message}`);
        return;
      }
      if (this.selected === null || !this.model.migrations.has(this.selected) || this.isIdle(this.selected)) this.selected = this.pickDefault();
      this.render();
    };
    es.onerror = () => {
      es.close();
      $("mig-source").textContent = "live view closed (the command ended): what it sent is kept";
      this.onStatus("done", "live view closed");
    };
  }

  private stopLive(): void {
    this.events?.close();
    this.events = null;
  }

  /** A finished migration is left for a running one that started since. */
  private isIdle(id: string): boolean {
    const m = this.model.migrations.get(id)!;
    return m.end !== null && [...this.model.migrations.values()].some((x) => x.end === null);
  }

  /** The newest running migration, else the first pagetwin one, else the first. */
  private pickDefault(): string | null {
    const all = [...this.model.migrations.values()];
    const pick = [...all].reverse().find((m) => m.end === null) ?? all.find((m) => m.start.method === "pagetwin") ?? all[0];
    return pick?.start.id ?? null;
  }

  private fail(msg: string): void {
    const e = $("mig-error");
    e.hidden = false;
    e.textContent = msg;
    this.onStatus("error", "error");
  }

  render(): void {
    if (this.queued) return;
    this.queued = true;
    requestAnimationFrame(() => {
      this.queued = false;
      const t0 = performance.now();
      this.renderNow();
      $("mig-view").dataset.renderMs = String(performance.now() - t0);
    });
  }

  private current(): MigrationModel | null {
    return this.selected ? this.model.migrations.get(this.selected) ?? null : null;
  }

  private renderNow(): void {
    this.renderList();
    const m = this.current();
    if (!m) return;
    const n = m.rounds.length;
    if (this.followRound || this.round < 1) this.round = n;
    this.round = Math.min(Math.max(1, this.round), Math.max(1, n));
    const slider = $<HTMLInputElement>("mig-round");
    slider.max = String(Math.max(1, n));
    slider.value = String(this.round);
    $("mig-round-out").textContent = n ? `${this.round} of ${n}` : "–";
    this.renderSummary(m);
    this.renderMap(m);
    const runs = this.chartRuns(m);
    drawBars($<HTMLCanvasElement>("mig-bars"), runs.slice(0, 1), this.round);
    drawCumulative($<HTMLCanvasElement>("mig-cumulative"), runs);
    this.renderTable(m);
    $("mig-view").dataset.state = stateOf(m);
  }

  private renderList(): void {
    const list = $("mig-list");
    list.innerHTML = [...this.model.migrations.values()].map((m) => {
      const t = m.totals();
      return `<li data-testid="migration-item" data-id="${esc(m.start.id)}" data-state="${stateOf(m)}" aria-selected="${m.start.id === this.selected}">`
        + `<b>${esc(m.start.label)}</b>${esc(m.start.mode)} mode, ${m.start.method}; ${fmtBytes(t.transferredBytes)} in ${fmtMs(t.tMs)}</li>`;
    }).join("");
    list.querySelectorAll<HTMLLIElement>("li").forEach((li) => {
      li.onclick = () => { this.selected = li.dataset.id!; this.followRound = stateOf(this.current()!) === "running"; this.render(); };
    });
  }

  private renderSummary(m: MigrationModel): void {
    const t = m.totals();
    const e = m.end;
    const pages = e ? e.pages : sumPages(m.rounds);
    const iterations = e ? e.iterations : m.rounds.length;
    const row = (label: string, id: string, value: number | string | boolean | null | undefined, text: string) =>
      `<tr><th>${label}</th><td data-testid="mig-${id}"${value === null || value === undefined ? "" : ` data-value="${esc(String(value))}"`}>${text}</td></tr>`;
    const live = e ? "" : " …";
    const saving = t.baselineBytes > 0 ? 1 - t.transferredBytes / t.baselineBytes : null;
    const stopped = m.switchover ? m.switchover.stopMs ?? m.switchover.tMs : null;
    let html = `<table class="cmp"><tbody>`;
    html += row("Migration", "state", stateOf(m), `${esc(m.start.label)} — ${stateOf(m)}${e?.error ? `: ${esc(e.error)}` : ""}`);
    html += row("Bytes on the wire", "transferred", t.transferredBytes, fmtBytes(t.transferredBytes) + live);
    html += row(`QEMU alone (${m.start.baseline})`, "baseline", t.baselineBytes, fmtBytes(t.baselineBytes) + live);
    html += row("Saved", "saving", saving, saving === null ? "–" : `${(saving * 100).toFixed(1)} %`);
    html += row("Time", "total-time", t.tMs, fmtMs(t.tMs) + live);
    html += row("Guest stopped at", "stopped-at", stopped, stopped === null ? (e ? "–" : "not yet") : fmtMs(stopped));
    html += row("Downtime", "downtime", e?.downtimeMs, e?.downtimeMs != null ? fmtMs(e.downtimeMs) : m.switchover ? "guest stopped…" : "–");
    html += row("Rounds (incl. final)", "iterations", iterations, fmtInt(iterations));
    html += row("Pages sent in full", "pages-normal", pages.normal, fmtInt(pages.normal));
    html += row("Pages as NAS references", "pages-twin", pages.twin, fmtInt(pages.twin));
    html += row("Zero pages", "pages-zero", pages.zero, fmtInt(pages.zero));
    html += row("Resent (block changed)", "pages-resent", pages.resent, fmtInt(pages.resent));
    html += row("Verified", "verified", e?.verified, e?.verified === undefined ? "–" : e.verified ? "✔ destination = source" : "✘ not verified");
    html += `</tbody></table>`;
    const guest = m.pages ? `${fmtInt(m.pages)} pages (${fmtBytes(m.pages * 4096)})` : "size not known yet";
    html += `<p class="caption">${esc(m.start.mode)} mode, ${m.start.method}; guest ${guest}; started ${new Date(m.start.startedAt).toLocaleString()}.</p>`;
    $("mig-summary").innerHTML = html;
  }

  private renderMap(m: MigrationModel): void {
    const r = m.rounds[this.round - 1] ?? null;
    const grid = cellGrid(m.cellCount, m.cellPages);
    drawCellMap($<HTMLCanvasElement>("mig-map"), r ? r.cells : null, m.pages, grid);
    const cap = $("mig-map-caption");
    cap.dataset.value = String(m.cellPages);
    cap.textContent = m.pages ? `${fmtInt(m.pages)} pages; ${m.cellPages === 1 ? "one cell per page" : `one cell = ${fmtInt(m.cellPages)} pages (${fmtBytes(m.cellPages * 4096)}), colored by the class most of its pages have`}` : "";
    $("mig-map-title").textContent = r
      ? `round ${r.iteration}${r.final ? " (final, guest stopped)" : ""}${r.done ? "" : " — running"}: ${fmtInt(r.pages.normal)} in full, ${fmtInt(r.pages.twin)} as references, ${fmtInt(r.pages.zero)} zero, ${fmtInt(r.pages.resent)} resent; ${fmtBytes(r.transferredBytes)} on the wire`
      : "no round yet";
  }

  private describeCell(e: MouseEvent): void {
    const m = this.current();
    const r = m?.rounds[this.round - 1];
    if (!m || !r || !m.pages) return;
    const canvas = e.currentTarget as HTMLCanvasElement;
    const box = canvas.getBoundingClientRect();
    const grid = cellGrid(m.cellCount, m.cellPages);
    const col = Math.floor(((e.clientX - box.left) / box.width) * grid.cols);
    const row = Math.floor(((e.clientY - box.top) / box.height) * grid.rows);
    const cell = row * grid.cols + col;
    if (col < 0 || col >= grid.cols || cell >= m.cellCount) return;
    const first = cell * m.cellPages, n = Math.min(m.cellPages, m.pages - first);
    const c = (k: number) => r.cells[cell * CLASS_COUNT + k] ?? 0;
    const rest = n - c(1) - c(2) - c(3) - c(4);
    $("mig-cell").textContent = `cell ${fmtInt(cell)}: pages ${fmtInt(first)}–${fmtInt(first + n - 1)} (${fmtInt(n)} pages): ${fmtInt(c(3))} in full, ${fmtInt(c(2))} as references, ${fmtInt(c(4))} resent, ${fmtInt(c(1))} zero, ${fmtInt(rest)} not sent`;
  }

  /** The migration's rounds, and the same rounds as QEMU alone would have sent them; a running round up to its last progress. */
  private chartRuns(m: MigrationModel): ChartRun[] {
    const tx: ChartIteration[] = [], bl: ChartIteration[] = [];
    let doneTx = 0, doneBl = 0;
    for (const r of m.rounds) {
      let bytes = r.transferredBytes, base = r.baselineBytes, dur = r.durationMs;
      if (!r.done) {
        const p = m.progress;
        if (!p || p.iteration !== r.iteration) continue;
        bytes = p.transferredBytes - doneTx; base = p.baselineBytes - doneBl; dur = p.tMs - r.startMs;
      }
      const it = { iteration: r.iteration, final: r.final, startMs: r.startMs, durationMs: Math.max(0, dur), pages: r.pages };
      tx.push({ ...it, transferredBytes: bytes });
      bl.push({ ...it, transferredBytes: base });
      doneTx += bytes; doneBl += base;
    }
    const done = m.end !== null;
    return [
      { label: "pagetwin", color: COLORS.pagetwin, iterations: tx, done },
      { label: `QEMU alone (${m.start.baseline})`, color: COLORS.baseline, iterations: bl, done },
    ];
  }

  private renderTable(m: MigrationModel): void {
    let html = `<table class="iters"><thead><tr><th>#</th><th>start</th><th>time</th><th>in full</th><th>to NAS</th><th>zero</th><th>resent</th><th>wire</th><th>QEMU alone</th></tr></thead><tbody>`;
    for (const r of m.rounds) {
      html += `<tr data-round="${r.iteration}"${r.iteration === this.round ? ` class="sel"` : ""}><th>${r.iteration}${r.final ? "<small> final</small>" : ""}</th>`
        + `<td>${fmtMs(r.startMs)}</td><td>${r.done ? fmtMs(r.durationMs) : "…"}</td><td>${fmtInt(r.pages.normal)}</td><td>${fmtInt(r.pages.twin)}</td><td>${fmtInt(r.pages.zero)}</td><td>${fmtInt(r.pages.resent)}</td>`
        + `<td data-testid="mig-round-${r.iteration}-bytes"${r.done ? ` data-value="${r.transferredBytes}"` : ""}>${fmtBytes(r.transferredBytes)}</td><td>${fmtBytes(r.baselineBytes)}</td></tr>`;
    }
    $("mig-table").innerHTML = html + `</tbody></table>`;
    $("mig-table").querySelectorAll<HTMLTableRowElement>("tr[data-round]").forEach((tr) => {
      tr.onclick = () => { this.followRound = false; this.round = Number(tr.dataset.round); this.render(); };
    });
  }
}
