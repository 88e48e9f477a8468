// The NBD protocol as far as pagetwin speaks it (client side): the fixed
// newstyle handshake, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT,
// NBD_OPT_GO, and the transmission phase's requests and replies (simple
// replies and structured reply chunks). Socket-free: encoders build bytes,
// NbdParser takes bytes as they arrive and hands out whole messages.
// Everything on the wire is big-endian (network byte order).

import { NbdProtocolError, NbdServerError } from "../../errors.js";
export { NbdProtocolError, NbdServerError };

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const CLIENT_FLAG_NO_ZEROES = 1 << 1;

export const Opt = { ExportName: 1, Abort: 2, Go: 7, StructuredReply: 8, ListMetaContext: 9, SetMetaContext: 10 } as const;
export const Rep = { Ack: 1, Server: 2, Info: 3, MetaContext: 4 } as const;
/** Option reply types with bit 31 set are errors. */
export const REP_ERROR_BIT = 0x80000000;
export const REP_ERRORS: Record<number, string> = {
  [0x80000001]: "unsupported option", [0x80000002]: "forbidden by policy", [0x80000003]: "invalid option",
  [0x80000004]: "unsupported on this platform", [0x80000005]: "TLS required", [0x80000006]: "unknown export",
  [0x80000007]: "server shutting down", [0x80000008]: "block size required",
};
export const INFO_EXPORT = 0;

export const TransmissionFlag = { HasFlags: 1 << 0, ReadOnly: 1 << 1 } as const;

export const Cmd = { Read: 0, Write: 1, Disc: 2, BlockStatus: 7 } as const;
export const CmdFlag = { ReqOne: 1 << 3 } as const;

export const Reply = { None: 0, OffsetData: 1, OffsetHole: 2, BlockStatus: 5, Error: 0x8001, ErrorOffset: 0x8002 } as const;
export const REPLY_FLAG_DONE = 1 << 0;
/** Structured reply types with bit 15 set are errors. */
export const REPLY_ERROR_BIT = 0x8000;

/** base:allocation status bits. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
/** qemu:dirty-bitmap:NAME status bit: the extent was written while the bitmap tracked. */
export const STATE_DIRTY = 1 << 0;

export const NBD_ERRNO: Record<number, string> = {
  1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN",
};



// ---- client -> server --------------------------------------------------------

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, 16);
  return b;
}

/** NBD_OPT_GO data: the export name and the information wanted (NBD_INFO_EXPORT is always sent). */
export function goData(exportName: string): Buffer {
  const name = Buffer.from(exportName, "utf8");
  const b = Buffer.alloc(4 + name.length + 2);
  b.writeUInt32BE(name.length, 0);
  b.set(name, 4);
  b.writeUInt16BE(0, 4 + name.length);
  return b;
}

/** NBD_OPT_SET_META_CONTEXT data: export name, then the queries. */
export function metaContextData(exportName: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const name = Buffer.from(exportName, "utf8");
  parts.push(u32(name.length), name, u32(queries.length));
  for (const q of queries) {
    const qb = Buffer.from(q, "utf8");
    parts.push(u32(qb.length), qb);
  }
  return Buffer.concat(parts);
}

export function encodeRequest(type: number, flags: number, handle: bigint, offset: number, length: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

// ---- server -> client --------------------------------------------------------

export type NbdMessage =
  | { kind: "greeting"; flags: number }
  | { kind: "option-reply"; option: number; type: number; data: Buffer }
  | { kind: "simple"; error: number; handle: bigint }
  | { kind: "chunk"; flags: number; type: number; handle: bigint; payload: Buffer };

export type Phase = "greeting" | "options" | "transmission";

/** Largest option reply or reply chunk payload accepted (a read is asked for in pieces well below it). */
export const MAX_PAYLOAD = 64 * 1024 * 1024;

/**
 * Incremental parser of what an NBD server sends. The client says which
 * phase the connection is in; a message may be split anywhere across reads.
 */
export class NbdParser {
  private chunks: Buffer[] = [];
  private have = 0;
  phase: Phase = "greeting";

  push(chunk: Buffer): NbdMessage[] {
    this.chunks.push(chunk);
    this.have += chunk.length;
    const out: NbdMessage[] = [];
    for (let m = this.next(); m; m = this.next()) {
      out.push(m);
      // NBD_OPT_GO's final ACK ends the option phase: what follows is transmission
      if (m.kind === "option-reply" && m.option === Opt.Go && m.type === Rep.Ack) this.phase = "transmission";
    }
    return out;
  }

  private next(): NbdMessage | null {
    switch (this.phase) {
      case "greeting": return this.greeting();
      case "options": return this.optionReply();
      case "transmission": return this.reply();
    }
  }

  private greeting(): NbdMessage | null {
    if (this.have < 18) return null;
    const b = this.take(18);
    if (b.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdProtocolError("not an NBD server (no NBDMAGIC greeting)");
    if (b.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdProtocolError("the NBD server speaks only the old-style handshake; a newstyle server is needed");
    this.phase = "options";
    return { kind: "greeting", flags: b.readUInt16BE(16) };
  }

  private optionReply(): NbdMessage | null {
    if (this.have < 20) return null;
    const h = this.peek(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new NbdProtocolError("bad option reply magic");
    const len = h.readUInt32BE(16);
    if (len > MAX_PAYLOAD) throw new NbdProtocolError(`option reply of ${len} bytes`);
    if (this.have < 20 + len) return null;
    const b = this.take(20 + len);
    return { kind: "option-reply", option: b.readUInt32BE(8), type: b.readUInt32BE(12), data: b.subarray(20) };
  }

  private reply(): NbdMessage | null {
    if (this.have < 4) return null;
    const magic = this.peek(4).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      if (this.have < 16) return null;
      const b = this.take(16);
      return { kind: "simple", error: b.readUInt32BE(4), handle: b.readBigUInt64BE(8) };
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
    if (this.have < 20) return null;
    const len = this.peek(20).readUInt32BE(16);
    if (len > MAX_PAYLOAD) throw new NbdProtocolError(`reply chunk of ${len} bytes`);
    if (this.have < 20 + len) return null;
    const b = this.take(20 + len);
    return { kind: "chunk", flags: b.readUInt16BE(4), type: b.readUInt16BE(6), handle: b.readBigUInt64BE(8), payload: b.subarray(20) };
  }

  /** The first n bytes (n <= have), without consuming them. */
  private peek(n: number): Buffer {
    if (this.chunks[0]!.length < n) this.gather(n);
    return this.chunks[0]!.subarray(0, n);
  }

  private take(n: number): Buffer {
    const b = this.peek(n);
    const first = this.chunks[0]!;
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.have -= n;
    return b;
  }

  /** Joins the leading chunks until the first holds n bytes. */
  private gather(n: number): void {
    const joined = Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(joined, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.chunks.unshift(joined);
  }
}
