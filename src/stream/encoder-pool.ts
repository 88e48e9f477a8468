// Worker threads that run stream-out's encoders (encoder.ts), so the
// sessions of a migration (its multifd channels) parse, hash, look up and
// compress on as many cores as there are workers, while the sessions keep
// their sockets on the main thread (session-workers.ts). Each worker has its
// own engine and its own copy of the NAS index. Chunks cross to the worker
// and frames back by transfer.

import type { Engine, TwinIndex } from "../core/engine.js";
import { HASH_SIZE } from "../core/engine.js";
import type { LinkRates } from "../link/rate.js";
import type { EncoderConfig, ReadTarget, SessionEncoder } from "./encoder.js";
import { addEncoderCounts, type EncoderCounts, type StreamStats } from "./stats.js";
import { StreamFormatError } from "./qemu-stream.js";
import { READ_BUFFER_BYTES } from "../link/read-buffer.js";
import { SessionWorkers, SpareBuffers, WorkerSession, addCounts, type ErrorAnswer, type WorkerHandle } from "./session-workers.js";
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

/**
 * A disk the workers look pages up in: its index (of `blocks` blocks, hashed with `engine`'s seed), where its
 * blocks start in the migration's numbering (disks.ts; 0 for stream-out's one disk), and where its twins count.
 */
export interface PoolDisk { engine: Engine; index: TwinIndex; blocks: number; offset: number; slot: number }

export class EncoderPool {
  private constructor(private readonly workers: SessionWorkers, private readonly found: number[]) {}

  /** `size` workers, each with a copy of every disk's index; `found` (pagetwin serve): twins per disk slot, counted as the workers find them. */
  static async create(size: number, disks: readonly PoolDisk[], found?: number[]): Promise<EncoderPool> {
    const data: EncoderWorkerData = { perDisk: found !== undefined, disks: disks.map((d) => {
      const records = new SharedArrayBuffer(d.blocks * HASH_SIZE);
      const at = d.index.recordsFor(d.blocks);
      new Uint8Array(records).set(d.engine.u8().subarray(at, at + d.blocks * HASH_SIZE));
      return { seed: d.engine.seed, flavor: d.engine.flavor, blocks: d.blocks, records, offset: d.offset, slot: d.slot };
    }) };
    return new EncoderPool(await SessionWorkers.start(WORKER_URL, data, size, "pagetwin stream-out's encoders"), found ?? []);
  }

  get size(): number {
    return this.workers.size;
  }

  /** A session's encoder on the least busy worker. */
  open(cfg: EncoderConfig, io: EncoderIo): SessionEncoder {
    return new RemoteEncoder(this.workers.pick(), cfg, io, this.found);
  }

  close(): Promise<void> {
    return this.workers.close();
  }
}

/** Chunks gather into batches of about this much while the worker is busy: one message each way per batch. */
const BATCH_BYTES = 1 << 20;
/** Batches a worker holds for a session before the next one waits on the main thread. */
const IN_WORKER = 2;
/** A read straight into a batch gets at least this much room; a batch with less left takes no more reads. */
const MIN_READ = 128 * 1024;

/** One message to the worker: the encode() calls whose chunks it carries wait for its answer. */
class Post {
  first = true;
  readonly done: Promise<number>;
  resolve!: (bytes: number) => void;
  reject!: (e: Error) => void;

  constructor() {
    this.done = new Promise((res, rej) => { this.resolve = res; this.reject = rej; });
    this.done.catch(() => {}); // the session hears of a failure through the call that made the post
  }
}

/** Chunks of QEMU's stream gathered in one buffer, encoded in one call (or, while the socket reads into it, a part at a time). */
class Batch {
  /** Bytes encode() has taken; bytes in it (read into it, or copied); bytes already posted as a copy. */
  used = 0;
  landed = 0;
  sent = 0;
  post = new Post();

  constructor(readonly buf: Uint8Array) {}
}

/**
 * A session's encoder in a worker: each call posts, each answer resolves the
 * oldest call. QEMU's socket reads into the batches (ReadTarget), which
 * gather reads while the worker has IN_WORKER of them; the batches' memory,
 * and the worker's output buffers once the link took them, go back and
 * forth (SpareBuffers).
 */
class RemoteEncoder extends WorkerSession implements SessionEncoder, ReadTarget {
  seq = 0;
  readonly reads: ReadTarget = this;
  /** The batch QEMU's socket reads into (when it reads straight into the batches). */
  private target: Batch | null = null;
  /** Between a read landing and the socket asking for its next memory: the target may be handed over whole then. */
  private inRead = false;
  /** stream-in acknowledged every reference below this one (the worker hears with the next batch). */
  private acked = 0;
  /** A copy of the target's new bytes, due at the end of this turn of the event loop unless a read comes first. */
  private copyLater: NodeJS.Immediate | null = null;
  private readonly batches: Batch[] = [];
  private inWorker = 0;
  private readonly spare = new SpareBuffers(BATCH_BYTES);
  /** The worker's output buffers the link has taken, to hand back with the next batch. */
  private readonly written: ArrayBuffer[] = [];
  private roomWaiter: (() => void) | null = null;

  constructor(worker: WorkerHandle, cfg: EncoderConfig, private readonly io: EncoderIo, private readonly found: number[]) {
    super(worker);
    this.tell({ t: "open", id: this.id, cfg } satisfies ToWorker);
  }

  next(): Uint8Array {
    this.inRead = false;
    let b = this.target;
    if (!b || b.buf.length - b.landed < MIN_READ) this.batches.push(b = this.target = new Batch(new Uint8Array(this.spare.take(0))));
    // reads no larger than the session's own (read-buffer.ts says why)
    return b.buf.subarray(b.landed, b.landed + READ_BUFFER_BYTES);
  }

