// `node dist/bench/multifd.js [--capture FILE] [--image IMAGE] [--runs N] [--layouts plain,1,2,4]
//    [--workers 0,2] [--baseline PATH/dist/src/cli/main.js] [--cpu-prof DIR]`:
// stream mode's cost with QEMU's multifd against one channel, on a real
// guest's pages. The capture (a guest's stream, `migrate "exec:cat > FILE"`)
// is replayed through stream-out and stream-in (the CLI, as child processes,
// TLS-PSK over loopback) into a sink, as:
//   plain:  the capture as it is, one connection;
//   N:      a main channel (the capture with each page record dropped, or made
//           a ZERO record where it names its RAM block) and N multifd channels
//           (compression none) carrying the same pages in packets of 128,
//           dealt round robin as QEMU deals them.
// Layouts (and, with --baseline, another build's proxies; with --workers,
// both proxies with that many worker threads) alternate run by run. Printed: bytes on the link per byte of QEMU's stream, and each
// proxy's CPU per GB of QEMU's stream (medians). --cpu-prof writes the
// proxies' CPU profiles there.

import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { QemuStreamParser, RAM_FLAG, type PagePiece } from "../src/stream/qemu-stream.js";
import { encodeInit, encodePacket, MULTIFD_FLAG, MULTIFD_PAGES_ALLOC } from "../src/stream/multifd-format.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { CpuMeter } from "../src/adapters/proc/cpu.js";
import { findGuest } from "../src/adapters/qemu/vm.js";
import type { StreamStats } from "../src/stream/stats.js";
import { freePort } from "../src/link/listen.js";
import { drained } from "../src/link/rate.js";
import { median } from "../src/compare/stats.js";
import { argString, argValue, benchArgs, isMain } from "./cli.js";

const MAIN_JS = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

/** The capture split into a main channel and `n` multifd channels carrying its pages. */
function multifdLayout(capture: Buffer, n: number): Buffer[] {
  const parser = new QemuStreamParser();
  const main: Buffer[] = [];
  const pages: PagePiece[] = [];
  for (let i = 0; i < capture.length; i += 1 << 20) {
    for (const p of parser.push(capture.subarray(i, i + (1 << 20)))) {
      if (p.kind === "raw") { main.push(p.data); continue; }
      pages.push(p);
      if (p.header[7]! & RAM_FLAG.CONTINUE) continue;
      // the record names its block for the records after it: keep it, as a ZERO record
      const h = Buffer.from(p.header);
      h[7] = (h[7]! & ~RAM_FLAG.PAGE) | RAM_FLAG.ZERO;
      main.push(h, Buffer.alloc(1));
    }
  }
  parser.finish();
  const channels: Buffer[][] = Array.from({ length: n }, (_, id) => [encodeInit({ uuid: Buffer.alloc(16), channel: id })]);
  const sync = (c: number) => encodePacket({ flags: MULTIFD_FLAG.SYNC, pagesAlloc: MULTIFD_PAGES_ALLOC, pagesUsed: 0, ramblock: "", offsets: Array(MULTIFD_PAGES_ALLOC).fill(0n), packetNum: BigInt(c) });
  channels.forEach((ch, c) => ch.push(sync(c)));
  let packet = 0;
  for (let i = 0; i < pages.length;) {
    const block = pages[i]!.block;
    let j = i;
    while (j < pages.length && j - i < MULTIFD_PAGES_ALLOC && pages[j]!.block === block) j++;
    const offsets = Array.from({ length: MULTIFD_PAGES_ALLOC }, (_, k) => BigInt(i + k < j ? pages[i + k]!.offset : 0));
    const ch = channels[packet % n]!;
    ch.push(encodePacket({ flags: 0, pagesAlloc: MULTIFD_PAGES_ALLOC, pagesUsed: j - i, ramblock: block, offsets, packetNum: BigInt(packet++) }));
    for (let k = i; k < j; k++) ch.push(pages[k]!.data);
    i = j;
  }
  channels.forEach((ch, c) => ch.push(sync(c)));
  return [Buffer.concat(main), ...channels.map((ch) => Buffer.concat(ch))];
}

