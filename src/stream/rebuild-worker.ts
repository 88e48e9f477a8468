// Entry of a stream-in rebuild worker (rebuild-pool.ts): the NAS image open
// here, an engine per hash seed in use, and per session a block verifier and
// a decompressor. A REFS frame comes back rebuilt (rebuild.ts), a RAW_Z frame
// decompressed, each with the frame's memory; output buffers come back for
// reuse once the destination QEMU's socket took them.

import { workerData } from "node:worker_threads";
import { createEngine, type Engine } from "../core/engine.js";
import { openDisk } from "../adapters/nas/disk.js";
import type { DiskFormat, GuestDisk } from "../adapters/nas/image.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import { ProtocolError, type Frame } from "../wire/envelope.js";
import type { CompressionAlgorithm } from "../codec/compress.js";
import { RawDecoder } from "./raw-codec.js";
import { decodeRefsFrame, rebuildRefs } from "./rebuild.js";
import { SFrame } from "./frames.js";
import { emptyCompressionStats } from "../codec/compress.js";
import { SpareBuffers, serveSessions, type Message, type Reply } from "./session-workers.js";
import type { FrameAlloc } from "./write-ring.js";

export interface RebuildWorkerData {
  image: string;
  format: DiskFormat | null;
}

export type ToRebuilder =
  | { t: "open"; id: number; seed: bigint; agreed: CompressionAlgorithm[] }
  | { t: "frames"; id: number; types: number[]; lengths: number[]; payload: Uint8Array; back: ArrayBuffer[] }
  | { t: "close"; id: number };

export type FromRebuilder =
  /** Per frame, its output, and (a REFS frame) which pages verified (1) and which are to fill (0). */
  | { t: "rebuilt"; id: number; outs: Uint8Array[]; oks: (Uint8Array | null)[]; input: ArrayBuffer }
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

  constructor(readonly verifier: BlockVerifier, readonly raw: RawDecoder) {}
}

interface State { image: GuestDisk; engines: Map<bigint, Engine>; sessions: Map<number, Session> }

async function open(m: Extract<ToRebuilder, { t: "open" }>, st: State): Promise<void> {
  let engine = st.engines.get(m.seed);
  if (!engine) st.engines.set(m.seed, engine = await createEngine({ seed: m.seed }));
  st.sessions.set(m.id, new Session(new BlockVerifier(engine, st.image), new RawDecoder(m.agreed, emptyCompressionStats("auto"))));
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
  return { answer: { t: "rebuilt", id: m.id, outs, oks, input } satisfies FromRebuilder, transfer: [input, ...outs.map((o) => o.buffer as ArrayBuffer)] };
}

const d = workerData as RebuildWorkerData;
await serveSessions(
  async (): Promise<State> => ({ image: openDisk(d.image, { format: d.format }), engines: new Map(), sessions: new Map() }),
  async (m, st) => {
    if (m.t !== "open") return handle(m, st);
    await open(m as Extract<ToRebuilder, { t: "open" }>, st);
    return null;
  },
  (err, m) => ({ t: "error", id: m.id, message: (err as Error).message, protocol: err instanceof ProtocolError } satisfies FromRebuilder),
  (st) => st.image.close(),
);
