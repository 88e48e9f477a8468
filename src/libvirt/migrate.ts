// One libvirt live migration through prepared ends: read the domain's disks,
// prepare the ends, run `virsh migrate --live` with their --migrateuri and
// --listen-address, watch its job, check where the guest runs afterwards, and
// release the ends. libvirt's rule holds on every failure: the guest stays on
// the source; the error says in which state virsh domstate finds it there.

import { LibvirtError, LibvirtMigrationError } from "../errors.js";
import { LIBVIRT_UNLIMITED_MIBS, Virsh, type DomainState } from "../adapters/libvirt/virsh.js";
import { domainDisks, domainUuid, twinDisks, type DomainDisk } from "./domain-xml.js";
import { JobWatcher, type JobProgress } from "./job.js";
import type { EndsReport, MigrationEnds, PreparedEnds } from "./ends.js";
import { DowntimeReserve, type DowntimeReserved } from "./downtime.js";

export interface LibvirtMigrateOptions {
  domain: string;
  /** The source libvirt (where the guest runs now). */
  source: Virsh;
  /** The destination libvirt URI, as virsh migrate takes it. */
  destUri: string;
  ends: MigrationEnds;
  /** --xml FILE for the destination. */
  xml?: string;
  /** Further `virsh migrate` options, passed as they are (--p2p, --persistent, --timeout N, ...). */
  virshArgs?: string[];
  onProgress?: (p: JobProgress) => void;
  /** Step messages (disks found, ends prepared, notes). */
  onNote?: (msg: string) => void;
  /** How often the job is polled, ms (default 1000: each poll is a virsh process, CPU the migration could use). */
  pollMs?: number;
  signal?: AbortSignal;
  /** ms of the guest's downtime limit kept back from QEMU's for libvirt's finish (default 0: QEMU's limit as the guest has it; docs/LIBVIRT.md). */
  downtimeReserveMs?: number;
}

export interface LibvirtMigrateResult {
  ok: true;
  domain: string;
  ends: string;
  migrateUri?: string;
  listenAddress?: string;
  disks: DomainDisk[];
  skippedDisks: { target: string; reason: string }[];
  /** Wall time of `virsh migrate`, ms. */
  migrateMs: number;
  /** Where the command's time went, ms: reading the domain, preparing the ends, virsh migrate, then at once checking both hosts and the ends' report. */
  phases: { inspectMs: number; prepareMs: number; migrateMs: number; checkMs: number; reportMs: number };
  elapsedMs: number;
  /** The guest's downtime limit and what QEMU was asked for (absent: left as it was, `notes` say why). */
  downtime?: DowntimeReserved;
  /** The last job figures seen (QEMU's stream, before the ends change it). */
  job?: JobProgress;
  sourceState: DomainState;
  destState: DomainState;
  notes: string[];
  report: EndsReport;
}

