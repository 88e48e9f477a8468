// Shared fixtures of the stream-mode tests: a QEMU-shaped stream, the two
// proxies driven by a fake source QEMU and a fake destination QEMU, a man in
// the middle on the link between them, and test certificates (helpers/certs).
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import * as net from "node:net";
import { join } from "node:path";
import { RAM_FLAG } from "../../src/stream/qemu-stream.js";
import { streamIn, type StreamInOptions } from "../../src/stream/in.js";
import { streamOut, type StreamOutOptions } from "../../src/stream/out.js";
import type { StreamProxy, StreamStats } from "../../src/stream/stats.js";
import { SFrame, STREAM_FRAMES } from "../../src/stream/frames.js";
import { FrameReader, frame } from "../../src/wire/envelope.js";
import type { FrameSet } from "../../src/link/channel.js";
import type { NasIndex } from "../../src/adapters/nas/index-file.js";
import { drained } from "../../src/link/rate.js";

const PAGE = 4096;

/** The pre-shared key of the tests' links (32 random bytes, like a key file's). */
export const TEST_KEY = randomBytes(32);
const be32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
const be64 = (n: number) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; };
const str8 = (s: string) => Buffer.concat([Buffer.from([s.length]), Buffer.from(s, "latin1")]);

/** A QEMU 7.2-shaped stream: one RAM block `block` of these pages (in PART sections of 64), device state, EOF. */
export function qemuStream(pages: Buffer, block = "mem"): Buffer {
  const n = pages.length / PAGE;
  const parts: Buffer[] = [Buffer.from("QEVM"), be32(3), Buffer.from([0x07]), be32(13), Buffer.from("pc-i440fx-7.2")];
  parts.push(Buffer.from([0x01]), be32(2), str8("ram"), be32(0), be32(4));
  parts.push(be64(n * PAGE + RAM_FLAG.MEM_SIZE), str8(block), be64(n * PAGE));
  parts.push(be64(RAM_FLAG.EOS), Buffer.from([0x7e]), be32(2));
  for (let i = 0; i < n; i += 64) {
    parts.push(Buffer.from([0x02]), be32(2));
    for (let k = i; k < Math.min(n, i + 64); k++) {
      parts.push(k === i ? Buffer.concat([be64(k * PAGE + RAM_FLAG.PAGE), str8(block)]) : be64(k * PAGE + RAM_FLAG.PAGE + RAM_FLAG.CONTINUE));
      parts.push(pages.subarray(k * PAGE, (k + 1) * PAGE));
    }
    parts.push(be64(RAM_FLAG.EOS), Buffer.from([0x7e]), be32(2));
  }
  parts.push(Buffer.from([0x03]), be32(2), be64(RAM_FLAG.EOS), Buffer.from([0x7e]), be32(2));
  parts.push(Buffer.from([0x04]), be32(3), str8("timer"), be32(0), be32(2), Buffer.alloc(24, 7), Buffer.from([0x7e]), be32(3), Buffer.from([0x05]));
  return Buffer.concat(parts);
}

export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const p = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return p;
}

import { relay, tamperProxy } from "./relay.js";
export { tamperProxy };

/**
 * What a man in the middle does with each stream-out -> stream-in frame: the
 * frame as sealed (length, type, payload, CRC) -> the bytes to forward
 * (changed or not), null to drop it, "cut" to tear the link there.
 */
export type FrameTamper = (type: SFrame, sealed: Buffer, payload: Buffer) => Buffer | null | "cut";

/**
 * A man in the middle that cuts the stream-out -> stream-in bytes (or an
 * agent link's source -> destination bytes, with AGENT_FRAMES) into frames
 * for `tamper`; the other way passes as it is.
 */
