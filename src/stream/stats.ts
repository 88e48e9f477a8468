// What a stream proxy reports: one stats shape for stream-out and stream-in,
// and the handle a running proxy is.

import { emptyCompressionStats, type CompressionStats } from "../codec/compress.js";

export interface StreamStats {
  role: "stream-out" | "stream-in";
  /** Migration connections handled (QEMU opens one, more with multifd). */
  sessions: number;
  /** RAM PAGE records seen in QEMU's stream (QEMU's "normal" pages). */
  pagesSeen: number;
  /** RAM ZERO records seen (QEMU's "duplicate" pages). */
  zeroPages: number;
  /** Pages sent (stream-out) or rebuilt (stream-in) from a NAS block reference. */
  twinsReplaced: number;
  /** Pages whose NAS block no longer matched and were sent again from the source. */
  resends: number;
  /** Bytes read from the source QEMU (stream-out) / written to the destination QEMU (stream-in). */
  bytesFromQemu: number;
  bytesToQemu: number;
  /** Bytes written to / read from the link between the proxies (frames included). */
  bytesOutLink: number;
  bytesInLink: number;
  /** Return-path bytes (destination QEMU -> source QEMU). */
  returnBytes: number;
  /** Multifd channels (QEMU's `multifd` capability): connections, their pages, the twins among them, SYNC packets. */
  multifd: { channels: number; pages: number; twins: number; syncs: number };
  /** Worker threads the proxy started (--workers), and the sessions whose per-byte work ran on one of them. */
  workers: { threads: number; sessions: number };
  /** Why dedup was off for (part of) a stream, if it was. */
  passthrough: string[];
  warnings: string[];
  /**
   * stream-in: peers refused before they authenticated (a failed TLS
   * handshake: wrong or no key, a certificate from another CA, too many
   * handshakes at once). They are not migrations: a one-shot stream-in keeps
   * waiting for the real stream-out.
   */
  refused: string[];
  error?: string;
  /** Wall time from the first connection to the end of the last. */
  ms: number;
  /** Where the time went (ms): rewriting/rebuilding, waiting for the link (out) or QEMU (in) to drain, waiting for acks. */
  busyMs: number;
  drainWaitMs: number;
  windowWaitMs: number;
  /** stream-in: waiting for stream-out's next frame, ms (a receiver that seldom waits is the bottleneck, not the link). */
  linkWaitMs: number;
  /** RAW data compressed on the link (stream-out: what it compressed and why not; stream-in: frames decompressed). */
  compression: CompressionStats;
  /** Whether the data frames between the proxies carry their own CRC-32 (the last session's: inside TLS the peers leave it out). */
  frameCrc: boolean;
  /**
   * Sessions whose whole stream, as handed to the destination QEMU, was
   * checked against the source QEMU's (length and CRC-32) and matched /
   * did not. stream-in checks; stream-out counts stream-in's VERDICTs.
   */
  streamsVerified: number;
  streamsFailed: number;
  /**
   * The end-to-end check over every session: "verified" (all matched),
   * "failed" (one did not), "unknown" (a session ended without a verdict:
   * the link closed first, or nothing was checked).
   */
  verdict: Verdict;
  /**
   * Times on this host's clock, ms (null: not observed). stream-out:
   * streamToVerdictMs, from the first byte of the source QEMU's stream to
   * stream-in's last VERDICT; with the source's QMP (--qmp),
   * stopToVerdictMs, from the source guest's STOP event to that VERDICT.
   * stream-in: streamToEndMs, from the first byte it handed its QEMU to
   * handing it the end of the stream; with the destination's QMP (--qmp),
   * endToResumeMs, from that end to the destination guest's RESUME event,
   * and streamToResumeMs, from the first byte to RESUME.
   */
  streamToVerdictMs: number | null;
  stopToVerdictMs: number | null;
  streamToEndMs: number | null;
  endToResumeMs: number | null;
  streamToResumeMs: number | null;
}

export type Verdict = "verified" | "failed" | "unknown";

/** The verdict of a proxy's sessions so far. */
export function verdictOf(s: StreamStats): Verdict {
  if (s.streamsFailed > 0) return "failed";
  return s.sessions > 0 && s.streamsVerified === s.sessions ? "verified" : "unknown";
}

export function newStats(role: StreamStats["role"]): StreamStats {
  return {
    role, sessions: 0, pagesSeen: 0, zeroPages: 0, twinsReplaced: 0, resends: 0, bytesFromQemu: 0, bytesToQemu: 0,
    bytesOutLink: 0, bytesInLink: 0, returnBytes: 0, multifd: { channels: 0, pages: 0, twins: 0, syncs: 0 }, workers: { threads: 0, sessions: 0 }, passthrough: [], warnings: [], refused: [], ms: 0,
    busyMs: 0, drainWaitMs: 0, windowWaitMs: 0, linkWaitMs: 0, compression: emptyCompressionStats("auto"), frameCrc: true, streamsVerified: 0,
    streamsFailed: 0, verdict: "unknown", streamToVerdictMs: null, stopToVerdictMs: null, streamToEndMs: null, endToResumeMs: null, streamToResumeMs: null,
  };
}

export interface StreamProxy {
  /** The port it listens on (useful with listenPort 0; 0 on a unix socket). */
  port: number;
  stats: StreamStats;
  /** Resolves when the first migration is over (or, with keep, when closed), failures in stats.error; rejects only with an AbortError when the signal fired. */
  done: Promise<StreamStats>;
  close(): Promise<void>;
}


/** The counters a session's encoder (encoder.ts) adds to its proxy's stats: what a worker's encoder sends back. */
export interface EncoderCounts {
  counts: number[];
  multifd: number[];
  compression: number[];
  passthrough: string[];
  warnings: string[];
}

const COUNTS = ["pagesSeen", "zeroPages", "twinsReplaced"] as const;
const MULTIFD = ["pages", "twins", "syncs"] as const;
const COMPRESSION = ["framesCompressed", "framesRaw", "rawSlow", "rawPoorRatio", "rawReceiverBusy", "bytesBefore", "bytesAfter"] as const;

/** Takes the encoder's counters out of `s` (a worker's own stats), leaving them at zero. */
export function takeEncoderCounts(s: StreamStats): EncoderCounts {
  const take = <T extends Record<K, number>, K extends string>(o: T, keys: readonly K[]) => keys.map((k) => {
    const v = o[k];
    (o as Record<K, number>)[k] = 0;
    return v;
  });
  return {
    counts: take(s, COUNTS), multifd: take(s.multifd, MULTIFD), compression: take(s.compression, COMPRESSION),
    passthrough: s.passthrough.splice(0), warnings: s.warnings.splice(0),
  };
}

/** Adds what takeEncoderCounts took. */
export function addEncoderCounts(s: StreamStats, c: EncoderCounts): void {
  COUNTS.forEach((k, i) => { s[k] += c.counts[i]!; });
  MULTIFD.forEach((k, i) => { s.multifd[k] += c.multifd[i]!; });
  COMPRESSION.forEach((k, i) => { s.compression[k] += c.compression[i]!; });
  s.passthrough.push(...c.passthrough);
  s.warnings.push(...c.warnings);
}