/** Migrates; the result, or a LibvirtMigrationError with the guest's state on the source. */
export async function libvirtMigrate(o: LibvirtMigrateOptions): Promise<LibvirtMigrateResult> {
  const t0 = performance.now();
  const note = o.onNote ?? (() => {});
  // both at once: each is a virsh process and a libvirt call, and this is time before anything moves
  const reserve = new DowntimeReserve(o.source, o.domain, o.downtimeReserveMs ?? 0);
  const [before, xml, speed, limit] = await Promise.all([
    o.source.domstate(o.domain), o.source.dumpxml(o.domain).catch((err: unknown) => err as Error),
    o.source.migrateSpeed(o.domain).catch(() => LIBVIRT_UNLIMITED_MIBS), reserve.limit(),
  ]);
  if (before !== "running") throw new LibvirtError(`domain ${o.domain} is ${before} on ${o.source.uri}, not running: nothing to migrate live`);
  if (xml instanceof Error) throw xml;
  const { usable, skipped } = twinDisks(domainDisks(xml));
  note(`disks: ${usable.map((d) => `${d.target} ${d.source}`).join(", ") || "none usable"}${skipped.length ? `; not used: ${skipped.map((s) => `${s.target} (${s.reason})`).join(", ")}` : ""}`);
  const uuid = domainUuid(xml);
  const tp = performance.now();
  const watcher = new JobWatcher(o.source, o.domain, o.onProgress ?? (() => {}), o.pollMs);
  let prepared: PreparedEnds | undefined;
  let migrateMs = 0, prepareMs = 0;
  let downtime: DowntimeReserved | undefined;
  try {
    const bandwidthMiBs = bandwidthArg(o.virshArgs ?? []) ?? (speed < LIBVIRT_UNLIMITED_MIBS ? speed : undefined);
    // both at once: the services' preparation and libvirt's call are independent, and both come before anything moves
    // (both settled before a failure is handled: the limit is set back only once it was set)
    const [ends, reserved] = await Promise.allSettled([
      o.ends.prepare({ domain: o.domain, ...(uuid ? { uuid } : {}), disks: usable, virshArgs: o.virshArgs ?? [], ...(bandwidthMiBs ? { bandwidthMiBs } : {}) }),
      reserve.apply(limit),
    ]);
    if (ends.status === "rejected") throw ends.reason;
    prepared = ends.value;
    for (const n of prepared.notes) note(n);
    const r = reserved.status === "fulfilled" ? reserved.value : { note: `QEMU's downtime-limit left as the guest has it (${(reserved.reason as Error).message})` };
    if (r && "note" in r) note(r.note);
    else if (r) note(`QEMU's downtime-limit ${(downtime = r.reserved).askedMs} ms: the guest's ${downtime.limitMs} ms less ${downtime.limitMs - downtime.askedMs} ms for libvirt's finish`);
    const tm = performance.now();
    prepareMs = tm - tp;
    await runVirshMigrate(o, prepared, watcher);
    migrateMs = performance.now() - tm;
  } catch (err) {
    watcher.stop();
    const error = await failed(o, prepared, err);
    await reserve.restore().catch((e: unknown) => note(`the source's downtime limit was not set back to ${downtime?.limitMs} ms: ${(e as Error).message}`));
    throw error;
  }
  // the check and the ends' report at once: neither needs the other
  const tc = performance.now();
  let tr = tc;
  const [[sourceState, destState], report] = await Promise.all([
    Promise.all([o.source.domstate(o.domain), destinationState(o)]).finally(() => { tr = performance.now(); }),
    prepared.finish(true),
  ]);
  const end = performance.now();
  const phases = { inspectMs: tp - t0, prepareMs, migrateMs, checkMs: tr - tc, reportMs: end - tc };
  return {
    ok: true, domain: o.domain, ends: o.ends.kind,
    ...(prepared.migrateUri ? { migrateUri: prepared.migrateUri } : {}),
    ...(prepared.listenAddress ? { listenAddress: prepared.listenAddress } : {}),
    disks: usable, skippedDisks: skipped, migrateMs, elapsedMs: end - t0,
    phases: Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, Math.round(v)])) as typeof phases,
    ...(watcher.last ? { job: watcher.last } : {}),
    ...(downtime ? { downtime } : {}),
    sourceState, destState, notes: prepared.notes, report,
  };
}

/** The virsh migrate command line for these ends (without `-c URI`). */
export function migrateArgs(o: Pick<LibvirtMigrateOptions, "domain" | "destUri" | "xml" | "virshArgs">, ends: Pick<PreparedEnds, "migrateUri" | "listenAddress" | "qemuBandwidthMiBs">): string[] {
  const virsh = ends.qemuBandwidthMiBs === undefined ? o.virshArgs ?? [] : [...withoutBandwidth(o.virshArgs ?? []), "--bandwidth", String(ends.qemuBandwidthMiBs)];
  return ["migrate", "--live", ...virsh, o.domain, o.destUri,
    ...(ends.migrateUri ? ["--migrateuri", ends.migrateUri] : []),
    ...(ends.listenAddress ? ["--listen-address", ends.listenAddress] : []),
    ...(o.xml ? ["--xml", o.xml] : [])];
}

