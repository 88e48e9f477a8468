// The one TCP relay of the tests: carries a connection to 127.0.0.1:port and
// back, handing every chunk to `tamper` (change it, drop it, cut the link),
// optionally pacing what the client sends, and counting the bytes each way.
// (Not a test file.)

import * as net from "node:net";

/** What a relay does with a chunk going `dir` ("up": client → port): the bytes to forward, or null to drop them. */
export type Tamper = (dir: "up" | "down", chunk: Buffer, cut: () => void) => Buffer | null;

export interface RelayOptions {
  tamper?: Tamper;
  /** Carry the client's bytes at this many bytes/s, pausing its reads to keep to it (default: as fast as they come). */
  rate?: number;
}

export interface Relay {
  server: net.Server;
  port: number;
  sockets: net.Socket[];
  /** Bytes forwarded each way so far, after `tamper`. */
  readonly up: number;
  readonly down: number;
  close(): void;
}

/** What an idle paced relay may carry at once, in ms of its rate. */
const BURST_MS = 2;

export async function relay(port: number, o: RelayOptions = {}): Promise<Relay> {
  const sockets: net.Socket[] = [];
  const counts = { up: 0, down: 0 };
  const pass = o.tamper ?? ((_dir, chunk) => chunk);
  const server = net.createServer((c) => {
    const up = net.connect(port, "127.0.0.1");
    sockets.push(c, up);
    const cut = () => { c.destroy(); up.destroy(); };
    // when the link is free again (ms); idle time earns at most BURST_MS of it, as a real link's does none:
    // timed from the connection's start, a pause let the next megabytes through at loopback speed
    let free = 0;
    c.on("data", (d: Buffer) => {
      const x = pass("up", d, cut);
      if (x && !up.destroyed) { counts.up += x.length; up.write(x); }
      if (!o.rate) return;
      const now = performance.now();
      free = Math.max(free, now - BURST_MS) + (d.length / o.rate) * 1000;
      if (free - now > 1) { c.pause(); setTimeout(() => c.resume(), free - now); }
    });
    up.on("data", (d: Buffer) => {
      const x = pass("down", d, cut);
      if (x && !c.destroyed) { counts.down += x.length; c.write(x); }
    });
    c.on("error", cut);
    up.on("error", cut);
    c.on("close", () => up.end());
    up.on("close", () => c.end());
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    server, sockets,
    port: (server.address() as net.AddressInfo).port,
    get up() { return counts.up; },
    get down() { return counts.down; },
    close: () => { sockets.forEach((s) => s.destroy()); server.close(); },
  };
}

/** A relay whose every chunk goes through `tamper`. */
export const tamperProxy = (port: number, tamper: Tamper): Promise<Relay> => relay(port, { tamper });
