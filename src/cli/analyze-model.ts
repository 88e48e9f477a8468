// What `pagetwin analyze` predicts for an agent-mode migration of a RAM file:
// the first round's frames (pages in full, compressed as agent mode would
// compress them: its codec and its CompressionPolicy, frame by frame; twins as
// references; zero pages as page numbers), and a time
// made of the parts this host can measure (the scan of RAM, the compressor,
// the destination's checks and writes, the link at the given bandwidth).
// What it cannot see is listed, not guessed.

import { CompressionPolicy, availableAlgorithms, contiguousRuns, createCompressor, type CompressionAlgorithm, type CompressionMode } from "../codec/compress.js";
import { MAX_REFS, REF_SIZE } from "../agent/protocol.js";
import { PAGE_SIZE } from "../core/engine.js";
import type { RamFile } from "../adapters/ram/ram-file.js";
import type { DestinationSample } from "./analyze-destination.js";
import type { WireSample } from "./analyze-wire.js";
import { ConvergencePolicy, type ConvergenceOptions } from "../plan/convergence.js";

/** Frames of full pages, as the agent sends them: up to 256 pages, never across a 4096-page window. */
const FRAME_PAGES = 256;
const WINDOW_PAGES = 4096;
/** At most this many frames are compressed, in stretches of consecutive frames spread over RAM (the policy's memory spans a few frames). */
const SAMPLE_FRAMES = 1024;
const STRETCH = 32;
/** Frame envelope (length, type, CRC) and the page count of a Pages/Refs/Zeros frame. */
const FRAME_BYTES = 4 + 1 + 4 + 4;

export interface CompressionSample {
  mode: CompressionMode;
  algorithm: CompressionAlgorithm | null;
  /** Frames of pages sent in full, and how many of them were compressed as the agent would. */
  frames: number;
  sampledFrames: number;
  framesCompressed: number;
  /** Bytes out / page bytes in over the sampled frames, raw frames included (1: nothing compressed). */
  ratio: number;
  /** The compressor's best rate on a frame, MB/s of page data. */
  compressMBs: number;
  /** Compressing all the frames the agent would compress, at the sampled rates, ms. */
  compressMs: number;
  /** Decompressing them at the destination, at the sampled rates, ms. */
  decompressMs: number;
  used: boolean;
  why: string;
}

/** The frames agent mode makes of one round's pages in full (`send`, ascending): [start, end) into `send`. */
function frames(send: Uint32Array): [number, number][] {
  const out: [number, number][] = [];
  for (let i = 0; i < send.length;) {
    const windowEnd = (Math.floor(send[i]! / WINDOW_PAGES) + 1) * WINDOW_PAGES;
    let j = i;
    while (j < send.length && j - i < FRAME_PAGES && send[j]! < windowEnd) j++;
    out.push([i, j]);
    i = j;
  }
  return out;
}

/** Which frames to compress: all, or stretches of consecutive ones spread evenly. */
function sampleFrames(n: number): number[] {
  if (n <= SAMPLE_FRAMES) return [...Array(n).keys()];
  const stretches = SAMPLE_FRAMES / STRETCH;
  const out: number[] = [];
  for (let s = 0; s < stretches; s++) {
    const first = Math.floor((s * (n - STRETCH)) / (stretches - 1));
    for (let k = 0; k < STRETCH; k++) out.push(first + k);
  }
  return out;
}

/**
 * Runs the agent's own CompressionPolicy over the frames the agent would send
 * (a sample of them on large RAM), compressing with the codec it would use, with
 * the link at `bandwidth` (as given) taking frames at `linkRate` (as the agent
 * would measure it): the frames it would compress, and what they become.
 */
