// The one logger type of the library API (agent mode, stream mode, the
// pool): level-aware, with structured fields. `console` is one; so is
// pino's logger through a two-line adapter. A plain `(msg) => void` is
// accepted too and gets every level.

export type LogLevel = "debug" | "info" | "warn" | "error";

/** Structured context of a log message (counts, paths, ids); never secrets. */
export type LogFields = Record<string, unknown>;

/** A level-aware logger; each method is optional (a missing level is dropped). */
export interface Logger {
  debug?(msg: string, fields?: LogFields): void;
  info?(msg: string, fields?: LogFields): void;
  warn?(msg: string, fields?: LogFields): void;
  error?(msg: string, fields?: LogFields): void;
}

/** What a `log` option takes: a {@link Logger}, or a function that gets every message. */
export type LogOption = Logger | ((msg: string) => void);

/** A logger with every level present. */
export type Log = Required<Logger>;

const NONE = () => {};

/** Every level present: missing ones dropped, a plain function gets all of them. */
export function toLog(o: LogOption | undefined): Log {
  if (!o) return { debug: NONE, info: NONE, warn: NONE, error: NONE };
  if (typeof o === "function") {
    const f = (msg: string) => o(msg);
    return { debug: f, info: f, warn: f, error: f };
  }
  const bind = (l: LogLevel) => (o[l] ? (msg: string, fields?: LogFields) => (fields ? o[l]!(msg, fields) : o[l]!(msg)) : NONE);
  return { debug: bind("debug"), info: bind("info"), warn: bind("warn"), error: bind("error") };
}

/** Progress of a long operation, reported to an `onProgress` callback. */
export interface Progress {
  /** What is going on: "index" (hashing the NAS image), "refresh" (re-hashing blocks written since), "iteration" (a pre-copy pass), "final" (the last pass, guest stopped), "handover" (QEMU's device state). */
  phase: "index" | "refresh" | "iteration" | "final" | "handover";
  /** Units done so far in this phase (blocks for "index", pages for the passes). */
  done: number;
  /** Units in all in this phase. */
  total: number;
  /** Bytes read (index) or put on the link (passes) so far in this phase. */
  bytes: number;
  /** The pass number, for "iteration" and "final". */
  iteration?: number;
}
