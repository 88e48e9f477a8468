// One migration at the destination agent, frame by frame: pages written into
// the RAM file, twins' blocks fetched from the NAS and verified before they
// are written (a block that no longer matches is asked for again), and at
// switchover the RAM digest compared with the source's. Nothing unverified is
// ever written into guest RAM.

import { Engine, Region, HASH_SIZE, PAGE_SIZE } from "../core/engine.js";
import type { RamFile } from "../adapters/ram/ram-file.js";
import type { GuestDisk } from "../adapters/nas/image.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import type { FrameLink } from "../link/channel.js";
import type { FrameBuffers } from "../link/buffers.js";
import { ProtocolError, jsonFrame, parseJson, printable, type Frame } from "../wire/envelope.js";
import { PageWriter } from "./page-writer.js";
import type { DeviceSink } from "./device.js";
import { FrameType, decodePages, decodeRefs, decodePageList, decodeCompressedPages, encodeIterAck } from "./protocol.js";
import { algorithmOfId, createCompressor, type CompressionAlgorithm, type PageCompressor } from "../codec/compress.js";

/** Pages hashed or decompressed at once. */
const BATCH_PAGES = 4096;

export interface DestinationResult {
  status: "completed" | "failed";
  pagesWritten: number;
  twinsVerified: number;
  /** Twins whose NAS block did not match their hash (rewritten since indexing, or unreadable). */
  twinsRejected: number;
  zeroPages: number;
  /** Pages that came in CompressedPages frames (included in pagesWritten). */
  pagesDecompressed: number;
  /** Bytes of device state handed to this host's QEMU through the link (0: none went this way). */
  deviceBytes: number;
  bytesIn: number;
  /** Whether the source's data frames carried their own CRC-32 (false: inside TLS both agents agreed to leave it out). */
  frameCrc: boolean;
  digest: string;
  verified: boolean;
  error?: string;
}

export function emptyDestinationResult(): DestinationResult {
  return { status: "failed", pagesWritten: 0, twinsVerified: 0, twinsRejected: 0, zeroPages: 0, pagesDecompressed: 0, bytesIn: 0, frameCrc: true, deviceBytes: 0, digest: "", verified: false };
}

export interface SessionParts {
  engine: Engine;
  ram: RamFile;
  /** The RAM file was created empty by this agent (all zero): no need to hash it first. */
  created: boolean;
  image: GuestDisk | null;
  pages: number;
  /** Algorithms agreed in Hello (what the source offered and this agent decompresses). */
  compression: CompressionAlgorithm[];
  /** The device state through the link into this host's QEMU, when the source asked for it. */
  device: DeviceSink | null;
  /** Pages frames' payloads go back here once written. */
  buffers: FrameBuffers;
  /** How the RAM is checked at switchover (DestinationOptions.verify). */
  verify: "held" | "reread";
  /** After the digest matched, before Done. */
  onVerified?: (() => Promise<void>) | undefined;
}

export class DestinationSession {
  /** 16 B per page: the hash of what this agent holds in RAM (taken before the migration, kept up to date on every write). */
  private readonly held: Region;
  /** Fetches and checks twin blocks from the image (null without one). */
  private readonly verifier: BlockVerifier | null;
  /** Writes pages into the RAM file and keeps `held` up to date. */
  private readonly writer: PageWriter;
  private readonly scratch: Region;
  private readonly zero = new Uint8Array(PAGE_SIZE);
  private readonly decompressors = new Map<CompressionAlgorithm, PageCompressor>();
  private resend: number[] = [];

  constructor(private readonly p: SessionParts, private readonly r: DestinationResult) {
    const { engine } = p;
    this.held = engine.alloc(p.pages * HASH_SIZE);
    this.verifier = p.image ? new BlockVerifier(engine, p.image) : null;
    this.writer = new PageWriter(engine, p.ram, this.held);
    this.scratch = engine.alloc(BATCH_PAGES * PAGE_SIZE);
    if (p.created) {
      const z = engine.zeroPageHash(), v = this.held.view();
      for (let i = 0; i < p.pages; i++) v.set(z, i * HASH_SIZE);
    } else {
      // an existing RAM file may hold anything: hash it now, before the guest stops
      this.hashRam(this.held.ptr);
    }
  }

  /** Takes one frame; true once the migration is complete (Done sent, device state handed on). */
  async take(f: Frame, link: FrameLink): Promise<boolean> {
    switch (f.type) {
      case FrameType.Pages: this.pages(f); return false;
      case FrameType.CompressedPages: this.compressedPages(f); return false;
      case FrameType.Zeros: this.zeros(f); return false;
      case FrameType.Refs: this.refs(f); return false;
      case FrameType.IterEnd: await this.iterEnd(f, link); return false;
      case FrameType.Switchover: await this.switchover(f, link); return true;
      default:
        throw new ProtocolError(`unexpected ${FrameType[f.type]} frame during a migration`);
    }
  }

