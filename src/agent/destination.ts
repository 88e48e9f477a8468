// Destination agent: listens, lets in one authenticated source at a time,
// and checks its Hello against this host's NAS image and RAM file; the
// migration itself (pages written, twins verified from the NAS, the RAM
// digest at switchover) is a DestinationSession.

import { setImmediate as yieldToIo } from "node:timers/promises";
import type { Socket } from "node:net";
import { Listener, freePort } from "../link/listen.js";
import { DeviceSink } from "./device.js";
import { resolveSecurity, checkSecurity, isTls, type Security, type SecurityOptions } from "../link/security.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { FrameLink } from "../link/channel.js";
import { ProtocolError, jsonFrame, parseJson, printable, type Frame } from "../wire/envelope.js";
import { createEngine, PAGE_SIZE } from "../core/engine.js";
import { RamFile } from "../adapters/ram/ram-file.js";
import type { GuestDisk } from "../adapters/nas/image.js";
import { openDisk } from "../adapters/nas/disk.js";
import { recordedFormat } from "../adapters/nas/index-header.js";
import { DestinationSession, emptyDestinationResult, type DestinationResult } from "./destination-session.js";
import { FrameBuffers } from "../link/buffers.js";
import { readIndexHeader, defaultIndexPath } from "../adapters/nas/index-file.js";
import {
  AGENT_FRAMES, DEFAULT_FRAME_PAGES, FrameType, PROTOCOL_VERSION, pagesFrameSize, encodeCredit,
} from "./protocol.js";
import { toLog, type Log, type LogOption } from "../log.js";
import { availableAlgorithms } from "../codec/compress.js";

export type { DestinationResult } from "./destination-session.js";

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
    const r = emptyDestinationResult();
    let s: DestinationSession | null = null;
    try {
      s = await this.hello(link, buffers, r);
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
        if (await s.take(f, link)) return r;
      }
    } catch (err) {
      r.error = (err as Error).message.replace(/^pagetwin: /, "");
      this.log.error(`pagetwin listen: migration failed: ${r.error}`, { error: r.error });
      link.abort(r.error);
      return r;
    } finally {
      r.bytesIn = link.bytesIn;
      s?.free();
    }
  }

  private async hello(link: FrameLink, buffers: FrameBuffers, r: DestinationResult): Promise<DestinationSession> {
    const h = parseJson<{ version: unknown; pages: number; pageSize: unknown; dedup: boolean; indexId: string | null; compression?: unknown; device?: unknown; noFrameCrc?: unknown }>(await link.next(FrameType.Hello, TIMEOUTS.helloMs), "Hello");
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
    // the source's data frames may go without their CRC when both ends are inside TLS (it refuses any changed record)
    const noFrameCrc = h.noFrameCrc === true && isTls(link.socket);
    await link.send(jsonFrame(FrameType.HelloAck, { ok: true, ready: true, version: PROTOCOL_VERSION, compression, ...(device ? { device: device.incoming } : {}), ...(noFrameCrc ? { noFrameCrc } : {}) }));
    link.handshakeDone({ crc: !noFrameCrc });
    r.frameCrc = !noFrameCrc;
    const parts = {
      engine, ram, created: !!this.opts.createRam, image, pages: h.pages, compression, device, buffers,
      verify: this.opts.verify ?? "held", onVerified: this.opts.onVerified,
    } as const;
    try {
      return new DestinationSession(parts, r);
    } catch (err) {
      ram.close();
      image?.close();
      throw err;
    }
  }
}
