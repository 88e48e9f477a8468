// Progress of a libvirt migration, as `virsh migrate --verbose` shows it:
// the source's `virsh domjobinfo`, polled; percent = 1 - remaining / total.

import type { Virsh } from "../adapters/libvirt/virsh.js";

export interface JobProgress {
  /** Bytes QEMU has sent so far (more than the total once pages are sent again). */
  processedBytes: number;
  remainingBytes: number;
  totalBytes: number;
  /** virsh's own figure: 100 × (1 − remaining / total). */
  percent: number;
  elapsedMs: number;
}

const UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 };

/** "38.125 MiB" -> bytes; undefined when it is not a size. */
export function parseSize(s: string | undefined): number | undefined {
  const m = /^([\d.]+)\s*(B|KiB|MiB|GiB|TiB)$/.exec((s ?? "").trim());
  return m ? Math.round(Number(m[1]) * UNITS[m[2]!]!) : undefined;
}

/** The progress in one `domjobinfo` answer, or undefined while libvirt reports no data yet (setup). */
export function jobProgress(info: Map<string, string>): JobProgress | undefined {
  const total = parseSize(info.get("Data total"));
  const remaining = parseSize(info.get("Data remaining"));
  if (total === undefined || remaining === undefined || total === 0) return undefined;
  return {
    processedBytes: parseSize(info.get("Data processed")) ?? 0,
    remainingBytes: remaining,
    totalBytes: total,
    percent: remaining === 0 ? 100 : Math.max(0, Math.min(100, 100 - (remaining * 100) / total)),
    elapsedMs: Number(/^(\d+)/.exec(info.get("Time elapsed") ?? "")?.[1] ?? 0),
  };
}

/** Polls the source's job every `everyMs` until stopped; each answer with data goes to `onProgress`. */
export class JobWatcher {
  private timer: NodeJS.Timeout | undefined;
  private busy = false;
  /** Ends a poll still running when the watcher stops (a virsh process the command would otherwise wait for). */
  private readonly stopped = new AbortController();
  last: JobProgress | undefined;

  constructor(private readonly source: Virsh, private readonly domain: string, private readonly onProgress: (p: JobProgress) => void, private readonly everyMs = 1000) {}

  start(): void {
    this.timer = setInterval(() => void this.poll(), this.everyMs);
  }

  stop(): void {
    clearInterval(this.timer);
    this.stopped.abort();
  }

  private async poll(): Promise<void> {
    if (this.busy || this.stopped.signal.aborted) return;
    this.busy = true;
    try {
      const p = jobProgress(await this.source.jobInfo(this.domain, [], this.stopped.signal));
      if (p) {
        this.last = p;
        this.onProgress(p);
      }
    } catch {
      // the job (or the domain, after the switchover) is gone: the migration's own exit says how it ended
    } finally {
      this.busy = false;
    }
  }
}
