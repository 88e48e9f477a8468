// Where a libvirt migration's downtime goes. While it runs, every SAMPLE_MS
// on one clock: the source's `domjobinfo` (QEMU's query-migrate as libvirt
// relays it: what is left, QEMU's rate, its expected downtime; libvirt's own
// QEMU monitor commands wait behind the migration job, domjobinfo does not)
// and `domstate` on both hosts (through one `virsh` shell per host, so a
// sample costs no process start) and, through pagetwin, both services'
// status. After it: QEMU's figures at its last iteration before it stopped the
// guest, what the services held between the two QEMUs then, and the downtime
// split into: the source QEMU's last writes (until the source service took its
// last byte), the services draining to the destination QEMU (until the
// destination service handed on its last byte), and the rest (the destination
// QEMU's load, libvirt's finish and resume).
import { spawn, type ChildProcess } from "node:child_process";
import { ServeClient } from "../src/serve/client.js";
import { parseSize } from "../src/libvirt/job.js";

const SAMPLE_MS = 40;
/** What `echo @@pagetwin-sample "end"` prints: its echoed command line (virsh shows it after its prompt) does not contain it. */
const END = "@@pagetwin-sample end";

/** One `virsh -q` reading commands from its stdin; each answer is its stdout up to an echoed marker (prompts and echoed commands included). */
class VirshShell {
  private readonly p: ChildProcess;
  private buf = "";
  private waiting: ((s: string) => void) | null = null;

  constructor(uri: string) {
    this.p = spawn("virsh", ["-q", "-c", uri], { stdio: ["pipe", "pipe", "ignore"] });
    this.p.stdout!.setEncoding("utf8");
    this.p.stdout!.on("data", (d: string) => {
      this.buf += d;
      const at = this.buf.indexOf(END);
      if (at >= 0 && this.waiting) {
        const out = this.buf.slice(0, at);
        this.buf = this.buf.slice(at + END.length).replace(/^\n/, "");
        const w = this.waiting; this.waiting = null; w(out);
      }
    });
  }

  run(cmd: string): Promise<string> {
    return new Promise((r) => { this.waiting = r; this.p.stdin!.write(`${cmd}\necho @@pagetwin-sample "end"\n`); });
  }

  close(): void {
    this.p.stdin!.end();
    setTimeout(() => this.p.kill(), 2000).unref();
  }
}

type Json = Record<string, any>;
interface Sample { t: number; srcState?: string; dstState?: string; job?: Map<string, string>; out?: Json; in?: Json }

export interface Switchover {
  /** The source's last sample before the guest stopped: dirty RAM left, QEMU's rate, its expected downtime (as libvirt
   *  relays them), and what the services held between the two QEMUs then (bytes the source service took that the destination QEMU had not). */
  last?: { remaining?: number; bandwidth?: number; expectedDowntimeMs?: number; iteration?: number; heldBytes?: number };
  /** ms after the guest stopped on the source (first sample paused, so up to SAMPLE_MS late): the source service took
   *  QEMU's last byte, the destination service handed on its last byte, the guest ran on the destination. */
  srcDoneMs?: number; dstDoneMs?: number; resumedMs?: number;
  /** Bytes of QEMU's stream the source service took after the stop (QEMU's whole last step, device state included),
   *  and the most the services held between the two QEMUs meanwhile (the pacer lets in at least 4 MiB beyond what the destination took: held near that, the destination set the pace). */
  afterStopBytes?: number; heldMaxAfterStop?: number;
  samples: number;
  /** The mean interval between samples, ms (the figures' resolution). */
  intervalMs: number;
}

/** `Key: value` lines of a virsh answer. */
function fields(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.split("\n")) {
    const f = /^([A-Z][\w /-]*?):\s+(.*)$/.exec(line.trim());
    if (f) m.set(f[1]!, f[2]!);
  }
  return m;
}

/** The state word of a `domstate` answer (the line after the prompt's echo). */
function state(text: string): string | undefined {
  return text.split("\n").map((l) => l.trim()).find((l) => /^(running|paused|shut off|in shutdown|crashed|pmsuspended)$/.test(l));
}

/** Samples until stop(); then the analysis. */
export class SwitchoverSampler {
  private readonly samples: Sample[] = [];
  private running = true;
  private readonly done: Promise<void>;

  constructor(private readonly dom: string, srcUri: string, dstUri: string, private readonly controls?: { out: string; in: string }) {
    this.done = this.loop(new VirshShell(srcUri), new VirshShell(dstUri));
  }

