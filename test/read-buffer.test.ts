// A socket a server accepted, read into one buffer of its own: every byte
// comes once and in order (what it had read before the switch first), a
// false from the callback pauses it and resume() reads on, and the end comes.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as net from "node:net";
import * as tls from "node:tls";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { readIntoBuffer } from "../src/link/read-buffer.js";
import { clientOptions, serverOptions, type Security } from "../src/link/security.js";

test("read buffer: an accepted socket reads into one reused buffer, pauses on false, and ends", async () => {
  const data = randomBytes(3 * 1024 * 1024 + 17);
  const server = net.createServer({ pauseOnConnect: true });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const client = net.connect((server.address() as net.AddressInfo).port, "127.0.0.1");
  const [sock] = (await once(server, "connection")) as [net.Socket];
  try {
    // some bytes read the ordinary way first: they must come first
    client.write(data.subarray(0, 1000));
    sock.resume();
    const first = (await once(sock, "data"))[0] as Buffer;
    sock.pause();
    const got: Buffer[] = [first];
    const buffers = new Set<ArrayBufferLike>();
    let reads = 0;
    const ok = readIntoBuffer(sock, 64 * 1024, (chunk) => {
      got.push(Buffer.from(chunk)); // a copy: the view is overwritten by the next read
      buffers.add(chunk.buffer);
      // every 5th read pauses the socket; it reads on after a while
      if (++reads % 5 === 0) { setTimeout(() => sock.resume(), 2); return false; }
      return true;
    });
    assert.ok(ok, "this Node offers the hooks (the proxies fall back to 'data' events where it does not)");
    const ended = once(sock, "end");
    sock.resume();
    client.end(data.subarray(1000));
    await ended;
    assert.equal(Buffer.compare(Buffer.concat(got), data), 0, "every byte once, in order");
    assert.ok(reads >= 10);
    assert.equal(buffers.size, 1, "one buffer for every read after the switch");
  } finally {
    client.destroy();
    sock.destroy();
    server.close();
  }
});

test("read buffer: a TLS socket a server accepted (what stream-in's link is) reads its decrypted bytes into one reused buffer", async () => {
  const sec: Security = { kind: "psk", key: randomBytes(32) };
  const data = randomBytes(2 * 1024 * 1024 + 5);
  const server = tls.createServer(serverOptions(sec));
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const client = tls.connect({ ...clientOptions(sec, "127.0.0.1"), port: (server.address() as net.AddressInfo).port, host: "127.0.0.1" });
  const [sock] = (await once(server, "secureConnection")) as [tls.TLSSocket];
  try {
    sock.pause();
    const got: Buffer[] = [];
    const buffers = new Set<ArrayBufferLike>();
    const ok = readIntoBuffer(sock, 64 * 1024, (chunk) => { got.push(Buffer.from(chunk)); buffers.add(chunk.buffer); return true; });
    assert.ok(ok, "this Node offers the hooks on a TLS socket too");
    const ended = once(sock, "end");
    sock.resume();
    client.end(data);
    await ended;
    assert.equal(Buffer.compare(Buffer.concat(got), data), 0, "every byte once, in order");
    assert.equal(buffers.size, 1, "one buffer for every read");
  } finally {
    client.destroy();
    sock.destroy();
    server.close();
  }
});
