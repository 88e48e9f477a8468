// The trace format (docs/TRACE.md), version 2: one JSON record per line
// (NDJSON), the same records in a trace file and in the live view's events.
// No Node APIs here: the visualizer imports this file too.

export const TRACE_FORMAT = "pagetwin-trace";
export const TRACE_VERSION = 2;
export const PAGE_BYTES = 4096;

/** What a round did to a page (the map's classes). */
export const PAGE_CLASS = { clean: 0, zero: 1, twin: 2, sent: 3, resent: 4 } as const;
export const CLASS_COUNT = 5;

export type TraceMode = "agent" | "stream" | "embedded";

export interface TracePages {
  /** Sent in full (QEMU: ram.normal). */
  normal: number;
  /** Sent as a NAS block reference. */
  twin: number;
  /** Zero markers (QEMU: ram.duplicate). */
  zero: number;
  /** Twins sent again in full: their block no longer matched at the destination. */
  resent: number;
}

export interface StartRecord {
  type: "start";
  format: typeof TRACE_FORMAT;
  version: typeof TRACE_VERSION;
  id: string;
  mode: TraceMode;
  /** "pagetwin", or "baseline" for a run without dedup (plain pre-copy). */
  method: "pagetwin" | "baseline";
  label: string;
  /** Guest pages (0 until a layout record says, in stream mode). */
  pages: number;
  /** Wall clock at the start, ms since 1970. */
  startedAt: number;
  /** How baselineBytes were found: QEMU's own stream bytes, or estimated from the page counts. */
  baseline: "measured" | "estimated";
  config?: Record<string, unknown>;
}

/** Stream mode: the guest's RAM blocks, in QEMU's order, as pages numbered from 0. */
export interface LayoutRecord {
  type: "layout";
  id: string;
  pages: number;
  blocks: { name: string; first: number; pages: number }[];
}

/** Classes of pages first .. first+count-1 in a round, run-length coded (encodeRuns). */
export interface PagesRecord {
  type: "pages";
  id: string;
  iteration: number;
  first: number;
  count: number;
  runs: string;
}

/** Pages resent in full during a round (a twin whose block changed). */
export interface ResendRecord {
  type: "resend";
  id: string;
  iteration: number;
  pages: number[];
}

/** Cumulative counters while a round runs. */
export interface ProgressRecord {
  type: "progress";
  id: string;
  iteration: number;
  /** ms since the start. */
  tMs: number;
  transferredBytes: number;
  baselineBytes: number;
}

export interface RoundRecord {
  type: "round";
  id: string;
  iteration: number;
  /** The round with the guest stopped. */
  final: boolean;
  startMs: number;
  durationMs: number;
  pages: TracePages;
  /** Bytes on pagetwin's link during the round. */
  transferredBytes: number;
  /** Bytes QEMU alone would have sent for the round (see StartRecord.baseline). */
  baselineBytes: number;
  dirty?: number;
}

/** The guest stops: the final round begins. */
export interface SwitchoverRecord {
  type: "switchover";
  id: string;
  iteration: number;
  tMs: number;
  /** Why: the convergence decision (agent mode) or "QEMU" (stream mode: QEMU decided). */
  reason: string;
  expectedDowntimeMs?: number;
  /** ms since the start of the guest's STOP event, when a QMP socket showed it. */
  stopMs?: number;
}

export interface EndRecord {
  type: "end";
  id: string;
  ok: boolean;
  error?: string;
  totalTimeMs: number;
  downtimeMs: number | null;
  iterations: number;
  pages: TracePages;
  transferredBytes: number;
  baselineBytes: number;
  verified?: boolean;
  convergence?: string;
  /** The mode's own result (stream mode: the proxy's stats). */
  stats?: Record<string, unknown>;
  /** QEMU's query-migrate at the end, where a QMP socket was given. */
  qemu?: Record<string, unknown>;
}

export type TraceRecord = StartRecord | LayoutRecord | PagesRecord | ResendRecord | ProgressRecord | RoundRecord | SwitchoverRecord | EndRecord;

export const emptyPages = (): TracePages => ({ normal: 0, twin: 0, zero: 0, resent: 0 });

/** What QEMU would send for these pages: every page in full with its 8-byte header, zero pages as 9-byte records. */
export function qemuBytesEstimate(p: { normal: number; twin: number; zero: number }): number {
  return (p.normal + p.twin) * (PAGE_BYTES + 8) + p.zero * 9;
}

// ---- run-length coding of a page map -------------------------------------------------
// A map (one class a page) as varints of (run length << 3 | class), base64.

export function encodeRuns(map: Uint8Array, from = 0, to = map.length): string {
  const out: number[] = [];
  let i = from;
  while (i < to) {
    const c = map[i]! & 7;
    let j = i + 1;
    while (j < to && (map[j]! & 7) === c) j++;
    let v = (j - i) * 8 + c;
    while (v >= 0x80) { out.push((v % 0x80) | 0x80); v = Math.floor(v / 0x80); }
    out.push(v);
    i = j;
  }
  return bytesToBase64(Uint8Array.from(out));
}

/** Calls f(start, length, class) for each run of an encoded map starting at page `first`. */
export function forEachRun(runs: string, first: number, f: (start: number, length: number, cls: number) => void): number {
  const b = base64ToBytes(runs);
  let p = first;
  for (let i = 0; i < b.length;) {
    let v = 0, mult = 1, x: number;
    do { x = b[i++]!; v += (x & 0x7f) * mult; mult *= 0x80; } while (x & 0x80 && i < b.length);
    const len = Math.floor(v / 8);
    f(p, len, v % 8);
    p += len;
  }
  return p - first;
}

export function bytesToBase64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function base64ToBytes(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}
