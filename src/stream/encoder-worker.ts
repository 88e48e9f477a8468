// Entry of an encoder worker thread (encoder-pool.ts): its own engine and
// copy of the NAS index, and a StreamEncoder per session, whose frames for a
// batch of QEMU's stream go back in one buffer, with the batch's memory.
// Answers leave in the order the calls came.

import { workerData } from "node:worker_threads";
import { createEngine } from "../core/engine.js";
import type { CoreFlavor } from "../core/wasm.js";
import { StreamFormatError } from "./qemu-stream.js";
import { StreamEncoder, type EncoderConfig } from "./encoder.js";
import { PageHasher, type PageLookup } from "./hasher.js";
import { MultiDiskHasher, type SourceDisk } from "./disks.js";
import { WriteRing } from "./write-ring.js";
import { newStats, takeEncoderCounts, type EncoderCounts, type StreamStats } from "./stats.js";
import { SpareBuffers, serveSessions, takeCounts, type Message, type Reply } from "./session-workers.js";

export interface EncoderWorkerData {
  /** Twins are counted per disk (pagetwin serve's lookup over its disks); else one disk, its own block numbers. */
  perDisk: boolean;
  /** Each disk pages are looked up in, first to last (encoder-pool.ts' PoolDisk). */
  disks: {
    seed: bigint;
    flavor: CoreFlavor;
    blocks: number;
    /** The index's block hashes, 16 bytes each, in block order. */
    records: SharedArrayBuffer;
    offset: number;
    slot: number;
  }[];
}

export type ToWorker =
  | { t: "open"; id: number; cfg: EncoderConfig }
  /** `acked`: stream-in acknowledged every reference below it (the window lets them go first). */
  | { t: "chunk"; id: number; data: Uint8Array; back: ArrayBuffer[]; acked: number; rate: number; measured: number; busy: boolean }
  | { t: "resend"; id: number; seq: number }
  | { t: "finish"; id: number; bytes: number }
  | { t: "close"; id: number };

export type FromWorker =
  | { t: "ready"; id: 0 }
  /** `found`: twins per disk slot since the last answer (counted per disk only). */
  | { t: "frames"; id: number; data: Uint8Array | null; input: ArrayBuffer; seq: number; counts: EncoderCounts; found?: number[] }
  | { t: "frame"; id: number; frame: Uint8Array; counts?: EncoderCounts }
  | { t: "closed"; id: number; compressMBs: number; linkMBs: number }
  | EncoderError;

/** A refused call: `format`, the stream is malformed (StreamFormatError); what the encoder counted before it failed. */
export type EncoderError = { t: "error"; id: number; message: string; format: boolean; counts?: EncoderCounts };

/** Output buffers are at least this big, so that they can be filled again. */
const OUT_BYTES = 256 * 1024;

/** The session's last reading of its link and of stream-in's load, as the chunk brought them. */
class Seen {
  rate = Infinity;
  measured = 0;
  busy = false;
  record(): void { /* the session's own meter, on the main thread, records */ }
}

/** One session in this worker. */
class Session {
  readonly stats: StreamStats = newStats("stream-out");
  readonly seen = new Seen();
  private readonly frames: Buffer[] = [];
  private bytes = 0;
  readonly encoder: StreamEncoder;
  private readonly lookup: PageLookup;
  /** Twins per disk slot, for a lookup over several disks (taken with each answer). */
  readonly found: number[] = [];
  private readonly ring = new WriteRing(8 * 1024 * 1024);
  /** Output buffers the session's link has taken, to fill again. */
  readonly spare = new SpareBuffers(OUT_BYTES);
  failed = false;

  constructor(cfg: EncoderConfig, disks: readonly SourceDisk[], perDisk: boolean) {
    this.lookup = perDisk ? new MultiDiskHasher(disks, this.found) : new PageHasher(disks[0]!.engine, disks[0]!.index);
    this.encoder = new StreamEncoder(cfg, {
      lookup: this.lookup, stats: this.stats, alloc: this.ring, meter: this.seen, receiver: this.seen,
      emit: (f) => { this.frames.push(f); this.bytes += f.length; },
      warn: () => { /* warnings travel in the counts */ },
    });
    // the batch goes back to the session once encoded: the window keeps copies
    this.encoder.inputReused = true;
  }

