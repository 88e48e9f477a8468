// Deterministic pseudo-random page contents (AES-128-CTR keystream), so the
// same embedded VM can be made twice, and any block can be made on its own.

import { createCipheriv, createHash } from "node:crypto";

const ZEROS = new Uint8Array(1 << 20);

export class ContentStream {
  private readonly key: Buffer;
  constructor(seed: string) {
    this.key = createHash("sha256").update(seed).digest().subarray(0, 16);
  }

  /** Fills `into` with the stream's bytes for 4 KiB units first, first+1, ... */
  fill(first: number, into: Uint8Array): void {
    const iv = Buffer.alloc(16);
    // 256 AES blocks per 4 KiB unit: the counter of unit n starts at n * 256
    iv.writeBigUInt64BE(BigInt(first) * 256n, 8);
    const c = createCipheriv("aes-128-ctr", this.key, iv);
    for (let o = 0; o < into.length; o += ZEROS.length) {
      const n = Math.min(ZEROS.length, into.length - o);
      const out = c.update(ZEROS.subarray(0, n));
      into.set(out, o);
    }
  }
}
