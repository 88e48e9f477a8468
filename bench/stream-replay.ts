// Stream mode's proxies against plain relays, per byte: a captured QEMU
// migration stream of the test guest is replayed through stream-out ->
// stream-in (TLS-PSK, no link limit) into a sink over loopback, and through
// two plain socket.pipe() relays in the same layout (plain TCP on both hops:
// the proxies' TLS is counted against them); the sink checks the output is
// the capture, byte for byte. Each process's CPU (user + system,
// from the first byte to its exit) per GB of QEMU's stream, and the proxies'
// over the relays'. Variants alternate within each round.
//
//   node dist/bench/stream-replay.js [--rounds N] [--baseline PATH/dist/src/cli/main.js] [--out-args "ARGS"]
//     [--only relays,proxies,plain,baseline,out-args] [--cpu-prof DIR] [--json]
//
// The capture is made once (the guest migrated to `exec:cat > FILE`, 512 MiB)
// and kept in $PAGETWIN_CACHE/stream-replay/. --baseline adds another build's
// proxies as a variant (before/after in one run), --out-args this build's
// stream-out with those arguments; --cpu-prof writes the
// proxies' CPU profiles (only this build's proxies run then).

import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { spawn, type ChildProcess } from "node:child_process";
import { freePort } from "../src/link/listen.js";
import { fileURLToPath, pathToFileURL } from "node:url";
import { QemuVm, QEMU_UNTHROTTLED, findGuest, type GuestImage } from "../src/adapters/qemu/vm.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { processCpuMs } from "../src/adapters/proc/cpu.js";
import { createKeyFile } from "../src/link/security.js";
import { median } from "../src/compare/stats.js";
import { argString, argValue, isMain } from "./cli.js";

const MAIN_JS = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
const RELAY_JS = fileURLToPath(new URL("../src/compare/pipe-relay.js", import.meta.url));
const CPU_PRELOAD = pathToFileURL(fileURLToPath(new URL("./cpu-at-exit.js", import.meta.url))).href;
const MEMORY_MIB = 512;

export interface ReplayOptions {
  rounds?: number;
  /** Another build's CLI (its dist/src/cli/main.js): its proxies become a variant too. */
  baseline?: string;
  /** More stream-out arguments to try as a variant of this build (e.g. ["--queue-ms", "100"]). */
  outArgs?: string[];
  /** Only these variants (relays, proxies, plain, baseline, out-args); default all that apply. */
  only?: string[];
  /** Directory for the proxies' --cpu-prof profiles. */
  cpuProf?: string;
  guest?: GuestImage;
  quiet?: boolean;
}

interface Variant { key: string; name: string; kind: "proxies" | "relays"; cli?: string; extra?: string[] }

/** CPU ms of the first and second hop (stream-out / relay A, stream-in / relay B) in one replay. */
interface Replay { first: number; second: number; wallMs: number }

export interface ReplayResult {
  streamBytes: number;
  twinsReplaced: number | null;
  linkBytes: number | null;
  /** stream-out's compression record in the last replay through this build's proxies (frames compressed or raw, and why). */
  compression: Record<string, unknown> | null;
  /** Median CPU seconds per GB (1e9 bytes) of QEMU's stream, per variant and hop. */
  sPerGB: Record<string, { first: number; second: number }>;
  /** Each proxy variant over the relays: first hop, second hop. */
  ratios: Record<string, { first: number; second: number }>;
}

