// A plain relay: accepts one connection on LISTEN, connects to TO and pipes
// both ways with Node's socket.pipe() (what carrying the bytes costs without
// any work on them; each end's close passes on as pipe() does); exits when
// both sockets have closed. Used by bench/stream-replay.ts (relays beside the
// proxies) and src/compare/stream.ts's relay mode.
//   node dist/src/compare/pipe-relay.js LISTEN TO
// Each address: PORT (127.0.0.1), HOST:PORT, or unix:PATH.
import * as net from "node:net";

/** A net.connect / server.listen address from PORT, HOST:PORT or unix:PATH. */
function relayAddress(s: string): { path: string } | { host: string; port: number } {
  if (s.startsWith("unix:")) return { path: s.slice(5) };
  const i = s.lastIndexOf(":");
  const port = Number(i < 0 ? s : s.slice(i + 1));
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new Error(`pipe-relay: bad address "${s}" (PORT, HOST:PORT or unix:PATH)`);
  return { host: i < 0 ? "127.0.0.1" : s.slice(0, i), port };
}

/** Relay the first connection on `listen` to `to`; resolves once listening. */
function startRelay(listen: string, to: string): Promise<net.Server> {
  const server = net.createServer((c) => {
    server.close();
    const up = net.connect(relayAddress(to));
    c.pipe(up);
    up.pipe(c);
    c.on("error", () => up.destroy());
    up.on("error", () => c.destroy());
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(relayAddress(listen), () => resolve(server));
  });
}

const [listen, to] = process.argv.slice(2);
if (!listen || !to) throw new Error("usage: pipe-relay LISTEN TO");
await startRelay(listen, to);
process.stderr.write(`relay listening on ${listen}\n`);
