// `pagetwin libvirt migrate DOMAIN DESTURI [...]`: a drop-in for `virsh
// migrate --live` whose stream goes through the two hosts' pagetwin services;
// `pagetwin libvirt prepare ...`: only the preparation, for an orchestrator
// that runs libvirt's migration itself. Options virsh migrate knows are passed
// on to it (docs/LIBVIRT.md).

import { LibvirtError, UsageError } from "../../errors.js";
import { Virsh } from "../../adapters/libvirt/virsh.js";
import { DirectEnds, type MigrationEnds } from "../../libvirt/ends.js";
import type { TraceSink } from "../../trace/sink.js";
import { libvirtAddresses, ServeEnds } from "../../libvirt/serve-ends.js";
import { domainDisks, domainUuid, twinDisks } from "../../libvirt/domain-xml.js";
// from the client, not ./serve.js: that would load the whole service (and stream mode) into this command
import { DEFAULT_CONTROL } from "../../serve/client.js";
import { libvirtMigrate, type LibvirtMigrateResult } from "../../libvirt/migrate.js";
import { splitArgs, type SplitArgs } from "../../libvirt/virsh-options.js";
import { fmtBytes } from "../args.js";
import { errorText, failureRecord, printJson } from "../json.js";
import { ProgressReporter } from "../progress.js";
import { openTraceOutputs, traceOptions, withUiDefault } from "../trace.js";

interface Opt { type: "string" | "boolean"; short?: string; help: string; default?: string }

const OPTIONS: Record<string, Opt> = {
  connect: { type: "string", short: "c", help: "the source libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)" },
  peer: { type: "string", help: "HOST:PORT of the destination host's pagetwin serve peer port (its --peer-listen)" },
  control: { type: "string", help: `this host's pagetwin serve control socket (default ${DEFAULT_CONTROL})` },
  "qemu-side": { type: "string", help: "how the services meet the two QEMUs: unix (default: a unix socket, the same path on both hosts) or tcp (a loopback port)" },
  migrateuri: { type: "string", help: "where the source QEMU connects, the service listens there: unix:///PATH (the same path on both hosts; default: one in the services' socket directory) or tcp://LOOPBACK[:PORT] (--qemu-side tcp's default tcp://127.0.0.1, a free port); with --no-pagetwin: libvirt's --migrateuri as given" },
  "listen-address": { type: "string", help: "--qemu-side tcp: where the destination QEMU listens, on the destination host (default 127.0.0.1: only its service reaches it); with --no-pagetwin: as given" },
  xml: { type: "string", help: "the destination's domain XML (virsh migrate --xml)" },
  "downtime-reserve": { type: "string", help: "ms of the guest's max downtime (virsh migrate-getmaxdowntime) kept back from QEMU's downtime-limit for libvirt's finish, which QEMU does not count, so that the guest's pause stays within its limit (default 0: QEMU's limit as it is; set back on the source if the migration fails; docs/LIBVIRT.md#downtime)" },
  "no-pagetwin": { type: "boolean", help: "libvirt's own migration, no pagetwin (a baseline with the same progress and checks)" },
  trace: { type: "string", help: `${traceOptions["trace"]!.help}; the source service traces it` },
  ui: { type: "string", help: traceOptions["ui"]!.help },
  json: { type: "boolean", help: "NDJSON on stdout: progress events, then the result (docs/JSON.md)" },
  quiet: { type: "boolean", help: "no progress or notes on stderr" },
};

