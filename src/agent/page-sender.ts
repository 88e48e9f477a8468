// What the source puts on the link for a window of RAM: zero markers, NAS
// references (twins) and pages sent in full, compressed when that pays; and
// the pages the destination asked for again, read afresh from RAM.

import { Engine, HASH_SIZE, PAGE_SIZE } from "../core/engine.js";
import type { Planner, WindowPlan } from "../plan/planner.js";
import type { FrameLink } from "../link/channel.js";
import { FrameBuffers } from "../link/buffers.js";
import type { LinkMeter } from "../link/rate.js";
import { FrameType, encodePageList, encodePagesMaybeCompressed, encodeRefs, pagesFrameSize } from "./protocol.js";
import {
  ALGORITHM_ID, CompressionPolicy, availableAlgorithms, contiguousRuns, createCompressor, emptyCompressionStats, zstdUnavailableReason,
  type CompressionAlgorithm, type CompressionMode, type CompressionStats, type PageCompressor,
} from "../codec/compress.js";
import type { RamReader } from "./source-types.js";

/** Raw frames that time a link the compressed frames never filled (CompressionPolicy's linkProbeFrames): 8 MiB, twice the send queue. */
const LINK_PROBE_FRAMES = 8;
/** References per Refs frame. */
const REFS_PER_FRAME = 4096;

export class PageSender {
  /** How the pages sent in full travelled: compressed or raw, and why. */
  readonly stats: CompressionStats;
  /** What this source offers: auto, every algorithm available here (preferred first); an algorithm, that one. */
  readonly offer: CompressionAlgorithm[];
  /** Whether the data frames carry their CRC (false once the destination agreed to go without inside TLS). */
  frameCrc = true;
  private compressor: PageCompressor | null = null;
  private policy: CompressionPolicy | null = null;
  // Pages frames are built in buffers used again once the link has written them
  private readonly frameBuffers: FrameBuffers;
  private readonly resendRegion;
  private readonly resendHashes;

  constructor(private readonly engine: Engine, private readonly planner: Planner, private readonly ram: RamReader, private readonly framePages: number, private readonly mode: CompressionMode) {
    this.stats = emptyCompressionStats(mode);
    this.offer = offerFor(mode);
    this.frameBuffers = new FrameBuffers(pagesFrameSize(framePages));
    this.resendRegion = engine.alloc(framePages * PAGE_SIZE);
    this.resendHashes = engine.alloc(framePages * HASH_SIZE);
  }

  /** The link's rate comes from `meter` (what the destination acknowledged), capped by `bandwidth` when given. */
  measure(meter: LinkMeter, bandwidth: number): void {
    this.policy = new CompressionPolicy({ mode: this.mode === "auto" ? "auto" : "always", bandwidth, meter, linkProbeFrames: LINK_PROBE_FRAMES });
  }

  /** The destination's answer to the offer: the first offered algorithm it accepts, or raw pages. */
  agree(accepted: unknown): void {
    if (!this.offer.length) {
      this.stats.note = "compression off";
      return;
    }
    const list = Array.isArray(accepted) ? accepted : [];
    const algo = this.offer.find((a) => list.includes(a)) ?? null;
    if (algo) {
      this.compressor = createCompressor(algo);
      this.stats.algorithm = algo;
    } else this.stats.note = `the destination decompresses none of ${this.offer.join(", ")}: pages travel raw`;
  }

  recordAcked(total: number): void {
    this.policy?.recordAcked(total);
  }

  async sendWindow(l: FrameLink, plan: WindowPlan, bytesOf: (i: number) => Uint8Array): Promise<void> {
    if (plan.zero.length) await l.send(encodePageList(FrameType.Zeros, plan.zero, this.frameCrc));
    for (let i = 0; i < plan.twinPages.length; i += REFS_PER_FRAME) {
      const pages = plan.twinPages.subarray(i, i + REFS_PER_FRAME), blocks = plan.twinBlocks.subarray(i, i + REFS_PER_FRAME);
      await l.send(encodeRefs(pages, blocks, (k) => this.planner.windowHash(plan.first, pages[k]!), this.frameCrc));
    }
    for (let i = 0; i < plan.send.length; i += this.framePages) {
      const pages = plan.send.subarray(i, i + this.framePages);
      // the frame holds the bytes (compressed or copied) before the next window overwrites them
      await this.sendPages(l, pages, (k) => bytesOf(i + k));
    }
  }

  /** Pages the destination asked for again: read now, their hashes recorded as sent, then sent in full. */
  async resendPages(l: FrameLink, pages: Uint32Array): Promise<void> {
    for (let i = 0; i < pages.length; i += this.framePages) {
      const batch = pages.subarray(i, i + this.framePages);
      const v = this.resendRegion.view();
      batch.forEach((p, k) => this.ram.readPages(p, 1, v.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE)));
      this.engine.hashPagesAt(this.resendRegion.ptr, batch.length, this.resendHashes.ptr);
      const hv = this.resendHashes.view();
      batch.forEach((p, k) => this.planner.recordSent(p, hv.subarray(k * HASH_SIZE, (k + 1) * HASH_SIZE)));
      const data = this.resendRegion.view();
      await this.sendPages(l, batch, (k) => data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE));
    }
  }

  /** One batch of full pages: compressed straight from `bytesOf` into the frame when that pays, else raw. */
  private async sendPages(l: FrameLink, pages: Uint32Array, bytesOf: (i: number) => Uint8Array): Promise<void> {
    const policy = this.policy!;
    const c = this.compressor;
    const verdict = c ? policy.decide() : "off";
    let compressMs = 0;
    const compress = c && verdict === "compress"
      ? (dst: Uint8Array): number => {
        const t = performance.now();
        const got = c.compressChunks(contiguousRuns(pages.length, bytesOf), dst);
        compressMs = performance.now() - t;
        return got;
      }
      : null;
    const { frame, compressed } = encodePagesMaybeCompressed(pages, bytesOf, c ? ALGORITHM_ID[c.algorithm] : 0, compress, policy.maxRatio, (size) => this.frameBuffers.take(size), this.frameCrc);
    const raw = pages.length * PAGE_SIZE;
    if (compress) policy.recordCompress(raw, compressed >= 0 ? compressed : raw, compressMs);
    this.count(raw, compressed, verdict, compress !== null);
    await l.send(frame, () => this.frameBuffers.give(frame));
    policy.recordFrame(l.bytesOut);
  }

  private count(raw: number, compressed: number, verdict: string, tried: boolean): void {
    const s = this.stats;
    if (compressed >= 0) {
      s.framesCompressed++;
      s.bytesBefore += raw;
      s.bytesAfter += compressed;
      return;
    }
    s.framesRaw++;
    if (verdict === "slow") s.rawSlow++;
    else if (verdict === "poor" || tried) s.rawPoorRatio++;
  }

  /** The rates it measured, into stats (MB/s). */
  finish(): void {
    this.stats.compressMBs = (this.policy?.compressRate ?? 0) / 1e6;
    this.stats.linkMBs = (this.policy?.measuredLinkRate ?? 0) / 1e6;
  }

  free(): void {
    this.resendRegion.free();
    this.resendHashes.free();
  }
}

function offerFor(mode: CompressionMode): CompressionAlgorithm[] {
  if (mode === "auto") return availableAlgorithms();
  if (mode === "off") return [];
  if (!availableAlgorithms().includes(mode)) throw new RangeError(`pagetwin: --compress ${mode}: not available here (${zstdUnavailableReason()})`);
  return [mode];
}
