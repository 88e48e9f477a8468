// One run of the stream comparison (stream.ts): a fresh source and
// destination guest in their namespaces, the mode's proxies (none, plain
// relays, pagetwin's), QEMU's migration timed from `migrate` to the
// destination's RESUME, and the guest's counter checked across.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import type { ChildProcess } from "node:child_process";
import { createKeyFile } from "../link/security.js";
import { QemuVm, QEMU_UNTHROTTLED, type GuestImage } from "../adapters/qemu/vm.js";
import type { QmpEvent } from "../adapters/qemu/qmp.js";
import type { NetnsLink } from "../adapters/netns/link.js";
import type { StreamStats } from "../stream/stats.js";
import { CpuMeter } from "../adapters/proc/cpu.js";
import { lastCounter } from "./guest.js";
import { pollMigration, type ProxyProgress } from "./migrate-timeline.js";
import type { CompareMode, CompareOptions, RunResult } from "./stream.js";

/** QEMU's multifd channels in the multifd modes (zstd: QEMU's own compression; pagetwin: none, the proxies dedup each channel). */
export const MULTIFD_CHANNELS = 2;

const MAIN_JS = fileURLToPath(new URL("../cli/main.js", import.meta.url));
const RELAY_JS = fileURLToPath(new URL("./pipe-relay.js", import.meta.url));
const QEMU_PORT = 4444, OUT_PORT = 4446, IN_PORT = 4447;

function evMs(ev: QmpEvent): number {
  return ev.timestamp ? ev.timestamp.seconds * 1000 + ev.timestamp.microseconds / 1000 : Date.now();
}

interface Proxy {
  child: ChildProcess;
  out: string;
  err: string;
  exited: Promise<number | null>;
  /** Its progress lines (running totals), dated on arrival. */
  progress: ProxyProgress[];
}

function startProxy(link: NetnsLink, ns: string, args: string[], main = MAIN_JS): Promise<Proxy> {
  const child = link.spawn(ns, process.execPath, [main, ...args, "--json"], { stdio: ["ignore", "pipe", "pipe"] });
  const p: Proxy = { child, out: "", err: "", exited: new Promise((r) => child.once("exit", (c) => r(c))), progress: [] };
  let seen = 0;
  child.stdout!.on("data", (d: Buffer) => {
    p.out += d.toString();
    const end = p.out.lastIndexOf("\n") + 1;
    for (const line of p.out.slice(seen, end).split("\n")) if (line.includes('"progress"')) p.progress.push({ at: Date.now(), ...JSON.parse(line) });
    seen = end;
  });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`proxy ${args[0]} did not start listening: ${p.err}`)), 30_000);
    child.stderr!.on("data", (d: Buffer) => {
      p.err += d.toString();
      if (/listening on/.test(p.err)) { clearTimeout(t); resolve(p); }
    });
    void p.exited.then((c) => { clearTimeout(t); reject(new Error(`proxy ${args[0]} exited (${c}) before listening: ${p.err}`)); });
  });
}

async function stopProxy(p: Proxy | null, timeoutMs = 10_000): Promise<StreamStats | null> {
  if (!p) return null;
  const t = setTimeout(() => p.child.kill("SIGTERM"), timeoutMs);
  await p.exited;
  clearTimeout(t);
  try {
    return JSON.parse(p.out.trim().split("\n").pop()!) as StreamStats;
  } catch {
    return null;
  }
}

export function runOnce(mode: CompareMode, link: NetnsLink, guest: GuestImage, opts: CompareOptions & { indexPath: string }, runNo: number): Promise<RunResult> {
  return new CompareRun(mode, link, guest, opts, runNo).run();
}

class CompareRun {
  private readonly res: RunResult;
  private readonly log: (msg: string) => void;
  private readonly dir: string;
  /** The proxies' link in TLS-PSK, as an operator would run it. */
  private readonly keyPath: string;
  private readonly multifd: boolean;
  private readonly relayed: boolean;
  private readonly proxied: boolean;
  private src: QemuVm | null = null;
  private dst: QemuVm | null = null;
  private pin: Proxy | null = null;
  private pout: Proxy | null = null;
  /** Where the destination QEMU listens, and where the source QEMU migrates to. */
  private incoming = "";
  private uri: string;
  /** The link's byte counters when `migrate` was sent. */
  private linkFrom = { tx0: 0, rx0: 0 };