  landed(chunk: Buffer): void {
    const b = this.target;
    // what the socket held before reading into the batches is copied by encode()
    if (!b || chunk.buffer !== b.buf.buffer) return;
    if (chunk.byteOffset !== b.landed) throw new Error("stream-out: a read landed out of place in its batch");
    b.landed += chunk.length;
    this.inRead = true;
  }

  /**
   * Takes a chunk into its batch: where it lies when the socket read it into one, else by a copy into the
   * batch being gathered (the session's read buffer is read into again). Resolves to the link bytes of the
   * post the chunk starts (0 for the others).
   */
  encode(chunk: Buffer): Promise<number> {
    if (this.failure) return Promise.reject(this.failure);
    let b = this.batches.find((x) => x.buf.buffer === chunk.buffer);
    if (b) {
      if (chunk.byteOffset !== b.used) throw new Error("stream-out: chunks out of order in their batch");
    } else {
      if (this.target) throw new Error("stream-out: a chunk from outside the batches while the socket reads into them");
      b = this.batches[this.batches.length - 1];
      if (!b || b.landed + chunk.length > b.buf.length) this.batches.push(b = new Batch(new Uint8Array(this.spare.take(chunk.length))));
      b.buf.set(chunk, b.landed);
      b.landed += chunk.length;
    }
    b.used += chunk.length;
    const p = b.post;
    const first = p.first;
    p.first = false;
    this.send();
    return first ? p.done : p.done.then(() => 0);
  }

  /** Null when another chunk may come now; else resolves once the gathered batches are down to one. */
  room(): Promise<void> | null {
    if (this.unsent() <= 1 || this.failure) return null;
    return new Promise((r) => { this.roomWaiter = r; });
  }

  /** Goes with the next batch (the worker's window needs it no sooner: it encodes nothing before). */
  release(upTo: number): void {
    this.acked = Math.max(this.acked, upTo);
  }

  async resend(seq: number): Promise<Buffer> {
    const m = await this.ask({ t: "resend", id: this.id, seq } satisfies ToWorker) as FromWorker;
    if (m.t !== "frame") throw new Error(`unexpected ${m.t}`);
    return Buffer.from(m.frame.buffer, m.frame.byteOffset, m.frame.byteLength);
  }

  async finish(bytesFromQemu: number): Promise<Buffer> {
    await Promise.all(this.batches.filter((b) => b.used > b.sent).map((b) => b.post.done));
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
    for (const b of this.batches.splice(0)) b.post.reject(err);
    this.wakeRoom();
  }

  /**
   * Posts the oldest gathered batch while the worker holds fewer than IN_WORKER, once every chunk in it was
   * encoded. The batch the socket reads into goes whole only between a read and the socket's next(), which
   * then gives it other memory. Any other time its new bytes wait for the socket's next read, or, if none
   * comes in this turn of the event loop (QEMU may be waiting for them to arrive), go as a copy.
   */
  private send(copy = false): void {
    if (this.inWorker >= IN_WORKER || this.failure) return;
    const b = this.batches[0];
    if (!b || b.used === b.sent || b.used !== b.landed) return;
    const whole = b !== this.target || this.inRead;
    if (!whole && !copy) {
      if (!this.copyLater) this.copyLater = setImmediate(() => { this.copyLater = null; this.send(true); });
      return;
    }
    const data = whole ? b.buf.subarray(b.sent, b.used) : new Uint8Array(this.spare.take(b.used - b.sent), 0, b.used - b.sent);
    if (!whole) data.set(b.buf.subarray(b.sent, b.used));
    const p = b.post;
    if (whole) {
      this.batches.shift();
      if (b === this.target) this.target = null;
    } else {
      b.sent = b.used;
      b.post = new Post();
    }
    this.inWorker++;
    this.wakeRoom();
    const back = this.written.splice(0);
    const { meter, receiver } = this.io;
    this.ask({ t: "chunk", id: this.id, data, back, acked: this.acked, rate: meter.rate, measured: meter.measured, busy: receiver.busy } satisfies ToWorker, [data.buffer as ArrayBuffer, ...back])
      .then((m) => p.resolve(this.encoded(m as FromWorker)), (err: Error) => {
        this.failure ??= err;
        p.reject(err);
        for (const x of this.batches.splice(0)) x.post.reject(err);
        this.wakeRoom();
      })
      .finally(() => { this.inWorker--; this.send(); });
  }

  /** A batch's answer: its frames to the link, its memory back to the spares; the link bytes. */
  private encoded(m: FromWorker): number {
    if (m.t !== "frames") throw new Error(`unexpected ${m.t}`);
    this.spare.give(m.input);
    this.seq = m.seq;
    this.count(m.counts, m.found);
    if (!m.data) return 0;
    const out = m.data;
    this.io.emit(Buffer.from(out.buffer, out.byteOffset, out.byteLength), () => this.written.push(out.buffer as ArrayBuffer));
    return out.byteLength;
  }

  /** Batches with bytes not posted yet. */
  private unsent(): number {
    let n = 0;
    for (const b of this.batches) if (b.landed > b.sent) n++;
    return n;
  }

  private wakeRoom(): void {
    if (this.roomWaiter && (this.unsent() <= 1 || this.failure)) { const w = this.roomWaiter; this.roomWaiter = null; w(); }
  }

  private count(c: EncoderCounts | undefined, found?: number[]): void {
    addCounts(this.found, found);
    if (!c) return;
    addEncoderCounts(this.io.stats, c);
    for (const w of c.warnings) this.io.warn(w);
  }
}
