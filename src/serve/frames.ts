// The peer link between two `pagetwin serve` services: one TLS port per
// service. Each connection says what it is in its first frame:
//
//   HELLO     1 (stream mode's, with `migration: ID`): a stream session of a
//               prepared migration; from there on it is stream mode's protocol
//   PREPARE  32 source->dest JSON {v, migration, qemu, disks: [{path, indexId, blocks}]}:
//               get the incoming side of a migration ready. The connection
//               stays open as the migration's lease: when it closes before
//               the migration ended, the destination drops the migration.
//   PREPARED 33 dest->source JSON {disks: [{dedup, reason?}]}: ready; the
//               disks the destination can verify (the others pass raw)
//   FINISHED 34 dest->source JSON {ok, error?, stats}: the incoming side ended
//   ABORT    10 either JSON {reason, code?}: the migration is off
//
// The envelope (length, type, payload, CRC-32) is wire/envelope.ts's.

import { SFrame, STREAM_FRAMES } from "../stream/frames.js";
import type { FrameSet } from "../link/channel.js";

export const SERVE_PROTOCOL_VERSION = 1;

export enum PeerFrame {
  Prepare = 32,
  Prepared = 33,
  Finished = 34,
}

/** What may come first on a peer connection, and on a lease. */
export const PEER_FRAMES: FrameSet = {
  maxFrame: STREAM_FRAMES.maxFrame,
  known: (t) => t in PeerFrame || t === SFrame.Hello || t === SFrame.Abort,
  name: (t) => PeerFrame[t] ?? SFrame[t] ?? `#${t}`,
};

/** A disk as PREPARE names it. */
export interface PrepareDisk {
  /** The image's path on the destination host. */
  path: string;
  /** The source's index of it (null: the source has none: no dedup on it). */
  indexId: string | null;
  /** Its whole 4 KiB blocks, as the source indexed them: the joint block numbering is built from these. */
  blocks: number;
}

export interface Prepare {
  v: number;
  migration: string;
  /** The destination QEMU's -incoming address. */
  qemu: string;
  disks: PrepareDisk[];
}

export interface Prepared {
  disks: { dedup: boolean; reason?: string }[];
}
