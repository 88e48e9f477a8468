// Shared command-line plumbing: option parsing with help, sizes and rates.

import { UsageError } from "../errors.js";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { INSECURE_WARNING, loadKey, type TlsFiles } from "../link/security.js";
import type { WorkersWhen } from "../agent/source.js";
import type { DiskFormat } from "../adapters/nas/image.js";

export { UsageError };

export interface CommandSpec {
  name: string;
  summary: string;
  usage: string;
  options: Record<string, { type: "string" | "boolean"; short?: string; default?: string | boolean; help: string; multiple?: boolean }>;
  details?: string;
}

export function helpText(spec: CommandSpec): string {
  const lines = [`pagetwin ${spec.name} — ${spec.summary}`, "", `Usage: ${spec.usage}`, "", "Options:"];
  const opts = Object.entries(spec.options);
  const w = Math.max(...opts.map(([k, o]) => k.length + (o.type === "string" ? 6 : 0))) + 4;
  for (const [k, o] of opts) {
    const flag = `--${k}${o.type === "string" ? " VALUE" : ""}`;
    const def = o.default !== undefined && o.default !== false ? ` (default: ${o.default})` : "";
    lines.push(`  ${flag.padEnd(w + 2)}${o.help}${def}`);
  }
  lines.push(`  ${"--help".padEnd(w + 2)}show this help`);
  if (spec.details) lines.push("", spec.details);
  return lines.join("\n");
}

export function parse(spec: CommandSpec, argv: string[]): { values: Record<string, string | boolean | undefined>; help: boolean } {
  const options: NonNullable<ParseArgsConfig["options"]> = { help: { type: "boolean", short: "h" } };
  for (const [k, o] of Object.entries(spec.options)) options[k] = { type: o.type, ...(o.short ? { short: o.short } : {}) };
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, allowPositionals: false, strict: true });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\nRun \`pagetwin ${spec.name} --help\` for the options.`);
  }
  const values: Record<string, string | boolean | undefined> = {};
  for (const [k, o] of Object.entries(spec.options)) values[k] = (parsed.values as Record<string, string | boolean | undefined>)[k] ?? o.default;
  return { values, help: !!parsed.values.help };
}

/** "1gbit", "125MB", "100mbit", "0" (unlimited, unless `positive`) -> bytes per second. */
export function parseRate(s: string, what = "--bandwidth", positive = false): number {
  const m = /^(\d+(?:\.\d+)?)\s*(g|m|k)?(bit|b|bps)?(?:\/s)?$/i.exec(s.trim());
  if (!m) throw new UsageError(`${what}: cannot read the rate "${s}": write e.g. 1gbit, 500mbit, 125MB`);
  const mult = { g: 1e9, m: 1e6, k: 1e3 }[(m[2] ?? "").toLowerCase() as "g" | "m" | "k"] ?? 1;
  const bits = (m[3] ?? "bit").toLowerCase() !== "b";
  const rate = (Number(m[1]) * mult) / (bits ? 8 : 1);
  if (positive && !(rate > 0)) throw new UsageError(`${what} must be a rate above 0, e.g. 1gbit (got "${s}")`);
  return rate;
}

/** "64GiB", "512MiB", "4096" (bytes) -> bytes. */
export function parseSize(s: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(k|m|g|t)?(i?b)?$/i.exec(s.trim());
  if (!m) throw new UsageError(`${what}: cannot read the size "${s}": write e.g. 16GiB, 512MiB`);
  const exp = { k: 1, m: 2, g: 3, t: 4 }[(m[2] ?? "").toLowerCase() as "k" | "m" | "g" | "t"] ?? 0;
  return Math.round(Number(m[1]) * 1024 ** exp);
}

export function num(values: Record<string, string | boolean | undefined>, k: string, min = -Infinity, max = Infinity): number {
  const v = Number(values[k]);
  if (values[k] === "" || !Number.isFinite(v) || v < min || v > max) throw new UsageError(`--${k} must be a number between ${min} and ${max} (got "${values[k]}")`);
  return v;
}

