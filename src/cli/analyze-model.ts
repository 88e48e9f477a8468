// What `pagetwin analyze` predicts for an agent-mode migration of a RAM file:
// the first round's frames (pages in full, compressed as agent mode would
// compress them; twins as references; zero pages as page numbers), and a time
// made of the parts this host can measure (the scan of RAM, the compressor,
// the link at the given bandwidth). What it cannot see is listed, not guessed.

import { availableAlgorithms, contiguousRuns, createCompressor, type CompressionAlgorithm, type CompressionMode } from "../codec/compress.js";
import { MAX_COMPRESSED_PAGES, MAX_REFS, REF_SIZE } from "../agent/protocol.js";
import { PAGE_SIZE } from "../core/engine.js";
import type { RamFile } from "../adapters/ram/ram-file.js";

/** Pages per sampled batch, and batches: up to 8 MiB of the pages sent in full, spread over RAM. */
const SAMPLE_BATCH = 256;
const SAMPLE_BATCHES = 32;
/** The agent's CompressionPolicy: compress when the compressor is this much faster than the link, and the data shrinks below this. */
const MARGIN = 1.25;
const MAX_RATIO = 0.9;
/** Frame envelope (length, type, CRC) and the page count of a Pages/Refs/Zeros frame. */
const FRAME_BYTES = 4 + 1 + 4 + 4;

export interface CompressionSample {
  mode: CompressionMode;
  algorithm: CompressionAlgorithm | null;
  sampledPages: number;
  /** Compressed bytes / raw bytes on the sample (1 when nothing was sampled). */
  ratio: number;
  /** The compressor's rate on the sample, MB/s of page data. */
  compressMBs: number;
  /** Whether agent mode would compress at this bandwidth (auto: compressor ≥ 1.25× the link, and ratio ≤ 0.9). */
  used: boolean;
  why: string;
}

/** Compresses a sample of the pages sent in full, as agent mode would (same codec, batches of consecutive pages). */
export function sampleCompression(ram: RamFile, send: Uint32Array, mode: CompressionMode, bandwidth: number): CompressionSample {
  const algorithm = mode === "off" ? null : mode === "auto" ? availableAlgorithms()[0]! : mode;
  const none = (why: string): CompressionSample => ({ mode, algorithm, sampledPages: 0, ratio: 1, compressMBs: 0, used: false, why });
  if (!algorithm) return none("compression off");
  if (send.length === 0) return none("no page travels in full");
  const c = createCompressor(algorithm);
  const batch = Math.min(SAMPLE_BATCH, send.length);
  const batches = Math.min(SAMPLE_BATCHES, Math.floor(send.length / batch));
  const buf = new Uint8Array(batch * PAGE_SIZE);
  const dst = new Uint8Array(c.bound(buf.length));
  let raw = 0, packed = 0, best = 0;
  c.compressChunks([buf.subarray(0, PAGE_SIZE)], dst); // the first call sets the compressor up: not part of its rate
  for (let b = 0; b < batches; b++) {
    const start = Math.floor((b * (send.length - batch)) / Math.max(batches - 1, 1));
    for (let k = 0; k < batch; k++) ram.readPages(send[start + k]!, 1, buf.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE));
    const t0 = performance.now();
    const n = c.compressChunks(contiguousRuns(batch, (k) => buf.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE)), dst);
    // the best batch's rate, as the agent's policy takes it (best of its recent frames): a busy host's stalls are no property of the codec
    best = Math.max(best, buf.length / Math.max((performance.now() - t0) / 1000, 1e-6));
    raw += buf.length;
    packed += n >= 0 ? Math.min(n, buf.length) : buf.length;
  }
  const ratio = packed / raw;
  const rate = best;
  const sample = { mode, algorithm, sampledPages: batches * batch, ratio, compressMBs: rate / 1e6 };
  if (ratio > MAX_RATIO) return { ...sample, used: false, why: `the sample compresses only to ${(ratio * 100).toFixed(0)}%: pages travel raw` };
  if (mode === "auto" && bandwidth > 0 && rate < MARGIN * bandwidth) {
    return { ...sample, used: false, why: `the compressor (${(rate / 1e6).toFixed(0)} MB/s) does not outrun the link by ${MARGIN}x: auto sends raw` };
  }
  return { ...sample, used: true, why: `${algorithm} compresses the sample to ${(ratio * 100).toFixed(0)}%` };
}

export interface FirstRound {
  normal: number;
  twin: number;
  /** Dirty zero pages (a page number each). */
  zero: number;
}

/** Bytes agent mode puts on the link for one round: frames of full pages (compressed or not), references, zero page lists. */
export function roundBytes(r: FirstRound, c: CompressionSample): { bytes: number; uncompressedBytes: number } {
  const frames = (n: number, per: number) => Math.ceil(n / per) * FRAME_BYTES;
  const index = 4 * r.normal + frames(r.normal, MAX_COMPRESSED_PAGES);
  const refs = REF_SIZE * r.twin + frames(r.twin, MAX_REFS);
  const zeros = 4 * r.zero + frames(r.zero, MAX_REFS);
  const full = r.normal * PAGE_SIZE;
  return {
    bytes: Math.round(index + refs + zeros + (c.used ? full * c.ratio : full)),
    uncompressedBytes: index + refs + zeros + full,
  };
}

export interface TimeModel {
  /** The modelled total, ms: round 1 (scan, compressor and link overlapped: the slowest of them), a sampled pass (1/32 of a scan), the final round's scan. */
  ms: number;
  linkMs: number;
  scanMs: number;
  compressMs: number;
}

/** Agent mode re-hashes all of RAM every round (it has no dirty bitmap); an idle guest converges after one live round. */
export function modelTime(bytes: number, bandwidth: number, scanMs: number, normalBytes: number, c: CompressionSample): TimeModel {
  const linkMs = (bytes / bandwidth) * 1000;
  const compressMs = c.used && c.compressMBs > 0 ? (normalBytes / (c.compressMBs * 1e6)) * 1000 : 0;
  const round1 = Math.max(linkMs, scanMs, compressMs);
  return { ms: round1 + scanMs / 32 + scanMs, linkMs, scanMs, compressMs };
}

/** What the modelled time leaves out, said plainly. */
export const LEAVES_OUT = [
  "pages the guest writes while it migrates (each costs another round)",
  "set-up: connecting, the TLS handshake, the destination hashing its RAM file once, building the block index if it is not current",
  "the destination reading and checking each twin's NAS block (assumed to keep up with the link)",
  "QEMU's device state step (agent mode) and its own set-up",
];
