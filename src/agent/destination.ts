// Destination agent: accepts one migration, writes pages into the
// destination RAM file, fetches every twin's block from the NAS image and
// verifies its hash before writing it (a block that no longer matches is
// asked for again), and at switchover hashes its whole RAM and answers with
// the digest. Nothing unverified is ever written into guest RAM.

import { setImmediate as yieldToIo } from "node:timers/promises";
import type { Socket } from "node:net";
import { Listener, freePort } from "../link/listen.js";
import { DeviceSink } from "./device.js";
import { resolveSecurity, checkSecurity, type Security, type SecurityOptions } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { FrameLink } from "../link/channel.js";
import { ProtocolError, jsonFrame, parseJson, printable, type Frame } from "../wire/envelope.js";
import { createEngine, Engine, Region, HASH_SIZE, PAGE_SIZE } from "../core/engine.js";
import { RamFile } from "../adapters/ram/ram-file.js";
import type { GuestDisk } from "../adapters/nas/image.js";
import { openDisk } from "../adapters/nas/disk.js";
import { recordedFormat } from "../adapters/nas/index-header.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import { PageWriter } from "./page-writer.js";
import { FrameBuffers } from "../link/buffers.js";
import { readIndexHeader, defaultIndexPath } from "../adapters/nas/index-file.js";
import {
  AGENT_FRAMES, DEFAULT_FRAME_PAGES, FrameType, PROTOCOL_VERSION, decodePages, pagesFrameSize, decodeRefs, decodePageList, decodeCompressedPages, encodeIterAck, encodeCredit,
} from "./protocol.js";
import { toLog, type Log, type LogOption } from "../log.js";
import { algorithmOfId, availableAlgorithms, createCompressor, type CompressionAlgorithm, type PageCompressor } from "../codec/compress.js";

export interface DestinationOptions extends SecurityOptions {
  /** The destination VM's RAM file (exists with the VM's size, or is created when `createRam`). */
  ramPath: string;
  createRam?: boolean;
  /** The NAS image the twins come from (the only file read for them). */
  imagePath?: string;
  indexPath?: string;
  /** Where to listen: host (default 127.0.0.1) and port, or a unix socket path. */
  host?: string;
  port?: number;
  socketPath?: string;
  /**
   * Largest RAM a source may migrate here, bytes, when this agent creates
   * the RAM file (createRam); an existing RAM file bounds it by its own size.
   */
  maxRamBytes?: number;
  /** Called after the RAM digest matched, before answering Done (QEMU: take the device state, `cont`). */
  onVerified?: () => Promise<void>;
  /** Where this agent logs (level-aware, or a function that gets every message). */
  log?: LogOption;
  /**
   * How to check the RAM at switchover: "held" (default) digests the hash of
   * every page as it was written, so the guest's downtime does not pay for
   * re-reading its RAM; "reread" reads and hashes the whole RAM file again
   * (catches writes by anything else, at the cost of a full pass).
   */
  verify?: "held" | "reread";
  /**
   * Where this host's QEMU takes the device state when the source sends it
   * through the link (`migrate-incoming` URI: tcp:127.0.0.1:PORT or
   * unix:PATH); default: a free loopback port, told to the source in HelloAck.
   */
  deviceIncoming?: string;
  /** A source silent for this long is dropped, ms (default 120000). */
  idleTimeoutMs?: number;
}

/**
 * Most pages a migration may have: 16 B of held hashes per page must fit the
 * core's 32-bit memory beside its other buffers (2^26 pages = 256 GiB of RAM).
 */
export const MAX_PAGES = 2 ** 26;
/** Largest RAM file this agent creates unless told otherwise (maxRamBytes, --max-ram). */
export const DEFAULT_MAX_RAM = 64 * 2 ** 30;
/** A Credit goes back once this many more bytes arrived (a 1 MiB Pages frame brings 4; 17 bytes each). */
const CREDIT_STEP = 256 * 1024;

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
  digest: string;
  verified: boolean;
  error?: string;
}

interface Session {
  engine: Engine;
  ram: RamFile;
  image: GuestDisk | null;
  /** Fetches and checks twin blocks from `image` (null without one). */
  verifier: BlockVerifier | null;
  pages: number;
  resend: number[];
  /** 16 B per page: the hash of what this agent holds in RAM (taken before the migration, kept up to date on every write). */
  held: Region;
  /** Writes pages into `ram` and keeps `held` up to date. */
  writer: PageWriter;
  /** Algorithms agreed in Hello (what the source offered and this agent decompresses). */
  compression: CompressionAlgorithm[];
  decompressors: Map<CompressionAlgorithm, PageCompressor>;
  /** The device state through the link into this host's QEMU, when the source asked for it. */
  device: DeviceSink | null;
}

