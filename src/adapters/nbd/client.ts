// A small NBD client over a unix socket or loopback TCP: the thin socket
// side of protocol.ts and replies.ts. It negotiates structured replies and
// the metadata contexts asked for, enters the export with NBD_OPT_GO, then
// reads and queries block status; requests may be in flight together.

import * as net from "node:net";
import {
  CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, Cmd, encodeClientFlags, encodeOption, encodeRequest,
  FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, goData, INFO_EXPORT, metaContextData, NbdParser, NbdProtocolError, NbdServerError,
  NBD_ERRNO, Opt, Rep, REP_ERRORS, REP_ERROR_BIT, type NbdMessage,
} from "./protocol.js";
import { applyChunk, finish, pendingRead, pendingStatus, type Extent, type Pending } from "./replies.js";

export type NbdAddress = { path: string } | { host: string; port: number };

export interface NbdConnectOptions {
  /** Export name ("" for the default export). */
  exportName?: string;
  /** Metadata contexts to select, e.g. "base:allocation", "qemu:dirty-bitmap:NAME". */
  metaContexts?: string[];
  /** Handshake timeout (default 10 s). */
  timeoutMs?: number;
}

/** Largest read asked for in one request (QEMU's server takes up to 32 MiB). */
export const MAX_READ = 4 * 1024 * 1024;

export class NbdClient {
  private readonly parser = new NbdParser();
  private readonly pending = new Map<bigint, { p: Pending; resolve: () => void; reject: (e: Error) => void }>();
  private waiter: { resolve: (m: NbdMessage) => void; reject: (e: Error) => void } | null = null;
  private queue: NbdMessage[] = [];
  private failure: Error | null = null;
  private nextHandle = 1n;
  private closed = false;
  private readonly inflight = new Set<Promise<Pending>>();
  /** Size of the export in bytes and its transmission flags, from NBD_OPT_GO. */
  size = 0;
  flags = 0;
  /** Selected metadata contexts: name -> id. */
  readonly contexts = new Map<string, number>();
  /** Requests sent, for callers that count their reads. */
  readonly counts = { reads: 0, bytesRead: 0, blockStatus: 0 };

  private constructor(private readonly sock: net.Socket) {
    sock.on("data", (d: Buffer) => this.onData(d));
    sock.on("error", (e) => this.fail(new NbdProtocolError(`NBD connection failed: ${e.message}`, { cause: e })));
    sock.on("close", () => this.fail(new NbdProtocolError("the NBD server closed the connection")));
  }

