// Fixtures of the `pagetwin serve` tests: two services on this machine (a
// source and a destination: their own control sockets and peer ports), a
// fake destination QEMU that keeps what it is sent, a fake source QEMU that
// writes a stream, and a relay that counts the bytes between the services.
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import * as net from "node:net";
import { join } from "node:path";
import { ServeService, type ServeServiceOptions } from "../../src/serve/service.js";
import { ServeClient } from "../../src/serve/client.js";
import { TEST_KEY } from "./stream.js";
import { relay, type Relay } from "./relay.js";
import { drained } from "../../src/link/rate.js";

export interface TwoServices {
  src: ServeService;
  dst: ServeService;
  srcClient: ServeClient;
  dstClient: ServeClient;
  srcControl: string;
  dstControl: string;
  close(): Promise<void>;
}

/** `srcExtra`, `dstExtra`: more options of the source and destination services (--trace-dir, --ui). */
export async function twoServices(dir: string, log: (m: string) => void = () => {}, srcExtra: Partial<ServeServiceOptions> = {}, dstExtra: Partial<ServeServiceOptions> = {}): Promise<TwoServices> {
  const srcControl = join(dir, "src.sock");
  const dstControl = join(dir, "dst.sock");
  const dst = await ServeService.start({ control: dstControl, peerListen: "127.0.0.1:0", psk: TEST_KEY, log: (m) => log(`dst: ${m}`), ...dstExtra });
  const src = await ServeService.start({ control: srcControl, peerListen: "127.0.0.1:0", psk: TEST_KEY, log: (m) => log(`src: ${m}`), ...srcExtra });
  const srcClient = await ServeClient.connect(srcControl);
  const dstClient = await ServeClient.connect(dstControl);
  return {
    src, dst, srcClient, dstClient, srcControl, dstControl,
    close: async () => {
      srcClient.close();
      dstClient.close();
      await Promise.all([src.shutdown(0), dst.shutdown(0)]);
    },
  };
}

/** A fake destination QEMU (on loopback TCP, or at a unix socket `path`): keeps what each connection sends it. */
export async function sinkQemu(path?: string): Promise<{ port: number; got(): Buffer; connections: number; close(): void }> {
  const chunks: Buffer[] = [];
  const socks: net.Socket[] = [];
  const state = { connections: 0 };
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    state.connections++;
    socks.push(s);
    s.on("data", (d: Buffer) => chunks.push(d));
    s.on("end", () => s.end());
    s.on("error", () => {});
  });
  await new Promise<void>((r) => (path ? server.listen(path, r) : server.listen(0, "127.0.0.1", r)));
  return {
    port: path ? 0 : (server.address() as net.AddressInfo).port,
    got: () => Buffer.concat(chunks),
    get connections() { return state.connections; },
    close: () => { socks.forEach((s) => s.destroy()); server.close(); },
  };
}

/** A fake source QEMU: connects to `to` (a port on loopback, or a unix socket's path), writes `data` in 64 KiB pieces and closes; true if it was cut off first. */
export async function sourceQemu(to: number | string, data: Buffer): Promise<boolean> {
  const q = typeof to === "string" ? net.connect(to) : net.connect(to, "127.0.0.1");
  let cut = false;
  let ended = false;
  q.on("data", () => {});
  q.on("error", () => { cut = true; });
  const closed = new Promise<void>((r) => q.on("close", () => { if (!ended) cut = true; r(); }));
  await Promise.race([new Promise<void>((r) => q.once("connect", r)), closed]);
  for (let i = 0; i < data.length && !q.destroyed; i += 65536) {
    if (!q.write(data.subarray(i, i + 65536))) await drained(q);
  }
  if (!q.destroyed) { ended = true; q.end(); }
  await closed;
  return cut;
}

/** A TCP relay to `port` that counts the bytes each way (the link as the network sees it). */
export const countingRelay = (port: number): Promise<Relay> => relay(port);