/**
 * The destination side of an agent-mode migration: listen(), then each
 * migration writes the destination RAM file, verifying every NAS block
 * before it is used; nextResult() resolves when one ends. close() when done.
 */
export class DestinationAgent {
  private listener: Listener | null = null;
  private busy = false;
  readonly results: DestinationResult[] = [];
  /** Peers refused before they authenticated (they are not migrations). */
  readonly refused: string[] = [];
  private waiters: ((r: DestinationResult) => void)[] = [];
  private readonly security: Security;
  private readonly log: Log;

  constructor(readonly opts: DestinationOptions) {
    this.log = toLog(opts.log);
    this.security = resolveSecurity(opts, "pagetwin listen");
    checkSecurity(this.security);
  }

  /** Starts listening; resolves with the bound port (0 on a unix socket). */
  async listen(): Promise<number> {
    const o = this.opts;
    this.listener = await Listener.open({
      at: o.socketPath ? { kind: "unix", path: o.socketPath } : { kind: "tcp", host: o.host ?? "127.0.0.1", port: o.port ?? 0 },
      security: this.security, peer: "source agent",
      onSession: (s) => this.accept(s),
      onRefused: (why) => this.refused.push(why),
      refusalFrame: (why) => jsonFrame(FrameType.HelloAck, { ok: false, error: `TLS: this destination refuses the source: ${why}` }),
      log: (m) => this.log.info(`pagetwin listen: ${m}`),
    });
    return this.listener.port;
  }

  /** The result of the next migration that ends. */
  nextResult(): Promise<DestinationResult> {
    return new Promise((r) => this.waiters.push(r));
  }

  close(): void {
    this.listener?.close();
  }

  private finish(r: DestinationResult): void {
    this.results.push(r);
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f(r);
  }

  /** An authenticated source (TLS is over): it takes the one migration slot, or is told it is busy. */
  private accept(socket: Socket): void {
    if (this.busy) {
      socket.end(jsonFrame(FrameType.HelloAck, { ok: false, error: "this destination agent is already receiving a migration" }));
      setTimeout(() => socket.destroy(), TIMEOUTS.refuseLingerMs).unref();
      return;
    }
    this.busy = true;
    const idle = this.opts.idleTimeoutMs ?? TIMEOUTS.idleMs;
    socket.setTimeout(idle, () => socket.destroy(new Error(`the source sent nothing for ${idle} ms`)));
    // frames of full pages, joined from the socket's chunks, in buffers used again once their pages are written
    const buffers = new FrameBuffers(pagesFrameSize(DEFAULT_FRAME_PAGES), 8);
    const frames = { ...AGENT_FRAMES, alloc: (n: number) => buffers.take(n) };
    const link = new FrameLink(socket, `source agent ${socket.remoteAddress ?? "on the unix socket"}${socket.remotePort ? `:${socket.remotePort}` : ""}`, frames);
    this.session(link, buffers).then((r) => {
      this.busy = false;
      this.finish(r);
    });
  }

