// RAW data (unique pages, device state) on the link. Stream-out sends a
// RAW_Z frame compressed straight from QEMU's pieces when the policy says it
// pays and stream-in agreed an algorithm, a plain RAW frame otherwise;
// stream-in decompresses RAW_Z with an agreed algorithm only. The accounting
// lands in the session's CompressionStats.

import { ALGORITHM_ID, CompressionPolicy, algorithmOfId, createCompressor, type CompressionAlgorithm, type CompressionMode, type CompressionStats, type PageCompressor } from "../codec/compress.js";
import { ProtocolError, type Frame } from "../wire/envelope.js";
import type { LinkRates } from "../link/rate.js";
import { HEAP_ALLOC, type FrameAlloc } from "./write-ring.js";
import { RAW_Z_OVERHEAD, compressedRawFrame, decodeRawZ, rawFrame } from "./frames.js";

/** Smaller RAW data is never worth a compressor call. */
const MIN_COMPRESS_BYTES = 4096;

export class RawEncoder {
  private readonly compressor: PageCompressor | null;
  private readonly policy: CompressionPolicy;

  /** `meter`: the link's rate, timed on the session's drain waits; `alloc`: where frames get their memory; `crc` false: frames without their CRC (agreed inside TLS); `receiver`: stream-in's load, from its credits. */
  constructor(algorithm: CompressionAlgorithm | null, mode: CompressionMode, bandwidth: number, private readonly stats: CompressionStats, meter: LinkRates,
    private readonly alloc: FrameAlloc = HEAP_ALLOC, private readonly crc = true, receiver?: { readonly busy: boolean }) {
    this.compressor = algorithm ? createCompressor(algorithm) : null;
    this.policy = new CompressionPolicy({ mode: mode === "auto" ? "auto" : "always", bandwidth, meter, ...(receiver ? { receiver } : {}) });
  }

  /** A RAW or RAW_Z frame around `pieces` (`bytes` in all). */
  frame(pieces: Uint8Array[], bytes: number): Buffer {
    const verdict = this.compressor && bytes >= MIN_COMPRESS_BYTES ? this.policy.decide() : null;
    if (verdict === "compress") {
      const f = this.compressed(pieces, bytes);
      if (f) return f;
      this.stats.rawPoorRatio++;
    } else if (verdict === "slow") this.stats.rawSlow++;
    else if (verdict === "poor") this.stats.rawPoorRatio++;
    else if (verdict === "receiver") this.stats.rawReceiverBusy++;
    this.stats.framesRaw++;
    return rawFrame(pieces, bytes, this.alloc, this.crc);
  }

  /** The rates the policy measured, into the stats. */
  report(): void {
    this.stats.compressMBs = this.policy.compressRate / 1e6;
    this.stats.linkMBs = this.policy.measuredLinkRate / 1e6;
  }

  private compressed(pieces: Uint8Array[], bytes: number): Buffer | null {
    const c = this.compressor!;
    let ms = 0;
    const f = compressedRawFrame(bytes, ALGORITHM_ID[c.algorithm], (dst) => {
      const t = performance.now();
      const n = c.compressChunks(pieces, dst);
      ms = performance.now() - t;
      return n;
    }, this.policy.maxRatio, this.alloc, this.crc);
    this.policy.recordCompress(bytes, f ? f.length - RAW_Z_OVERHEAD : bytes, ms);
    if (!f) return null;
    this.stats.framesCompressed++;
    this.stats.bytesBefore += bytes;
    this.stats.bytesAfter += f.length - RAW_Z_OVERHEAD;
    return f;
  }
}

export class RawDecoder {
  private readonly decompressors = new Map<CompressionAlgorithm, PageCompressor>();

  constructor(private readonly agreed: readonly CompressionAlgorithm[], private readonly stats: CompressionStats) {}

  /** A RAW_Z frame's bytes, decompressed into exactly the length it names (4 MiB at most). */
  unpack(f: Frame, alloc: FrameAlloc = HEAP_ALLOC): Buffer {
    const { algo, rawLength, packed } = this.account(f);
    let d = this.decompressors.get(algo);
    if (!d) this.decompressors.set(algo, (d = createCompressor(algo)));
    const out = alloc.take(rawLength);
    try {
      d.decompressInto(packed, out);
    } catch (err) {
      alloc.release(out);
      throw new ProtocolError(`RAW_Z frame: ${(err as Error).message.replace(/^CompressedPages frame: /, "")}`);
    }
    return out;
  }

  /** A RAW_Z frame's header, its algorithm checked as agreed, and counted (a rebuild worker decompresses it). */
  account(f: Frame): { algo: CompressionAlgorithm; rawLength: number; packed: Buffer } {
    const { algorithmId, rawLength, packed } = decodeRawZ(f);
    const algo = algorithmOfId(algorithmId);
    if (!algo || !this.agreed.includes(algo)) {
      throw new ProtocolError(`RAW_Z frame uses algorithm ${algo ?? `#${algorithmId}`}, which was not agreed (agreed: ${this.agreed.join(", ") || "none"})`);
    }
    this.stats.framesCompressed++;
    this.stats.bytesBefore += rawLength;
    this.stats.bytesAfter += packed.length;
    this.stats.algorithm = algo;
    return { algo, rawLength, packed };
  }
}
