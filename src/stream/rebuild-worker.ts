// Entry of a stream-in rebuild worker (rebuild-pool.ts): the NAS images open
// here, an engine per hash seed in use, and per session a block verifier
// (over every disk, for pagetwin serve) and a decompressor. A REFS frame
// comes back rebuilt (rebuild.ts), a RAW_Z frame decompressed, each with the
// frame's memory; output buffers come back for reuse once the destination
// QEMU's socket took them.

import { workerData } from "node:worker_threads";
import { createEngine, type Engine } from "../core/engine.js";
import { openDisk } from "../adapters/nas/disk.js";
import type { DiskFormat, GuestDisk } from "../adapters/nas/image.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import { MultiDiskVerifier, type DestDisk, type PageVerifier } from "./disks.js";
import { ProtocolError, type Frame } from "../wire/envelope.js";
import type { CompressionAlgorithm } from "../codec/compress.js";
import { RawDecoder } from "./raw-codec.js";
import { decodeRefsFrame, rebuildRefs } from "./rebuild.js";
import { SFrame } from "./frames.js";
import { emptyCompressionStats } from "../codec/compress.js";
import { SpareBuffers, serveSessions, takeCounts, type Message, type Reply } from "./session-workers.js";
import type { FrameAlloc } from "./write-ring.js";

/**
 * A disk the workers read blocks from: its image, where its blocks start in the migration's numbering
 * (disks.ts; -1: no dedup on it; 0 for stream-in's one disk) and how many it has.
 */
export interface RebuildDisk { image: string; format: DiskFormat | null; offset: number; blocks: number }

export interface RebuildWorkerData {
  /** Twins are counted per disk (pagetwin serve's verifier over its disks); else one disk, its own block numbers. */
  perDisk: boolean;
  disks: RebuildDisk[];
}

export type ToRebuilder =
  | { t: "open"; id: number; seeds: bigint[]; agreed: CompressionAlgorithm[] }
  | { t: "frames"; id: number; types: number[]; lengths: number[]; payload: Uint8Array; back: ArrayBuffer[] }
  | { t: "close"; id: number };

export type FromRebuilder =
  /** Per frame, its output, and (a REFS frame) which pages verified (1) and which are to fill (0); `used`: twins verified per disk (counted per disk only). */
  | { t: "rebuilt"; id: number; outs: Uint8Array[]; oks: (Uint8Array | null)[]; input: ArrayBuffer; used?: number[] }
  | { t: "closed"; id: number }
  | RebuildError;

/** A refused call: `protocol`, stream-out sent what it must not (ProtocolError). */
export type RebuildError = { t: "error"; id: number; message: string; protocol: boolean };

/** Output buffers are at least this big, so that they can be filled again. */
const OUT_BYTES = 256 * 1024;

/** Output memory from the buffers the session handed back, else new (each is transferred whole). */
class Spares implements FrameAlloc {
  readonly buffers = new SpareBuffers(OUT_BYTES);

  take(n: number): Buffer {
    return Buffer.from(this.buffers.take(n), 0, n);
  }

  trim(buf: Buffer, used: number): Buffer {
    return buf.subarray(0, used);
  }

  release(buf: Buffer): void {
    this.buffers.give(buf.buffer as ArrayBuffer);
  }
}

class Session {
  readonly spares = new Spares();
  /** Twins verified per disk, for a verifier over several disks (taken with each answer). */
  readonly used: number[] = [];
  readonly verifier: PageVerifier;

  constructor(disks: readonly DestDisk[], perDisk: boolean, readonly raw: RawDecoder) {
    this.verifier = perDisk ? new MultiDiskVerifier(disks, this.used) : new BlockVerifier(disks[0]!.engine, disks[0]!.image);
  }
}

interface State { disks: { image: GuestDisk; offset: number; blocks: number }[]; perDisk: boolean; engines: Map<bigint, Engine>; sessions: Map<number, Session> }

function load(d: RebuildWorkerData): State {
  const disks: State["disks"] = [];
  try {
    for (const x of d.disks) disks.push({ image: openDisk(x.image, { format: x.format }), offset: x.offset, blocks: x.blocks });
  } catch (err) {
    for (const x of disks) x.image.close();
    throw err;
  }
  return { disks, perDisk: d.perDisk, engines: new Map(), sessions: new Map() };
}

/** A session's disks with the engines of its seeds (one per disk), made once per seed. */
async function open(m: Extract<ToRebuilder, { t: "open" }>, st: State): Promise<void> {
  if (m.seeds.length !== st.disks.length) throw new Error(`${m.seeds.length} seeds for ${st.disks.length} disks`);
  const disks: DestDisk[] = [];
  for (const [i, d] of st.disks.entries()) {
    const seed = m.seeds[i]!;
    let engine = st.engines.get(seed);
    if (!engine) st.engines.set(seed, engine = await createEngine({ seed }));
    disks.push({ engine, ...d });
  }
  st.sessions.set(m.id, new Session(disks, st.perDisk, new RawDecoder(m.agreed, emptyCompressionStats("auto"))));
}

function handle(msg: Message, st: State): Reply | null {
  const m = msg as ToRebuilder;
  if (m.t === "open") throw new Error("an open is handled by open()");
  const s = st.sessions.get(m.id);
  if (!s) return { answer: { t: "error", id: m.id, message: `no rebuild session ${m.id}`, protocol: false } satisfies FromRebuilder };
  if (m.t === "close") {
    s.verifier.free();
    st.sessions.delete(m.id);
    return { answer: { t: "closed", id: m.id } satisfies FromRebuilder };
  }
  s.spares.buffers.give(...m.back);
  const input = m.payload.buffer as ArrayBuffer;
  const outs: Uint8Array[] = [], oks: (Uint8Array | null)[] = [];
  let at = m.payload.byteOffset;
  m.types.forEach((type, k) => {
    const f: Frame = { type, payload: Buffer.from(input, at, m.lengths[k]!) };
    at += m.lengths[k]!;
    const r = type === SFrame.RawZ ? null : rebuildRefs(s.verifier, decodeRefsFrame(f).refs, s.spares);
    const out = r ? r.out : s.raw.unpack(f, s.spares);
    outs.push(new Uint8Array(out.buffer, out.byteOffset, out.byteLength));
    oks.push(r ? Uint8Array.from(r.ok, (x) => (x ? 1 : 0)) : null);
  });
  const used = takeCounts(s.used);
  return { answer: { t: "rebuilt", id: m.id, outs, oks, input, ...(used ? { used } : {}) } satisfies FromRebuilder, transfer: [input, ...outs.map((o) => o.buffer as ArrayBuffer)] };
}

await serveSessions(
  async () => load(workerData as RebuildWorkerData),
  async (m, st) => {
    if (m.t !== "open") return handle(m, st);
    await open(m as Extract<ToRebuilder, { t: "open" }>, st);
    return null;
  },
  (err, m) => ({ t: "error", id: m.id, message: (err as Error).message, protocol: err instanceof ProtocolError } satisfies FromRebuilder),
  (st) => { for (const d of st.disks) d.image.close(); },
);
