// A plain relay for bench/stream-replay.ts: accepts one connection on
// 127.0.0.1:LISTEN, connects to 127.0.0.1:TO and pipes both ways with
// Node's socket.pipe() (what carrying the bytes costs without any work on
// them); exits when both sockets have closed.
//   node dist/bench/pipe-relay.js LISTEN TO
import * as net from "node:net";

const [listen, to] = process.argv.slice(2).map(Number);
const server = net.createServer((c) => {
  server.close();
  const up = net.connect(to!, "127.0.0.1");
  c.pipe(up);
  up.pipe(c);
  c.on("error", () => up.destroy());
  up.on("error", () => c.destroy());
});
server.listen(listen, "127.0.0.1", () => process.stderr.write(`relay listening on 127.0.0.1:${listen}\n`));