interface Proxy { child: ChildProcess; out: string; err: string; exited: Promise<number | null> }

function startProxy(cli: string, args: string[], nodeArgs: string[]): Promise<Proxy> {
  const child = spawn(process.execPath, [...nodeArgs, cli, ...args, "--json"], { stdio: ["ignore", "pipe", "pipe"] });
  const p: Proxy = { child, out: "", err: "", exited: new Promise((r) => child.once("exit", (c) => r(c))) };
  child.stdout!.on("data", (d: Buffer) => { p.out += d.toString(); });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { child.kill(); reject(new Error(`${args[0]} did not start listening: ${p.err}`)); }, 60_000);
    child.stderr!.on("data", (d: Buffer) => {
      p.err += d.toString();
      if (/listening on/.test(p.err)) { clearTimeout(t); resolve(p); }
    });
    void p.exited.then((c) => { clearTimeout(t); reject(new Error(`${args[0]} exited (${c}) before listening: ${p.err}`)); });
  });
}

/** Stops a --keep proxy; its stats are the last line it prints. */
async function stats(p: Proxy): Promise<StreamStats> {
  p.child.kill("SIGTERM");
  await p.exited;
  return JSON.parse(p.out.trim().split("\n").pop()!) as StreamStats;
}

/**
 * Writes each connection's bytes to stream-out (the main channel first, as
 * QEMU connects it); resolves when stream-out has closed every one (after
 * stream-in's verdict on it).
 */
async function feed(port: number, conns: Buffer[]): Promise<void> {
  const socks = [];
  for (const data of conns) {
    const q = net.connect(port, "127.0.0.1");
    q.on("error", () => {});
    q.on("data", () => {});
    const closed = new Promise((r) => q.once("close", r));
    await new Promise<void>((r) => q.once("connect", r));
    socks.push((async () => {
      for (let i = 0; i < data.length; i += 1 << 20) {
        if (!q.write(data.subarray(i, i + (1 << 20)))) await drained(q);
      }
      q.end();
      await closed;
    })());
  }
  await Promise.all(socks);
}

export interface MultifdRow { build: string; layout: string; streamBytes: number; linkBytes: number; outCpuMs: number; inCpuMs: number; wallMs: number; twins: number; verified: boolean }

interface Build { name: string; cli: string; args: string[] }
interface RunOptions { image: string; index: string; key: string; nodeArgs: string[] }

async function runOnce(build: Build, layout: string, conns: Buffer[], o: RunOptions): Promise<MultifdRow> {
  const sinkSrv = net.createServer({ allowHalfOpen: true }, (s) => { s.on("data", () => {}); s.on("end", () => s.end()); s.on("error", () => {}); });
  await new Promise<void>((r) => sinkSrv.listen(0, "127.0.0.1", r));
  const [inPort, outPort] = [await freePort(), await freePort()];
  const common = ["--image", o.image, "--index", o.index, "--psk-file", o.key, "--keep"];
  let pin: Proxy | null = null, pout: Proxy | null = null;
  try {
    pin = await startProxy(build.cli, ["stream-in", "--listen", `127.0.0.1:${inPort}`, "--qemu", `127.0.0.1:${(sinkSrv.address() as net.AddressInfo).port}`, ...common, ...build.args], o.nodeArgs);
    pout = await startProxy(build.cli, ["stream-out", "--listen", `127.0.0.1:${outPort}`, "--to", `127.0.0.1:${inPort}`, ...common, ...build.args], o.nodeArgs);
    const cpu = new CpuMeter();
    cpu.start({ out: pout.child.pid, in: pin.child.pid });
    const t0 = performance.now();
    await feed(outPort, conns);
    const wallMs = performance.now() - t0;
    const ms = cpu.stop(); // before they exit: /proc forgets a process once it is reaped
    const [so] = await Promise.all([stats(pout), stats(pin)]);
    return {
      build: build.name, layout, streamBytes: so.bytesFromQemu, linkBytes: so.bytesOutLink, outCpuMs: ms["out"]!, inCpuMs: ms["in"]!, wallMs,
      twins: so.twinsReplaced,
      // stream-in's verdict on every connection (the `verdict` field is only updated once a session's socket is gone: SIGTERM may come first)
      verified: so.streamsFailed === 0 && so.streamsVerified === conns.length,
    };
  } finally {
    for (const p of [pout, pin]) if (p && p.child.exitCode === null) p.child.kill();
    sinkSrv.close();
  }
}

