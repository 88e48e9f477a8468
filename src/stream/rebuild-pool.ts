// Worker threads that do stream-in's per-byte work for its sessions: the
// NAS block reads and their verification for REFS frames (rebuild.ts), and
// the decompression of RAW_Z frames, so a multifd migration's channels are
// rebuilt on as many cores as there are workers. The session keeps the
// link, the order, the resends, the end-to-end check and its QEMU socket; it
// hands each frame over as it arrives (session-workers.ts), so the workers
// run ahead of what it writes to QEMU.

import type { DiskFormat } from "../adapters/nas/image.js";
import type { CompressionAlgorithm } from "../codec/compress.js";
import { ProtocolError, type Frame } from "../wire/envelope.js";
import { SFrame } from "./frames.js";
import type { Rebuilt } from "./rebuild.js";
import { SessionWorkers, WorkerSession, type ErrorAnswer, type WorkerHandle } from "./session-workers.js";
import type { FromRebuilder, RebuildError, RebuildWorkerData, ToRebuilder } from "./rebuild-worker.js";

const WORKER_URL = new URL("./rebuild-worker.js", import.meta.url);
/** Frames are copied into buffers at least this big, handed back and forth. */
const INPUT_BYTES = 256 * 1024;

export class RebuildPool {
  private constructor(private readonly workers: SessionWorkers) {}

  /** `size` workers, each with the image open. */
  static async create(size: number, image: string, format: DiskFormat | null): Promise<RebuildPool> {
    const data: RebuildWorkerData = { image, format };
    return new RebuildPool(await SessionWorkers.start(WORKER_URL, data, size, "pagetwin stream-in's rebuilders"));
  }

  get size(): number {
    return this.workers.size;
  }

  /** A session's rebuilder on the least busy worker: blocks verified with the index of `seed`, RAW_Z of the `agreed` algorithms. */
  open(seed: bigint, agreed: CompressionAlgorithm[]): RemoteRebuilder {
    return new RemoteRebuilder(this.workers.pick(), seed, agreed);
  }

  close(): Promise<void> {
    return this.workers.close();
  }
}

export class RemoteRebuilder extends WorkerSession {
  private readonly spare: ArrayBuffer[] = [];
  /** Output buffers QEMU's socket has taken, to hand back with the next frame. */
  private readonly written: ArrayBuffer[] = [];

  constructor(worker: WorkerHandle, seed: bigint, agreed: CompressionAlgorithm[]) {
    super(worker);
    this.tell({ t: "open", id: this.id, seed, agreed } satisfies ToRebuilder);
  }

  /** A REFS or MREFS frame, rebuilt in the worker (its pages that did not verify are left to fill). */
  async refs(f: Frame): Promise<Rebuilt> {
    const m = await this.post("refs", f);
    if (m.t !== "rebuilt") throw new Error(`unexpected ${m.t}`);
    return { out: Buffer.from(m.out.buffer, m.out.byteOffset, m.out.byteLength), ok: Array.from(m.ok, (x) => x === 1) };
  }

  /** A RAW_Z frame's data, decompressed in the worker. */
  async unpack(f: Frame): Promise<Buffer> {
    const m = await this.post("rawz", f);
    if (m.t !== "unpacked") throw new Error(`unexpected ${m.t}`);
    return Buffer.from(m.out.buffer, m.out.byteOffset, m.out.byteLength);
  }

  /** `out` (from refs() or unpack()) was taken by QEMU's socket: its memory goes back to the worker. */
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

  private async post(t: "refs" | "rawz", f: Frame): Promise<FromRebuilder> {
    if (t === "refs" && f.type !== SFrame.Refs && f.type !== SFrame.MultifdRefs) throw new Error(`${SFrame[f.type]} is not a REFS frame`);
    const n = f.payload.length;
    const payload = new Uint8Array(n <= INPUT_BYTES && this.spare.length ? this.spare.pop()! : new ArrayBuffer(Math.max(n, INPUT_BYTES)), 0, n);
    payload.set(f.payload);
    const back = this.written.splice(0);
    const m = await this.ask({ t, id: this.id, type: f.type, payload, back } satisfies ToRebuilder, [payload.buffer as ArrayBuffer, ...back]) as FromRebuilder;
    if ("input" in m && m.input.byteLength >= INPUT_BYTES) this.spare.push(m.input);
    return m;
  }
}
