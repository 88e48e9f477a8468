// Canvas drawing for the visualizer: page maps, per-iteration bars and the
// cumulative bytes-over-time chart. Plain 2D canvas, crisp at any pixel ratio.

import { MAP_DIRTIED, ROLE, ROLE_SHIFT, type PageCounts } from "./sim.js";

export const COLORS = {
  sent: "#e4572e",
  resent: "#8e44ad",
  twin: "#0e9f87",
  zero: "#7d8ca3",
  dirty: "#f2a900",
  cleanZero: "#eef1f5",
  cleanCache: "#bfe8df",
  cleanAnon: "#f6d3c8",
  cleanUnknown: "#dfe3e8",
  pagetwin: "#0e9f87",
  baseline: "#4a5a73",
  grid: "#e3e7ec",
  axis: "#5d6b7e",
  text: "#1d2733",
};

// Cell categories, in legend order.
const CAT_COLORS = [COLORS.sent, COLORS.resent, COLORS.twin, COLORS.zero, COLORS.dirty, COLORS.cleanZero, COLORS.cleanCache, COLORS.cleanAnon, COLORS.cleanUnknown];

export const MAP_LEGEND: [string, string][] = [
  [COLORS.sent, "sent in full this round"],
  [COLORS.twin, "twin: mapped to a NAS block (24 B)"],
  [COLORS.resent, "twin whose block changed: resent"],
  [COLORS.zero, "zero marker (4 B)"],
  [COLORS.dirty, "written by the guest during the round (dirty next round)"],
  [COLORS.cleanCache, "unchanged: page cache"],
  [COLORS.cleanAnon, "unchanged: anonymous"],
  [COLORS.cleanZero, "unchanged: zero"],
  [COLORS.cleanUnknown, "unchanged (trace: role unknown)"],
];

function category(code: number): number {
  if (code & MAP_DIRTIED) return 4;
  switch (code & 7) {
    case 3: return 0;
    case 4: return 1;
    case 2: return 2;
    case 1: return 3;
  }
  switch ((code >> ROLE_SHIFT) & 3) {
    case ROLE.zero: return 5;
    case ROLE.cache: return 6;
    case ROLE.anon: return 7;
  }
  return 8;
}

function rgb(hex: string): [number, number, number] {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}
const CAT_RGB = CAT_COLORS.map(rgb);

function prepare(canvas: HTMLCanvasElement, cssHeight: number): { ctx: CanvasRenderingContext2D; w: number; h: number } {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600;
  canvas.style.height = `${cssHeight}px`;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(cssHeight * dpr);
  const ctx = canvas.getContext("2d")!;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, cssHeight);
  ctx.font = "12px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  return { ctx, w, h: cssHeight };
}