/** The cached capture of the guest's stream, made now if missing. */
export async function captureStream(guest: GuestImage, log: (m: string) => void): Promise<string> {
  const cacheDir = path.dirname(path.dirname(guest.disk));
  const file = path.join(cacheDir, "stream-replay", `guest-${MEMORY_MIB}.qemu-stream`);
  if (fs.existsSync(file)) return file;
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-replay-"));
  const tmp = `${file}.${process.pid}.tmp`;
  log(`capturing the guest's migration stream into ${file} (once)`);
  const vm = await QemuVm.start({
    ...guest, memoryMiB: MEMORY_MIB, memPath: `/dev/shm/pt-replay-${process.pid}`,
    qmpSocket: path.join(work, "qmp"), serialLog: path.join(work, "serial.log"), name: "pt-replay",
  });
  try {
    await vm.waitForSerial(/pagetwin-ready/, 240_000);
    const m = await vm.waitForSerial(/pagetwin-counter (\d+)/, 30_000);
    await vm.waitForSerial(new RegExp(`pagetwin-counter ${Number(m[1]) + 2}\\b`), 60_000);
    await vm.qmp.execute("migrate-set-parameters", { "max-bandwidth": QEMU_UNTHROTTLED });
    await vm.qmp.execute("migrate", { uri: `exec:cat > ${tmp}` });
    for (;;) {
      const s = await vm.qmp.execute<{ status: string; "error-desc"?: string }>("query-migrate");
      if (s.status === "completed") break;
      if (s.status === "failed" || s.status === "cancelled") throw new Error(`capture migration ${s.status}: ${s["error-desc"] ?? ""}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    fs.renameSync(tmp, file);
  } finally {
    await vm.cleanup();
    fs.rmSync(tmp, { force: true });
    fs.rmSync(work, { recursive: true, force: true });
  }
  return file;
}

/** A measured child: its CPU at the start of the replay, and what it printed. */
class Child {
  readonly proc: ChildProcess;
  out = "";
  err = "";
  readonly exited: Promise<number | null>;
  private startMs = NaN;

  constructor(args: string[]) {
    this.proc = spawn(process.execPath, ["--import", CPU_PRELOAD, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    this.proc.stdout!.on("data", (d: Buffer) => { this.out += d.toString(); });
    this.proc.stderr!.on("data", (d: Buffer) => { this.err += d.toString(); });
    this.exited = new Promise((r) => this.proc.once("exit", (c) => r(c)));
  }

  async listening(): Promise<void> {
    const t0 = Date.now();
    while (!/listening on/.test(this.err)) {
      if (this.proc.exitCode !== null || Date.now() - t0 > 60_000) throw new Error(`bench: ${this.proc.spawnargs.slice(3, 5).join(" ")} did not start: ${this.err}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  markStart(): void {
    this.startMs = processCpuMs(this.proc.pid!);
  }

  /** CPU ms from markStart() to the exit. */
  async cpuMs(): Promise<number> {
    await this.exited;
    const m = /pagetwin-bench-cpu (\{.*\})/.exec(this.err);
    if (!m) throw new Error(`bench: no CPU line from ${this.proc.spawnargs.slice(3, 5).join(" ")}: ${this.err.slice(-500)}`);
    const u = JSON.parse(m[1]!) as { user: number; system: number };
    return (u.user + u.system) / 1000 - this.startMs;
  }

  kill(): void {
    if (this.proc.exitCode === null) this.proc.kill("SIGKILL");
  }
}

/** Receives the replayed stream and checks it against the capture as it arrives. */
function sink(capture: Buffer): Promise<{ port: number; done: Promise<void>; close(): void }> {
  let pos = 0;
  let bad = "";
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => { resolveDone = r; });
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    s.on("data", (d: Buffer) => {
      if (!bad && !d.equals(capture.subarray(pos, pos + d.length))) bad = `the output differs from the capture within bytes ${pos}..${pos + d.length}`;
      pos += d.length;
    });
    s.on("end", () => { s.end(); resolveDone(); });
    s.on("error", () => {});
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({
    port: (server.address() as net.AddressInfo).port,
    done: done.then(() => {
      if (!bad && pos !== capture.length) bad = `the output has ${pos} bytes, the capture ${capture.length}`;
      if (bad) throw new Error(`bench: ${bad}`);
    }),
    close: () => server.close(),
  })));
}

