// The two QEMUs of an agent-mode migration, over QMP: the checks before
// anything moves, the source's stop, the device-state handover at switchover
// (x-ignore-shared: the shared RAM is skipped), and after a failure the
// source left running and the destination stopped (its RAM is incomplete).

import { mkdtempSync, rmSync } from "node:fs";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Listener } from "../link/listen.js";
import type { QmpClient } from "../adapters/qemu/qmp.js";
import type { DeviceTunnel } from "./device.js";
import { throwIfAborted } from "../abort.js";
import type { Log, Progress } from "../log.js";

/** query-migrate's members for a QEMU migration (the ones pagetwin reads). */
export interface QueryMigrate {
  status?: string;
  "total-time"?: number;
  downtime?: number;
  "expected-downtime"?: number;
  "setup-time"?: number;
  "error-desc"?: string;
  ram?: {
    transferred?: number;
    total?: number;
    duplicate?: number;
    skipped?: number;
    normal?: number;
    "normal-bytes"?: number;
    "dirty-sync-count"?: number;
    mbps?: number;
    [k: string]: unknown;
  };
  "socket-address"?: { type: string; host?: string; port?: string }[];
  [k: string]: unknown;
}

/** QEMU's device-state migration, from its own query-migrate at the end. */
export interface DeviceMigration { "total-time": number; downtime: number; transferred: number; status: string }

export interface HandoverOptions {
  /** QEMU to QEMU straight (no tunnel): where the destination takes it and the source sends it. */
  incomingUri?: string | undefined;
  timeoutMs: number;
  signal?: AbortSignal | undefined;
  onProgress?: ((p: Progress) => void) | undefined;
  /** Both guests stopped, the device state arrived, before the destination's `cont`. */
  beforeResume?: (() => Promise<void>) | undefined;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function status(qmp: QmpClient): Promise<string> {
  return (await qmp.execute<{ status: string }>("query-status", undefined, { timeoutMs: 10_000 })).status;
}

/** Polls query-migrate on `qmp` until the migration leaves its active states. */
export async function waitMigration(qmp: QmpClient, timeoutMs: number, pollMs = 10, signal?: AbortSignal): Promise<QueryMigrate> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    throwIfAborted(signal, "the migration");
    const q = await qmp.execute<QueryMigrate>("query-migrate", undefined, { timeoutMs: 10_000 });
    const s = q.status ?? "none";
    if (s === "completed" || s === "failed" || s === "cancelled") return q;
    if (Date.now() > deadline) throw new Error(`QEMU's migration is still '${s}' after ${timeoutMs} ms`);
    await sleep(pollMs);
  }
}

export class QemuPair {
  /** Why the destination QEMU is gone (its QMP connection closed), or null. */
  gone: string | null = null;
  /** QEMU's device-state migration, once it ended (completed or not). */
  device: DeviceMigration | null = null;
  private migrating = false;
  private killed = false;
  private readonly onClose = (err: Error | undefined) => { this.gone = `the destination QEMU's QMP connection closed${err ? ` (${err.message})` : ""}`; };

  constructor(readonly src: QmpClient, readonly dst: QmpClient, private readonly killDst: (() => Promise<void>) | undefined, private readonly log: Log) {
    dst.on("close", this.onClose);
    if (dst.closed) this.gone = "the destination QEMU's QMP connection is closed";
  }

  /** Stops the pre-copy as soon as the destination QEMU is gone. */
  throwIfGone(): void {
    if (this.gone) throw new Error(this.gone);
  }

  /** The source runs (or is paused), the destination waits for -incoming, both can skip shared RAM. */
  async check(): Promise<void> {
    const [ss, ds] = [await status(this.src), await status(this.dst)];
    if (ss !== "running" && ss !== "paused") throw new Error(`the source QEMU is '${ss}', not running`);
    if (ds !== "inmigrate") throw new Error(`the destination QEMU is '${ds}'; start it with -incoming defer (and -S)`);
    await setIgnoreShared(this.src, "source");
    await setIgnoreShared(this.dst, "destination");
  }

  async pauseSource(): Promise<void> {
    await this.src.execute("stop");
  }

