// The secure channel against plain sockets over loopback, through pagetwin's
// own dial() and Listener: the sender writes N MiB of random pages in 1 MiB
// writes with backpressure, the receiver counts them and answers one byte at
// the end; the time runs from the first write (handshake over) to that answer.
//
//   node dist/bench/channel.js [--mib N] [--rounds N] [--json]
//
// Variants: TCP plain, TCP TLS-PSK, TCP TLS 1.3 (mutual certificates), unix
// socket plain, unix socket TLS-PSK. Two figures: both ends in this process
// (one event loop carries both), and the receiver in a child process (as the
// two agents run). Variants alternate within each round after one warm-up
// run each; MB/s = 1e6 bytes per second.

import os from "node:os";
import { once } from "node:events";
import { fork, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Socket } from "node:net";
import { dial } from "../src/link/dial.js";
import { Listener } from "../src/link/listen.js";
import type { Endpoint } from "../src/link/endpoint.js";
import type { Security } from "../src/link/security.js";
import { makeCerts } from "../test/helpers/certs.js";
import { argValue, benchArgs, isMain } from "./cli.js";

const WRITE = 1 << 20;
const GOAL = 0.8;

interface Variant { name: string; transport: "tcp" | "unix"; security: "plain" | "psk" | "tls" }
const VARIANTS: Variant[] = [
  { name: "tcp plain", transport: "tcp", security: "plain" },
  { name: "tcp TLS-PSK", transport: "tcp", security: "psk" },
  { name: "tcp TLS 1.3 certs", transport: "tcp", security: "tls" },
  { name: "unix plain", transport: "unix", security: "plain" },
  { name: "unix TLS-PSK", transport: "unix", security: "psk" },
];
type Mode = "oneProcess" | "twoProcesses";
const MODES: Mode[] = ["oneProcess", "twoProcesses"];

export interface ChannelRow extends Variant {
  mbps: number[];
  min: number;
  median: number;
  max: number;
  /** Median / the median of plain on the same transport and mode. */
  vsPlain: number;
  handshakeMs: number;
}

export interface ChannelBenchResult {
  bench: "channel";
  mib: number;
  rounds: number;
  writeBytes: number;
  modes: Record<Mode, ChannelRow[]>;
  /** Every secure variant >= 0.8x plain on its transport, per mode. */
  goals: Record<Mode, boolean>;
}

/** Listens for one session, counts `bytes`, answers one byte; `closed` settles once the listener is gone. */
async function receiveOnce(at: Endpoint, security: Security, bytes: number): Promise<{ endpoint: Endpoint; closed: Promise<void> }> {
  let done!: () => void;
  const session = new Promise<void>((r) => (done = r));
  const l = await Listener.open({
    at, security, peer: "bench sender",
    onSession: (sock: Socket) => {
      let n = 0;
      sock.on("data", (c: Buffer) => { n += c.length; if (n >= bytes) sock.end(Buffer.from([1])); });
      sock.on("error", () => sock.destroy());
      sock.on("close", done);
    },
  });
  return { endpoint: l.endpoint, closed: session.then(() => l.close()) };
}

interface Progress { stage: "dial" | "write" | "answer" | "close"; sent: number }

/** Sends `bytes` from `data` in 1 MiB writes; the seconds until the receiver has them all, and the handshake's ms. */
async function sendOnce(to: Endpoint, security: Security, bytes: number, data: Buffer, p: Progress): Promise<{ seconds: number; handshakeMs: number }> {
  const h0 = performance.now();
  const s = await dial(to, security, { peer: "bench receiver" });
  p.stage = "write";
  const handshakeMs = performance.now() - h0;
  try {
    const ack = once(s, "data");
    const t0 = performance.now();
    for (let off = 0; off < bytes; off += WRITE) {
      const at = off % data.length;
      if (!s.write(data.subarray(at, at + WRITE))) await once(s, "drain");
      p.sent = off + WRITE;
    }
    p.stage = "answer";
    await ack;
    p.stage = "close";
    return { seconds: (performance.now() - t0) / 1000, handshakeMs };
  } finally {
    s.destroy();
  }
}

