// Worker threads that run stream-out's encoders (encoder.ts), so the
// sessions of a migration (its multifd channels) parse, hash, look up and
// compress on as many cores as there are workers, while the sessions keep
// their sockets on the main thread. Each worker has its own engine and its
// own copy of the NAS index; a session takes the worker with the fewest
// sessions and keeps it. Chunks cross to the worker and frames back by
// transfer, one message each way per chunk (a plain MessagePort protocol:
// comlink's proxies cost more per message than this hot path can spend).

import { Worker } from "node:worker_threads";
import type { Engine, TwinIndex } from "../core/engine.js";
import { HASH_SIZE } from "../core/engine.js";
import type { LinkRates } from "../link/rate.js";
import type { EncoderConfig, SessionEncoder } from "./encoder.js";
import { addEncoderCounts, type EncoderCounts, type StreamStats } from "./stats.js";
import { StreamFormatError } from "./qemu-stream.js";
import type { EncoderWorkerData, FromWorker, ToWorker } from "./encoder-worker.js";

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
  private readonly members: Member[];
  private nextId = 1;

  private constructor(members: Member[]) {
    this.members = members;
  }

  /** `size` workers, each with a copy of `index` (of `blocks` blocks, hashed with `engine`'s seed). */
  static async create(size: number, engine: Engine, index: TwinIndex, blocks: number): Promise<EncoderPool> {
    const records = new SharedArrayBuffer(blocks * HASH_SIZE);
    const at = index.recordsFor(blocks);
    new Uint8Array(records).set(engine.u8().subarray(at, at + blocks * HASH_SIZE));
    const data: EncoderWorkerData = { seed: engine.seed, flavor: engine.flavor, blocks, records };
    const members = await Promise.allSettled(Array.from({ length: size }, () => Member.start(data)));
    const up = members.flatMap((m) => (m.status === "fulfilled" ? [m.value] : []));
    const failed = members.find((m) => m.status === "rejected");
    if (failed) {
      await Promise.all(up.map((m) => m.close()));
      throw new Error(`pagetwin stream-out: an encoder worker did not start: ${(failed.reason as Error).message}`);
    }
    return new EncoderPool(up);
  }

  get size(): number {
    return this.members.length;
  }

  /** A session's encoder on the least busy worker. */
  open(cfg: EncoderConfig, io: EncoderIo): SessionEncoder {
    const m = this.members.reduce((a, b) => (b.sessions.size < a.sessions.size ? b : a));
    return new RemoteEncoder(m, this.nextId++, cfg, io);
  }

  async close(): Promise<void> {
    await Promise.all(this.members.map((m) => m.close()));
  }
}

/** One worker: its sessions' answers come back in the order asked. */
class Member {
  readonly sessions = new Map<number, RemoteEncoder>();
  private closing = false;

  private constructor(private readonly worker: Worker) {
    worker.on("message", (m: FromWorker) => this.sessions.get(m.id)?.answer(m));
    worker.on("error", (e) => this.lost(`the encoder worker failed: ${e.message}`));
    worker.on("exit", (code) => { if (!this.closing) this.lost(`the encoder worker exited (code ${code})`); });
  }

  static start(data: EncoderWorkerData): Promise<Member> {
    const worker = new Worker(WORKER_URL, { workerData: data });
    return new Promise((resolve, reject) => {
      const early = (e: Error | number) => reject(typeof e === "number" ? new Error(`it exited (code ${e})`) : e);
      worker.once("error", early);
      worker.once("exit", early);
      worker.once("message", (m: FromWorker) => {
        worker.off("error", early);
        worker.off("exit", early);
        if (m.t === "ready") resolve(new Member(worker));
        else reject(new Error(m.t === "error" ? m.message : `unexpected ${m.t}`));
      });
    });
  }

  post(m: ToWorker, transfer: ArrayBuffer[] = []): void {
    this.worker.postMessage(m, transfer);
  }

  async close(): Promise<void> {
    this.closing = true;
    await this.worker.terminate();
  }

  private lost(why: string): void {
    for (const s of this.sessions.values()) s.lost(new Error(why));
    this.sessions.clear();
  }
}

type Waiter = { resolve: (m: FromWorker) => void; reject: (e: Error) => void };

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
class RemoteEncoder implements SessionEncoder {
  seq = 0;
  private readonly waiting: Waiter[] = [];
  private failure: Error | null = null;
  private readonly batches: Batch[] = [];
  private inWorker = 0;
  private readonly spare: ArrayBuffer[] = [];
  /** The worker's output buffers the link has taken, to hand back with the next batch. */
  private readonly written: ArrayBuffer[] = [];
  private roomWaiter: (() => void) | null = null;

  constructor(private readonly m: Member, private readonly id: number, cfg: EncoderConfig, private readonly io: EncoderIo) {
    m.sessions.set(id, this);
    m.post({ t: "open", id, cfg });
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
    if (!this.failure) this.m.post({ t: "release", id: this.id, upTo });
  }

  async resend(seq: number): Promise<Buffer> {
    const m = await this.ask({ t: "resend", id: this.id, seq });
    if (m.t !== "frame") throw new Error(`unexpected ${m.t}`);
    return Buffer.from(m.frame.buffer, m.frame.byteOffset, m.frame.byteLength);
  }

  async finish(bytesFromQemu: number): Promise<Buffer> {
    await Promise.all(this.batches.map((b) => b.done));
    const m = await this.ask({ t: "finish", id: this.id, bytes: bytesFromQemu });
    if (m.t !== "frame") throw new Error(`unexpected ${m.t}`);
    this.count(m.counts);
    return Buffer.from(m.frame.buffer, m.frame.byteOffset, m.frame.byteLength);
  }

  async close(): Promise<void> {
    if (!this.failure) {
      const m = await this.ask({ t: "close", id: this.id }).catch(() => null);
      if (m?.t === "closed") {
        this.io.stats.compression.compressMBs = m.compressMBs;
        this.io.stats.compression.linkMBs = m.linkMBs;
      }
    }
    this.m.sessions.delete(this.id);
  }

  /** The worker's answer to the oldest call. */
  answer(m: FromWorker): void {
    const w = this.waiting.shift();
    if (!w) return;
    if (m.t !== "error") return w.resolve(m);
    this.count(m.counts);
    w.reject(m.format ? new StreamFormatError(m.message) : new Error(m.message));
  }

  /** The worker is gone: every call fails, and every later one. */
  lost(err: Error): void {
    this.failure = err;
    for (const w of this.waiting.splice(0)) w.reject(err);
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
    this.ask({ t: "chunk", id: this.id, data, back, rate: meter.rate, measured: meter.measured, busy: receiver.busy }, [data.buffer as ArrayBuffer, ...back])
      .then((m) => b.resolve(this.encoded(m)), (err: Error) => { this.failure ??= err; b.reject(err); for (const x of this.batches.splice(0)) x.reject(err); this.wakeRoom(); })
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

  private ask(msg: ToWorker, transfer: ArrayBuffer[] = []): Promise<FromWorker> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.m.post(msg, transfer);
    });
  }

  private count(c: EncoderCounts | undefined): void {
    if (!c) return;
    addEncoderCounts(this.io.stats, c);
    for (const w of c.warnings) this.io.warn(w);
  }
}