  private async session(link: FrameLink, buffers: FrameBuffers): Promise<DestinationResult> {
    const r: DestinationResult = { status: "failed", pagesWritten: 0, twinsVerified: 0, twinsRejected: 0, zeroPages: 0, pagesDecompressed: 0, bytesIn: 0, deviceBytes: 0, digest: "", verified: false };
    let s: Session | null = null;
    try {
      s = await this.hello(link);
      const zero = new Uint8Array(PAGE_SIZE);
      const scratch = s.engine.alloc(4096 * PAGE_SIZE);
      let credited = 0;
      for (;;) {
        // Queued frames come back as microtasks: let the socket be read between
        // them, or the link idles while a run of Refs frames is verified here.
        await yieldToIo();
        const f: Frame = await link.next();
        // what has arrived, acknowledged as it arrives: the source times the link on these, not on its socket's buffers
        if (link.bytesIn - credited >= CREDIT_STEP) {
          credited = link.bytesIn;
          await link.send(encodeCredit(credited));
        }
        switch (f.type) {
          case FrameType.Pages: {
            const { pages, data } = decodePages(f, s.pages);
            s.writer.write(pages, (i) => data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
            r.pagesWritten += pages.length;
            buffers.give(f.payload); // the writer copied the pages
            break;
          }
          case FrameType.CompressedPages: {
            const { algorithmId, pages, packed } = decodeCompressedPages(f, s.pages);
            const algo = algorithmOfId(algorithmId);
            if (!algo || !s.compression.includes(algo)) {
              throw new ProtocolError(`CompressedPages frame uses algorithm ${algo ?? `#${algorithmId}`}, which was not agreed (agreed: ${s.compression.join(", ") || "none"})`);
            }
            let d = s.decompressors.get(algo);
            if (!d) s.decompressors.set(algo, (d = createCompressor(algo)));
            // straight into the hashing scratch: exactly n pages, never more (a bomb or corrupt data throws)
            const n = pages.length;
            const data = scratch.view(0, n * PAGE_SIZE);
            d.decompressInto(packed, data);
            s.writer.write(pages, (i) => data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
            r.pagesWritten += n;
            r.pagesDecompressed += n;
            buffers.give(f.payload);
            break;
          }
          case FrameType.Zeros: {
            const pages = decodePageList(f, s.pages, "Zeros");
            s.writer.write(pages, () => zero);
            r.zeroPages += pages.length;
            break;
          }
          case FrameType.Refs: {
            if (!s.verifier) throw new ProtocolError("the source sent NAS references, but this destination has no image (start it with --image)");
            // a block past the image's end now (it shrank since indexing) reads as unreadable: asked for again;
            // more than MAX_REFS (4096, the verifier's slots) references are refused by decodeRefs
            const { pages, blocks, hashes: want } = decodeRefs(f, s.pages, 0xffffffff);
            const ok = s.verifier.verify(blocks, (i) => want.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE));
            const v = s.verifier.slots(pages.length);
            const good: number[] = [];
            for (let i = 0; i < pages.length; i++) {
              if (ok[i]) good.push(i);
              else s.resend.push(pages[i]!);
            }
            s.writer.write(Uint32Array.from(good, (i) => pages[i]!), (k) => v.subarray(good[k]! * PAGE_SIZE, (good[k]! + 1) * PAGE_SIZE));
            r.twinsVerified += good.length;
            r.twinsRejected += pages.length - good.length;
            break;
          }
          case FrameType.IterEnd: {
            const { iteration } = parseJson<{ iteration: number }>(f, "IterEnd");
            s.writer.flush();
            await link.send(encodeIterAck(iteration, s.resend));
            s.resend = [];
            break;
          }
          case FrameType.Switchover: {
            const { digest } = parseJson<{ digest: unknown }>(f, "Switchover");
            s.writer.flush();
            r.digest = this.opts.verify === "reread"
              ? this.ramDigest(s, scratch.ptr)
              : Buffer.from(s.engine.digest(s.held.view())).toString("hex");
            if (r.digest !== digest) {
              const why = `RAM digest ${r.digest} differs from the source's ${printable(String(digest))}`;
              await link.send(jsonFrame(FrameType.Done, { ok: false, digest: r.digest, error: why }));
              throw new ProtocolError(why);
            }
            r.verified = true;
            if (this.opts.onVerified) await this.opts.onVerified();
            await link.send(jsonFrame(FrameType.Done, { ok: true, digest: r.digest }));
            if (s.device) {
              await s.device.run(link);
              r.deviceBytes = s.device.bytes;
            }
            r.status = "completed";
            link.close();
            return r;
          }
          default:
            throw new ProtocolError(`unexpected ${FrameType[f.type]} frame during a migration`);
        }
      }
    } catch (err) {
      r.error = (err as Error).message.replace(/^pagetwin: /, "");
      this.log.error(`pagetwin listen: migration failed: ${r.error}`, { error: r.error });
      link.abort(r.error);
      return r;
    } finally {
      r.bytesIn = link.bytesIn;
      s?.verifier?.free();
      s?.writer.free();
      s?.held.free();
      s?.ram.close();
      s?.image?.close();
    }
  }

  private async hello(link: FrameLink): Promise<Session> {
    const h = parseJson<{ version: unknown; pages: number; pageSize: unknown; dedup: boolean; indexId: string | null; compression?: unknown; device?: unknown }>(await link.next(FrameType.Hello, TIMEOUTS.helloMs), "Hello");
    const refuse = async (error: string): Promise<never> => {
      await link.send(jsonFrame(FrameType.HelloAck, { ok: false, error, version: PROTOCOL_VERSION }));
      throw new ProtocolError(error);
    };
    if (h.version !== PROTOCOL_VERSION) return refuse(`protocol version ${printable(String(h.version))} is not supported (this agent speaks ${PROTOCOL_VERSION}): run the same pagetwin version on both hosts`);
    if (h.pageSize !== PAGE_SIZE) return refuse(`page size ${printable(String(h.pageSize))} is not supported (4096 only)`);
    if (!Number.isInteger(h.pages) || h.pages <= 0 || h.pages > MAX_PAGES) return refuse(`bad page count ${printable(String(h.pages))} (1..${MAX_PAGES})`);
    const maxRam = this.opts.maxRamBytes ?? DEFAULT_MAX_RAM;
    if (this.opts.createRam && h.pages * PAGE_SIZE > maxRam) {
      return refuse(`the source's RAM is ${h.pages * PAGE_SIZE} bytes, more than this destination allows (${maxRam}; raise it with --max-ram)`);
    }
    let seed = 0n;
    let image: GuestDisk | null = null;
    if (h.indexId) {
      if (!this.opts.imagePath) return refuse("the source uses a NAS index, but this destination was started without --image");
      const indexPath = this.opts.indexPath ?? defaultIndexPath(this.opts.imagePath);
      let header;
      try {
        header = readIndexHeader(indexPath);
      } catch (err) {
        return refuse((err as Error).message);
      }
      if (header.indexId !== h.indexId) return refuse(`the index at ${indexPath} is not the one the source uses (id ${header.indexId} vs ${h.indexId}); point both agents at the same NAS image`);
      seed = header.seed;
      try {
        image = openDisk(this.opts.imagePath, { format: recordedFormat(header) }); // as the source indexed it
      } catch (err) {
        return refuse((err as Error).message); // e.g. a qcow2 feature not read here: the source learns which
      }
    } else if (h.dedup) {
      return refuse("dedup without an index id");
    }
    let ram: RamFile;
    try {
      ram = this.opts.createRam ? RamFile.create(this.opts.ramPath, h.pages) : RamFile.open(this.opts.ramPath, { write: true, expectPages: h.pages });
    } catch (err) {
      image?.close();
      return refuse((err as Error).message);
    }
    const engine = await createEngine({ seed });
    const offered = Array.isArray(h.compression) ? h.compression : [];
    const compression = availableAlgorithms().filter((a) => offered.includes(a));
    const device = h.device === true ? new DeviceSink(this.opts.deviceIncoming ?? `tcp:127.0.0.1:${await freePort()}`) : null;
    await link.send(jsonFrame(FrameType.HelloAck, { ok: true, ready: true, version: PROTOCOL_VERSION, compression, ...(device ? { device: device.incoming } : {}) }));
    link.handshakeDone();
    const held = engine.alloc(h.pages * HASH_SIZE);
    const verifier = image ? new BlockVerifier(engine, image) : null;
    const writer = new PageWriter(engine, ram, held);
    const session: Session = { engine, ram, image, verifier, pages: h.pages, resend: [], held, writer, compression, decompressors: new Map(), device };
    if (this.opts.createRam) {
      const z = engine.zeroPageHash(), v = held.view();
      for (let i = 0; i < h.pages; i++) v.set(z, i * HASH_SIZE);
    } else {
      // an existing RAM file may hold anything: hash it now, before the guest stops
      const scratch = engine.alloc(4096 * PAGE_SIZE);
      try {
        this.hashRam(session, scratch.ptr, held.ptr);
      } finally {
        scratch.free();
      }
    }
    return session;
  }

  /** Reads and hashes the whole RAM file into `outPtr` (16 B per page). */
  private hashRam(s: Session, scratchPtr: number, outPtr: number): void {
    for (let first = 0; first < s.pages; first += 4096) {
      const n = Math.min(4096, s.pages - first);
      s.ram.readPages(first, n, s.engine.u8().subarray(scratchPtr, scratchPtr + n * PAGE_SIZE));
      s.engine.hashPagesAt(scratchPtr, n, outPtr + first * HASH_SIZE);
    }
  }

  private ramDigest(s: Session, scratchPtr: number): string {
    const all = s.engine.alloc(s.pages * HASH_SIZE);
    try {
      this.hashRam(s, scratchPtr, all.ptr);
      return Buffer.from(s.engine.digest(all.view())).toString("hex");
    } finally {
      all.free();
    }
  }
}
