// Worker threads that run stream-out's encoders (encoder.ts), so the
// sessions of a migration (its multifd channels) parse, hash, look up and
// compress on as many cores as there are workers, while the sessions keep
// their sockets on the main thread (session-workers.ts). Each worker has its
// own engine and its own copy of the NAS index. Chunks cross to the worker
// and frames back by transfer.

import type { Engine, TwinIndex } from "../core/engine.js";
import { HASH_SIZE } from "../core/engine.js";
import type { LinkRates } from "../link/rate.js";
import type { EncoderConfig, SessionEncoder } from "./encoder.js";
import { addEncoderCounts, type EncoderCounts, type StreamStats } from "./stats.js";
import { StreamFormatError } from "./qemu-stream.js";
import { SessionWorkers, WorkerSession, type ErrorAnswer, type WorkerHandle } from "./session-workers.js";
import type { EncoderError, EncoderWorkerData, FromWorker, ToWorker } from "./encoder-worker.js";

/** What a session lends its encoder (encoder.ts' EncoderParts, less what the worker has of its own). */
export interface EncoderIo {
  stats: StreamStats;
  meter: LinkRates;
  receiver: { readonly busy: boolean };
  /** Sends a frame (or frames); `written`: called once the link has taken it. */
  emit: (frame: Buffer, written?: () => void) => void;
  warn: (message: string) => void;
}

const WORKER_URL = new URL("./encoder-worker.js", import.meta.url);

export class EncoderPool {
  private constructor(private readonly workers: SessionWorkers) {}

  /** `size` workers, each with a copy of `index` (of `blocks` blocks, hashed with `engine`'s seed). */
  static async create(size: number, engine: Engine, index: TwinIndex, blocks: number): Promise<EncoderPool> {
    const records = new SharedArrayBuffer(blocks * HASH_SIZE);
    const at = index.recordsFor(blocks);
    new Uint8Array(records).set(engine.u8().subarray(at, at + blocks * HASH_SIZE));
    const data: EncoderWorkerData = { seed: engine.seed, flavor: engine.flavor, blocks, records };
    return new EncoderPool(await SessionWorkers.start(WORKER_URL, data, size, "pagetwin stream-out's encoders"));
  }

  get size(): number {
    return this.workers.size;
  }

  /** A session's encoder on the least busy worker. */
  open(cfg: EncoderConfig, io: EncoderIo): SessionEncoder {
    return new RemoteEncoder(this.workers.pick(), cfg, io);
  }

  close(): Promise<void> {
    return this.workers.close();
  }
}

/** Chunks gather into batches of about this much while the worker is busy: one message each way per batch. */
const BATCH_BYTES = 1 << 20;
/** Batches a worker holds for a session before the next one waits on the main thread. */
const IN_WORKER = 2;

/** Chunks of QEMU's stream gathered in one buffer, encoded in one call. */
class Batch {
  used = 0;
  first = true;
  readonly done: Promise<number>;
  resolve!: (bytes: number) => void;
  reject!: (e: Error) => void;

  constructor(readonly buf: Uint8Array) {
    this.done = new Promise((res, rej) => { this.resolve = res; this.reject = rej; });
    this.done.catch(() => {}); // the session hears of a failure through the call that made the batch
  }
}

/**
 * A session's encoder in a worker: each call posts, each answer resolves the
 * oldest call. Chunks gather into batches while the worker has IN_WORKER of
 * them; the batches' memory, and the worker's output buffers once the link
 * took them, go back and forth instead of being allocated anew (fresh memory
 * costs page faults at every chunk).
 */
class RemoteEncoder extends WorkerSession implements SessionEncoder {
  seq = 0;
  private readonly batches: Batch[] = [];
  private inWorker = 0;
  private readonly spare: ArrayBuffer[] = [];
  /** The worker's output buffers the link has taken, to hand back with the next batch. */
  private readonly written: ArrayBuffer[] = [];
  private roomWaiter: (() => void) | null = null;

  constructor(worker: WorkerHandle, cfg: EncoderConfig, private readonly io: EncoderIo) {
    super(worker);
    this.tell({ t: "open", id: this.id, cfg } satisfies ToWorker);
  }

  /** Copies the chunk into the batch being gathered (the session's read buffer is read into again); resolves to the link bytes of the batch it starts. */
  encode(chunk: Buffer): Promise<number> {
    if (this.failure) return Promise.reject(this.failure);
    let b = this.batches[this.batches.length - 1];
    if (!b || b.used + chunk.length > b.buf.length) this.batches.push(b = new Batch(this.buffer(chunk.length)));
    b.buf.set(chunk, b.used);
    b.used += chunk.length;
    const first = b.first;
    b.first = false;
    this.send();
    return first ? b.done : b.done.then(() => 0);
  }

