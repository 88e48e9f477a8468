// virsh against one libvirt connection: the only code that runs virsh. Each
// call is a child process with a timeout; a failure is a LibvirtError with
// virsh's own message.

import { execFile, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { LibvirtError } from "../../errors.js";

/** A domain's state as `virsh domstate` prints it ("running", "paused", "shut off", ...), or "absent" (no such domain). */
export type DomainState = string;

export interface VirshOptions {
  /** The virsh binary (default "virsh" on PATH). */
  bin?: string;
  /** Per call, ms (default 30 s). */
  timeoutMs?: number;
}

/** libvirt's "no limit" for a migration's bandwidth, MiB/s (INT64_MAX bytes/s): migrate-getspeed's answer when none was set. */
export const LIBVIRT_UNLIMITED_MIBS = 8796093022207;

/** What virsh says when the domain does not exist on that connection. */
const NO_DOMAIN = /failed to get domain|Domain not found/i;

export class Virsh {
  private readonly bin: string;

  constructor(readonly uri: string, private readonly o: VirshOptions = {}) {
    this.bin = o.bin ?? "virsh";
  }

  /** Runs `virsh -c URI ARGS...`; its stdout, or a LibvirtError with its stderr (`signal`: killed when it aborts). */
  run(args: string[], timeoutMs = this.o.timeoutMs ?? 30_000, signal?: AbortSignal): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile(this.bin, ["-c", this.uri, ...args], { timeout: timeoutMs, maxBuffer: 16 << 20, ...(signal ? { signal } : {}) }, (err, stdout, stderr) => {
        if (!err) return resolve(stdout);
        const said = stderr.trim().replace(/^error: /gm, "").split("\n").filter(Boolean).join("; ");
        reject(new LibvirtError(`virsh ${args[0]} (${this.uri}): ${said || err.message}`, { cause: err, virshStderr: stderr }));
      });
    });
  }

  /** The domain's state, or "absent" when this connection has no such domain. */
  async domstate(domain: string): Promise<DomainState> {
    try {
      return (await this.run(["domstate", domain])).trim();
    } catch (err) {
      if (err instanceof LibvirtError && NO_DOMAIN.test(err.virshStderr)) return "absent";
      throw err;
    }
  }

  /** The domain's XML (`--migratable`: as a destination would be given it). */
  dumpxml(domain: string, migratable = false): Promise<string> {
    return this.run(["dumpxml", ...(migratable ? ["--migratable"] : []), domain]);
  }

  /** `virsh domjobinfo`'s key/value lines ("Data processed" -> "120.5 MiB"); empty when no job runs (`--completed`: the last job's). */
  async jobInfo(domain: string, extra: string[] = [], signal?: AbortSignal): Promise<Map<string, string>> {
    const out = await this.run(["domjobinfo", ...extra, domain], 10_000, signal);
    const m = new Map<string, string>();
    for (const line of out.split("\n")) {
      const i = line.indexOf(":");
      if (i > 0) m.set(line.slice(0, i).trim(), line.slice(i + 1).trim());
    }
    return m;
  }

  /** `virsh migrate-getspeed`: QEMU's max-bandwidth for the domain's migrations, MiB/s (LIBVIRT_UNLIMITED_MIBS: none set). */
  async migrateSpeed(domain: string): Promise<number> {
    const v = Number((await this.run(["migrate-getspeed", domain], 10_000)).trim());
    if (!Number.isFinite(v) || v < 0) throw new LibvirtError(`virsh migrate-getspeed ${domain}: not a number`, { virshStderr: "" });
    return v;
  }

  /** `virsh migrate-getmaxdowntime`: QEMU's downtime-limit for the domain's migrations, ms. */
  async maxDowntime(domain: string): Promise<number> {
    const v = Number((await this.run(["migrate-getmaxdowntime", domain], 10_000)).trim());
    if (!Number.isInteger(v) || v <= 0) throw new LibvirtError(`virsh migrate-getmaxdowntime ${domain}: not a number of ms`, { virshStderr: "" });
    return v;
  }

  /** `virsh migrate-setmaxdowntime`: sets it (the domain must be running). */
  async setMaxDowntime(domain: string, ms: number): Promise<void> {
    await this.run(["migrate-setmaxdowntime", domain, String(ms)], 10_000);
  }

  /** Starts a long virsh command (a migration) as a child; the caller waits for it and kills it. */
  spawn(args: string[]): ChildProcess {
    return spawn(this.bin, ["-c", this.uri, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  }
}

/** True if virsh runs here (libvirt-clients installed). */
export function virshAvailable(bin = "virsh"): boolean {
  const r = spawnSync(bin, ["--version"], { stdio: "ignore", timeout: 5000 });
  return r.status === 0;
}