  constructor(private readonly mode: CompareMode, private readonly link: NetnsLink, private readonly guest: GuestImage,
    private readonly opts: CompareOptions & { indexPath: string }, private readonly runNo: number) {
    this.log = opts.log ?? (() => {});
    this.dir = fs.mkdtempSync(path.join(opts.workDir ?? os.tmpdir(), "pt-cmp-"));
    this.keyPath = createKeyFile(path.join(this.dir, "link.key"));
    this.multifd = mode === "qemu-multifd-zstd" || mode === "pagetwin-multifd";
    this.relayed = mode === "relay";
    this.proxied = this.relayed || mode === "pagetwin" || mode === "pagetwin-multifd" || mode === "pagetwin-baseline";
    this.uri = `tcp:${link.dstIp}:${QEMU_PORT}`;
    this.res = {
      mode, ok: false, totalTimeMs: NaN, downtimeMs: NaN, ramTransferred: NaN, normalPages: NaN, endToEndMs: NaN,
      observedDowntimeMs: NaN, linkBytes: NaN, linkBytesReturn: NaN, lastSourceCounter: -1, firstDestCounter: -1, cpuMs: {},
    };
  }

  async run(): Promise<RunResult> {
    const { res, runNo, mode } = this;
    try {
      await this.startGuests();
      await this.startProxies();
      const t0 = await this.migrate();
      await this.collect(t0);
    } catch (err) {
      res.error = (err as Error).message;
      this.log(`run ${runNo} ${mode}: FAILED: ${res.error}`);
      // a destination guest that fails after a complete stream: say whether the proxies changed a byte
      if (this.pin && mode !== "relay") {
        this.logVerified(await stopProxy(this.pin, 3000));
        this.pin = null;
      }
    } finally {
      await this.cleanup();
    }
    return res;
  }

  private logVerified(si: StreamStats | null): void {
    this.log(`run ${this.runNo} ${this.mode}: stream ${si?.streamsVerified ? "checked end to end: identical at both ends" : `NOT checked: ${si?.error ?? "no stream-in stats"}`}`);
  }

  /** Where a QEMU reaches its proxy (unix unless told tcp, as docs/STREAM.md advises). */
  private local(port: number, name: string): string {
    return this.opts.qemuSide !== "tcp" ? `unix:${path.join(this.dir, name)}` : `tcp:127.0.0.1:${port}`;
  }

  /** Both guests, the source settled (it has read its files, its counter runs), QEMU's parameters set. */
  private async startGuests(): Promise<void> {
    const { opts, link, dir } = this;
    const tag = `${process.pid}-${this.runNo}-${this.mode}`;
    // anonymous RAM, as libvirt gives a guest: faulting in a file's pages costs the QEMUs more than a real host's guest pays
    const common = { ...this.guest, memoryMiB: opts.memoryMiB ?? 512, anonymousRam: true, preallocRam: opts.prealloc ?? false, ...(opts.append ? { append: opts.append } : {}) };
    const src = this.src = await QemuVm.start({
      ...common, memPath: `/dev/shm/pt-cmp-src-${tag}`, qmpSocket: path.join(dir, "src.qmp"), serialLog: path.join(dir, "src.log"),
      netns: link.srcNs, name: "pt-cmp-src",
    });
    this.incoming = this.proxied ? this.local(QEMU_PORT, "dst-qemu.sock") : `tcp:${link.dstIp}:${QEMU_PORT}`;
    const dst = this.dst = await QemuVm.start({
      ...common, memPath: `/dev/shm/pt-cmp-dst-${tag}`, qmpSocket: path.join(dir, "dst.qmp"), serialLog: path.join(dir, "dst.log"),
      netns: link.dstNs, name: "pt-cmp-dst", incoming: this.multifd ? "defer" : this.incoming,
    });
    opts.watchDestination?.started(dst);
    await src.waitForSerial(/pagetwin-ready/, 240_000);
    const m = await src.waitForSerial(/pagetwin-counter (\d+)/, 30_000);
    const settle = Number(m[1]) + (opts.settleCounters ?? 2);
    await src.waitForSerial(new RegExp(`pagetwin-counter ${settle}\\b`), 60_000);
    await src.qmp.execute("migrate-set-parameters", {
      "max-bandwidth": opts.maxBandwidth ?? QEMU_UNTHROTTLED,
      ...(opts.downtimeLimitMs !== undefined ? { "downtime-limit": opts.downtimeLimitMs } : {}),
    });
    if (this.multifd) {
      for (const vm of [src, dst]) await vm.useMultifd(MULTIFD_CHANNELS, this.mode === "pagetwin-multifd" ? "none" : "zstd");
      await dst.qmp.execute("migrate-incoming", { uri: this.incoming });
    }
  }