  /** QEMU migrates the device state (through the tunnel, or straight to incomingUri), then the destination gets `cont`. */
  async handover(tunnel: DeviceTunnel | null, o: HandoverOptions): Promise<void> {
    this.throwIfGone();
    throwIfAborted(o.signal, "the migration");
    o.onProgress?.({ phase: "handover", done: 0, total: 1, bytes: 0 });
    // through pagetwin's link (TLS) by default; straight from QEMU to QEMU with an explicit incomingUri
    await this.dst.execute("migrate-incoming", { uri: tunnel ? tunnel.incoming : o.incomingUri! });
    this.migrating = true;
    if (tunnel) await carryDeviceState(this.src, tunnel, o.timeoutMs);
    else await this.src.execute("migrate", { uri: o.incomingUri! });
    const q = await waitMigration(this.src, o.timeoutMs, 5, o.signal);
    this.migrating = false;
    this.device = { "total-time": q["total-time"] ?? 0, downtime: q.downtime ?? 0, transferred: q.ram?.transferred ?? 0, status: q.status ?? "" };
    if (q.status !== "completed") throw new Error(`QEMU's device-state migration ended '${q.status}'${q["error-desc"] ? `: ${q["error-desc"]}` : ""}`);
    const d = await this.destinationLoaded();
    o.onProgress?.({ phase: "handover", done: 1, total: 1, bytes: this.device.transferred });
    if (d !== "running") {
      // the last moment to cancel: after `cont` the guest runs at the destination
      throwIfAborted(o.signal, "the migration");
      if (o.beforeResume) await o.beforeResume();
      await this.dst.execute("cont");
    } else {
      this.log.warn("the destination QEMU resumed by itself (started without -S): its RAM could not be checked before cont");
    }
  }

  /** The source's side is done when the last byte left; wait for the destination to load it. */
  private async destinationLoaded(): Promise<string> {
    const deadline = Date.now() + 30_000;
    let d = await status(this.dst);
    while (d === "inmigrate") {
      if (Date.now() > deadline) throw new Error("the destination QEMU is still loading the device state after 30 s");
      await sleep(5);
      d = await status(this.dst);
    }
    if (d !== "paused" && d !== "prelaunch" && d !== "running") throw new Error(`the destination QEMU is '${d}' after the device state arrived`);
    return d;
  }

  /** Leave the source running: cancel QEMU's migration, stop the destination, `cont` the source. */
  async restoreSource(): Promise<void> {
    if (this.migrating) {
      await this.src.execute("migrate_cancel").catch(() => undefined);
      try { await waitMigration(this.src, 10_000); } catch { /* reported by the status check below */ }
      this.migrating = false;
    }
    await this.killDestination();
    if (await status(this.src) !== "running") await this.src.execute("cont");
  }

  private async killDestination(): Promise<void> {
    if (this.killed) return;
    this.killed = true;
    try {
      if (this.killDst) await this.killDst();
      else if (!this.dst.closed) await this.dst.execute("quit", undefined, { timeoutMs: 5000 }).catch(() => undefined);
    } catch (err) {
      this.log.error(`stopping the destination QEMU failed: ${(err as Error).message}`);
    }
  }

  async sourceStatus(): Promise<string> {
    return status(this.src).catch((e: Error) => `unknown (${e.message})`);
  }

  detach(): void {
    this.dst.off("close", this.onClose);
  }
}

async function setIgnoreShared(qmp: QmpClient, side: string): Promise<void> {
  const caps = await qmp.execute<{ capability: string; state: boolean }[]>("query-migrate-capabilities");
  if (!caps.some((c) => c.capability === "x-ignore-shared")) {
    throw new Error(`the ${side} QEMU has no migration capability x-ignore-shared (QEMU 4.0 or later is needed)`);
  }
  await qmp.execute("migrate-set-capabilities", { capabilities: [{ capability: "x-ignore-shared", state: true }] });
}

/**
 * The source QEMU's device state into the tunnel: QEMU migrates to a unix
 * socket (0600, in a fresh 0700 directory: only this user's processes reach
 * it), which takes one connection and carries it through the link.
 */
async function carryDeviceState(src: QmpClient, tunnel: DeviceTunnel, timeoutMs: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-device-"));
  const path = join(dir, "device.sock");
  let accepted!: (s: Socket) => void;
  let timer: NodeJS.Timeout | undefined;
  const conn = new Promise<Socket>((resolve, reject) => {
    accepted = resolve;
    timer = setTimeout(() => reject(new Error(`the source QEMU did not connect for its device state within ${timeoutMs} ms`)), timeoutMs);
  });
  const listener = await Listener.open({ at: { kind: "unix", path }, security: { kind: "local" }, peer: "source QEMU (device state)", onSession: (s) => accepted(s) });
  try {
    await src.execute("migrate", { uri: `unix:${path}` });
    const sock = await conn;
    clearTimeout(timer);
    listener.close(); // one connection: nothing else gets in
    await tunnel.carry(sock);
  } finally {
    clearTimeout(timer);
    listener.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