  /** The frames emitted since the last call, in one buffer of their own (to transfer). */
  take(): Uint8Array | null {
    if (!this.bytes) return null;
    const out = new Uint8Array(this.spare.take(this.bytes), 0, this.bytes);
    let at = 0;
    for (const f of this.frames) {
      out.set(f, at);
      at += f.length;
      this.ring.release(f);
    }
    this.frames.length = 0;
    this.bytes = 0;
    return out;
  }

  free(): void {
    this.lookup.free();
  }
}

interface Loaded { disks: SourceDisk[]; perDisk: boolean }

async function loadIndexes(d: EncoderWorkerData): Promise<Loaded> {
  const disks = await Promise.all(d.disks.map(async (x) => {
    const engine = await createEngine({ seed: x.seed, flavor: x.flavor });
    const index = engine.createIndexForLoad(x.blocks);
    const at = index.recordsFor(x.blocks);
    engine.u8().set(new Uint8Array(x.records), at);
    index.loadAt(at, x.blocks);
    return { engine, index, offset: x.offset, slot: x.slot };
  }));
  return { disks, perDisk: d.perDisk };
}

function handle(msg: Message, sessions: Map<number, Session>, loaded: Loaded): Reply | null {
  const m = msg as ToWorker;
  if (m.t === "open") {
    sessions.set(m.id, new Session(m.cfg, loaded.disks, loaded.perDisk));
    return null;
  }
  const s = sessions.get(m.id);
  if (!s) return { answer: { t: "error", id: m.id, message: `no encoder session ${m.id}`, format: false } satisfies FromWorker };
  if (m.t === "close") {
    s.encoder.close();
    s.free();
    sessions.delete(m.id);
    const c = s.stats.compression;
    return { answer: { t: "closed", id: m.id, compressMBs: c.compressMBs, linkMBs: c.linkMBs } satisfies FromWorker };
  }
  if (s.failed) return { answer: { t: "error", id: m.id, message: "the encoder failed before", format: false } satisfies FromWorker };
  try {
    return answer(m, s);
  } catch (err) {
    s.failed = true;
    return { answer: { t: "error", id: m.id, message: (err as Error).message, format: err instanceof StreamFormatError, counts: takeEncoderCounts(s.stats) } satisfies FromWorker };
  }
}

function answer(m: Exclude<ToWorker, { t: "open" | "close" }>, s: Session): Reply {
  if (m.t === "chunk") {
    Object.assign(s.seen, { rate: m.rate, measured: m.measured, busy: m.busy });
    s.encoder.release(m.acked);
    s.spare.give(...m.back);
    s.encoder.encode(Buffer.from(m.data.buffer, m.data.byteOffset, m.data.byteLength));
    const data = s.take();
    const found = takeCounts(s.found);
    const a: FromWorker = { t: "frames", id: m.id, data, input: m.data.buffer as ArrayBuffer, seq: s.encoder.seq, counts: takeEncoderCounts(s.stats), ...(found ? { found } : {}) };
    return { answer: a, transfer: [a.input, ...(data ? [data.buffer as ArrayBuffer] : [])] };
  }
  const f = new Uint8Array(m.t === "resend" ? s.encoder.resend(m.seq) : s.encoder.finish(m.bytes));
  return { answer: { t: "frame", id: m.id, frame: f, ...(m.t === "finish" ? { counts: takeEncoderCounts(s.stats) } : {}) } satisfies FromWorker, transfer: [f.buffer] };
}

const sessions = new Map<number, Session>();
await serveSessions(() => loadIndexes(workerData as EncoderWorkerData), (m, loaded) => handle(m, sessions, loaded),
  (err, m) => ({ t: "error", id: m.id, message: (err as Error).message, format: false } satisfies FromWorker));