  private pages(f: Frame): void {
    const { pages, data } = decodePages(f, this.p.pages);
    this.writer.write(pages, (i) => data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
    this.r.pagesWritten += pages.length;
    this.p.buffers.give(f.payload); // the writer copied the pages
  }

  private compressedPages(f: Frame): void {
    const { algorithmId, pages, packed } = decodeCompressedPages(f, this.p.pages);
    const algo = algorithmOfId(algorithmId);
    if (!algo || !this.p.compression.includes(algo)) {
      throw new ProtocolError(`CompressedPages frame uses algorithm ${algo ?? `#${algorithmId}`}, which was not agreed (agreed: ${this.p.compression.join(", ") || "none"})`);
    }
    let d = this.decompressors.get(algo);
    if (!d) this.decompressors.set(algo, (d = createCompressor(algo)));
    // straight into the hashing scratch: exactly n pages, never more (a bomb or corrupt data throws)
    const n = pages.length;
    const data = this.scratch.view(0, n * PAGE_SIZE);
    d.decompressInto(packed, data);
    this.writer.write(pages, (i) => data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
    this.r.pagesWritten += n;
    this.r.pagesDecompressed += n;
    this.p.buffers.give(f.payload);
  }

  private zeros(f: Frame): void {
    const pages = decodePageList(f, this.p.pages, "Zeros");
    this.writer.write(pages, () => this.zero);
    this.r.zeroPages += pages.length;
  }

  private refs(f: Frame): void {
    const verifier = this.verifier;
    if (!verifier) throw new ProtocolError("the source sent NAS references, but this destination has no image (start it with --image)");
    // a block past the image's end now (it shrank since indexing) reads as unreadable: asked for again;
    // more than MAX_REFS (4096, the verifier's slots) references are refused by decodeRefs
    const { pages, blocks, hashes: want } = decodeRefs(f, this.p.pages, 0xffffffff);
    const ok = verifier.verify(blocks, (i) => want.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE));
    const v = verifier.slots(pages.length);
    const good: number[] = [];
    for (let i = 0; i < pages.length; i++) {
      if (ok[i]) good.push(i);
      else this.resend.push(pages[i]!);
    }
    this.writer.write(Uint32Array.from(good, (i) => pages[i]!), (k) => v.subarray(good[k]! * PAGE_SIZE, (good[k]! + 1) * PAGE_SIZE));
    this.r.twinsVerified += good.length;
    this.r.twinsRejected += pages.length - good.length;
  }

  private async iterEnd(f: Frame, link: FrameLink): Promise<void> {
    const { iteration } = parseJson<{ iteration: number }>(f, "IterEnd");
    this.writer.flush();
    await link.send(encodeIterAck(iteration, this.resend));
    this.resend = [];
  }

  private async switchover(f: Frame, link: FrameLink): Promise<void> {
    const r = this.r;
    const { digest } = parseJson<{ digest: unknown }>(f, "Switchover");
    this.writer.flush();
    r.digest = this.p.verify === "reread" ? this.ramDigest() : Buffer.from(this.p.engine.digest(this.held.view())).toString("hex");
    if (r.digest !== digest) {
      const why = `RAM digest ${r.digest} differs from the source's ${printable(String(digest))}`;
      await link.send(jsonFrame(FrameType.Done, { ok: false, digest: r.digest, error: why }));
      throw new ProtocolError(why);
    }
    r.verified = true;
    if (this.p.onVerified) await this.p.onVerified();
    await link.send(jsonFrame(FrameType.Done, { ok: true, digest: r.digest }));
    if (this.p.device) {
      await this.p.device.run(link);
      r.deviceBytes = this.p.device.bytes;
    }
    r.status = "completed";
    link.close();
  }

  /** Reads and hashes the whole RAM file into `outPtr` (16 B per page). */
  private hashRam(outPtr: number): void {
    const { engine, ram, pages } = this.p, at = this.scratch.ptr;
    for (let first = 0; first < pages; first += BATCH_PAGES) {
      const n = Math.min(BATCH_PAGES, pages - first);
      ram.readPages(first, n, engine.u8().subarray(at, at + n * PAGE_SIZE));
      engine.hashPagesAt(at, n, outPtr + first * HASH_SIZE);
    }
  }

  private ramDigest(): string {
    const all = this.p.engine.alloc(this.p.pages * HASH_SIZE);
    try {
      this.hashRam(all.ptr);
      return Buffer.from(this.p.engine.digest(all.view())).toString("hex");
    } finally {
      all.free();
    }
  }

  free(): void {
    this.verifier?.free();
    this.writer.free();
    this.held.free();
    this.scratch.free();
    this.p.ram.close();
    this.p.image?.close();
  }
}
