// QEMU's own write tracking for the block index: a dirty bitmap on the VM's
// drive records every block the guest writes. A refresh snapshots it and
// clears it in one QMP transaction (so a write lands either in the snapshot
// or in the live bitmap, never in neither), exports the drive over QEMU's NBD
// server with the snapshot as the qemu:dirty-bitmap:NAME metadata context,
// asks NBD_CMD_BLOCK_STATUS which blocks are dirty, reads just those (from the
// image file, or through NBD) and re-hashes them into the index. Writes that land during a refresh
// are in the live bitmap, for the next one.

import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { NbdClient, type NbdAddress } from "../nbd/client.js";
import { STATE_DIRTY } from "../nbd/protocol.js";
import type { Extent } from "../nbd/replies.js";
import { BLOCK_SIZE } from "../nas/image.js";
import type { NasIndex } from "../nas/index-file.js";
import { imageSource, refreshBlocks, type BlockRun, type RefreshResult } from "../nas/refresh.js";
import { QmpCommandError, type QmpClient } from "./qmp.js";
export { DirtyTrackerError } from "../../errors.js";
import { DirtyTrackerError } from "../../errors.js";

export interface DirtyTrackerOptions {
  /** The drive: a QEMU block device id (e.g. "virtio0") or node name (default: the only drive with a medium). */
  drive?: string;
  /** Bytes per bitmap bit (default 4096: one index block). */
  granularity?: number;
  /** Directory for the NBD server's unix socket (default /tmp). */
  socketDir?: string;
  /**
   * Where the dirty blocks' content is read: "file" (default), the image file
   * as the destination reads it to verify a twin (one pread per run, fast);
   * or "nbd", QEMU's view through its NBD server (a round trip per run).
   * With a raw image on this host the two are the same bytes.
   */
  readVia?: "file" | "nbd";
  /**
   * The address of an NBD server this QEMU already runs (a QEMU has at most
   * one, e.g. started for a storage migration): the refresh adds its own
   * read-only export to it and removes it after, leaving the server running.
   * Default: start a private server on a unix socket and stop it after.
   */
  nbdServer?: NbdAddress;
}

export interface DirtyRefreshResult extends RefreshResult {
  /** NBD_CMD_READ requests and bytes the refresh read (0 when it read the file). */
  nbdReads: number;
  nbdBytes: number;
}


/** Tracking started before the index was built (DirtyTracker.begin). */
export interface PendingTracking {
  /** The bitmap's name in QEMU. */
  readonly name: string;
  /** The built index's tracker, holding every write since `begin`. */
  adopt(indexId: string): Promise<DirtyTracker>;
  drop(): Promise<void>;
}

export class DirtyTracker {
  private constructor(
    private readonly qmp: QmpClient,
    /** The drive's block node, where the bitmap lives. */
    readonly node: string,
    /** The live bitmap's name. */
    readonly bitmap: string,
    /** False when the bitmap was there already (a tracker of an earlier run). */
    readonly created: boolean,
    private readonly o: DirtyTrackerOptions,
  ) {}

  /** Starts tracking (or finds the tracking a previous run started) for the index with this id. */
  static async attach(qmp: QmpClient, indexId: string, o: DirtyTrackerOptions = {}): Promise<DirtyTracker> {
    const node = await blockNode(qmp, o.drive);
    const bitmap = `pagetwin-${indexId}`;
    const have = await bitmapNames(qmp, node);
    if (!have.includes(bitmap)) {
      await qmp.execute("block-dirty-bitmap-add", { node, name: bitmap, granularity: o.granularity ?? BLOCK_SIZE });
    }
    return new DirtyTracker(qmp, node, bitmap, !have.includes(bitmap), o);
  }