  static async connect(at: NbdAddress, opts: NbdConnectOptions = {}): Promise<NbdClient> {
    const sock = "path" in at ? net.connect(at.path) : net.connect(at.port, at.host);
    await new Promise<void>((resolve, reject) => {
      sock.once("connect", resolve);
      sock.once("error", (e) => reject(new NbdProtocolError(`cannot connect to the NBD server at ${"path" in at ? at.path : `${at.host}:${at.port}`}: ${e.message}`, { cause: e })));
    });
    const c = new NbdClient(sock);
    const timer = setTimeout(() => c.fail(new NbdProtocolError(`the NBD handshake took longer than ${opts.timeoutMs ?? 10_000} ms`)), opts.timeoutMs ?? 10_000);
    try {
      await c.handshake(opts.exportName ?? "", opts.metaContexts ?? []);
      return c;
    } catch (err) {
      sock.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Reads length bytes at offset (split into MAX_READ requests, all in flight at once). */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    if (length <= MAX_READ) return this.request(Cmd.Read, 0, offset, length, pendingRead(offset, length)).then((p) => (p as Pending & { kind: "read" }).data);
    const parts: Promise<Buffer>[] = [];
    for (let at = 0; at < length; at += MAX_READ) parts.push(this.read(offset + at, Math.min(MAX_READ, length - at)));
    return Buffer.concat(await Promise.all(parts));
  }

  /**
   * The extents of `context` over [offset, offset+length), in order and
   * covering the whole range (a server may answer a query in part: the rest
   * is asked for again).
   */
  async blockStatus(context: string, offset: number, length: number): Promise<Extent[]> {
    const id = this.contexts.get(context);
    if (id === undefined) throw new NbdProtocolError(`metadata context ${context} was not negotiated (have: ${[...this.contexts.keys()].join(", ") || "none"})`);
    this.checkRange(offset, length);
    const out: Extent[] = [];
    for (let at = offset; at < offset + length;) {
      const len = Math.min(offset + length - at, 0x80000000); // the length field is 32 bits
      const p = await this.request(Cmd.BlockStatus, 0, at, len, pendingStatus(at, len));
      const ext = (p as Pending & { kind: "status" }).extents.get(id);
      if (!ext || ext.length === 0) throw new NbdProtocolError(`no extents for context ${context} in the server's answer`);
      out.push(...ext);
      at = ext[ext.length - 1]!.offset + ext[ext.length - 1]!.length;
    }
    return out;
  }

  /** A raw request (tests use it to send what a server must refuse). */
  async rawRequest(type: number, flags: number, offset: number, length: number): Promise<void> {
    await this.request(type, flags, offset, length, type === Cmd.Read ? pendingRead(offset, length) : { kind: "other", error: null });
  }

  /** NBD_CMD_DISC after the requests in flight are answered; resolves when the server has closed. */
  async disconnect(): Promise<void> {
    if (this.closed) return;
    await Promise.allSettled([...this.inflight]);
    this.closed = true;
    const gone = new Promise<void>((r) => { if (this.sock.destroyed) r(); else this.sock.once("close", () => r()); });
    if (!this.sock.destroyed) this.sock.end(encodeRequest(Cmd.Disc, 0, 0n, 0, 0));
    await gone;
  }

  /** Drops the connection at once (a hard disconnect). */
  destroy(): void {
    this.closed = true;
    this.sock.destroy();
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0) {
      throw new RangeError(`pagetwin: NBD range ${offset}+${length} is not a positive byte range`);
    }
  }