/** Writes the capture as the source QEMU would, with backpressure. */
async function feed(port: number, capture: Buffer): Promise<void> {
  const sock = net.connect(port, "127.0.0.1");
  await new Promise<void>((r, j) => { sock.once("connect", r); sock.once("error", j); });
  sock.on("error", () => {});
  sock.resume(); // the return path: nothing expected
  const step = 1 << 20;
  for (let i = 0; i < capture.length; i += step) {
    if (!sock.write(capture.subarray(i, i + step))) await new Promise((r) => sock.once("drain", r));
  }
  sock.end();
}

interface Setup { capture: Buffer; disk: string; index: string; key: string; cpuProf?: string }

function hops(v: Variant, s: Setup, ports: { first: number; second: number; sink: number }): [string[], string[]] {
  if (v.kind === "relays") return [[RELAY_JS, String(ports.first), String(ports.second)], [RELAY_JS, String(ports.second), String(ports.sink)]];
  const prof = s.cpuProf ? ["--cpu-prof", "--cpu-prof-dir", s.cpuProf] : [];
  const common = ["--image", s.disk, "--index", s.index, "--psk-file", s.key, "--json"];
  return [
    [...prof, v.cli!, "stream-out", "--listen", `127.0.0.1:${ports.first}`, "--to", `127.0.0.1:${ports.second}`, ...common, ...(v.extra ?? [])],
    [...prof, v.cli!, "stream-in", "--listen", `127.0.0.1:${ports.second}`, "--qemu", `127.0.0.1:${ports.sink}`, ...common],
  ];
}

/** One replay of the capture through a variant's two hops. */
async function replayOnce(v: Variant, s: Setup): Promise<Replay & { stats?: Record<string, unknown> }> {
  const out = await sink(s.capture);
  const ports = { first: await freePort(), second: await freePort(), sink: out.port };
  const [a, b] = hops(v, s, ports);
  const second = new Child(b);
  const first = new Child(a);
  try {
    await second.listening();
    await first.listening();
    first.markStart();
    second.markStart();
    const t0 = performance.now();
    await feed(ports.first, s.capture);
    await out.done;
    const [c1, c2] = [await first.cpuMs(), await second.cpuMs()];
    const wallMs = performance.now() - t0;
    if (v.kind === "relays") return { first: c1, second: c2, wallMs };
    const stats = JSON.parse(first.out.trim().split("\n").pop()!) as Record<string, unknown>;
    if (stats["verdict"] !== "verified") throw new Error(`bench: stream-out's verdict: ${String(stats["verdict"])}`);
    return { first: c1, second: c2, wallMs, stats };
  } finally {
    first.kill();
    second.kill();
    out.close();
  }
}

