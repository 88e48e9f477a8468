// One migration of the embedded VM from start to verified end: builds the
// VM, (re)indexes its NAS image, starts a destination agent (a child process
// by default, as on another host; or in this process), runs the guest and the
// source agent, and compares the two RAM files byte for byte at the end.

import { spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";
import { rmSync, existsSync } from "node:fs";
import { compareFiles } from "../adapters/ram/ram-diff.js";
import { createKeyFile, loadKey, type SecurityOptions } from "../link/security.js";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { EmbeddedVm, type EmbeddedVmOptions } from "../adapters/embedded/vm.js";
import { openNasIndex } from "../adapters/nas/index-file.js";
import { RamFile } from "../adapters/ram/ram-file.js";
import { EnginePool } from "../pool/pool.js";
import { DestinationAgent, type DestinationResult } from "../agent/destination.js";
import { migrateSource, MigrationError, type MigrationResult, type WorkersWhen } from "../agent/source.js";
import type { ConvergenceOptions } from "../plan/convergence.js";
import type { CompressionMode } from "../codec/compress.js";

export interface EmbeddedRunOptions {
  vm: EmbeddedVmOptions;
  mode: "baseline" | "pagetwin";
  /** Bytes per second on the link (default 1 Gbit/s). */
  bandwidth?: number;
  convergence?: ConvergenceOptions;
  /** Destination agent in a child process (default) or in this process. */
  destination?: "process" | "inproc";
  /** Guest runs this long before the migration starts, ms. */
  warmupMs?: number;
  trace?: boolean;
  /** Compression of the pages sent in full (default "auto"). */
  compress?: CompressionMode;
  /** Hash with a pool of this many worker threads (0: on the main thread). */
  workers?: number;
  /** Whether the workers hash every pass or only the final one (see SourceOptions). */
  workersWhen?: WorkersWhen;
  onIteration?: Parameters<typeof migrateSource>[0]["onIteration"];
  /** Hook to break things in tests: called with the destination's port before the source connects. */
  beforeConnect?: (port: number, vm: EmbeddedVm, destinationPid: number | null) => Promise<{ host: string; port: number } | void>;
  /** The agents' link (default: TLS-PSK with a key file made in the VM's directory); `{ insecure: true }` to see the frames on the wire. */
  link?: SecurityOptions;
}

export interface EmbeddedRunResult extends MigrationResult {
  /** Destination RAM equals source RAM at switchover, compared byte for byte (and by digest). */
  verified: boolean;
  bytesCompared: number;
  destination: DestinationResult | null;
  guest: { written: number; filled: number; rewritten: number };
  indexMs: number;
  /** The source guest was running when the source agent returned (true after a failure: it was resumed or never stopped). */
  sourceRunningAfter: boolean;
  ramPath: string;
}

const CLI = fileURLToPath(new URL("../cli/main.js", import.meta.url));

/** This process's --cpu-prof options, with the values of those given as separate arguments (`--cpu-prof-dir D`). */
export function cpuProfileArgs(execArgv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < execArgv.length; i++) {
    const a = execArgv[i]!;
    if (!a.startsWith("--cpu-prof")) continue;
    out.push(a);
    if (a !== "--cpu-prof" && !a.includes("=") && i + 1 < execArgv.length) out.push(execArgv[++i]!);
  }
  return out;
}

/** The destination agent exits by itself after its result (`--once`; a profiled one writes its profile first); killed if it has not within `ms`. */
async function exitOrKill(child: ChildProcess, ms: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<boolean>((r) => child.once("exit", () => r(true)));
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)));
  if (!(await Promise.race([exited, late]))) child.kill();
  clearTimeout(timer);
}