function layoutName(l: string): string {
  return l === "plain" ? "one channel (no multifd)" : `multifd, ${l} channel${l === "1" ? "" : "s"}`;
}

/** Medians of one build's runs of one layout (CPU and wall s per GB of QEMU's stream). */
export interface MultifdMedian { build: string; layout: string; streamBytes: number; linkPerStream: number; outSPerGB: number; inSPerGB: number; wallSPerGB: number; verified: boolean }

function medians(rows: MultifdRow[], builds: Build[], layouts: string[]): MultifdMedian[] {
  const out: MultifdMedian[] = [];
  const gb = (x: MultifdRow) => x.streamBytes / 1e9;
  for (const l of layouts) {
    for (const b of builds) {
      const rs = rows.filter((x) => x.layout === l && x.build === b.name);
      out.push({
        build: b.name, layout: l, streamBytes: median(rs.map((x) => x.streamBytes)), linkPerStream: median(rs.map((x) => x.linkBytes / x.streamBytes)),
        outSPerGB: median(rs.map((x) => x.outCpuMs / 1000 / gb(x))), inSPerGB: median(rs.map((x) => x.inCpuMs / 1000 / gb(x))),
        wallSPerGB: median(rs.map((x) => x.wallMs / 1000 / gb(x))), verified: rs.every((x) => x.verified),
      });
    }
  }
  return out;
}

/** The medians as a Markdown table. */
function table(ms: MultifdMedian[], many: boolean): string {
  const lines = [`| ${many ? "build | " : ""}layout | QEMU stream | link / stream | stream-out CPU s/GB | stream-in CPU s/GB | wall s/GB | all verified |`, `|${many ? "---|" : ""}---|---|---|---|---|---|---|`];
  for (const m of ms) {
    lines.push(`| ${many ? `${m.build} | ` : ""}${layoutName(m.layout)} | ${(m.streamBytes / 1e6).toFixed(1)} MB | ${m.linkPerStream.toFixed(3)} | ` +
      `${m.outSPerGB.toFixed(2)} | ${m.inSPerGB.toFixed(2)} | ${m.wallSPerGB.toFixed(2)} | ${m.verified} |`);
  }
  return lines.join("\n");
}

export interface MultifdOptions {
  /** A captured stream (default: stream-replay's capture in the cache) and its disk image (default: the guest's). */
  capture?: string;
  image?: string;
  runs?: number;
  layouts?: string[];
  /** Another build's dist/src/cli/main.js, alternated with this one. */
  baseline?: string;
  /** Both proxies' --workers, each value a build of its own (default [0]). */
  workers?: number[];
  cpuProf?: string;
  quiet?: boolean;
}

