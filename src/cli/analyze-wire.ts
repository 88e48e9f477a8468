// What the link costs the agents' CPUs per byte, timed here: the source builds
// each frame (a copy of its pages and the CRC-32 seal) and TLS encrypts it;
// the destination decrypts it and its FrameReader checks and parses it. With
// the documented TLS-PSK link the cipher is ChaCha20-Poly1305 (src/link/security.ts).
// Timed on frames of 1 MiB, the size of agent mode's Pages frames.

import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { FrameReader, frame } from "../wire/envelope.js";
import { AGENT_FRAMES, FrameType } from "../agent/protocol.js";

/** Frames timed (of 1 MiB each). */
const SAMPLE_FRAMES = 16;

export interface WireSample {
  /** Source: frame building, seal and encryption, ms per MB (1e6 bytes) on the link. */
  sourceMsPerMB: number;
  /** Destination: decryption and frame parsing (CRC checked), ms per MB. */
  destinationMsPerMB: number;
}

export function sampleWire(): WireSample {
  const key = randomBytes(32), iv = randomBytes(12);
  const cipher = createCipheriv("chacha20-poly1305", key, iv, { authTagLength: 16 });
  const decipher = createDecipheriv("chacha20-poly1305", key, iv, { authTagLength: 16 });
  const reader = new FrameReader(AGENT_FRAMES);
  const pages = randomBytes(1 << 20);
  let srcMs = 0, dstMs = 0, bytes = 0;
  for (let i = 0; i < SAMPLE_FRAMES; i++) {
    let t = performance.now();
    const sealed = cipher.update(frame(FrameType.Pages, pages));
    srcMs += performance.now() - t;
    t = performance.now();
    reader.push(decipher.update(sealed));
    dstMs += performance.now() - t;
    bytes += sealed.length;
  }
  const mb = bytes / 1e6;
  return { sourceMsPerMB: srcMs / mb, destinationMsPerMB: dstMs / mb };
}
