// `pagetwin libvirt migrate` takes `virsh migrate`'s own options too: this
// splits a command line into pagetwin's options, the two positionals, and the
// virsh options passed on as they are; it refuses those pagetwin cannot serve
// and names those whose stream passes through without dedup.

import { UsageError } from "../errors.js";

/** virsh migrate options that take a value (the rest are flags). */
const VIRSH_VALUED = new Set([
  "--timeout", "--bandwidth", "--dname", "--persistent-xml", "--migrate-disks", "--disks-port", "--disks-uri",
  "--parallel-connections", "--comp-methods", "--comp-mt-level", "--comp-mt-threads", "--comp-mt-dthreads",
  "--comp-xbzrle-cache", "--comp-zlib-level", "--comp-zstd-level", "--tls-destination", "--graphicsuri",
  "--postcopy-bandwidth",
]);

/** virsh migrate options that leave no place for pagetwin, and why. */
const REFUSED: Record<string, string> = {
  "--tunnelled": "a tunnelled migration carries QEMU's stream inside libvirt's own connection, where no proxy can be: leave out --tunnelled",
  "--offline": "an offline migration moves no RAM: use virsh migrate --offline itself",
  "--direct": "virsh's --direct (QEMU managing the migration itself) takes no --migrateuri",
};

/**
 * Options whose stream pagetwin forwards unchanged, and what the user is told.
 * (--parallel is not among them: each multifd channel is a session of the
 * migration, its pages looked up like the main channel's.)
 */
const PASSTHROUGH: Record<string, string> = {
  "--compressed": "--compressed: with QEMU's default method (xbzrle) the pages QEMU sends again as deltas pass on as they are, the rest is deduplicated; pages QEMU compresses itself (--comp-methods mt, or zlib/zstd with --parallel) cannot be matched with disk blocks and pass through unchanged",
  "--tls": "--tls: QEMU encrypts its own stream, so pagetwin cannot read it; it passes through unchanged",
  "--postcopy": "--postcopy: pages QEMU sends after the switch to post-copy pass through without dedup",
};

export interface PagetwinOptionSpec {
  [name: string]: { type: "string" | "boolean"; short?: string };
}

export interface SplitArgs {
  /** pagetwin's own options, by name. */
  values: Record<string, string | boolean | undefined>;
  positionals: string[];
  /** For virsh migrate, in the order given. */
  virsh: string[];
  /** What passes through without dedup (one sentence per option). */
  notes: string[];
  help: boolean;
}

/** Splits argv: pagetwin's options by `spec`, anything else starting with `-` goes to virsh (with its value if it takes one). */
export function splitArgs(argv: string[], spec: PagetwinOptionSpec): SplitArgs {
  const out: SplitArgs = { values: {}, positionals: [], virsh: [], notes: [], help: false };
  const short = new Map<string, string>();
  for (const [k, o] of Object.entries(spec)) if (o.short) short.set(`-${o.short}`, k);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--help" || a === "-h") { out.help = true; continue; }
    const eq = a.startsWith("--") ? a.indexOf("=") : -1;
    const flag = eq > 0 ? a.slice(0, eq) : a;
    const name = short.get(flag) ?? (flag.startsWith("--") ? flag.slice(2) : undefined);
    const own = name !== undefined ? spec[name] : undefined;
    if (own && name !== undefined) {
      if (own.type === "boolean") {
        if (eq > 0) throw new UsageError(`${flag} takes no value`);
        out.values[name] = true;
      } else {
        const v = eq > 0 ? a.slice(eq + 1) : argv[++i];
        if (v === undefined) throw new UsageError(`${flag} needs a value`);
        out.values[name] = v;
      }
      continue;
    }
    if (!a.startsWith("-") || a === "-") { out.positionals.push(a); continue; }
    if (flag in REFUSED) throw new UsageError(`${flag}: ${REFUSED[flag]}`);
    if (flag === "--live" || flag === "--verbose") continue; // always live; progress is pagetwin's own
    if (flag in PASSTHROUGH) out.notes.push(PASSTHROUGH[flag]!);
    out.virsh.push(a);
    if (eq < 0 && VIRSH_VALUED.has(flag)) {
      const v = argv[++i];
      if (v === undefined) throw new UsageError(`${flag} needs a value`);
      out.virsh.push(v);
    }
  }
  return out;
}