  private request(type: number, flags: number, offset: number, length: number, p: Pending): Promise<Pending> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new NbdProtocolError("the NBD client is disconnected"));
    const handle = this.nextHandle++;
    if (type === Cmd.Read) { this.counts.reads++; this.counts.bytesRead += length; }
    if (type === Cmd.BlockStatus) this.counts.blockStatus++;
    const answer = new Promise<Pending>((resolve, reject) => {
      this.pending.set(handle, {
        p,
        resolve: () => { try { finish(p); resolve(p); } catch (e) { reject(e as Error); } },
        reject,
      });
      this.sock.write(encodeRequest(type, flags, handle, offset, length));
    });
    this.inflight.add(answer);
    const forget = () => { this.inflight.delete(answer); };
    answer.then(forget, forget);
    return answer;
  }

  // ---- handshake -------------------------------------------------------------

  private async handshake(exportName: string, metaContexts: string[]): Promise<void> {
    const greeting = await this.message();
    if (greeting.kind !== "greeting") throw new NbdProtocolError("no NBD greeting");
    if (!(greeting.flags & FLAG_FIXED_NEWSTYLE)) throw new NbdProtocolError("the NBD server does not speak the fixed newstyle handshake");
    this.sock.write(encodeClientFlags(CLIENT_FLAG_FIXED_NEWSTYLE | (greeting.flags & FLAG_NO_ZEROES ? CLIENT_FLAG_NO_ZEROES : 0)));
    await this.option(Opt.StructuredReply, Buffer.alloc(0), "structured replies");
    if (metaContexts.length) {
      const replies = await this.option(Opt.SetMetaContext, metaContextData(exportName, metaContexts), "metadata contexts");
      for (const r of replies) {
        if (r.type !== Rep.MetaContext || r.data.length < 4) continue;
        this.contexts.set(r.data.toString("utf8", 4), r.data.readUInt32BE(0));
      }
      const missing = metaContexts.filter((c) => !this.contexts.has(c));
      if (missing.length) throw new NbdServerError(`the NBD server does not offer the metadata context ${missing.join(", ")} on export "${exportName}"`);
    }
    for (const r of await this.option(Opt.Go, goData(exportName), `export "${exportName}"`)) {
      if (r.type === Rep.Info && r.data.length >= 12 && r.data.readUInt16BE(0) === INFO_EXPORT) {
        this.size = Number(r.data.readBigUInt64BE(2));
        this.flags = r.data.readUInt16BE(10);
      }
    }
    if (!this.size) throw new NbdProtocolError(`the NBD server gave no size for export "${exportName}"`);
  }

  /** Sends an option and collects its replies up to the final ACK; an error reply throws. */
  private async option(option: number, data: Buffer, what: string): Promise<Array<NbdMessage & { kind: "option-reply" }>> {
    this.sock.write(encodeOption(option, data));
    const replies: Array<NbdMessage & { kind: "option-reply" }> = [];
    for (;;) {
      const m = await this.message();
      if (m.kind !== "option-reply" || m.option !== option) throw new NbdProtocolError(`unexpected ${m.kind} while negotiating ${what}`);
      if (m.type & REP_ERROR_BIT) {
        const why = REP_ERRORS[m.type] ?? `error 0x${m.type.toString(16)}`;
        throw new NbdServerError(`the NBD server refused ${what}: ${why}${m.data.length ? ` (${m.data.toString("utf8")})` : ""}`);
      }
      if (m.type === Rep.Ack) return replies;
      replies.push(m);
    }
  }

  private message(): Promise<NbdMessage> {
    if (this.failure) return Promise.reject(this.failure);
    const m = this.queue.shift();
    if (m) return Promise.resolve(m);
    return new Promise((resolve, reject) => { this.waiter = { resolve, reject }; });
  }

  // ---- incoming --------------------------------------------------------------

  private onData(d: Buffer): void {
    let msgs: NbdMessage[];
    try {
      msgs = this.parser.push(d);
    } catch (e) {
      this.fail(e as Error);
      this.sock.destroy();
      return;
    }
    for (const m of msgs) {
      if (this.parser.phase !== "transmission" || m.kind === "option-reply") this.deliverHandshake(m);
      else this.onReply(m);
    }
  }

  private deliverHandshake(m: NbdMessage): void {
    const w = this.waiter;
    if (w) { this.waiter = null; w.resolve(m); } else this.queue.push(m);
  }

  private onReply(m: NbdMessage): void {
    if (m.kind !== "simple" && m.kind !== "chunk") return;
    const e = this.pending.get(m.handle);
    if (!e) {
      this.fail(new NbdProtocolError(`a reply for handle ${m.handle}, which no request in flight has`));
      this.sock.destroy();
      return;
    }
    let done: boolean;
    try {
      if (m.kind === "simple") {
        // only a request without data may be answered simply once structured replies are on
        if (e.p.kind === "read" && m.error === 0) throw new NbdProtocolError("a simple reply to a read after structured replies were negotiated");
        if (m.error) e.p.error = new NbdServerError(`NBD server error ${NBD_ERRNO[m.error] ?? m.error}`, { errno: m.error });
        done = true;
      } else {
        done = applyChunk(e.p, m.flags, m.type, m.payload);
      }
    } catch (err) {
      this.fail(err as Error);
      this.sock.destroy();
      return;
    }
    if (done) {
      this.pending.delete(m.handle);
      e.resolve();
    }
  }

  private fail(err: Error): void {
    if (this.closed && this.pending.size === 0) return;
    this.failure ??= err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(this.failure);
    for (const e of this.pending.values()) e.reject(this.failure);
    this.pending.clear();
  }
}
