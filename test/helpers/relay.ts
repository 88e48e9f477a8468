// A TCP relay on loopback that paces what the source sends: a link of a given rate that nobody told the agents about.
import { createServer, connect, type Server, type Socket } from "node:net";

/** A TCP relay that carries the source's bytes at `rate` bytes/s (0: as fast as it can), pausing its reads to keep to it. */
export async function pacedRelay(port: number, rate: number): Promise<{ server: Server; port: number; sockets: Socket[] }> {
  const sockets: Socket[] = [];
  const server = createServer((c) => {
    const up = connect(port, "127.0.0.1");
    sockets.push(c, up);
    const t0 = performance.now();
    let carried = 0;
    c.on("data", (d) => {
      up.write(d);
      carried += d.length;
      const due = rate > 0 ? t0 + (carried / rate) * 1000 - performance.now() : 0;
      if (due > 1) { c.pause(); setTimeout(() => c.resume(), due); }
    });
    up.on("data", (d) => { if (!c.destroyed) c.write(d); });
    const cut = () => { c.destroy(); up.destroy(); };
    c.on("error", cut);
    up.on("error", cut);
    c.on("close", () => up.end());
    up.on("close", () => c.end());
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { server, port: (server.address() as { port: number }).port, sockets };
}