export function frameTamper(tamper: FrameTamper, frames: FrameSet = STREAM_FRAMES): (dir: "up" | "down", chunk: Buffer, cut: () => void) => Buffer | null {
  const reader = new FrameReader(frames);
  return (dir, chunk, cut) => {
    if (dir === "down") return chunk;
    const out: Buffer[] = [];
    for (const f of reader.push(chunk)) {
      const x = tamper(f.type, frame(f.type, f.payload), f.payload);
      if (x === "cut") {
        cut();
        return null;
      }
      if (x) out.push(x);
    }
    return out.length ? Buffer.concat(out) : null;
  };
}

export interface ProxyRun {
  /** What the fake destination QEMU received, in order. */
  out: Buffer;
  so: StreamStats;
  si: StreamStats;
  /** Connections the fake destination QEMU accepted. */
  qemuConnections: number;
  /** The fake source QEMU's connection was closed by stream-out before it had sent everything (its migration fails). */
  sourceCut: boolean;
  /** stream-in ended on its own (it was not closed by this helper). */
  inEnded: boolean;
  /** Bytes that crossed the link, both ways (with `record`). */
  linkBytes: Buffer[];
}

export interface ProxyRunOptions {
  data: Buffer;
  image: string;
  nas?: NasIndex;
  out?: Partial<StreamOutOptions>;
  in?: Partial<StreamInOptions>;
  /** A stream-in already running (its done is then not awaited). */
  streamIn?: StreamProxy;
  /** Man in the middle on the link. */
  via?: (dir: "up" | "down", chunk: Buffer, cut: () => void) => Buffer | null;
  /** Keep a copy of every byte on the link (linkBytes). */
  record?: boolean;
  /** Write sizes of the fake source QEMU: fixed, or random up to 100 kB (split anywhere). */
  split?: number | "random";
  /** Carry stream-out's bytes to stream-in at this many bytes/s (a paced relay; default: straight, loopback speed). */
  linkRate?: number;
  /** The fake destination QEMU reads at this many bytes/s (default: as fast as they come). */
  qemuRate?: number;
}

/**
 * Feeds `data` to stream-out as a source QEMU would; collects what stream-in
 * gives its (fake) destination QEMU. stream-in is closed when stream-out is
 * done and stream-in has not ended on its own within 3 s (a refused peer does
 * not end it).
 */