export function sampleCompression(ram: RamFile, send: Uint32Array, mode: CompressionMode, bandwidth: number, linkRate = bandwidth): CompressionSample {
  const algorithm = mode === "off" ? null : mode === "auto" ? availableAlgorithms()[0]! : mode;
  const all = frames(send);
  const none = (why: string): CompressionSample => ({ mode, algorithm, frames: all.length, sampledFrames: 0, framesCompressed: 0, ratio: 1, compressMBs: 0, compressMs: 0, decompressMs: 0, used: false, why });
  if (!algorithm) return none("compression off");
  if (send.length === 0) return none("no page travels in full");
  const c = createCompressor(algorithm);
  const policy = new CompressionPolicy({ mode: mode === "auto" ? "auto" : "always", bandwidth });
  const buf = new Uint8Array(FRAME_PAGES * PAGE_SIZE);
  const dst = new Uint8Array(c.bound(buf.length));
  c.compressChunks([buf.subarray(0, PAGE_SIZE)], dst); // the first call sets the compressor up: not part of its rate
  let rawBytes = 0, outBytes = 0, compressed = 0, ms = 0, best = 0, unpackMs = 0;
  const picked = sampleFrames(all.length);
  for (const f of picked) {
    const [a, b] = all[f]!;
    const n = b - a, raw = n * PAGE_SIZE;
    for (let k = 0; k < n; k++) ram.readPages(send[a + k]!, 1, buf.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE));
    let got = -1, took = 0;
    if (policy.decide() === "compress") {
      const t0 = performance.now();
      got = c.compressChunks(contiguousRuns(n, (k) => buf.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE)), dst);
      took = performance.now() - t0;
      if (got > raw * policy.maxRatio) got = -1;
      policy.recordCompress(raw, got >= 0 ? got : raw, took);
      ms += took;
      best = Math.max(best, raw / Math.max(took / 1000, 1e-6));
    }
    if (got >= 0) {
      const t0 = performance.now();
      c.decompressInto(dst.subarray(0, got), buf.subarray(0, raw));
      unpackMs += performance.now() - t0;
    }
    const out = got >= 0 ? got : raw;
    // the agent's meter: every frame, at the rate the destination takes them (until 4 MiB are timed, the policy weighs `bandwidth`)
    policy.recordSend(out, (out / linkRate) * 1000);
    if (got >= 0) compressed++;
    rawBytes += raw;
    outBytes += out;
  }
  const ratio = outBytes / rawBytes;
  const scale = all.length / picked.length;
  const sample = { mode, algorithm, frames: all.length, sampledFrames: picked.length, framesCompressed: Math.round(compressed * scale), ratio, compressMBs: best / 1e6, compressMs: ms * scale, decompressMs: unpackMs * scale };
  if (compressed === 0) return { ...sample, used: false, why: `the agent's policy (${mode}) would send every frame raw at this bandwidth` };
  return { ...sample, used: true, why: `${algorithm}: ${compressed} of ${picked.length} frames compressed, to ${(ratio * 100).toFixed(0)}% of the page bytes overall` };
}

export interface FirstRound {
  normal: number;
  twin: number;
  /** Dirty zero pages (a page number each). */
  zero: number;
}

/** Bytes agent mode puts on the link for one round: frames of full pages (compressed or not), references, zero page lists. */
export function roundBytes(r: FirstRound, c: CompressionSample | null): { bytes: number; uncompressedBytes: number } {
  const headers = (n: number, per: number) => Math.ceil(n / per) * FRAME_BYTES;
  const index = 4 * r.normal + headers(r.normal, FRAME_PAGES);
  const refs = REF_SIZE * r.twin + headers(r.twin, MAX_REFS);
  const zeros = 4 * r.zero + headers(r.zero, MAX_REFS);
  const full = r.normal * PAGE_SIZE;
  return {
    bytes: Math.round(index + refs + zeros + (c?.used ? full * c.ratio : full)),
    uncompressedBytes: index + refs + zeros + full,
  };
}

export interface TimeModel {
  /**
   * The modelled total, as total-time without QEMU's device-state step, ms:
   * set-up, round 1 (the source, the link and the destination work at once:
   * the slowest of them), the sampled pass that decides on the switchover
   * (1/32 of a scan), any further live rounds the agent's own convergence
   * rule would run, and the final round.
   */
  ms: number;
  /** Set-up the tool can time: opening (or building) the block index, as the migration does first, ms. */
  setupMs: number;
  /** Round 1 alone, ms. */
  roundMs: number;
  /** Rounds with the final one, as the agent's ConvergencePolicy would decide them on these figures. */
  rounds: number;
  /**
   * The same total with both agents on this one host (a local destination,
   * `--dst-ram`), where their work shares its cores with the guest: round 1
   * as the slowest of the link and source + destination, ms.
   */
  oneHostMs: number;
  linkMs: number;
  scanMs: number;
  compressMs: number;
  /** The source's thread in round 1: scan, compress what it sends in full, build, seal and encrypt the frames, ms. */
  sourceMs: number;
  /** Round 1's frames: building, sealing and encrypting them at the source; decrypting and parsing them at the destination, ms. */
  wireSourceMs: number;
  wireDestinationMs: number;
  /** The destination in round 1: hash its RAM file once (before it reads the first frames), decrypt and parse the frames, check and write the twins, write the pages in full (read back, hashed), decompress them, ms. */
  destinationMs: number;
}