const USAGE = `pagetwin libvirt migrate DOMAIN DESTURI --peer HOST:PORT [options] [virsh migrate options]
pagetwin libvirt prepare DOMAIN --peer HOST:PORT [options]

migrate: a drop-in for \`virsh migrate --live DOMAIN DESTURI\`. It reads the domain's
disks from libvirt, has this host's pagetwin serve prepare both ends (the
destination's service over the peer link), runs libvirt's migration through
them, shows progress, and checks where the guest runs afterwards. If anything
fails the guest keeps running on the source (libvirt's rule), and the error
says so. virsh migrate's options (--p2p, --persistent, --undefinesource,
--timeout N, ...) are passed on; --tunnelled and --offline are refused (no
place for pagetwin).

prepare: only the preparation, for an orchestrator that calls libvirt itself:
prints the --migrateuri (with --qemu-side tcp, also --listen-address) to give libvirt (docs/LIBVIRT.md).`;

function help(): string {
  const lines = [USAGE, "", "Options:"];
  for (const [k, o] of Object.entries(OPTIONS)) lines.push(`  ${`${o.short ? `-${o.short}, ` : ""}--${k}${o.type === "string" ? " VALUE" : ""}`.padEnd(28)}${o.help}`);
  lines.push(`  ${"--help".padEnd(28)}show this help`);
  return lines.join("\n");
}

export async function run(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === "migrate") return runMigrate(withUiDefault(rest));
  if (sub === "prepare") return runPrepare(rest);
  if (!sub || sub === "--help" || sub === "-h") {
    // no subcommand is a usage error: the help goes where errors go
    (sub ? process.stdout : process.stderr).write(help() + "\n");
    return sub ? 0 : 2;
  }
  throw new UsageError(`unknown libvirt command "${sub}": pagetwin libvirt migrate|prepare (--help)`);
}

function sourceUri(v: SplitArgs["values"]): string {
  return (v["connect"] as string | undefined) ?? process.env["LIBVIRT_DEFAULT_URI"] ?? "qemu:///system";
}

type QemuSide = { qemuSide: "unix"; socketPath?: string } | { qemuSide: "tcp"; qemuHost?: string; port?: number; listenAddress?: string };