async function startDestinationProcess(ramPath: string, imagePath: string, security: string[]): Promise<{ port: number; child: ChildProcess; result: Promise<DestinationResult | null> }> {
  // a run under --cpu-prof profiles its destination too (a profile file of its own, in the same directory)
  const profile = cpuProfileArgs(process.execArgv);
  const child = spawn(process.execPath, [...profile, CLI, "listen", "--ram", ramPath, "--create-ram", "--image", imagePath, "--port", "0", "--once", "--json", ...security], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = createInterface({ input: child.stdout! });
  let resolveResult: (r: DestinationResult | null) => void;
  const result = new Promise<DestinationResult | null>((r) => (resolveResult = r));
  const port = await new Promise<number>((resolve, reject) => {
    child.once("exit", (code) => { reject(new Error(`pagetwin: the destination agent exited (code ${code}) before listening`)); resolveResult(null); });
    lines.on("line", (line) => {
      let ev: { event?: string; port?: number };
      try { ev = JSON.parse(line); } catch { return; }
      if (ev.event === "listening") resolve(ev.port!);
      if (ev.event === "result") resolveResult(ev as unknown as DestinationResult);
    });
  });
  return { port, child, result };
}

export async function runEmbeddedMigration(o: EmbeddedRunOptions): Promise<EmbeddedRunResult> {
  const vm = EmbeddedVm.create(o.vm);
  const { ramPath, imagePath } = vm.layout;
  const dstRam = join(o.vm.dir, "destination-ram");
  // the agents' link runs in TLS-PSK with a key of this directory's own, unless told otherwise
  const keyPath = join(o.vm.dir, "link.key");
  if (!o.link && !existsSync(keyPath)) createKeyFile(keyPath);
  const link: SecurityOptions = o.link ?? { psk: loadKey(keyPath) };
  const cliSecurity = link.insecure ? ["--insecure"] : ["--psk-file", keyPath];
  if (o.link && !o.link.insecure && (o.destination ?? "process") === "process") throw new RangeError("runEmbeddedMigration: a destination process takes the default key or insecure");
  const t0 = performance.now();
  const nas = await openNasIndex(imagePath, { rebuild: true });
  const indexMs = performance.now() - t0;
  let child: ChildProcess | null = null;
  let inproc: DestinationAgent | null = null;
  let destResult: Promise<DestinationResult | null>;
  let port: number;
  if ((o.destination ?? "process") === "process") {
    const d = await startDestinationProcess(dstRam, imagePath, cliSecurity);
    child = d.child;
    port = d.port;
    destResult = d.result;
  } else {
    inproc = new DestinationAgent({ ramPath: dstRam, createRam: true, imagePath, ...link });
    port = await inproc.listen();
    destResult = inproc.nextResult();
  }
  const ram = RamFile.open(ramPath);
  // workers for the final pass only are started by the source agent after its handshake (and closed by it)
  const startPool = () => EnginePool.create({ size: o.workers!, seed: nas.header.seed });
  const pool = !o.workers ? null : o.workersWhen === "switchover" ? startPool : await startPool();
  let result: MigrationResult;
  let guest = { written: 0, filled: 0, rewritten: 0 };
  let sourceRunningAfter = false;
  try {
    await vm.start();
    await new Promise((r) => setTimeout(r, o.warmupMs ?? 300));
    const target = (await o.beforeConnect?.(port, vm, child?.pid ?? null)) ?? { host: "127.0.0.1", port };
    try {
      result = await migrateSource({
        engine: nas.engine, index: o.mode === "pagetwin" ? nas.index : null, indexId: nas.header.indexId,
        ram, pool, ramPath, workersWhen: o.workersWhen ?? "always", vm: { pause: () => vm.pause(), resume: () => vm.resume() },
        host: target.host, port: target.port, bandwidth: o.bandwidth ?? 125e6, convergence: o.convergence,
        trace: o.trace, onIteration: o.onIteration, compress: o.compress, ...link,
      });
    } catch (err) {
      if (err instanceof MigrationError) result = err.result;
      else throw err;
    }
    sourceRunningAfter = vm.running;
    guest = await vm.stop();
  } finally {
    await vm.stop().catch(() => {});
    ram.close();
    nas.image.close();
    if (pool && typeof pool !== "function") await pool.close();
    inproc?.close();
  }
  const destination = await Promise.race([destResult, new Promise<null>((r) => setTimeout(() => r(null), 10_000))]);
  if (child) await exitOrKill(child, 5_000);
  let bytesCompared = 0;
  let verified = false;
  if (result.status === "completed") {
    // the guest is stopped (it moved): its RAM at switchover is what the source file holds now
    try {
      bytesCompared = compareFiles(ramPath, dstRam);
      verified = result.verified && bytesCompared === vm.layout.pages * 4096;
    } catch (err) {
      result.error = `RAM check failed: ${(err as Error).message}`;
    }
  }
  return { ...result, verified, bytesCompared, destination, guest, indexMs, sourceRunningAfter, ramPath };
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}
