// CPU time a process has used (user + system, all its threads, those that
// have exited included), from /proc/PID/stat: where a comparison's time went
// on a host whose cores every process shares.

import { readFileSync } from "node:fs";
import { spawnSync } from "node:child_process";

let ticksPerSecond = 0;

function clockTicks(): number {
  if (!ticksPerSecond) {
    const r = spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8", timeout: 5000 });
    const n = Number(r.stdout?.trim());
    ticksPerSecond = Number.isInteger(n) && n > 0 ? n : 100;
  }
  return ticksPerSecond;
}

/** Milliseconds of CPU the process has used so far; NaN if it is gone or unreadable. */
export function processCpuMs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // fields after the command name, which may hold spaces and parentheses
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(f[11]) + Number(f[12]); // utime, stime
    return Number.isFinite(ticks) ? (ticks * 1000) / clockTicks() : NaN;
  } catch {
    return NaN;
  }
}

/** CPU used by each named process between start() and stop(), ms. */
export class CpuMeter {
  private readonly before = new Map<string, { pid: number; ms: number }>();

  start(procs: Record<string, number | undefined>): void {
    this.before.clear();
    for (const [name, pid] of Object.entries(procs)) if (pid) this.before.set(name, { pid, ms: processCpuMs(pid) });
  }

  stop(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [name, { pid, ms }] of this.before) out[name] = processCpuMs(pid) - ms;
    return out;
  }
}