  /** Null when another chunk may come now; else resolves once the gathered batches are down to one. */
  room(): Promise<void> | null {
    if (this.batches.length <= 1 || this.failure) return null;
    return new Promise((r) => { this.roomWaiter = r; });
  }

  release(upTo: number): void {
    this.tell({ t: "release", id: this.id, upTo } satisfies ToWorker);
  }

  async resend(seq: number): Promise<Buffer> {
    const m = await this.ask({ t: "resend", id: this.id, seq } satisfies ToWorker) as FromWorker;
    if (m.t !== "frame") throw new Error(`unexpected ${m.t}`);
    return Buffer.from(m.frame.buffer, m.frame.byteOffset, m.frame.byteLength);
  }

  async finish(bytesFromQemu: number): Promise<Buffer> {
    await Promise.all(this.batches.map((b) => b.done));
    const m = await this.ask({ t: "finish", id: this.id, bytes: bytesFromQemu } satisfies ToWorker) as FromWorker;
    if (m.t !== "frame") throw new Error(`unexpected ${m.t}`);
    this.count(m.counts);
    return Buffer.from(m.frame.buffer, m.frame.byteOffset, m.frame.byteLength);
  }

  async close(): Promise<void> {
    if (!this.failure) {
      const m = await (this.ask({ t: "close", id: this.id } satisfies ToWorker) as Promise<FromWorker>).catch(() => null);
      if (m?.t === "closed") {
        this.io.stats.compression.compressMBs = m.compressMBs;
        this.io.stats.compression.linkMBs = m.linkMBs;
      }
    }
    this.leave();
  }

  /** A refused call: what the encoder counted before it failed, and a malformed stream's error as such. */
  protected override refused(m: ErrorAnswer): Error {
    const e = m as EncoderError;
    this.count(e.counts);
    return e.format ? new StreamFormatError(e.message) : new Error(e.message);
  }

  /** The worker is gone: every call fails, and every later one. */
  override lost(err: Error): void {
    super.lost(err);
    for (const b of this.batches.splice(0)) b.reject(err);
    this.wakeRoom();
  }

  /** Posts the oldest gathered batch while the worker holds fewer than IN_WORKER. */
  private send(): void {
    if (this.inWorker >= IN_WORKER || this.failure) return;
    // the batch being gathered goes too: the worker has room for it now
    const b = this.batches.shift();
    if (!b) return;
    this.inWorker++;
    this.wakeRoom();
    const data = b.buf.subarray(0, b.used);
    const back = this.written.splice(0);
    const { meter, receiver } = this.io;
    this.ask({ t: "chunk", id: this.id, data, back, rate: meter.rate, measured: meter.measured, busy: receiver.busy } satisfies ToWorker, [data.buffer as ArrayBuffer, ...back])
      .then((m) => b.resolve(this.encoded(m as FromWorker)), (err: Error) => { this.failure ??= err; b.reject(err); for (const x of this.batches.splice(0)) x.reject(err); this.wakeRoom(); })
      .finally(() => { this.inWorker--; this.send(); });
  }

  /** A batch's answer: its frames to the link, its memory back to the spares; the link bytes. */
  private encoded(m: FromWorker): number {
    if (m.t !== "frames") throw new Error(`unexpected ${m.t}`);
    this.spare.push(m.input);
    this.seq = m.seq;
    this.count(m.counts);
    if (!m.data) return 0;
    const out = m.data;
    this.io.emit(Buffer.from(out.buffer, out.byteOffset, out.byteLength), () => this.written.push(out.buffer as ArrayBuffer));
    return out.byteLength;
  }

  private buffer(n: number): Uint8Array {
    if (n > BATCH_BYTES) return new Uint8Array(n);
    return new Uint8Array(this.spare.pop() ?? new ArrayBuffer(BATCH_BYTES));
  }

  private wakeRoom(): void {
    if (this.roomWaiter && (this.batches.length <= 1 || this.failure)) { const w = this.roomWaiter; this.roomWaiter = null; w(); }
  }

  private count(c: EncoderCounts | undefined): void {
    if (!c) return;
    addEncoderCounts(this.io.stats, c);
    for (const w of c.warnings) this.io.warn(w);
  }
}