/** A whole number option (workers, ports, counts): 1.5 is a usage error, not a runtime one. */
export function int(values: Record<string, string | boolean | undefined>, k: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const v = num(values, k, min, max);
  if (!Number.isInteger(v)) throw new UsageError(`--${k} must be a whole number between ${min} and ${max} (got "${values[k]}")`);
  return v;
}

export function str(values: Record<string, string | boolean | undefined>, k: string): string {
  const v = values[k];
  if (typeof v !== "string" || v === "") throw new UsageError(`--${k} is required`);
  return v;
}

export function fmtBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

/** The link's security options (--psk-file, --tls-*, --insecure), worded for the agent or proxy at the other end. */
export function securityOptions(peer: string, peerPresents: boolean): CommandSpec["options"] {
  return {
    "psk-file": { type: "string", help: `pre-shared key file, the same 32 random bytes as the ${peer}'s, mode 0600 (head -c 32 /dev/urandom > key; chmod 600 key): the link runs in TLS-PSK` },
    "tls-cert": { type: "string", help: "TLS 1.3 with certificates: this end's certificate (PEM); with --tls-key and --tls-ca" },
    "tls-key": { type: "string", help: "TLS: this end's private key (PEM, mode 0600)" },
    "tls-ca": { type: "string", help: `TLS: CA that signed the ${peer}'s certificate${peerPresents ? " (it must present one)" : ""}` },
    insecure: { type: "boolean", help: "no key and no certificates: nothing authenticated or encrypted (only on a link nobody else can reach)" },
  };
}

/** The key, certificates or --insecure the options name: exactly one must be given (checked where the link is made). */
export function security(values: Record<string, string | boolean | undefined>): { psk: Uint8Array | null; tls: TlsFiles | null; insecure: boolean } {
  return { psk: values["psk-file"] ? loadKey(values["psk-file"] as string) : null, tls: tlsFiles(values), insecure: values["insecure"] === true };
}

/** A command that dials says what --insecure means (a listener says it when it starts listening). */
export function warnIfInsecure(values: Record<string, string | boolean | undefined>): void {
  if (values["insecure"] === true) process.stderr.write(`pagetwin: ${INSECURE_WARNING}\n`);
}

/** --tls-cert/--tls-key/--tls-ca: all three or none. */
export function tlsFiles(values: Record<string, string | boolean | undefined>): TlsFiles | null {
  const [cert, key, ca] = [values["tls-cert"], values["tls-key"], values["tls-ca"]];
  if (!cert && !key && !ca) return null;
  if (typeof cert !== "string" || typeof key !== "string" || typeof ca !== "string") {
    throw new UsageError("TLS needs all of --tls-cert, --tls-key and --tls-ca (see docs/SECURITY.md to make them)");
  }
  return { cert, key, ca };
}

/** --workers-when: always, or switchover (the workers hash only the final pass, with the guest stopped). */
export function workersWhen(values: Record<string, string | boolean | undefined>): WorkersWhen {
  const v = values["workers-when"] ?? "always";
  if (v === "always" || v === "switchover") return v;
  throw new UsageError(`--workers-when is always or switchover (got "${String(v)}")`);
}

/** --format, for every command that names a disk image. */
export const FORMAT_OPTION = {
  format: { type: "string", default: "auto", help: "the image's format: raw, qcow2, or auto (told by its first bytes; a raw disk whose guest wrote a qcow2 header at its start needs raw)" },
} as const satisfies CommandSpec["options"];

/** The --format given: undefined for auto (detect). */
export function diskFormat(values: Record<string, string | boolean | undefined>): DiskFormat | undefined {
  const f = values.format ?? "auto";
  if (f === "auto") return undefined;
  if (f === "raw" || f === "qcow2") return f;
  throw new UsageError(`--format is raw, qcow2 or auto (got "${String(f)}")`);
}

/** --refresh-rate, for the commands that migrate with a stale index. */
export const REFRESH_RATE_OPTION = {
  "refresh-rate": { type: "string", default: "32MB", help: "a stale index (the image was written since indexing) is used as it is and re-read in the background at this rate (0: not re-read)" },
} as const satisfies CommandSpec["options"];