export async function benchMultifd(o: MultifdOptions = {}): Promise<{ rows: MultifdRow[]; medians: MultifdMedian[] } | { skipped: string }> {
  const log = (m: string) => { if (!o.quiet) console.log(m); };
  const capturePath = o.capture ?? path.join(process.env["PAGETWIN_CACHE"] ?? ".cache", "stream-replay", "guest-512.qemu-stream");
  const image = o.image ?? findGuest()?.disk;
  const runs = o.runs ?? 3;
  const layouts = o.layouts ?? ["plain", "1", "2", "4"];
  const builds: Build[] = [
    ...(o.workers ?? [0]).map((w) => ({ name: w ? `${w} workers` : "this build", cli: MAIN_JS, args: w ? ["--workers", String(w)] : [] })),
    ...(o.baseline ? [{ name: "baseline", cli: path.resolve(o.baseline), args: [] }] : []),
  ];
  if (!fs.existsSync(capturePath) || !image) {
    return { skipped: `needs a captured stream (--capture FILE; a guest's "migrate exec:cat > FILE", or stream-replay's) and its disk image (--image); have ${capturePath} ${image ?? "(no image)"}` };
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-bench-multifd-"));
  try {
    const index = path.join(dir, "disk.pagetwin-index");
    (await openNasIndex(image, { indexPath: index })).image.close(); // built once, outside the timed runs
    const key = path.join(dir, "link.key");
    fs.writeFileSync(key, Buffer.from(Array.from({ length: 32 }, (_, i) => (i * 37 + 11) & 0xff)), { mode: 0o600 });
    const capture = fs.readFileSync(capturePath);
    const data = new Map(layouts.map((l) => [l, l === "plain" ? [capture] : multifdLayout(capture, Number(l))]));
    const opts: RunOptions = { image, index, key, nodeArgs: o.cpuProf ? ["--cpu-prof", "--cpu-prof-dir", path.resolve(o.cpuProf)] : [] };
    log(`multifd bench: ${capturePath} (${(capture.length / 1e6).toFixed(1)} MB), ${runs} runs of ${layouts.join(", ")} x (${builds.map((b) => b.name).join(", ")}) alternating, ` +
      `${os.cpus().length} cores, load ${os.loadavg()[0]!.toFixed(2)}`);
    const rows: MultifdRow[] = [];
    for (let r = 0; r < runs; r++) {
      for (const l of layouts) {
        // which build goes first alternates too
        for (const b of r % 2 ? [...builds].reverse() : builds) {
          const row = await runOnce(b, l, data.get(l)!, opts);
          rows.push(row);
          log(`  run ${r + 1} ${b.name.padEnd(10)} ${l.padEnd(5)}: link ${(row.linkBytes / row.streamBytes).toFixed(3)}x of ${(row.streamBytes / 1e6).toFixed(1)} MB, ` +
            `stream-out ${row.outCpuMs.toFixed(0)} ms, stream-in ${row.inCpuMs.toFixed(0)} ms CPU, ${row.wallMs.toFixed(0)} ms, ${row.twins} twins, verified ${row.verified}`);
        }
      }
    }
    const ms = medians(rows, builds, layouts);
    log("\n" + table(ms, builds.length > 1));
    return { rows, medians: ms };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/multifd.js [--capture FILE --image IMAGE] [--runs N] [--layouts plain,1,2,4] [--workers 0,2]\n  [--baseline PATH/dist/src/cli/main.js] [--cpu-prof DIR]: stream mode with QEMU's multifd against one channel, on a\n  captured guest stream (default: the test guest's), alternating layouts (and builds); CPU per GB of each proxy", ["--capture", "--image", "--runs", "--layouts", "--workers", "--baseline", "--cpu-prof"]);
  const layouts = argString(args, "--layouts")?.split(",");
  const workers = argString(args, "--workers")?.split(",").map(Number);
  const r = await benchMultifd({
    runs: argValue(args, "--runs") ?? 3,
    ...(layouts ? { layouts } : {}), ...(workers ? { workers } : {}),
    ...optional("capture", argString(args, "--capture")), ...optional("image", argString(args, "--image")),
    ...optional("baseline", argString(args, "--baseline")), ...optional("cpuProf", argString(args, "--cpu-prof")),
  });
  if ("skipped" in r) throw new Error(`bench/multifd: ${r.skipped}`);
}

function optional<K extends string>(k: K, v: string | undefined): Partial<Record<K, string>> {
  return v === undefined ? {} : ({ [k]: v } as Record<K, string>);
}