export interface ModelInput {
  /** Round 1's bytes, and the link's rate, bytes/s. */
  bytes: number;
  bandwidth: number;
  /** Reading, hashing and planning all RAM here, ms (every round re-scans: agent mode has no dirty bitmap). */
  scanMs: number;
  /** A later round's scan (read and hash, most pages clean), timed on the dirty-page sample, ms. */
  laterScanMs: number;
  /** Opening the block index here, ms. */
  indexMs: number;
  /** Pages changed since the scan, from a sample (estimateDirtyPages, as the agent estimates after round 1). */
  dirtyPages: number;
  ramPages: number;
  convergence?: ConvergenceOptions;
}

/** The rounds after round 1 as the agent would run them (its ConvergencePolicy): how many, and their time, ms. */
function laterRounds(m: ModelInput, roundMs: number): { rounds: number; ms: number } {
  const policy = new ConvergencePolicy(m.convergence);
  const dirtyBytes = m.dirtyPages * PAGE_SIZE;
  const ramBytes = m.ramPages * PAGE_SIZE;
  // the agent's rate: what the destination received over the rounds so far
  const rate = Math.min(m.bandwidth, m.bytes / Math.max(roundMs / 1000, 1e-3));
  // a later round scans all of RAM while the link carries the few pages that changed
  const roundAfter = Math.max(m.laterScanMs, (dirtyBytes / m.bandwidth) * 1000);
  let ms = m.laterScanMs / 32; // the sampled pass after round 1
  let sent = m.bytes;
  let d = policy.decide({ iteration: 1, wireBytes: m.bytes, scanMs: m.scanMs, bytesPerSecond: rate, totalBytes: sent, ramBytes, nextRoundBytes: dirtyBytes });
  let iteration = 1;
  while (d.action === "continue") {
    iteration++;
    ms += roundAfter;
    sent += dirtyBytes;
    d = policy.decide({ iteration, wireBytes: dirtyBytes, scanMs: m.laterScanMs, bytesPerSecond: rate, totalBytes: sent, ramBytes });
  }
  return { rounds: iteration + 1, ms: ms + roundAfter }; // the final round: a scan, with the guest stopped
}

/** Round 1 with every page sent raw, agents on a host each (the slower of the two), ms: what bounds the rate the link is fed at. */
export function rawRoundMs(bytes: number, scanMs: number, dst: DestinationSample, wire: WireSample): number {
  const mb = bytes / 1e6;
  return Math.max(scanMs + mb * wire.sourceMsPerMB, dst.ramHashMs + dst.twinMs + dst.pagesMs + mb * wire.destinationMsPerMB);
}

/** Agent mode's time from the parts measured here: set-up, round 1, and the rounds its convergence rule adds. */
export function modelTime(m: ModelInput, c: CompressionSample, dst: DestinationSample, wire: WireSample): TimeModel {
  const linkMs = (m.bytes / m.bandwidth) * 1000;
  const compressMs = c.compressMs;
  const wireSourceMs = (m.bytes / 1e6) * wire.sourceMsPerMB, wireDestinationMs = (m.bytes / 1e6) * wire.destinationMsPerMB;
  const sourceMs = m.scanMs + compressMs + wireSourceMs;
  const destinationMs = dst.ramHashMs + dst.twinMs + dst.pagesMs + c.decompressMs + wireDestinationMs;
  const setupMs = m.indexMs;
  const roundMs = Math.max(linkMs, sourceMs, destinationMs);
  const oneHostRound = Math.max(linkMs, sourceMs + destinationMs);
  const apart = laterRounds(m, roundMs), together = laterRounds(m, oneHostRound);
  return {
    ms: setupMs + roundMs + apart.ms, setupMs, roundMs, rounds: apart.rounds, oneHostMs: setupMs + oneHostRound + together.ms,
    linkMs, scanMs: m.scanMs, compressMs, sourceMs, destinationMs, wireSourceMs, wireDestinationMs,
  };
}

/** What the modelled time leaves out, said plainly. */
export const LEAVES_OUT = [
  "pages the guest writes while it migrates beyond those changed during analyze's own scan (the rounds count those)",
  "set-up besides the block index: QMP checks, connecting, the TLS handshake, starting --workers",
  "the destination and source agents sharing one host's cores (timeMs assumes a host each; oneHostMs adds their work up)",
  "QEMU's device state step (agent mode) and its own set-up",
  "rounds added while scan times vary, when a scan of RAM alone exceeds the downtime target (the agent stops after 3 rounds without a 10% gain; a faster scan by chance starts the count again)",
];
