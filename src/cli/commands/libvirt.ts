// `pagetwin libvirt migrate DOMAIN DESTURI [...]`: a drop-in for `virsh
// migrate --live` whose stream goes through the two hosts' pagetwin services;
// `pagetwin libvirt prepare ...`: only the preparation, for an orchestrator
// that runs libvirt's migration itself. Options virsh migrate knows are passed
// on to it (docs/LIBVIRT.md).

import { UsageError } from "../../errors.js";
import { Virsh } from "../../adapters/libvirt/virsh.js";
import { DirectEnds, type MigrationEnds } from "../../libvirt/ends.js";
import { libvirtMigrate, type LibvirtMigrateResult } from "../../libvirt/migrate.js";
import { splitArgs, type SplitArgs } from "../../libvirt/virsh-options.js";
import { fmtBytes } from "../args.js";
import { errorText, failureRecord, printJson } from "../json.js";
import { ProgressReporter } from "../progress.js";

interface Opt { type: "string" | "boolean"; short?: string; help: string; default?: string }

const OPTIONS: Record<string, Opt> = {
  connect: { type: "string", short: "c", help: "the source libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)" },
  "no-pagetwin": { type: "boolean", help: "libvirt's own migration, no pagetwin (a baseline with the same progress and checks)" },
  migrateuri: { type: "string", help: "with --no-pagetwin: libvirt's --migrateuri, as given" },
  "listen-address": { type: "string", help: "with --no-pagetwin: libvirt's --listen-address, as given" },
  xml: { type: "string", help: "the destination's domain XML (virsh migrate --xml)" },
  json: { type: "boolean", help: "NDJSON on stdout: progress events, then the result (docs/JSON.md)" },
  quiet: { type: "boolean", help: "no progress or notes on stderr" },
};

const USAGE = `pagetwin libvirt migrate DOMAIN DESTURI [options] [virsh migrate options]

A drop-in for \`virsh migrate --live DOMAIN DESTURI\`: reads the domain's disks
from libvirt, prepares both hosts' pagetwin services, runs libvirt's migration
through them, shows progress, checks where the guest runs afterwards. If
anything fails the guest keeps running on the source (libvirt's rule), and
the error says so. virsh migrate's options (--p2p, --persistent,
--undefinesource, --timeout N, ...) are passed on; --tunnelled and --offline
are refused (no place for pagetwin).`;

function help(): string {
  const lines = [USAGE, "", "Options:"];
  for (const [k, o] of Object.entries(OPTIONS)) lines.push(`  ${`${o.short ? `-${o.short}, ` : ""}--${k}${o.type === "string" ? " VALUE" : ""}`.padEnd(28)}${o.help}`);
  lines.push(`  ${"--help".padEnd(28)}show this help`);
  return lines.join("\n");
}

export async function run(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === "migrate") return runMigrate(rest);
  if (!sub || sub === "--help" || sub === "-h") {
    process.stdout.write(help() + "\n");
    return sub ? 0 : 2;
  }
  throw new UsageError(`unknown libvirt command "${sub}": pagetwin libvirt migrate|prepare (--help)`);
}

function sourceUri(v: SplitArgs["values"]): string {
  return (v["connect"] as string | undefined) ?? process.env["LIBVIRT_DEFAULT_URI"] ?? "qemu:///system";
}

/** The ends the options ask for. */
function endsFor(a: SplitArgs): MigrationEnds {
  const v = a.values;
  if (v["no-pagetwin"]) return new DirectEnds(v["migrateuri"] as string | undefined, v["listen-address"] as string | undefined);
  throw new UsageError("pagetwin's services are not available in this build: use --no-pagetwin for libvirt's own migration");
}

async function runMigrate(argv: string[]): Promise<number> {
  const a = splitArgs(argv, OPTIONS);
  if (a.help) {
    process.stdout.write(help() + "\n");
    return 0;
  }
  const [domain, destUri, ...extra] = a.positionals;
  if (!domain || !destUri) throw new UsageError("DOMAIN and DESTURI are both required: pagetwin libvirt migrate DOMAIN DESTURI [options] (--help)");
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}" (virsh migrate options start with --)`);
  const json = a.values["json"] === true;
  const quiet = a.values["quiet"] === true;
  const progress = new ProgressReporter("libvirt-migrate", { json, quiet });
  const note = (m: string) => progress.step("note", { message: m }, `pagetwin: ${m}`);
  for (const n of a.notes) note(n);
  const ends = endsFor(a);
  const source = new Virsh(sourceUri(a.values));
  const ac = new AbortController();
  const onSig = () => ac.abort();
  process.once("SIGINT", onSig);
  process.once("SIGTERM", onSig);
  try {
    const r = await libvirtMigrate({
      domain, destUri, source, ends, virshArgs: a.virsh, signal: ac.signal, onNote: note,
      ...(a.values["xml"] ? { xml: a.values["xml"] as string } : {}),
      onProgress: (p) => progress.update("migration", p.totalBytes - p.remainingBytes, p.totalBytes, "bytes", { processedBytes: p.processedBytes }),
    });
    progress.closeBar();
    if (json) printJson("libvirt-migrate", "result", r);
    else if (!quiet) process.stderr.write(summary(r) + "\n");
    return 0;
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
  }
}

/** The human summary after a migration, like virsh's "Migration: [100 %]" and a line of figures. */
function summary(r: LibvirtMigrateResult): string {
  const lines = [`Migration: [100 %] ${r.domain} is ${r.destState} on the destination (source: ${r.sourceState}), ${(r.migrateMs / 1000).toFixed(1)} s`];
  if (r.job) lines.push(`  QEMU's stream: ${fmtBytes(r.job.processedBytes)}`);
  const link = r.report["bytesOutLink"];
  if (typeof link === "number") lines.push(`  on the link: ${fmtBytes(link)}`);
  return lines.join("\n");
}