export async function benchStreamReplay(o: ReplayOptions = {}): Promise<ReplayResult | { skipped: string }> {
  const log = (m: string) => { if (!o.quiet) console.log(m); };
  const guest = o.guest ?? findGuest();
  if (!guest) return { skipped: "the guest is not built (scripts/build-guest.sh)" };
  const file = await captureStream(guest, (m) => { if (!o.quiet) process.stderr.write(`  ${m}\n`); });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-replay-"));
  try {
    const index = path.join(work, "index");
    (await openNasIndex(guest.disk, { indexPath: index })).image.close();
    const s: Setup = { capture: fs.readFileSync(file), disk: guest.disk, index, key: createKeyFile(path.join(work, "key")), ...(o.cpuProf ? { cpuProf: o.cpuProf } : {}) };
    const all: Variant[] = [
      { key: "relays", name: "relays", kind: "relays" },
      { key: "proxies", name: "proxies", kind: "proxies", cli: MAIN_JS },
      { key: "plain", name: "proxies --no-dedup --compress off", kind: "proxies", cli: MAIN_JS, extra: ["--no-dedup", "--compress", "off"] },
      ...(o.baseline ? [{ key: "baseline", name: "proxies (baseline build)", kind: "proxies" as const, cli: path.resolve(o.baseline) }] : []),
      ...(o.outArgs ? [{ key: "out-args", name: `proxies, stream-out ${o.outArgs.join(" ")}`, kind: "proxies" as const, cli: MAIN_JS, extra: o.outArgs }] : []),
    ];
    const only = o.cpuProf ? ["proxies"] : o.only; // profiling: this build's proxies alone
    const variants = only ? all.filter((v) => only.includes(v.key)) : all;
    log(`stream replay: ${(s.capture.length / 1e6).toFixed(1)} MB of the guest's QEMU stream (${MEMORY_MIB} MiB guest), loopback, no link limit; CPU s per GB of QEMU's stream (first hop: stream-out or relay A; second: stream-in or relay B)`);
    return await measure(variants, s, o.rounds ?? 3, log);
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

async function measure(variants: Variant[], s: Setup, rounds: number, log: (m: string) => void): Promise<ReplayResult> {
  const runs = new Map<string, Replay[]>(variants.map((v) => [v.name, []]));
  let stats: Record<string, unknown> | undefined;
  for (let r = 0; r < rounds; r++) {
    // the order turns each round so that no variant always runs first
    for (let k = 0; k < variants.length; k++) {
      const v = variants[(k + r) % variants.length]!;
      const x = await replayOnce(v, s);
      if (v.name === "proxies") stats = x.stats;
      runs.get(v.name)!.push(x);
      log(`  round ${r + 1} ${v.name.padEnd(34)} ${(x.first / 1000).toFixed(2)} + ${(x.second / 1000).toFixed(2)} s of CPU, ${x.wallMs.toFixed(0)} ms`);
    }
  }
  const gb = s.capture.length / 1e9;
  const sPerGB: ReplayResult["sPerGB"] = {};
  for (const [name, xs] of runs) sPerGB[name] = { first: median(xs.map((x) => x.first)) / 1000 / gb, second: median(xs.map((x) => x.second)) / 1000 / gb };
  const relay = sPerGB["relays"];
  const ratios: ReplayResult["ratios"] = {};
  if (relay) for (const [name, v] of Object.entries(sPerGB)) if (name !== "relays") ratios[name] = { first: v.first / relay.first, second: v.second / relay.second };
  log(`  medians, s of CPU per GB of QEMU's stream (first hop / second hop), and over the relays':`);
  for (const [name, v] of Object.entries(sPerGB)) {
    const x = ratios[name];
    log(`    ${name.padEnd(34)} ${v.first.toFixed(2)} / ${v.second.toFixed(2)}${x ? `   ${x.first.toFixed(2)}x / ${x.second.toFixed(2)}x` : ""}`);
  }
  const base = sPerGB["proxies (baseline build)"];
  if (base) log(`  this build over the baseline build: stream-out ${(sPerGB["proxies"]!.first / base.first).toFixed(2)}x, stream-in ${(sPerGB["proxies"]!.second / base.second).toFixed(2)}x`);
  return {
    streamBytes: s.capture.length, sPerGB, ratios,
    twinsReplaced: typeof stats?.["twinsReplaced"] === "number" ? stats["twinsReplaced"] : null,
    linkBytes: typeof stats?.["bytesOutLink"] === "number" ? stats["bytesOutLink"] : null,
    compression: (stats?.["compression"] as Record<string, unknown> | undefined) ?? null,
  };
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const baseline = argString(args, "--baseline");
  const cpuProf = argString(args, "--cpu-prof");
  // its value starts with "--", which argString() takes for the next flag
  const outArgs = args.includes("--out-args") ? args[args.indexOf("--out-args") + 1] : undefined;
  const only = argString(args, "--only");
  const r = await benchStreamReplay({
    rounds: argValue(args, "--rounds") ?? 3, quiet: args.includes("--json"),
    ...(baseline ? { baseline } : {}), ...(outArgs ? { outArgs: outArgs.split(" ") } : {}), ...(only ? { only: only.split(",") } : {}), ...(cpuProf ? { cpuProf: path.resolve(cpuProf) } : {}),
  });
  if (args.includes("--json")) console.log(JSON.stringify(r));
}