/** The receiver in a child process: one request at a time, answered with its endpoint, then with `closed`. */
class ChildReceiver {
  private readonly child: ChildProcess = fork(fileURLToPath(import.meta.url), ["--receiver"], { serialization: "advanced" });

  async receive(at: Endpoint, security: Security, bytes: number): Promise<{ endpoint: Endpoint; closed: Promise<void> }> {
    let ready!: (e: Endpoint) => void;
    const endpoint = new Promise<Endpoint>((r) => (ready = r));
    const closed = new Promise<void>((resolve, reject) => {
      const onMsg = (m: { endpoint?: Endpoint; closed?: boolean; error?: string }) => {
        if (m.endpoint) ready(m.endpoint);
        if (m.error) reject(new Error(`bench receiver: ${m.error}`));
        if (m.closed || m.error) { this.child.off("message", onMsg); resolve(); }
      };
      this.child.on("message", onMsg);
    });
    this.child.send({ at, security, bytes });
    return { endpoint: await Promise.race([endpoint, closed.then(() => { throw new Error("bench receiver closed early"); })]), closed };
  }

  stop(): void {
    this.child.disconnect();
  }
}

function childMain(): void {
  process.on("message", (m: { at: Endpoint; security: Security; bytes: number }) => {
    // a Buffer crosses the IPC channel as a Uint8Array
    const sec: Security = m.security.kind === "psk" ? { kind: "psk", key: Buffer.from(m.security.key) } : m.security;
    receiveOnce(m.at, sec, m.bytes).then(async (r) => {
      process.send!({ endpoint: r.endpoint });
      await r.closed;
      process.send!({ closed: true });
    }, (err: Error) => process.send!({ error: err.message }));
  });
}

interface Ctx { dir: string; data: Buffer; key: Buffer; certs: ReturnType<typeof makeCerts>; child: ChildReceiver }

function securities(v: Variant, c: Ctx): { server: Security; client: Security } {
  if (v.security === "psk") return { server: { kind: "psk", key: c.key }, client: { kind: "psk", key: c.key } };
  if (v.security === "tls") {
    return {
      server: { kind: "tls", files: { cert: c.certs.dstCert, key: c.certs.dstKey, ca: c.certs.ca } },
      client: { kind: "tls", files: { cert: c.certs.srcCert, key: c.certs.srcKey, ca: c.certs.ca } },
    };
  }
  return { server: { kind: "insecure" }, client: { kind: "insecure" } };
}

async function runOnce(v: Variant, mode: Mode, bytes: number, c: Ctx): Promise<{ seconds: number; handshakeMs: number }> {
  const at: Endpoint = v.transport === "unix" ? { kind: "unix", path: join(c.dir, "bench.sock") } : { kind: "tcp", host: "127.0.0.1", port: 0 };
  const sec = securities(v, c);
  const p: Progress = { stage: "dial", sent: 0 };
  // a run that stops making progress fails the bench with where it stood, instead of hanging it
  let timer: NodeJS.Timeout | undefined;
  const stuck = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`channel bench: ${v.name} (${mode}) stuck at ${p.stage} after ${p.sent} bytes`)), 30_000 + bytes / 20e3);
  });
  try {
    const rx = await Promise.race([mode === "oneProcess" ? receiveOnce(at, sec.server, bytes) : c.child.receive(at, sec.server, bytes), stuck]);
    try {
      return await Promise.race([sendOnce(rx.endpoint, sec.client, bytes, c.data, p), stuck]);
    } finally {
      await Promise.race([rx.closed, stuck]);
    }
  } finally {
    clearTimeout(timer);
  }
}

const median = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[s.length >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2; };

function rows(samples: Map<string, { mbps: number[]; hs: number[] }>): ChannelRow[] {
  const rs = VARIANTS.map((v) => {
    const s = samples.get(v.name)!;
    const r1 = (x: number) => +x.toFixed(1);
    return { ...v, mbps: s.mbps.map(r1), min: r1(Math.min(...s.mbps)), median: r1(median(s.mbps)), max: r1(Math.max(...s.mbps)), vsPlain: 1, handshakeMs: r1(median(s.hs)) };
  });
  for (const r of rs) r.vsPlain = +(r.median / rs.find((p) => p.transport === r.transport && p.security === "plain")!.median).toFixed(3);
  return rs;
}