  /** The mode's proxies, and the URI the source QEMU migrates to. */
  private async startProxies(): Promise<void> {
    const { link, opts, mode, guest } = this;
    const to = `${link.dstIp}:${IN_PORT}`;
    const qemuIn = this.incoming.replace(/^tcp:/, "");
    if (this.relayed) {
      this.uri = this.local(OUT_PORT, "relay-out.sock");
      this.pin = await startProxy(link, link.dstNs, [to, qemuIn], RELAY_JS);
      this.pout = await startProxy(link, link.srcNs, [this.uri.replace(/^tcp:/, ""), to], RELAY_JS);
    } else if (this.proxied) {
      const main = mode === "pagetwin-baseline" ? opts.baselineMain : undefined;
      if (mode === "pagetwin-baseline" && !main) throw new Error("the pagetwin-baseline mode needs another build's main.js (baselineMain)");
      const nas = ["--image", guest.disk, "--index", opts.indexPath, "--psk-file", this.keyPath];
      this.pin = await startProxy(link, link.dstNs, ["stream-in", "--listen", to, "--qemu", qemuIn, ...nas], main);
      const outArgs = mode === "pagetwin-baseline" ? [] : opts.outArgs ?? [];
      this.uri = this.local(OUT_PORT, "stream-out.sock");
      this.pout = await startProxy(link, link.srcNs, ["stream-out", "--listen", this.uri.replace(/^tcp:/, ""), "--to", to, ...nas, ...outArgs], main);
    }
  }

  /** QEMU's migration, to the destination's RESUME; returns when `migrate` was sent (ms since the epoch). */
  private async migrate(): Promise<number> {
    const { res, link } = this;
    const src = this.src!, dst = this.dst!;
    const tx0 = link.txBytes(link.srcNs), rx0 = link.txBytes(link.dstNs);
    const stopEv = src.qmp.waitForEvent("STOP", 300_000);
    const resumeEv = dst.qmp.waitForEvent("RESUME", 300_000);
    stopEv.catch(() => undefined);
    resumeEv.catch(() => undefined);
    this.log(`run ${this.runNo} ${this.mode}: migrating (${this.uri})`);
    const cpu = new CpuMeter();
    cpu.start({ "source QEMU": src.pid, "destination QEMU": dst.pid, "stream-out": this.pout?.child.pid, "stream-in": this.pin?.child.pid });
    const t0 = Date.now();
    await src.qmp.execute("migrate", { uri: this.uri });
    const { info, samples } = await pollMigration(src.qmp, t0);
    res.timeline = samples;
    if (info.status !== "completed") throw new Error(`migration ${info.status}: ${info["error-desc"] ?? ""}`);
    const resume = await resumeEv;
    res.cpuMs = cpu.stop();
    const stop = await stopEv;
    res.endToEndMs = evMs(resume) - t0;
    res.observedDowntimeMs = evMs(resume) - evMs(stop);
    res.totalTimeMs = info["total-time"];
    res.downtimeMs = info.downtime;
    res.ramTransferred = info.ram.transferred;
    res.normalPages = info.ram.normal;
    // the link's counters are read once the proxies are done (collect)
    this.linkFrom = { tx0, rx0 };
    return t0;
  }

  /** The counter across, the proxies' stats and the link's bytes once they are done. */
  private async collect(t0: number): Promise<void> {
    const { res, link } = this;
    const proxies = this.proxied && !this.relayed;
    res.lastSourceCounter = lastCounter(this.src!.serialLog());
    const d = await this.dst!.waitForSerial(/pagetwin-counter (\d+)/, 30_000);
    res.firstDestCounter = Number(d[1]);
    if (this.pout && proxies) res.outProgress = this.pout.progress.map((x) => ({ ...x, at: x.at - t0 }));
    const stats = { out: await stopProxy(this.pout), in: await stopProxy(this.pin) };
    this.pout = this.pin = null;
    res.linkBytes = link.txBytes(link.srcNs) - this.linkFrom.tx0;
    res.linkBytesReturn = link.txBytes(link.dstNs) - this.linkFrom.rx0;
    if (proxies) {
      res.proxies = stats;
      this.logVerified(stats.in);
    }
    res.ok = res.firstDestCounter > res.lastSourceCounter - 1 && res.lastSourceCounter >= 0;
    if (!res.ok) res.error = `destination counter ${res.firstDestCounter} does not continue source counter ${res.lastSourceCounter}`;
    this.log(`run ${this.runNo} ${this.mode}: total ${res.totalTimeMs} ms, end-to-end ${res.endToEndMs.toFixed(0)} ms, downtime ${res.downtimeMs} ms (observed ${res.observedDowntimeMs.toFixed(0)}), link ${(res.linkBytes / 1e6).toFixed(1)} MB, counter ${res.lastSourceCounter} -> ${res.firstDestCounter}`);
  }

  private async cleanup(): Promise<void> {
    const { dst, opts, res } = this;
    if (dst && opts.watchDestination) await opts.watchDestination.finished(dst, res).catch((e: Error) => this.log(`run ${this.runNo} ${this.mode}: destination watch: ${e.message}`));
    for (const p of [this.pout, this.pin]) if (p) { p.child.kill("SIGKILL"); await p.exited; }
    await this.src?.cleanup();
    await dst?.cleanup();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
