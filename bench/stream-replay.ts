// Stream mode's proxies against plain relays, per byte: a captured QEMU
// migration stream of the test guest is replayed through stream-out ->
// stream-in (TLS-PSK, no link limit) into a sink over loopback, and through
// two plain socket.pipe() relays in the same layout (plain TCP on both hops:
// the proxies' TLS is counted against them); the sink checks the output is
// the capture, byte for byte. Each process's CPU (user + system,
// from the first byte to its exit) per GB of QEMU's stream, and the proxies'
// over the relays'. Variants alternate within each round.
//
//   node dist/bench/stream-replay.js [--stream FILE --image DISK] [--rounds N] [--baseline PATH/dist/src/cli/main.js]
//     [--out-args="ARGS"] [--only relays,proxies,plain,baseline,out-args] [--cpu-prof DIR] [--json]
//
// The capture is made once (the guest migrated to `exec:cat > FILE`, 512 MiB)
// and kept in $PAGETWIN_CACHE/stream-replay/; --stream and --image replay any
// other guest's capture against its disk instead. Both the feed and the check
// read the capture from its file as they go, so a capture of any size replays
// in a few MB of memory. --baseline adds another build's
// proxies as a variant (before/after in one run), --out-args this build's
// stream-out with those arguments; --cpu-prof writes the
// proxies' CPU profiles (only this build's proxies run then).

import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { spawn, type ChildProcess } from "node:child_process";
import { freePort } from "../src/link/listen.js";
import { drained } from "../src/link/rate.js";
import { fileURLToPath, pathToFileURL } from "node:url";
import { QemuVm, QEMU_UNTHROTTLED, findGuest, type GuestImage } from "../src/adapters/qemu/vm.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { processCpuMs } from "../src/adapters/proc/cpu.js";
import { createKeyFile } from "../src/link/security.js";
import { median } from "../src/compare/stats.js";
import { parseArgs } from "node:util";
import { isMain } from "./cli.js";
import { QEVM_MAGIC } from "../src/stream/qemu-stream.js";

const MAIN_JS = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
const RELAY_JS = fileURLToPath(new URL("../src/compare/pipe-relay.js", import.meta.url));
const CPU_PRELOAD = pathToFileURL(fileURLToPath(new URL("./cpu-at-exit.js", import.meta.url))).href;
/** The test guest's RAM when no other size is asked for (--mem). */
const MEMORY_MIB = 512;

export interface ReplayOptions {
  rounds?: number;
  /** A capture of another guest's QEMU stream (`migrate "exec:cat > FILE"`) to replay instead of the test guest's; needs `image`. */
  stream?: string;
  /** The disk image (raw or qcow2) that `stream`'s guest ran on: its blocks are what pages are twins of. */
  image?: string;
  /** Another build's CLI (its dist/src/cli/main.js): its proxies become a variant too. */
  baseline?: string;
  /** More stream-out arguments to try as a variant of this build (e.g. ["--queue-ms", "100"]). */
  outArgs?: string[];
  /** Only these variants (relays, proxies, plain, baseline, out-args); default all that apply. */
  only?: string[];
  /** Directory for the proxies' --cpu-prof profiles. */
  cpuProf?: string;
  /** The test guest's RAM, MiB (default 512): its stream is captured once per size. */
  memoryMiB?: number;
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
  /** Where stream-out's time went in that replay, ms (its stats' busyMs, drainWaitMs, windowWaitMs). */
  streamOut: { busyMs: number; drainWaitMs: number; windowWaitMs: number } | null;
  /** Median CPU seconds per GB (1e9 bytes) of QEMU's stream, per variant and hop. */
  sPerGB: Record<string, { first: number; second: number }>;
  /** Each proxy variant over the relays: first hop, second hop. */
  ratios: Record<string, { first: number; second: number }>;
}