export async function benchChannel(opts: { json?: boolean; quiet?: boolean; mib?: number; rounds?: number } = {}): Promise<ChannelBenchResult> {
  const mib = opts.mib ?? 512, rounds = opts.rounds ?? 3, bytes = mib * WRITE;
  const log = (s: string) => { if (!opts.json && !opts.quiet) process.stderr.write(s + "\n"); };
  const dir = mkdtempSync(join(os.tmpdir(), "pagetwin-bench-channel-"));
  const c: Ctx = { dir, data: randomBytes(16 * WRITE), key: randomBytes(32), certs: makeCerts(dir), child: new ChildReceiver() };
  try {
    const samples = Object.fromEntries(MODES.map((m) => [m, new Map(VARIANTS.map((v) => [v.name, { mbps: [] as number[], hs: [] as number[] }]))])) as Record<Mode, Map<string, { mbps: number[]; hs: number[] }>>;
    for (const m of MODES) for (const v of VARIANTS) await runOnce(v, m, Math.min(bytes, 32 * WRITE), c); // warm-up
    for (let r = 0; r < rounds; r++) {
      for (let k = 0; k < VARIANTS.length; k++) {
        const v = VARIANTS[(k + r) % VARIANTS.length]!;
        for (const m of MODES) {
          const t = await runOnce(v, m, bytes, c);
          samples[m].get(v.name)!.mbps.push(bytes / 1e6 / t.seconds);
          samples[m].get(v.name)!.hs.push(t.handshakeMs);
        }
      }
      log(`  channel round ${r + 1}/${rounds} done`);
    }
    const modes = { oneProcess: rows(samples.oneProcess), twoProcesses: rows(samples.twoProcesses) };
    const goals = { oneProcess: modes.oneProcess.every((x) => x.vsPlain >= GOAL), twoProcesses: modes.twoProcesses.every((x) => x.vsPlain >= GOAL) };
    const result: ChannelBenchResult = { bench: "channel", mib, rounds, writeBytes: WRITE, modes, goals };
    if (opts.json) console.log(JSON.stringify(result));
    else if (!opts.quiet) console.log(formatChannelResult(result));
    return result;
  } finally {
    c.child.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

export function formatChannelResult(r: ChannelBenchResult): string {
  const out = [`channel: ${r.mib} MiB one way over loopback in 1 MiB writes with backpressure, through link/dial and link/listen; ${r.rounds} rounds, variants alternated; MB/s = 1e6 B/s`];
  const titles: Record<Mode, string> = { oneProcess: "one process (sender and receiver on one event loop)", twoProcesses: "two processes (receiver in a child process)" };
  for (const m of MODES) {
    out.push(`  ${titles[m]}:`, `    ${"variant".padEnd(18)} ${"min".padStart(6)} ${"median".padStart(6)} ${"max".padStart(6)}  secure/plain  handshake ms`);
    for (const x of r.modes[m]) {
      const ratio = x.security === "plain" ? "" : `${x.vsPlain.toFixed(2)}x ${x.vsPlain >= GOAL ? "ok" : "MISSED"}`;
      out.push(`    ${x.name.padEnd(18)} ${x.min.toFixed(0).padStart(6)} ${x.median.toFixed(0).padStart(6)} ${x.max.toFixed(0).padStart(6)}  ${ratio.padEnd(12)}  ${x.handshakeMs.toFixed(1).padStart(12)}`);
    }
  }
  const say = (m: Mode) => (r.goals[m] ? "holds" : "MISSED");
  out.push(`  goal: every secure variant >= ${GOAL}x plain (ratio of medians, same transport): one process ${say("oneProcess")}; two processes ${say("twoProcesses")}`);
  return out.join("\n");
}

if (isMain(import.meta.url) && process.argv.includes("--receiver")) {
  childMain();
} else if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/channel.js [--mib N] [--rounds N] [--json]: the secure channel against plain sockets over loopback", ["--mib", "--rounds", "--json", "--receiver"]);
  benchChannel({ json: args.includes("--json"), mib: argValue(args, "--mib"), rounds: argValue(args, "--rounds") }).catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