  /**
   * Starts tracking before an index exists (its id, and so the bitmap's name,
   * comes with the build): a bitmap of a random name records every write from
   * now on, so a write that lands while the index is built, after the build
   * read that block, is not missed. `adopt` hands its writes to the index's
   * bitmap; `drop` removes it when no index was built.
   */
  static async begin(qmp: QmpClient, o: DirtyTrackerOptions = {}): Promise<PendingTracking> {
    const node = await blockNode(qmp, o.drive);
    const name = `pagetwin-pending-${randomBytes(6).toString("hex")}`;
    await qmp.execute("block-dirty-bitmap-add", { node, name, granularity: o.granularity ?? BLOCK_SIZE });
    return {
      name,
      adopt: async (indexId) => {
        const t = await DirtyTracker.attach(qmp, indexId, o);
        // the index's bitmap records every write from its add on, and the merge brings those since `begin`
        await qmp.execute("block-dirty-bitmap-merge", { node, target: t.bitmap, bitmaps: [name] });
        await qmp.execute("block-dirty-bitmap-remove", { node, name });
        return t;
      },
      drop: () => qmp.execute("block-dirty-bitmap-remove", { node, name }).then(() => undefined, () => undefined),
    };
  }

  /** Re-hashes the blocks written since the tracking began or the last refresh, and writes the next generation. */
  async refresh(nas: NasIndex, hooks: { afterSnapshot?: () => Promise<void> } = {}): Promise<DirtyRefreshResult> {
    const identity = nas.image.identity();
    const snap = `${this.bitmap}-${randomBytes(4).toString("hex")}`;
    await this.qmp.execute("transaction", {
      actions: [
        { type: "block-dirty-bitmap-add", data: { node: this.node, name: snap, granularity: this.o.granularity ?? BLOCK_SIZE, disabled: true } },
        { type: "block-dirty-bitmap-merge", data: { node: this.node, target: snap, bitmaps: [this.bitmap] } },
        { type: "block-dirty-bitmap-clear", data: { node: this.node, name: this.bitmap } },
      ],
    });
    let ok = false;
    try {
      await hooks.afterSnapshot?.();
      const r = await this.readDirty(nas, snap, identity);
      ok = true;
      return r;
    } finally {
      // a failed refresh gives its blocks back to the live bitmap: the next one re-reads them
      if (!ok) await this.qmp.execute("block-dirty-bitmap-merge", { node: this.node, target: this.bitmap, bitmaps: [snap] }).catch(() => undefined);
      await retryBusy(() => this.qmp.execute("block-dirty-bitmap-remove", { node: this.node, name: snap }));
    }
  }

  /** Stops tracking: removes the live bitmap. */
  async detach(): Promise<void> {
    await this.qmp.execute("block-dirty-bitmap-remove", { node: this.node, name: this.bitmap }).catch(() => undefined);
  }

  private async readDirty(nas: NasIndex, snap: string, identity: ReturnType<NasIndex["image"]["identity"]>): Promise<DirtyRefreshResult> {
    const tag = randomBytes(4).toString("hex");
    const socket = join(this.o.socketDir ?? "/tmp", `pagetwin-nbd-${tag}.sock`);
    const exportId = `pagetwin-${tag}`;
    const server = this.o.nbdServer ?? { path: socket };
    if (!this.o.nbdServer) await this.startServer(socket);
    let client: NbdClient | null = null;
    try {
      await this.qmp.execute("block-export-add", { type: "nbd", id: exportId, "node-name": this.node, name: exportId, writable: false, bitmaps: [snap] });
      const context = `qemu:dirty-bitmap:${snap}`;
      client = await NbdClient.connect(server, { exportName: exportId, metaContexts: [context] }).catch((err: Error) => {
        throw new DirtyTrackerError(`pagetwin: cannot read QEMU's NBD server at ${describe(server)} (${err.message})` +
          (this.o.nbdServer ? "; is that the address this QEMU's NBD server listens on, without TLS (tls-creds)?" : ""), { cause: err });
      });
      const runs = dirtyRuns(await client.blockStatus(context, 0, client.size), nas.header.blocks);
      const c = client;
      // a batch's runs are asked for all at once: the reads are in flight together
      const read = async (group: readonly BlockRun[], into: Uint8Array) => {
        const parts = await Promise.all(group.map(([first, count]) => c.read(first * BLOCK_SIZE, count * BLOCK_SIZE)));
        let at = 0;
        for (const p of parts) { into.set(p, at); at += p.length; }
      };
      const source = this.o.readVia === "nbd" ? { read } : imageSource(nas.image);
      const r = await refreshBlocks(nas, runs, source, { kind: "dirty-bitmap", identity });
      return { ...r, nbdReads: client.counts.reads, nbdBytes: client.counts.bytesRead };
    } finally {
      if (client) await client.disconnect().catch(() => client!.destroy());
      await retryBusy(() => this.qmp.execute("block-export-del", { id: exportId })).catch(() => undefined);
      await waitExportGone(this.qmp, exportId);
      if (!this.o.nbdServer) {
        await this.qmp.execute("nbd-server-stop").catch(() => undefined);
        rmSync(socket, { force: true });
      }
    }
  }

