// --json output of every command (docs/JSON.md): NDJSON on stdout, each line
// one object with the same envelope ({schema, event, command, ...}), numbers
// rounded by one rule here so no command prints 102.135896 ms or a null.

/** Bumped when a field changes meaning or is removed (adding fields does not bump it). */
export const JSON_SCHEMA = 1;

export type JsonEvent = "progress" | "result" | "listening";

/** Byte counts (integers), by key: `bytes`, `…Bytes`, `…-bytes`, `transferred`, `total`. */
const BYTES_KEY = /(^bytes|Bytes|-bytes|^transferred|^total)$/;
/** Shares and ratios keep 4 decimals; every other fraction is rounded to 0.1 (ms, MB/s, Mbit/s). */
const FRACTION_KEY = /(share|Share|ratio|Ratio|ratios)$/;

/**
 * A copy of `v` fit for JSON: byte counts integers, shares and ratios (and
 * everything inside an object named so, e.g. `ratios`) to 4 decimals, other
 * fractions to 0.1; undefined, NaN and ±Infinity are left out (never null).
 */
export function roundForJson(v: unknown, key = "", inRatio = false): unknown {
  const ratio = inRatio || FRACTION_KEY.test(key);
  if (typeof v === "number") {
    if (!Number.isFinite(v)) return undefined;
    if (Number.isInteger(v)) return v;
    if (ratio) return Math.round(v * 1e4) / 1e4;
    if (BYTES_KEY.test(key)) return Math.round(v);
    return Math.round(v * 10) / 10;
  }
  if (typeof v === "bigint") return v.toString();
  if (Array.isArray(v)) return v.map((x) => roundForJson(x, key, ratio)).filter((x) => x !== undefined);
  if (v && typeof v === "object") {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) {
      const r = roundForJson(x, k, ratio);
      if (r !== undefined) out[k] = r;
    }
    return out;
  }
  return v;
}

/** One line of a command's --json output: the envelope, then the record's fields, rounded. */
export function jsonLine(command: string, event: JsonEvent, record: object): string {
  return JSON.stringify(roundForJson({ schema: JSON_SCHEMA, event, command, ...record })) + "\n";
}

/** What --json prints for a failure: the message and a stable code (PAGETWIN_*), plus whatever record there is. */
export function failureRecord(err: unknown, record: object = {}): object {
  return { ok: false, ...record, error: errorText(err), errorCode: errorCode(err) };
}

/** The error's stable code: its own (every PagetwinError has one, PAGETWIN_* or ABORT_ERR), else PAGETWIN_FAILED. */
export function errorCode(err: unknown): string {
  const c = (err as { code?: unknown } | null)?.code;
  if (typeof c === "string" && (c.startsWith("PAGETWIN_") || c === "ABORT_ERR")) return c;
  return "PAGETWIN_FAILED";
}

/** An error's message for people, once prefixed: "pagetwin: " nested by wrapping errors is dropped. */
export function errorText(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  const inner = msg.replace(/(^|: )pagetwin: /g, "$1");
  return /^pagetwin\b/.test(inner) ? inner : `pagetwin: ${inner}`;
}

/** Writes one --json line to stdout. */
export function printJson(command: string, event: JsonEvent, record: object): void {
  process.stdout.write(jsonLine(command, event, record));
}