/** The cached capture of the guest's stream, made now if missing. */
export async function captureStream(guest: GuestImage, log: (m: string) => void, memoryMiB = MEMORY_MIB): Promise<string> {
  const cacheDir = path.dirname(path.dirname(guest.disk));
  const file = path.join(cacheDir, "stream-replay", `guest-${memoryMiB}.qemu-stream`);
  if (fs.existsSync(file)) return file;
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-replay-"));
  const tmp = `${file}.${process.pid}.tmp`;
  log(`capturing the guest's migration stream into ${file} (once)`);
  const vm = await QemuVm.start({
    ...guest, memoryMiB, memPath: `/dev/shm/pt-replay-${process.pid}`,
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

/** The capture's bytes at [pos, pos + n), read from its file into `into` (a short read past its end); `close`: closes fd after. */
function readAt(fd: number, into: Buffer, n: number, pos: number, close = false): Buffer {
  let got = 0;
  try {
    while (got < n) {
      const r = fs.readSync(fd, into, got, n - got, pos + got);
      if (r === 0) break;
      got += r;
    }
  } finally {
    if (close) fs.closeSync(fd);
  }
  return into.subarray(0, got);
}

/** Receives the replayed stream and checks it against the capture (read from its file) as it arrives. */
function sink(capture: Capture): Promise<{ port: number; done: Promise<void>; close(): void }> {
  let pos = 0;
  let bad = "";
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => { resolveDone = r; });
  const fd = fs.openSync(capture.file, "r");
  let want = Buffer.allocUnsafe(1 << 20);
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    s.on("data", (d: Buffer) => {
      if (want.length < d.length) want = Buffer.allocUnsafe(d.length);
      if (!bad && !d.equals(readAt(fd, want, d.length, pos))) bad = `the output differs from the capture within bytes ${pos}..${pos + d.length}`;
      pos += d.length;
    });
    s.on("end", () => { s.end(); resolveDone(); });
    s.on("error", () => {});
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({
    port: (server.address() as net.AddressInfo).port,
    done: done.then(() => {
      if (!bad && pos !== capture.bytes) bad = `the output has ${pos} bytes, the capture ${capture.bytes}`;
      if (bad) throw new Error(`bench: ${bad}`);
    }),
    close: () => { server.close(); fs.closeSync(fd); },
  })));
}

/** Writes the capture (from its file) as the source QEMU would, with backpressure. */
async function feed(port: number, capture: Capture): Promise<void> {
  const sock = net.connect(port, "127.0.0.1");
  await new Promise<void>((r, j) => { sock.once("connect", r); sock.once("error", j); });
  sock.on("error", () => {});
  sock.resume(); // the return path: nothing expected
  for await (const chunk of fs.createReadStream(capture.file, { highWaterMark: 1 << 20 })) {
    if (!sock.write(chunk as Buffer)) await drained(sock);
  }
  sock.end();
}

interface Capture { file: string; bytes: number }
interface Setup { capture: Capture; disk: string; index: string; key: string; cpuProf?: string }

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

/** The capture to replay and the disk its pages are twins of: the test guest's (captured now if missing), or the user's. */
async function source(o: ReplayOptions, log: (m: string) => void): Promise<{ capture: Capture; disk: string; what: string } | { skipped: string }> {
  if (o.stream || o.image) {
    if (o.memoryMiB !== undefined) throw new RangeError("bench: --mem sizes the test guest; a capture of your own (--stream) is the size it is");
    if (!o.stream || !o.image) throw new RangeError("bench: --stream FILE and --image DISK go together (the capture, and the disk its guest ran on)");
    for (const f of [o.stream, o.image]) if (!fs.statSync(f, { throwIfNoEntry: false })?.isFile()) throw new Error(`bench: ${f}: no such file`);
    const head = readAt(fs.openSync(o.stream, "r"), Buffer.alloc(4), 4, 0, true);
    if (head.length < 4 || head.readUInt32BE(0) !== QEVM_MAGIC) {
      throw new Error(`bench: ${o.stream} is not a QEMU migration stream (a capture starts with "QEVM"; this one with ${JSON.stringify(head.toString("latin1"))})`);
    }
    return { capture: { file: o.stream, bytes: fs.statSync(o.stream).size }, disk: o.image, what: `${path.basename(o.stream)} (against ${path.basename(o.image)})` };
  }
  const guest = o.guest ?? findGuest();
  if (!guest) return { skipped: "the guest is not built (scripts/build-guest.sh)" };
  const mem = o.memoryMiB ?? MEMORY_MIB;
  const file = await captureStream(guest, log, mem);
  return { capture: { file, bytes: fs.statSync(file).size }, disk: guest.disk, what: `the test guest's (${mem} MiB)` };
}