  /** A private NBD server on a unix socket; a QEMU already running one (it has at most one) is told apart, with what to do. */
  private async startServer(socket: string): Promise<void> {
    try {
      await this.qmp.execute("nbd-server-start", { addr: { type: "unix", data: { path: socket } } });
    } catch (err) {
      const running = err instanceof QmpCommandError && /already running/i.test(err.desc);
      throw new DirtyTrackerError(running
        ? "pagetwin: this QEMU already runs an NBD server (a QEMU has one; e.g. one started for a storage migration or a backup): " +
          "give its address (--nbd unix:PATH or HOST:PORT; the server must not require TLS) and pagetwin adds a read-only export of its own to it, " +
          "removed after; or refresh once that server is stopped"
        : `pagetwin: cannot start QEMU's NBD server (${(err as Error).message})`, { cause: err });
    }
  }
}

function describe(a: NbdAddress): string {
  return "path" in a ? `unix:${a.path}` : `${a.host}:${a.port}`;
}

/** The dirty extents as runs of whole blocks, within the index's blocks. */
export function dirtyRuns(extents: Extent[], blocks: number): BlockRun[] {
  const runs: BlockRun[] = [];
  for (const e of extents) {
    if (!(e.flags & STATE_DIRTY)) continue;
    const first = Math.floor(e.offset / BLOCK_SIZE);
    const end = Math.min(blocks, Math.ceil((e.offset + e.length) / BLOCK_SIZE));
    if (end <= first) continue;
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] >= first) runs[runs.length - 1] = [last[0], Math.max(last[1], end - last[0])];
    else runs.push([first, end - first]);
  }
  return runs;
}

interface BlockInfo { device: string; qdev?: string; inserted?: { "node-name"?: string; "dirty-bitmaps"?: Array<{ name?: string }> } }

async function blockNode(qmp: QmpClient, drive?: string): Promise<string> {
  const devs = (await qmp.execute<BlockInfo[]>("query-block")).filter((d) => d.inserted?.["node-name"]);
  const pick = drive === undefined ? devs : devs.filter((d) => d.device === drive || d.qdev === drive || d.inserted!["node-name"] === drive);
  if (pick.length !== 1) {
    const names = devs.map((d) => d.device || d.inserted!["node-name"]).join(", ") || "none";
    throw new DirtyTrackerError(drive === undefined
      ? `pagetwin: say which drive to track (--drive); this QEMU has ${names}`
      : `pagetwin: QEMU has no drive "${drive}" (it has ${names})`);
  }
  return pick[0]!.inserted!["node-name"]!;
}

async function bitmapNames(qmp: QmpClient, node: string): Promise<string[]> {
  const devs = await qmp.execute<BlockInfo[]>("query-block");
  const d = devs.find((x) => x.inserted?.["node-name"] === node);
  return (d?.inserted?.["dirty-bitmaps"] ?? []).map((b) => b.name ?? "");
}

/** Runs a QMP command again while QEMU says the object is still in use (an export lets go of its bitmap asynchronously). */
async function retryBusy<T>(fn: () => Promise<T>, tries = 50): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (i >= tries || !(err instanceof QmpCommandError) || !/busy|in use|connect/i.test(err.desc)) throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

async function waitExportGone(qmp: QmpClient, id: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const list = await qmp.execute<Array<{ id: string }>>("query-block-exports").catch(() => []);
    if (!list.some((e) => e.id === id)) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}