/** One cell per page, or per group of pages (the group's most common category). */
export function drawPageMap(canvas: HTMLCanvasElement, map: Uint8Array | null, pages: number): void {
  const group = Math.max(1, Math.ceil(pages / 32768));
  const cells = Math.ceil(pages / group);
  const cols = Math.max(16, Math.ceil(Math.sqrt(cells * 3.2) / 8) * 8); // about 3:1
  const rows = Math.ceil(cells / cols);
  const cssW = canvas.clientWidth || 500;
  const { ctx, w, h } = prepare(canvas, Math.max(40, Math.round((cssW / cols) * rows)));
  if (!map) {
    ctx.fillStyle = COLORS.cleanUnknown;
    ctx.fillRect(0, 0, w, h);
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "center";
    ctx.fillText("no page map", w / 2, h / 2);
    return;
  }
  const img = new ImageData(cols, rows);
  const px = img.data;
  const counts = new Uint32Array(CAT_COLORS.length);
  for (let c = 0; c < cells; c++) {
    let cat: number;
    if (group === 1) cat = category(map[c] ?? 0);
    else {
      counts.fill(0);
      const end = Math.min(pages, (c + 1) * group);
      for (let p = c * group; p < end; p++) counts[category(map[p] ?? 0)]!++;
      cat = 0;
      for (let k = 1; k < counts.length; k++) if (counts[k]! > counts[cat]!) cat = k;
    }
    const [r, g, b] = CAT_RGB[cat]!;
    px[c * 4] = r; px[c * 4 + 1] = g; px[c * 4 + 2] = b; px[c * 4 + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = cols;
  off.height = rows;
  off.getContext("2d")!.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, w, h);
}

export interface ChartIteration {
  iteration: number;
  final: boolean;
  startMs: number;
  durationMs: number;
  pages: PageCounts;
  transferredBytes: number;
}

export interface ChartRun {
  label: string;
  color: string;
  iterations: ChartIteration[];
  done: boolean;
}

const MiB = 1024 * 1024;

function niceStep(max: number, ticks: number): number {
  const raw = max / ticks;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const m = raw / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

function fmtAxis(v: number): string {
  return v >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(v >= 10 ? 0 : 1);
}

function fmtWire(bytes: number): string {
  return bytes >= 100 * MiB ? `${(bytes / MiB).toFixed(0)} MiB` : bytes >= MiB ? `${(bytes / MiB).toFixed(1)} MiB` : `${(bytes / 1024).toFixed(0)} KiB`;
}

/** Stacked bars per iteration (RAM moved: in full / mapped to NAS / zero), one bar per run, square-root scale. */
export function drawBars(canvas: HTMLCanvasElement, runs: ChartRun[], selected: number): void {
  const { ctx, w, h } = prepare(canvas, 280);
  const L = 54, R = 10, T = 66, B = 34;
  const pw = w - L - R, ph = h - T - B;
  const n = Math.max(1, ...runs.map((r) => r.iterations.length));
  const seg = (i: ChartIteration) => [(i.pages.normal + i.pages.resent) * 4096, i.pages.twin * 4096, i.pages.zero * 4096];
  let max = 0;
  for (const r of runs) for (const i of r.iterations) max = Math.max(max, seg(i).reduce((a, b) => a + b, 0));
  const maxMiB = Math.max(1, max / MiB);
  const y = (mib: number) => T + ph - Math.sqrt(Math.max(0, mib) / maxMiB) * ph;
  // grid: square-root scale, ticks at nice values
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.axis;
  ctx.textAlign = "right";
  const ticks = [0, ...[0.02, 0.1, 0.3, 0.6, 1].map((f) => {
    const v = maxMiB * f, p = Math.pow(10, Math.floor(Math.log10(v)));
    return Math.floor(v / p) * p;
  })];
  for (const t of [...new Set(ticks)].filter((t) => t <= maxMiB)) {
    ctx.beginPath(); ctx.moveTo(L, y(t) + 0.5); ctx.lineTo(L + pw, y(t) + 0.5); ctx.stroke();
    ctx.fillText(fmtAxis(t), L - 6, y(t));
  }
  ctx.save();
  ctx.translate(12, T + ph / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
  ctx.fillText("MiB of RAM (√ scale)", 0, 0);
  ctx.restore();
  const gw = pw / n;
  const bw = Math.min(26, (gw * 0.8) / Math.max(1, runs.length));
  const colors = [COLORS.sent, COLORS.twin, COLORS.zero];
  for (let k = 0; k < n; k++) {
    const gx = L + k * gw;
    if (k + 1 === selected) { ctx.fillStyle = "rgba(242,169,0,0.12)"; ctx.fillRect(gx, T, gw, ph); }
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "center";
    if (n <= 16 || (k + 1) % Math.ceil(n / 16) === 0 || k === 0) ctx.fillText(String(k + 1), gx + gw / 2, h - B + 12);
    const groupTop = Math.min(...runs.map((r) => { const it = r.iterations[k]; return it ? y(seg(it).reduce((a, b) => a + b, 0) / MiB) : y(0); }));
    runs.forEach((r, j) => {
      const it = r.iterations[k];
      if (!it) return;
      const x = gx + gw / 2 - (runs.length * bw) / 2 + j * bw + 1;
      let acc = 0;
      seg(it).forEach((bytes, s) => {
        if (bytes <= 0) return;
        const y0 = y(acc / MiB), y1 = y((acc + bytes) / MiB);
        ctx.fillStyle = colors[s]!;
        ctx.fillRect(x, y1, bw - 2, Math.max(1, y0 - y1));
        acc += bytes;
      });
      ctx.strokeStyle = r.color;
      ctx.lineWidth = 1.5;
      ctx.strokeRect(x + 0.5, y(acc / MiB) + 0.5, bw - 3, Math.max(1, y(0) - y(acc / MiB) - 1));
      ctx.lineWidth = 1;
      if (gw >= 70) {
        ctx.fillStyle = COLORS.text;
        ctx.font = "10px system-ui, sans-serif";
        ctx.fillText(fmtWire(it.transferredBytes), x + bw / 2 - 1, groupTop - 8 - (runs.length - 1 - j) * 12);
        ctx.font = "12px system-ui, sans-serif";
      }
      if (gw >= 40) {
        ctx.fillStyle = r.color;
        ctx.font = "10px system-ui, sans-serif";
        ctx.fillText(j === 0 ? "pt" : "pre", x + bw / 2 - 1, h - B + 24);
        ctx.font = "12px system-ui, sans-serif";
      }
    });
  }
  ctx.fillStyle = COLORS.axis;
  ctx.textAlign = "left";
  ctx.fillText("iteration", 4, h - B + 12);
  // legend
  const items: [string, string][] = [[COLORS.sent, "in full"], [COLORS.twin, "mapped to NAS"], [COLORS.zero, "zero"]];
  let lx = L;
  for (const [c, label] of items) {
    ctx.fillStyle = c; ctx.fillRect(lx, 8, 12, 12);
    ctx.fillStyle = COLORS.text; ctx.textAlign = "left"; ctx.fillText(label, lx + 16, 14);
    lx += ctx.measureText(label).width + 32;
  }
  lx = L;
  runs.forEach((r, j) => {
    const label = `${j === 0 ? "pt" : "pre"}: ${r.label}`;
    ctx.strokeStyle = r.color; ctx.lineWidth = 2; ctx.strokeRect(lx, 27, 12, 12); ctx.lineWidth = 1;
    ctx.fillStyle = COLORS.text; ctx.fillText(label, lx + 16, 33);
    lx += ctx.measureText(label).width + 32;
  });
  if (gw >= 70) { ctx.fillStyle = COLORS.axis; ctx.fillText("numbers: bytes on the wire", lx, 33); }
}

/**
 * Cumulative bytes on the wire over time, one solid line per run (the final,
 * stopped round drawn thick), and dashed: guest RAM delivered to the
 * destination (pages sent, mapped to NAS blocks or zero-marked, 4 KiB each).
 */
export function drawCumulative(canvas: HTMLCanvasElement, runs: ChartRun[]): void {
  const { ctx, w, h } = prepare(canvas, 260);
  const L = 54, R = 16, T = 28, B = 34;
  const pw = w - L - R, ph = h - T - B;
  const ram = (i: ChartIteration) => (i.pages.normal + i.pages.twin + i.pages.zero) * 4096;
  let maxT = 1, maxB = 1;
  for (const r of runs) {
    let cum = 0, cumRam = 0;
    for (const i of r.iterations) { cum += i.transferredBytes; cumRam += ram(i); maxT = Math.max(maxT, i.startMs + i.durationMs); }
    maxB = Math.max(maxB, cum, cumRam);
  }
  const maxS = maxT / 1000, maxM = (maxB / MiB) * 1.45; // headroom for the legend
  const sx = niceStep(maxS, 6), sy = niceStep(maxM, 5);
  const X = (ms: number) => L + (ms / 1000 / (Math.ceil(maxS / sx) * sx)) * pw;
  const Y = (b: number) => T + ph - (b / MiB / (Math.ceil(maxM / sy) * sy)) * ph;
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.axis;
  for (let v = 0; v <= Math.ceil(maxM / sy) * sy + 1e-9; v += sy) {
    const yy = Y(v * MiB);
    ctx.beginPath(); ctx.moveTo(L, yy + 0.5); ctx.lineTo(L + pw, yy + 0.5); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(fmtAxis(v), L - 6, yy);
  }
  for (let v = 0; v <= Math.ceil(maxS / sx) * sx + 1e-9; v += sx) {
    const xx = X(v * 1000);
    ctx.beginPath(); ctx.moveTo(xx + 0.5, T); ctx.lineTo(xx + 0.5, T + ph); ctx.stroke();
    ctx.textAlign = "center"; ctx.fillText(fmtAxis(v), xx, T + ph + 12);
  }
  ctx.textAlign = "left";
  ctx.fillText("time, s", 4, T + ph + 12);
  ctx.save();
  ctx.translate(12, T + ph / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
  ctx.fillText("MiB", 0, 0);
  ctx.restore();
  const labels: { y: number; text: string; color: string; x: number }[] = [];
  // pagetwin (first) drawn last, on top
  for (const r of [...runs].reverse()) {
    // RAM delivered, dashed
    let cumRam = 0;
    ctx.strokeStyle = r.color;
    ctx.lineWidth = 1.5;
    ctx.setLineDash([5, 4]);
    ctx.beginPath();
    ctx.moveTo(X(0), Y(0));
    for (const i of r.iterations) {
      ctx.lineTo(X(i.startMs), Y(cumRam));
      cumRam += ram(i);
      ctx.lineTo(X(i.startMs + i.durationMs), Y(cumRam));
    }
    ctx.stroke();
    ctx.setLineDash([]);
    // bytes on the wire, solid; the final round thick
    let cum = 0;
    ctx.lineWidth = 2.5;
    ctx.beginPath();
    ctx.moveTo(X(0), Y(0));
    for (const i of r.iterations) {
      ctx.lineTo(X(i.startMs), Y(cum));
      if (i.final) {
        ctx.stroke();
        ctx.lineWidth = 6;
        ctx.beginPath();
        ctx.moveTo(X(i.startMs), Y(cum));
        ctx.lineTo(X(i.startMs + i.durationMs), Y(cum + i.transferredBytes));
        ctx.stroke();
        ctx.setLineDash([2, 3]); ctx.lineWidth = 1;
        ctx.beginPath(); ctx.moveTo(X(i.startMs) + 0.5, T); ctx.lineTo(X(i.startMs) + 0.5, T + ph); ctx.stroke();
        ctx.setLineDash([]); ctx.lineWidth = 2.5;
        ctx.beginPath();
        ctx.moveTo(X(i.startMs + i.durationMs), Y(cum + i.transferredBytes));
      } else {
        ctx.lineTo(X(i.startMs + i.durationMs), Y(cum + i.transferredBytes));
      }
      cum += i.transferredBytes;
    }
    ctx.stroke();
    const last = r.iterations[r.iterations.length - 1];
    if (last) {
      const end = last.startMs + last.durationMs;
      labels.push({ x: X(end), y: Y(cum), color: r.color, text: `${r.label}: ${fmtWire(cum)} in ${(end / 1000).toFixed(2)} s${r.done ? "" : " …"}` });
    }
  }
  ctx.lineWidth = 1;
  // legend in the plot's top left (the lines rise from the bottom left, so it is free)
  let ly = T + 10;
  ctx.textAlign = "left";
  ctx.font = "bold 12px system-ui, sans-serif";
  for (const l of [...labels].reverse()) {
    ctx.fillStyle = l.color;
    ctx.fillRect(L + 8, ly - 1.5, 16, 3);
    ctx.fillText(l.text, L + 30, ly);
    ly += 16;
  }
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = COLORS.axis;
  ctx.fillText("solid: bytes on the wire; thick: final round, guest stopped", L + 8, ly);
  ctx.fillText("dashed: guest RAM delivered (sent, mapped to NAS, zero)", L + 8, ly + 14);
  ctx.font = "12px system-ui, sans-serif";
}

// ---- cell maps of traces (any guest size) -------------------------------------------

/** Classes of a trace's map (PAGE_CLASS order), and their colors: clean, zero, twin, sent, resent. */
export const CELL_COLORS = [COLORS.cleanUnknown, COLORS.zero, COLORS.twin, COLORS.sent, COLORS.resent];
const CELL_RGB = CELL_COLORS.map(rgb);

export const CELL_LEGEND: [string, string][] = [
  [COLORS.sent, "sent in full"],
  [COLORS.twin, "sent as a NAS reference"],
  [COLORS.resent, "resent in full (block changed)"],
  [COLORS.zero, "zero"],
  [COLORS.cleanUnknown, "not sent this round"],
];

export interface CellGrid {
  cols: number;
  rows: number;
  /** Pages per cell. */
  cellPages: number;
}

/** Where cells go on a canvas of this many cells: about 3:1. */
export function cellGrid(cells: number, cellPages: number): CellGrid {
  const cols = Math.max(16, Math.ceil(Math.sqrt(cells * 3.2) / 8) * 8);
  return { cols, rows: Math.max(1, Math.ceil(cells / cols)), cellPages };
}

/**
 * A round's map from per-cell class counts (counts[cell * 5 + class], class 0
 * unused: clean is what the others leave of the cell). Each cell takes the
 * color of the class with most pages in it; O(cells), whatever the guest size.
 */
export function drawCellMap(canvas: HTMLCanvasElement, counts: Uint32Array | null, pages: number, grid: CellGrid): void {
  const cssW = canvas.clientWidth || 600;
  const { ctx, w, h } = prepare(canvas, Math.max(40, Math.min(520, Math.round((cssW / grid.cols) * grid.rows))));
  const img = new ImageData(grid.cols, grid.rows);
  const px = img.data;
  const cells = Math.ceil(pages / grid.cellPages);
  for (let c = 0; c < cells; c++) {
    let best = 0, bestN = Math.min(grid.cellPages, pages - c * grid.cellPages);
    if (counts) {
      let used = 0;
      for (let k = 1; k < 5; k++) used += counts[c * 5 + k]!;
      bestN -= used;
      for (let k = 1; k < 5; k++) if (counts[c * 5 + k]! > bestN) { best = k; bestN = counts[c * 5 + k]!; }
    }
    const [r, g, b] = CELL_RGB[best]!;
    px[c * 4] = r; px[c * 4 + 1] = g; px[c * 4 + 2] = b; px[c * 4 + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = grid.cols;
  off.height = grid.rows;
  off.getContext("2d")!.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, w, h);
}