/** unix:///PATH -> the path; tcp://HOST[:PORT] -> host and port (0: any free one). */
function parseMigrateUri(v: string): QemuSide {
  const u = /^unix:\/\/(\/[^?#]+)$/.exec(v);
  if (u) return { qemuSide: "unix", socketPath: u[1]! };
  const m = /^tcp:\/\/(\[[^\]]+\]|[^:/]+)(?::(\d+))?\/?$/.exec(v);
  const port = Number(m?.[2] ?? 0);
  if (!m || port > 65535) throw new UsageError(`--migrateuri: unix:///PATH, or tcp://HOST[:PORT] on this host's loopback, where the source QEMU connects (got "${v}")`);
  return { qemuSide: "tcp", qemuHost: m[1]!.replace(/^\[|\]$/g, ""), port };
}

/** How the services meet the QEMUs, from --qemu-side, --migrateuri and --listen-address (unix unless one of them says tcp). */
function qemuSide(v: SplitArgs["values"]): QemuSide {
  const side = v["qemu-side"] as string | undefined;
  if (side !== undefined && side !== "unix" && side !== "tcp") throw new UsageError(`--qemu-side: unix or tcp (got "${side}")`);
  const uri = v["migrateuri"] ? parseMigrateUri(v["migrateuri"] as string) : undefined;
  const listen = v["listen-address"] as string | undefined;
  const kind = side ?? uri?.qemuSide ?? (listen ? "tcp" : "unix");
  if (uri && uri.qemuSide !== kind) throw new UsageError(`--migrateuri ${v["migrateuri"]} is not --qemu-side ${kind}`);
  if (kind === "unix") {
    if (listen) throw new UsageError("--listen-address is for --qemu-side tcp: with a unix socket libvirt's destination QEMU listens at the migrate URI's path");
    return uri ?? { qemuSide: "unix" };
  }
  return { ...(uri ?? { qemuSide: "tcp" }), ...(listen ? { listenAddress: listen } : {}) };
}

/** --downtime-reserve MS, checked. */
function downtimeReserve(v: SplitArgs["values"]): { downtimeReserveMs?: number } {
  const s = v["downtime-reserve"] as string | undefined;
  if (s === undefined) return {};
  const ms = Number(s);
  if (!/^\d+$/.test(s) || ms > 60_000) throw new UsageError(`--downtime-reserve: whole ms, 0 to 60000 (got "${s}")`);
  return { downtimeReserveMs: ms };
}

/** pagetwin's ends from the options: this host's service, which prepares the destination's (and traces the migration into `trace`). */
function serveEnds(v: SplitArgs["values"], trace: readonly TraceSink[] = []): ServeEnds {
  const peer = v["peer"];
  if (typeof peer !== "string" || !peer) throw new UsageError("--peer HOST:PORT is required: the destination host's pagetwin serve peer port (or --no-pagetwin)");
  return new ServeEnds({
    control: (v["control"] as string | undefined) ?? DEFAULT_CONTROL, peer, ...qemuSide(v),
    ...(trace.length ? { trace } : {}),
  });
}

/** The ends the options ask for. */
function endsFor(a: SplitArgs, trace: readonly TraceSink[]): MigrationEnds {
  const v = a.values;
  if (v["no-pagetwin"]) {
    if (v["trace"] !== undefined || v["ui"] !== undefined) throw new UsageError("--trace and --ui trace pagetwin's proxies: not with --no-pagetwin");
    if (v["qemu-side"] !== undefined) throw new UsageError("--qemu-side is where pagetwin's services meet QEMU: not with --no-pagetwin (give libvirt's --migrateuri)");
    return new DirectEnds(v["migrateuri"] as string | undefined, v["listen-address"] as string | undefined);
  }
  return serveEnds(v, trace);
}

async function runMigrate(argv: string[]): Promise<number> {
  const a = splitArgs(argv, OPTIONS);
  if (a.help) {
    process.stdout.write(help() + "\n");
    return 0;
  }
  const [domain, destUri, ...extra] = a.positionals;
  if (!domain || !destUri) throw new UsageError("DOMAIN and DESTURI are both required: pagetwin libvirt migrate DOMAIN DESTURI --peer HOST:PORT [options] (--help)");
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}" (virsh migrate options start with --)`);
  const json = a.values["json"] === true;
  const quiet = a.values["quiet"] === true;
  const progress = new ProgressReporter("libvirt-migrate", { json, quiet });
  const note = (m: string) => progress.step("note", { message: m }, `pagetwin: ${m}`);
  for (const n of a.notes) note(n);
  endsFor(a, []); // usage errors before anything opens
  downtimeReserve(a.values);
  // the URL even with --quiet: it is the only way to the page
  const traces = await openTraceOutputs(a.values, (m) => process.stderr.write(`pagetwin: ${m}\n`));
  const ends = endsFor(a, traces.sinks);
  const source = new Virsh(sourceUri(a.values));
  const ac = new AbortController();
  const onSig = () => ac.abort();
  process.once("SIGINT", onSig);
  process.once("SIGTERM", onSig);
  try {
    const r = await libvirtMigrate({
      domain, destUri, source, ends, virshArgs: a.virsh, signal: ac.signal, onNote: note,
      ...(a.values["xml"] ? { xml: a.values["xml"] as string } : {}),
      ...downtimeReserve(a.values),
      onProgress: (p) => progress.update("migration", p.totalBytes - p.remainingBytes, p.totalBytes, "bytes", { processedBytes: p.processedBytes }),
    });
    progress.closeBar();
    const doubt = verdictDoubt(r);
    if (doubt) process.stderr.write(`pagetwin: warning: ${doubt}\n`);
    if (json) printJson("libvirt-migrate", "result", r);
    else if (!quiet) process.stderr.write(summary(r) + "\n");
    return r.report["verdict"] === "failed" ? 1 : 0;
  } catch (err) {
    progress.closeBar();
    if (json) {
      printJson("libvirt-migrate", "result", failureRecord(err, { domain, sourceState: (err as { sourceState?: string }).sourceState }));
      process.stderr.write(errorText(err) + "\n");
      return 1;
    }
    throw err;
  } finally {
    process.off("SIGINT", onSig);
    process.off("SIGTERM", onSig);
    await traces.close();
  }
}

