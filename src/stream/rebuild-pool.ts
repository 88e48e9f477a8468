// Worker threads that do stream-in's per-byte work for its sessions: the
// NAS block reads and their verification for REFS frames (rebuild.ts), and
// the decompression of RAW_Z frames, so a multifd migration's channels are
// rebuilt on as many cores as there are workers. The session keeps the
// link, the order, the resends, the end-to-end check and its QEMU socket; it
// hands each frame over as it arrives (session-workers.ts), so the workers
// run ahead of what it writes to QEMU.

import type { CompressionAlgorithm } from "../codec/compress.js";
import { ProtocolError, type Frame } from "../wire/envelope.js";
import type { Rebuilt } from "./rebuild.js";
import { SessionWorkers, SpareBuffers, WorkerSession, addCounts, type ErrorAnswer, type WorkerHandle } from "./session-workers.js";
import type { FromRebuilder, RebuildDisk, RebuildError, RebuildWorkerData, ToRebuilder } from "./rebuild-worker.js";

export type { RebuildDisk };

const WORKER_URL = new URL("./rebuild-worker.js", import.meta.url);
/** Frames are copied into buffers at least this big, handed back and forth (a REFS frame is a few KB). */
const INPUT_BYTES = 16 * 1024;

export class RebuildPool {
  private constructor(private readonly workers: SessionWorkers, private readonly used: number[]) {}

  /** `size` workers, each with every disk's image open; `used` (pagetwin serve): twins verified per disk, counted as the workers verify them. */
  static async create(size: number, disks: readonly RebuildDisk[], used?: number[]): Promise<RebuildPool> {
    const data: RebuildWorkerData = { perDisk: used !== undefined, disks: [...disks] };
    return new RebuildPool(await SessionWorkers.start(WORKER_URL, data, size, "pagetwin stream-in's rebuilders"), used ?? []);
  }

  get size(): number {
    return this.workers.size;
  }

  /** A session's rebuilder on the least busy worker: each disk's blocks verified with the index of its `seeds` (the session's, as an index may be rebuilt meanwhile), RAW_Z of the `agreed` algorithms. */
  open(seeds: readonly bigint[], agreed: CompressionAlgorithm[]): RemoteRebuilder {
    return new RemoteRebuilder(this.workers.pick(), seeds, agreed, this.used);
  }

  close(): Promise<void> {
    return this.workers.close();
  }
}

export class RemoteRebuilder extends WorkerSession {
  private readonly spare = new SpareBuffers(INPUT_BYTES);
  /** Output buffers QEMU's socket has taken, to hand back with the next frame. */
  private readonly written: ArrayBuffer[] = [];

  constructor(worker: WorkerHandle, seeds: readonly bigint[], agreed: CompressionAlgorithm[], private readonly used: number[]) {
    super(worker);
    this.tell({ t: "open", id: this.id, seeds: [...seeds], agreed } satisfies ToRebuilder);
  }

  /** REFS, MREFS and RAW_Z frames, in one message: each REFS frame rebuilt (its pages that did not verify are left to fill), each RAW_Z frame's data decompressed. */
  async frames(fs: readonly Frame[]): Promise<(Rebuilt | Buffer)[]> {
    let n = 0;
    for (const f of fs) n += f.payload.length;
    const payload = new Uint8Array(this.spare.take(n), 0, n);
    let at = 0;
    for (const f of fs) { payload.set(f.payload, at); at += f.payload.length; }
    const back = this.written.splice(0);
    const msg: ToRebuilder = { t: "frames", id: this.id, types: fs.map((f) => f.type), lengths: fs.map((f) => f.payload.length), payload, back };
    const m = await this.ask(msg, [payload.buffer as ArrayBuffer, ...back]) as FromRebuilder;
    if (m.t !== "rebuilt") throw new Error(`unexpected ${m.t}`);
    this.spare.give(m.input);
    addCounts(this.used, m.used);
    return m.outs.map((o, k) => {
      const out = Buffer.from(o.buffer, o.byteOffset, o.byteLength);
      const ok = m.oks[k];
      return ok ? { out, ok: Array.from(ok, (x) => x === 1) } : out;
    });
  }

  /** `out` (from frames()) was taken by QEMU's socket: its memory goes back to the worker. */
  done(out: Buffer): void {
    this.written.push(out.buffer as ArrayBuffer);
  }

  async close(): Promise<void> {
    if (!this.failure) await this.ask({ t: "close", id: this.id } satisfies ToRebuilder).catch(() => null);
    this.leave();
  }

  protected override refused(m: ErrorAnswer): Error {
    return (m as RebuildError).protocol ? new ProtocolError(m.message) : new Error(m.message);
  }

}