export async function throughProxies(o: ProxyRunOptions): Promise<ProxyRun> {
  // a link a test tampers with runs in the clear (what --insecure allows); otherwise TLS-PSK
  const link = o.via ? { insecure: true } : { psk: TEST_KEY };
  const secured = (x?: Partial<StreamOutOptions | StreamInOptions>) => (x && ("psk" in x || "tls" in x || "insecure" in x) ? {} : link);
  const got: Buffer[] = [];
  let qemuConnections = 0;
  const sink = net.createServer({ allowHalfOpen: true }, (s) => {
    qemuConnections++;
    s.on("data", (d: Buffer) => {
      got.push(d);
      if (o.qemuRate) { s.pause(); setTimeout(() => s.resume(), (d.length / o.qemuRate) * 1000); }
    });
    s.on("end", () => s.end());
    s.on("error", () => {});
  });
  await new Promise<void>((r) => sink.listen(0, "127.0.0.1", r));
  const si = o.streamIn ?? await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${(sink.address() as net.AddressInfo).port}`, image: o.image, ...secured(o.in), ...o.in });
  const linkBytes: Buffer[] = [];
  const mitm = o.via || o.record || o.linkRate
    ? await relay(si.port, {
      tamper: (dir, chunk, cut) => {
        if (o.record) linkBytes.push(Buffer.from(chunk));
        return o.via ? o.via(dir, chunk, cut) : chunk;
      },
      ...(o.linkRate ? { rate: o.linkRate } : {}),
    })
    : null;
  let so: StreamProxy | null = null;
  try {
    so = await streamOut({ listenPort: 0, to: `127.0.0.1:${mitm?.port ?? si.port}`, ...(o.nas ? { nas: o.nas } : { image: o.image }), ...secured(o.out), ...o.out });
    const q = net.connect(so.port, "127.0.0.1");
    let ended = false;
    let sourceCut = false;
    q.on("data", () => {});
    q.on("error", () => { sourceCut = true; });
    q.on("close", () => { if (!ended) sourceCut = true; });
    await new Promise<void>((r) => q.once("connect", r));
    let rnd = 12345;
    for (let i = 0; i < o.data.length && !q.destroyed;) {
      rnd = (rnd * 1103515245 + 12345) & 0x7fffffff;
      const n = o.split === "random" ? 1 + (rnd % 100_000) : o.split ?? 65536;
      if (!q.write(o.data.subarray(i, i + n))) await drained(q);
      i += n;
    }
    if (!q.destroyed) { ended = true; q.end(); }
    const a = await so.done;
    let over = false;
    let inEnded = false;
    if (!o.streamIn) {
      // stream-in ends on its own after a session; after refused peers only (or none in 3 s), it waits on: then close it
      void si.done.then(() => { over = true; });
      for (const t = Date.now(); !over && Date.now() - t < 30_000;) {
        if (si.stats.sessions === 0 && (si.stats.refused.length > 0 || Date.now() - t > 3000)) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      inEnded = over; // read before close(): closing it ends it too
      await si.close();
    }
    return { out: Buffer.concat(got), so: a, si: si.stats, qemuConnections, sourceCut, linkBytes, inEnded };
  } finally {
    await so?.close();
    if (!o.streamIn) await si.close();
    mitm?.close();
    sink.close();
  }
}

export { makeCerts, certsOnce } from "./certs.js";

/** Writes TEST_KEY to a 0600 key file in `dir` for a command's --psk-file. */
export function testKeyFile(dir: string): string {
  const path = join(dir, "test.key");
  writeFileSync(path, TEST_KEY, { mode: 0o600 });
  return path;
}

/** TLS record content types (RFC 8446 5.1). */
export const TLS_RECORD = { changeCipherSpec: 20, alert: 21, handshake: 22, applicationData: 23 } as const;

/**
 * What an on-path relay does with each TLS record crossing it: the record
 * (5-byte header and body, a copy it may change), its direction and its index
 * among that direction's records -> the bytes to forward, or null to drop it.
 */
export type TlsRecordTamper = (dir: "up" | "down", record: Buffer, index: number) => Buffer | null;

/**
 * A man in the middle (for tamperProxy or throughProxies' `via`) that cuts
 * each direction into whole TLS records, whatever the TCP chunks, so that a
 * test can change exactly the record and the byte it means to (a byte of a
 * record header would only stall the reader, not test the crypto).
 */
export function tlsRecordTamper(tamper: TlsRecordTamper): (dir: "up" | "down", chunk: Buffer, cut: () => void) => Buffer | null {
  const held = { up: Buffer.alloc(0), down: Buffer.alloc(0) };
  const count = { up: 0, down: 0 };
  return (dir, chunk) => {
    let b = Buffer.concat([held[dir], chunk]);
    const out: Buffer[] = [];
    while (b.length >= 5 && b.length >= 5 + b.readUInt16BE(3)) {
      const n = 5 + b.readUInt16BE(3);
      const x = tamper(dir, Buffer.from(b.subarray(0, n)), count[dir]++);
      if (x) out.push(x);
      b = b.subarray(n);
    }
    held[dir] = Buffer.from(b);
    return out.length ? Buffer.concat(out) : null;
  };
}

/** A 16-byte pattern no real page, key stream or frame holds by chance. */
export const CANARY = Buffer.from("pgtw-CANARY-7f3a", "latin1");

/** `pages` pages, each filled with CANARY repeated. */
export function canaryPages(pages: number): Buffer {
  const b = Buffer.alloc(pages * PAGE);
  for (let o = 0; o < b.length; o += CANARY.length) CANARY.copy(b, o);
  return b;
}