  private async loop(src: VirshShell, dst: VirshShell): Promise<void> {
    const clients = this.controls ? await Promise.all([ServeClient.connect(this.controls.out), ServeClient.connect(this.controls.in)]).catch(() => null) : null;
    const status = (c: ServeClient | undefined, direction: string) => c?.request("status", { migration: this.dom, direction }).then((s) => (s as Json)["stats"] as Json, () => undefined);
    try {
      while (this.running) {
        const t = performance.now();
        const [srcText, dstText, o, i] = await Promise.all([src.run(`domstate ${this.dom}\ndomjobinfo ${this.dom}`), dst.run(`domstate ${this.dom}`), status(clients?.[0], "out"), status(clients?.[1], "in")]);
        const job = fields(srcText);
        const srcState = state(srcText), dstState = state(dstText);
        this.samples.push({ t, ...(srcState ? { srcState } : {}), ...(dstState ? { dstState } : {}), ...(job.size ? { job } : {}), ...(o ? { out: o } : {}), ...(i ? { in: i } : {}) });
        await new Promise((r) => setTimeout(r, Math.max(0, SAMPLE_MS - (performance.now() - t))));
      }
    } finally {
      src.close(); dst.close();
      for (const c of clients ?? []) c.close();
    }
  }

  async stop(): Promise<Switchover> {
    this.running = false;
    await this.done;
    return this.analyse();
  }

  private analyse(): Switchover {
    const S = this.samples;
    const r: Switchover = { samples: S.length, intervalMs: S.length > 1 ? Math.round((S.at(-1)!.t - S[0]!.t) / (S.length - 1)) : 0 };
    // the guest stopped for the switchover: the source paused after it ran during the migration
    const stopAt = S.findIndex((x, i) => x.srcState === "paused" && S.slice(0, i).some((y) => y.srcState === "running" && y.job?.get("Data remaining")));
    if (stopAt < 0) return r;
    const stop = S[stopAt]!;
    const before = S.slice(0, stopAt).reverse().find((x) => x.job?.get("Data remaining"));
    const held = (x: Sample) => (x.out && x.in ? x.out["bytesFromQemu"] - x.in["bytesToQemu"] : undefined);
    if (before) {
      const j = before.job!, h = held(before);
      const num = (k: string) => { const v = /^(\d+)/.exec(j.get(k) ?? "")?.[1]; return v === undefined ? undefined : Number(v); };
      const bw = /^([\d.]+)\s*(\w+)\/s$/.exec(j.get("Memory bandwidth") ?? "");
      const last: NonNullable<Switchover["last"]> = {};
      const rem = parseSize(j.get("Data remaining")), bandwidth = bw ? parseSize(`${bw[1]} ${bw[2]}`) : undefined, exp = num("Expected downtime"), it = num("Iteration");
      if (rem !== undefined) last.remaining = rem;
      if (bandwidth !== undefined) last.bandwidth = bandwidth;
      if (exp !== undefined) last.expectedDowntimeMs = exp;
      if (it !== undefined) last.iteration = it;
      if (h !== undefined) last.heldBytes = h;
      r.last = last;
    }
    const after = S.slice(stopAt);
    const at = (f: (x: Sample) => boolean) => { const x = after.find(f); return x ? Math.round(x.t - stop.t) : undefined; };
    const total = S.at(-1)?.out?.["bytesFromQemu"];
    const srcDone = at((x) => x.out?.["bytesFromQemu"] === total && total !== undefined);
    const dstDone = at((x) => total !== undefined && x.in?.["bytesToQemu"] >= total);
    const resumed = at((x) => x.dstState === "running");
    if (srcDone !== undefined) r.srcDoneMs = srcDone;
    if (dstDone !== undefined) r.dstDoneMs = dstDone;
    if (resumed !== undefined) r.resumedMs = resumed;
    if (total !== undefined && stop.out) r.afterStopBytes = total - stop.out["bytesFromQemu"];
    const helds = after.flatMap((x) => { const h = held(x); return h === undefined ? [] : [h]; });
    if (helds.length) r.heldMaxAfterStop = Math.max(...helds);
    return r;
  }
}

/** One line: the switchover's figures. */
export function describeSwitchover(s: Switchover): string {
  const mb = (b: number | undefined) => (b === undefined ? "-" : `${(b / 1e6).toFixed(1)} MB`);
  const l = s.last;
  const parts = [l ? `before the stop (iteration ${l.iteration ?? "-"}): ${mb(l.remaining)} left at ${mb(l.bandwidth)}/s, QEMU expects ${l.expectedDowntimeMs ?? "-"} ms; services held ${mb(l.heldBytes)}` : "no sample before the stop"];
  parts.push(`after the stop: ${mb(s.afterStopBytes)} from QEMU, the services holding at most ${mb(s.heldMaxAfterStop)}; source QEMU's last byte taken ${s.srcDoneMs ?? "-"} ms, destination QEMU's last byte handed on ${s.dstDoneMs ?? "-"} ms, running on the destination ${s.resumedMs ?? "-"} ms (${s.samples} samples, every ${s.intervalMs} ms)`);
  return parts.join("; ");
}
