// A socket read into one buffer of its own, again and again, instead of a
// fresh Buffer per read: on the machines measured, reading QEMU's stream
// through 'data' events cost 2–5 s of CPU per GB (a new 64 KiB allocation,
// its page faults and its garbage per read), through one reused buffer
// 0.3–0.5 s. Node offers this (`onread`) only to sockets it connects itself;
// a socket a server accepted, and a TLS socket (its decrypted bytes), gets it
// here through the same hooks, found on a socket made with `onread`. Where a
// Node version lacks them, the caller keeps its 'data' events.

import * as net from "node:net";

/**
 * The one buffer's size: reads of up to 256 KiB when that much is waiting
 * (fewer system calls and chunks than Node's 64 KiB; more would let QEMU hand
 * stream-out more at once than the pacer's few ms of a slow link).
 */
export const READ_BUFFER_BYTES = 256 * 1024;

/** Gets each read as a view of the one buffer, valid until it returns; false pauses the socket (resume() reads on). */
export type ReadCallback = (chunk: Buffer) => boolean;

interface Hooks { buffer: symbol; callback: symbol; generator: symbol }

let hooks: Hooks | null | undefined;

function findHooks(): Hooks | null {
  if (hooks !== undefined) return hooks;
  // @types/node 20 does not declare `onread` on the constructor; Node has taken it since 12
  const probe = new net.Socket({ onread: { buffer: Buffer.alloc(1), callback: () => true } } as net.SocketConstructorOpts);
  const byName = new Map(Object.getOwnPropertySymbols(probe).map((s) => [s.description, s]));
  probe.destroy();
  const [buffer, callback, generator] = [byName.get("kBuffer"), byName.get("kBufferCb"), byName.get("kBufferGen")];
  hooks = buffer && callback && generator ? { buffer, callback, generator } : null;
  return hooks;
}

type Handle = { useUserBuffer?: (b: Uint8Array) => void };

/**
 * From now on `sock` (paused, not ended) reads into a buffer of `size`
 * bytes and hands each read to `onRead` (what it had buffered first).
 * With a function instead of a size, each read goes into the memory it
 * returns, asked for before the first read and right after each read's
 * onRead (the read is then the caller's to keep). False when this Node
 * cannot: nothing changed, 'data' events go on.
 */
export function readIntoBuffer(sock: net.Socket, size: number | (() => Uint8Array), onRead: ReadCallback): boolean {
  const h = findHooks();
  const handle = (sock as unknown as { _handle?: Handle | null })._handle;
  if (!h || typeof handle?.useUserBuffer !== "function" || sock.readableEnded) return false;
  // bytes the socket read before the switch come first
  for (let b = sock.read() as Buffer | null; b !== null; b = sock.read() as Buffer | null) onRead(b);
  const next = typeof size === "function" ? size : null;
  const buf = next ? next() : Buffer.allocUnsafeSlow(size as number);
  const s = sock as unknown as Record<symbol, unknown>;
  s[h.buffer] = buf;
  s[h.callback] = (n: number, into: Uint8Array) => onRead(Buffer.from(into.buffer, into.byteOffset, n));
  s[h.generator] = next;
  handle.useUserBuffer(buf);
  return true;
}

/**
 * Hands `sock`'s reads to `onChunk`: from one reused buffer of
 * READ_BUFFER_BYTES where this Node allows (true: each chunk is valid only
 * during the call, so a frame reader copies it: `inputReused`), else from
 * 'data' events (false: chunks are the caller's to keep; none came yet).
 */
export function readChunks(sock: net.Socket, onChunk: (chunk: Buffer) => void): boolean {
  sock.pause();
  if (readIntoBuffer(sock, READ_BUFFER_BYTES, (chunk) => { onChunk(chunk); return true; })) {
    sock.resume();
    return true;
  }
  sock.on("data", onChunk);
  return false;
}