export async function benchStreamReplay(o: ReplayOptions = {}): Promise<ReplayResult | { skipped: string }> {
  const log = (m: string) => { if (!o.quiet) console.log(m); };
  const src = await source(o, (m) => { if (!o.quiet) process.stderr.write(`  ${m}\n`); });
  if ("skipped" in src) return src;
  if (src.capture.bytes === 0) throw new Error(`bench: ${src.capture.file} is empty`);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "pt-replay-"));
  try {
    const all: Variant[] = [
      { key: "relays", name: "relays", kind: "relays" },
      { key: "proxies", name: "proxies", kind: "proxies", cli: MAIN_JS },
      { key: "plain", name: "proxies --no-dedup --compress off", kind: "proxies", cli: MAIN_JS, extra: ["--no-dedup", "--compress", "off"] },
      ...(o.baseline ? [{ key: "baseline", name: "proxies (baseline build)", kind: "proxies" as const, cli: path.resolve(o.baseline) }] : []),
      ...(o.outArgs ? [{ key: "out-args", name: `proxies, stream-out ${o.outArgs.join(" ")}`, kind: "proxies" as const, cli: MAIN_JS, extra: o.outArgs }] : []),
    ];
    const only = o.cpuProf ? ["proxies"] : o.only; // profiling: this build's proxies alone
    const variants = only ? all.filter((v) => only.includes(v.key)) : all;
    if (!variants.length) throw new RangeError(`bench: --only ${only!.join(",")}: none of ${all.map((v) => v.key).join(", ")}`);
    const index = path.join(work, "index");
    (await openNasIndex(src.disk, { indexPath: index })).image.close();
    const s: Setup = { capture: src.capture, disk: src.disk, index, key: createKeyFile(path.join(work, "key")), ...(o.cpuProf ? { cpuProf: o.cpuProf } : {}) };
    log(`stream replay: ${(s.capture.bytes / 1e6).toFixed(1)} MB of QEMU stream, ${src.what}, loopback, no link limit; CPU s per GB of QEMU's stream (first hop: stream-out or relay A; second: stream-in or relay B)`);
    return await measure(variants, s, o.rounds ?? 3, log);
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

async function measure(variants: Variant[], s: Setup, rounds: number, log: (m: string) => void): Promise<ReplayResult> {
  const runs = new Map<string, Replay[]>(variants.map((v) => [v.name, []]));
  /** Each proxy variant's stream-out stats in its last replay. */
  const last = new Map<string, Record<string, unknown>>();
  for (let r = 0; r < rounds; r++) {
    // the order turns each round so that no variant always runs first
    for (let k = 0; k < variants.length; k++) {
      const v = variants[(k + r) % variants.length]!;
      const x = await replayOnce(v, s);
      if (x.stats) last.set(v.name, x.stats);
      runs.get(v.name)!.push(x);
      log(`  round ${r + 1} ${v.name.padEnd(34)} ${(x.first / 1000).toFixed(2)} + ${(x.second / 1000).toFixed(2)} s of CPU, ${x.wallMs.toFixed(0)} ms`);
    }
  }
  const gb = s.capture.bytes / 1e9;
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
  if (base && sPerGB["proxies"]) log(`  this build over the baseline build: stream-out ${(sPerGB["proxies"]!.first / base.first).toFixed(2)}x, stream-in ${(sPerGB["proxies"]!.second / base.second).toFixed(2)}x`);
  for (const [name, st] of last) {
    if (typeof st["twinsReplaced"] !== "number" || typeof st["bytesOutLink"] !== "number") continue;
    log(`  through the ${name}: ${st["twinsReplaced"]} pages travelled as references, ${(st["bytesOutLink"] / 1e6).toFixed(1)} MB on the link (${(st["bytesOutLink"] / s.capture.bytes).toFixed(3)} of QEMU's stream); output identical to the capture`);
  }
  const stats = last.get("proxies");
  const twinsReplaced = typeof stats?.["twinsReplaced"] === "number" ? stats["twinsReplaced"] : null;
  const linkBytes = typeof stats?.["bytesOutLink"] === "number" ? stats["bytesOutLink"] : null;
  const num = (k: string): number => (typeof stats?.[k] === "number" ? stats[k] as number : 0);
  const times = stats ? { busyMs: num("busyMs"), drainWaitMs: num("drainWaitMs"), windowWaitMs: num("windowWaitMs") } : null;
  if (times) log(`  stream-out in its last replay: busy ${times.busyMs.toFixed(0)} ms, waiting for stream-in ${times.drainWaitMs.toFixed(0)} ms, for the replay window ${times.windowWaitMs.toFixed(0)} ms`);
  return {
    streamBytes: s.capture.bytes, sPerGB, ratios, twinsReplaced, linkBytes, streamOut: times,
    compression: (stats?.["compression"] as Record<string, unknown> | undefined) ?? null,
  };
}

const USAGE = `node dist/bench/stream-replay.js [options]: a captured QEMU migration stream replayed through stream-out -> stream-in
(TLS-PSK, loopback, no link limit) and through two plain socket.pipe() relays, alternating; the output is checked
byte for byte against the capture; prints each process's CPU per GB of QEMU's stream and the proxies' over the relays'
  --stream FILE     a capture of your guest's stream (default: the test guest's, captured once into .cache/stream-replay/):
                    QMP {"execute":"migrate","arguments":{"uri":"exec:cat > FILE"}} on the running guest (it stays paused
                    after: "cont" resumes it); needs --image
  --image DISK      the disk image (raw or qcow2) that guest ran on; its block index is built in a temporary directory
  --mem MIB         the test guest's RAM (default 512): a bigger guest's stream holds more zero pages and more pages
                    sent in full; captured once per size (needs MIB of free RAM, and QEMU, the first time)
  --rounds N        rounds of every variant (medians; default 3)
  --only LIST       variants, comma-separated: relays, proxies, plain (proxies --no-dedup --compress off), baseline, out-args
  --baseline MAIN   another build's dist/src/cli/main.js: its proxies as a variant (before and after in one run)
  --out-args="ARGS" this build's stream-out with more arguments as a variant (e.g. --out-args="--queue-ms 100")
  --cpu-prof DIR    the proxies' CPU profiles (this build's proxies alone)
  --json            the result as one JSON object
  --help            this text`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      stream: { type: "string" }, image: { type: "string" }, mem: { type: "string" }, rounds: { type: "string", default: "3" }, only: { type: "string" },
      baseline: { type: "string" }, "out-args": { type: "string" }, "cpu-prof": { type: "string" }, json: { type: "boolean" }, help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const rounds = Number(values.rounds);
  if (!Number.isInteger(rounds) || rounds < 1) throw new RangeError(`bench: --rounds ${values.rounds}: a whole number of at least 1`);
  const mem = values.mem === undefined ? undefined : Number(values.mem);
  if (mem !== undefined && !(Number.isInteger(mem) && mem >= 64)) throw new RangeError(`bench: --mem ${values.mem}: a whole number of MiB, at least 64`);
  const r = await benchStreamReplay({
    rounds, quiet: !!values.json, ...(mem !== undefined ? { memoryMiB: mem } : {}),
    ...(values.stream ? { stream: values.stream } : {}), ...(values.image ? { image: values.image } : {}),
    ...(values.baseline ? { baseline: values.baseline } : {}), ...(values["out-args"] ? { outArgs: values["out-args"].split(" ") } : {}),
    ...(values.only ? { only: values.only.split(",") } : {}), ...(values["cpu-prof"] ? { cpuProf: path.resolve(values["cpu-prof"]) } : {}),
  });
  if (values.json) console.log(JSON.stringify(r));
}

if (isMain(import.meta.url)) {
  await main().catch((err: Error) => {
    // usage errors (RangeError, parseArgs' TypeError) exit 2, failures of the replay 1
    process.stderr.write(`${err.message}\n`);
    process.exit(err instanceof RangeError || (err as { code?: string }).code?.startsWith("ERR_PARSE_ARGS") ? 2 : 1);
  });
}