/**
 * libvirt succeeded, but pagetwin's end-to-end check did not pass: what to tell the user (undefined: nothing).
 * "failed" (the stream rebuilt at the destination differs from the source's) makes the command fail.
 */
function verdictDoubt(r: LibvirtMigrateResult): string | undefined {
  if (r.ends !== "pagetwin" || r.report["verdict"] === "verified") return undefined;
  const why = typeof r.report["error"] === "string" ? `: ${r.report["error"]}` : "";
  return r.report["verdict"] === "failed"
    ? `the stream the destination QEMU got is not the one the source QEMU sent${why}; libvirt reports ${r.domain} ${r.destState} on the destination: check the guest`
    : `pagetwin could not verify the stream end to end (verdict ${String(r.report["verdict"] ?? "unknown")})${why}; libvirt reports ${r.domain} ${r.destState} on the destination`;
}

/** The human summary after a migration, like virsh's "Migration: [100 %]" and a line of figures. */
function summary(r: LibvirtMigrateResult): string {
  const lines = [`Migration: [100 %] ${r.domain} is ${r.destState} on the destination (source: ${r.sourceState}), ${(r.migrateMs / 1000).toFixed(1)} s`];
  if (r.job) lines.push(`  QEMU's stream: ${fmtBytes(r.job.processedBytes)}`);
  const link = r.report["bytesOutLink"];
  if (typeof link === "number") lines.push(`  on the link: ${fmtBytes(link)}`);
  return lines.join("\n");
}

/** `prepare`: the service prepares both ends; prints what to give libvirt, and the virsh command line that uses it. */
async function runPrepare(argv: string[]): Promise<number> {
  const a = splitArgs(argv, OPTIONS);
  if (a.help) {
    process.stdout.write(help() + "\n");
    return 0;
  }
  const [domain, ...extra] = a.positionals;
  if (!domain) throw new UsageError("DOMAIN is required: pagetwin libvirt prepare DOMAIN --peer HOST:PORT [options] (--help)");
  if (extra.length || a.virsh.length) throw new UsageError(`prepare takes DOMAIN and pagetwin's options only (got "${extra[0] ?? a.virsh[0]}")`);
  if (a.values["no-pagetwin"] || a.values["xml"] || a.values["downtime-reserve"] !== undefined) throw new UsageError("prepare: --no-pagetwin, --xml and --downtime-reserve belong to migrate");
  const ends = serveEnds(a.values);
  const source = new Virsh(sourceUri(a.values));
  const state = await source.domstate(domain);
  if (state !== "running") throw new LibvirtError(`domain ${domain} is ${state} on ${source.uri}, not running: nothing to prepare`);
  const xml = await source.dumpxml(domain);
  const { usable } = twinDisks(domainDisks(xml));
  const uuid = domainUuid(xml);
  const ready = await ends.prepareOnly({ domain, ...(uuid ? { uuid } : {}), disks: usable, virshArgs: [] });
  const at = libvirtAddresses(ready);
  if (a.values["json"]) printJson("libvirt-prepare", "result", { ok: true, domain, ...ready, ...at });
  else {
    process.stdout.write(`--migrateuri ${at.migrateUri}${at.listenAddress ? ` --listen-address ${at.listenAddress}` : ""}\n`);
    if (!a.values["quiet"]) process.stderr.write(`pagetwin: migration ${ready.migration} prepared; run: virsh migrate --live ${domain} DESTURI --migrateuri ${at.migrateUri}${at.listenAddress ? ` --listen-address ${at.listenAddress}` : ""}\n`);
  }
  return 0;
}