/** virsh migrate's --bandwidth N (MiB/s), if given. */
export function bandwidthArg(args: readonly string[]): number | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const v = a === "--bandwidth" ? args[i + 1] : a.startsWith("--bandwidth=") ? a.slice(12) : undefined;
    if (v !== undefined) return Number(v) > 0 ? Number(v) : undefined;
  }
  return undefined;
}

function withoutBandwidth(args: readonly string[]): string[] {
  return args.filter((a, i) => a !== "--bandwidth" && args[i - 1] !== "--bandwidth" && !a.startsWith("--bandwidth="));
}

/** virsh errors an operator can act on, and what to do (pagetwin's options pass them on to libvirt). */
const VIRSH_HINTS: readonly (readonly [RegExp, string])[] = [
  // QEMU checks at the destination only, when libvirt sets the capability for --postcopy
  [/Postcopy is not supported/, "--postcopy needs userfaultfd in the destination QEMU: QEMU run as an unprivileged user (libvirt-qemu) gets it with `sysctl vm.unprivileged_userfaultfd=1` on the destination host; the destination QEMU's log names the cause"],
];

/** What to do about virsh's message `said`, if pagetwin knows ("" if not). */
export function virshHint(said: string): string {
  return VIRSH_HINTS.find(([re]) => re.test(said))?.[1] ?? "";
}

/** Runs `virsh migrate` to its end; rejects with virsh's message when it fails or the signal aborts it. */
function runVirshMigrate(o: LibvirtMigrateOptions, ends: PreparedEnds, watcher: JobWatcher): Promise<void> {
  const child = o.source.spawn(migrateArgs(o, ends));
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => { stderr = (stderr + d).slice(-8000); });
  child.stdout!.resume();
  watcher.start();
  // SIGINT is virsh's Ctrl-C: it asks libvirt to abort the job, and libvirt resumes the guest on the source.
  const abort = () => child.kill("SIGINT");
  o.signal?.addEventListener("abort", abort, { once: true });
  return new Promise<void>((resolve, reject) => {
    child.once("error", (err) => reject(new LibvirtError(`cannot run virsh: ${err.message}`, { cause: err })));
    child.once("close", (code, sig) => {
      watcher.stop();
      o.signal?.removeEventListener("abort", abort);
      const said = stderr.replace(/\r?Migration: \[[^\]]*\]/g, "").trim().replace(/^error: /gm, "").split("\n").filter(Boolean).join("; ");
      if (code === 0 && !o.signal?.aborted) resolve();
      else if (o.signal?.aborted) reject(new LibvirtError(`migration aborted${said ? `: ${said}` : ""}`, { virshStderr: stderr }));
      else {
        const hint = virshHint(said);
        reject(new LibvirtError(`virsh migrate failed (${code ?? sig})${said ? `: ${said}` : ""}${hint ? ` (${hint})` : ""}`, { virshStderr: stderr }));
      }
    });
  });
}

/** The guest's state where libvirt migrated it (client-managed: virsh reaches the destination too), or "unknown". */
async function destinationState(o: LibvirtMigrateOptions): Promise<DomainState> {
  try {
    return await new Virsh(o.destUri).domstate(o.domain);
  } catch {
    return "unknown";
  }
}

/** After a failure (preparing or migrating): release the ends, find the guest on the source, and say so in the error. */
async function failed(o: LibvirtMigrateOptions, ends: PreparedEnds | undefined, err: unknown): Promise<LibvirtMigrationError> {
  let report: EndsReport = {};
  try { if (ends) report = await ends.finish(false); } catch { /* the migration's error is the one to report */ }
  let state: DomainState;
  try { state = await o.source.domstate(o.domain); } catch (e) { state = `unknown (${(e as Error).message})`; }
  const where = state === "running" ? "the guest is running on the source" : `the guest is ${state} on the source (virsh domstate)`;
  const endsSaid = typeof report["error"] === "string" ? `; pagetwin: ${report["error"]}` : "";
  return new LibvirtMigrationError(`${(err as Error).message}${endsSaid}; ${where}`, {
    cause: err, sourceState: state, virshStderr: err instanceof LibvirtError ? err.virshStderr : "",
  });
}
