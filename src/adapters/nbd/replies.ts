// One request's structured reply, put together chunk by chunk (socket-free):
// a read's data and holes land at their offsets, a block status query's
// extents are listed per metadata context, and error chunks are kept to fail
// the request once its last chunk has come.

import { NbdProtocolError, NbdServerError, NBD_ERRNO, Reply, REPLY_ERROR_BIT, REPLY_FLAG_DONE } from "./protocol.js";

export interface Extent {
  /** Byte offset in the export. */
  offset: number;
  length: number;
  /** Status bits, meaning per context (base:allocation: HOLE, ZERO; qemu:dirty-bitmap: DIRTY). */
  flags: number;
}

export type Pending =
  | { kind: "read"; offset: number; length: number; data: Buffer; covered: number; error: NbdServerError | null }
  | { kind: "status"; offset: number; length: number; extents: Map<number, Extent[]>; error: NbdServerError | null }
  | { kind: "other"; error: NbdServerError | null };

export function pendingRead(offset: number, length: number): Pending {
  return { kind: "read", offset, length, data: Buffer.alloc(length), covered: 0, error: null };
}

export function pendingStatus(offset: number, length: number): Pending {
  return { kind: "status", offset, length, extents: new Map(), error: null };
}

/** Applies one chunk; returns true when it was the request's last. */
export function applyChunk(p: Pending, flags: number, type: number, payload: Buffer): boolean {
  if (type & REPLY_ERROR_BIT) p.error ??= errorChunk(type, payload);
  else if (type === Reply.OffsetData) offsetData(p, payload);
  else if (type === Reply.OffsetHole) offsetHole(p, payload);
  else if (type === Reply.BlockStatus) blockStatus(p, payload);
  else if (type !== Reply.None) throw new NbdProtocolError(`unknown structured reply type ${type}`);
  if (type === Reply.None && !(flags & REPLY_FLAG_DONE)) throw new NbdProtocolError("a NONE reply chunk without the DONE flag");
  return (flags & REPLY_FLAG_DONE) !== 0;
}

/** What a finished request yields, or its error. */
export function finish(p: Pending): void {
  if (p.error) throw p.error;
  if (p.kind === "read" && p.covered !== p.length) {
    throw new NbdProtocolError(`the server answered a read of ${p.length} bytes with ${p.covered}`);
  }
}

function errorChunk(type: number, payload: Buffer): NbdServerError {
  if (payload.length < 6) throw new NbdProtocolError(`error chunk of ${payload.length} bytes`);
  const errno = payload.readUInt32BE(0);
  const msgLen = payload.readUInt16BE(4);
  if (6 + msgLen > payload.length) throw new NbdProtocolError("error chunk message longer than the chunk");
  const msg = payload.toString("utf8", 6, 6 + msgLen);
  const at = type === Reply.ErrorOffset && payload.length >= 6 + msgLen + 8 ? ` at offset ${payload.readBigUInt64BE(6 + msgLen)}` : "";
  return new NbdServerError(`NBD server error ${NBD_ERRNO[errno] ?? errno}${at}${msg ? `: ${msg}` : ""}`, { errno });
}

/** Checks that [offset, offset+len) lies in the read's range; returns where it starts in the buffer. */
function within(p: Pending & { kind: "read" }, offset: number, len: number): number {
  const at = offset - p.offset;
  if (at < 0 || at + len > p.length || len === 0) {
    throw new NbdProtocolError(`a read chunk for ${offset}+${len} outside the request ${p.offset}+${p.length}`);
  }
  return at;
}

function offsetData(p: Pending, payload: Buffer): void {
  if (p.kind !== "read") throw new NbdProtocolError("a data chunk in reply to something not a read");
  if (payload.length < 9) throw new NbdProtocolError(`data chunk of ${payload.length} bytes`);
  const at = within(p, Number(payload.readBigUInt64BE(0)), payload.length - 8);
  payload.copy(p.data, at, 8);
  p.covered += payload.length - 8;
}

function offsetHole(p: Pending, payload: Buffer): void {
  if (p.kind !== "read") throw new NbdProtocolError("a hole chunk in reply to something not a read");
  if (payload.length !== 12) throw new NbdProtocolError(`hole chunk of ${payload.length} bytes`);
  const size = payload.readUInt32BE(8);
  const at = within(p, Number(payload.readBigUInt64BE(0)), size);
  p.data.fill(0, at, at + size); // the buffer starts zeroed; a hole is said explicitly anyway
  p.covered += size;
}

function blockStatus(p: Pending, payload: Buffer): void {
  if (p.kind !== "status") throw new NbdProtocolError("a block status chunk in reply to something not a block status query");
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) throw new NbdProtocolError(`block status chunk of ${payload.length} bytes`);
  const id = payload.readUInt32BE(0);
  if (p.extents.has(id)) throw new NbdProtocolError(`two block status chunks for context ${id}`);
  const list: Extent[] = [];
  let offset = p.offset;
  for (let i = 4; i < payload.length; i += 8) {
    const length = payload.readUInt32BE(i);
    if (length === 0) throw new NbdProtocolError("a block status extent of length 0");
    const end = p.offset + p.length;
    if (offset >= end) throw new NbdProtocolError("block status extents run past the query");
    // a final extent past the query's end is clipped (some servers round it up)
    list.push({ offset, length: Math.min(length, end - offset), flags: payload.readUInt32BE(i + 4) });
    offset += length;
  }
  p.extents.set(id, list);
}
