// Security of the link between stream-out and stream-in: a pre-shared key
// (mutual challenge-response) and mutual TLS. A peer that does not
// authenticate is refused before stream-in connects to the destination QEMU,
// and before any byte of the source QEMU's stream goes out.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import * as net from "node:net";
import { streamIn } from "../src/stream/proxy.js";
import { StreamFrameReader, SFrame, STREAM_PROTOCOL_VERSION, abortReason, frame, jsonFrame, parseJson, type StreamFrame } from "../src/stream/frames.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { makeCerts, qemuStream, throughProxies } from "./helpers/stream.js";

const PAGE = 4096;

/** An image, its index, and a stream of 256 twins of its blocks between 256 random pages. */
async function fixture(dir: string): Promise<{ image: string; data: Buffer }> {
  const image = join(dir, "disk.img");
  const blocks = randomBytes(512 * PAGE);
  writeFileSync(image, blocks);
  (await openNasIndex(image, { rebuild: true })).image.close();
  return { image, data: qemuStream(Buffer.concat([randomBytes(128 * PAGE), blocks.subarray(0, 256 * PAGE), randomBytes(128 * PAGE)])) };
}

/** A fake destination QEMU that counts the connections it gets. */
async function countingSink(): Promise<{ port: number; connections: () => number; close(): void }> {
  let n = 0;
  const s = net.createServer((c) => { n++; c.resume(); c.on("error", () => {}); });
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  return { port: (s.address() as net.AddressInfo).port, connections: () => n, close: () => s.close() };
}

/** A hand-made stream-out that does not hold the key: the reason in stream-in's ABORT. */
async function impostorSession(port: number, how: "bad proof" | "data first"): Promise<string> {
  const sock = net.connect(port, "127.0.0.1");
  const reader = new StreamFrameReader();
  const frames: StreamFrame[] = [];
  let wake = () => {};
  sock.on("data", (d: Buffer) => { frames.push(...reader.push(d)); wake(); });
  sock.on("close", () => wake());
  const next = async (): Promise<StreamFrame> => {
    while (!frames.length) {
      if (sock.destroyed) throw new Error("stream-in closed the link without a word");
      await new Promise<void>((r) => { wake = r; });
    }
    return frames.shift()!;
  };
  try {
    await new Promise<void>((r) => sock.once("connect", r));
    if (how === "data first") sock.write(frame(SFrame.Raw, Buffer.from("QEVM")));
    else {
      sock.write(jsonFrame(SFrame.Hello, { v: STREAM_PROTOCOL_VERSION, indexId: null, channel: 0, compression: [], auth: "psk", nonce: "ab".repeat(32) }));
      const challenge = parseJson<{ ready: boolean; nonce: string; proof: string }>(await next());
      assert.equal(challenge.ready, false);
      sock.write(jsonFrame(SFrame.Auth, { proof: "cd".repeat(32) }));
    }
    const f = await next();
    assert.equal(f.type, SFrame.Abort);
    return abortReason(f);
  } finally {
    sock.destroy();
  }
}

test("stream PSK: proxies with the same key carry the stream byte-identical; the key never crosses the link", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-psk-"));
  try {
    const { image, data } = await fixture(dir);
    const key = randomBytes(32);
    const r = await throughProxies({ data, image, out: { psk: key, compress: "off" }, in: { psk: key }, record: true });
    assert.equal(r.so.error, undefined);
    assert.equal(r.si.error, undefined);
    assert.ok(r.out.equals(data), "stream rebuilt byte-identical");
    assert.equal(r.so.twinsReplaced, 256);
    assert.deepEqual(r.si.refused, []);
    const wire = Buffer.concat(r.linkBytes);
    assert.ok(wire.length > 0);
    for (const k of [key, Buffer.from(key.toString("hex")), Buffer.from(key.toString("base64"))]) assert.equal(wire.indexOf(k), -1, "the key is on the link");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream PSK: a wrong or missing key is refused before the destination QEMU gets a connection; stream-in then takes the right peer", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-psk-"));
  const sink = await countingSink();
  try {
    const { image, data } = await fixture(dir);
    const key = randomBytes(32);
    // one stream-in with a key, kept up through the refused peers
    const si = await streamIn({ listenPort: 0, listenHost: "127.0.0.1", qemu: `127.0.0.1:${sink.port}`, image, psk: key });
    try {
      const wrong = await throughProxies({ data, image, streamIn: si, out: { psk: randomBytes(32) } });
      // stream-out checks stream-in's proof first: with another key it refuses the impostor and sends nothing
      assert.match(wrong.so.error ?? "", /the stream-in did not prove it holds the pre-shared key: refusing to send it any memory/);
      assert.match(si.stats.refused[0] ?? "", /stream-out aborted the migration: the stream-in did not prove/);
      const none = await throughProxies({ data, image, streamIn: si, out: {} });
      assert.match(none.so.error ?? "", /stream-in aborted the migration: this stream-in requires a pre-shared key: start the stream-out with the same --psk-file/);
      assert.match(si.stats.refused[1] ?? "", /requires a pre-shared key/);
      for (const x of [wrong, none]) {
        assert.ok(x.sourceCut, "the source QEMU's connection was closed (its migration fails, the VM runs on)");
        assert.ok(x.so.bytesOutLink < 1024, `${x.so.bytesOutLink} bytes went out: only the handshake`);
        assert.equal(x.so.bytesFromQemu, 0, "not one byte of QEMU's stream was taken in");
      }
      assert.equal(sink.connections(), 0, "stream-in connected to its QEMU for an unauthenticated peer");
      assert.equal(si.stats.sessions, 0);
      assert.equal(si.stats.error, undefined, "a refused peer is not a failed migration");
      // an impostor that skips checking stream-in's proof and answers with a made-up one, or sends stream data at once
      for (const impostor of ["bad proof", "data first"] as const) {
        const reason = await impostorSession(si.port, impostor);
        assert.match(reason, impostor === "bad proof"
          ? /authentication failed: the stream-out does not hold this stream-in's pre-shared key/
          : /Raw frame from stream-out before the handshake ended/);
      }
      assert.equal(si.stats.refused.length, 4);
      // the one-shot stream-in is still there for the right stream-out
      const ok = await throughProxies({ data, image, streamIn: si, out: { psk: key } });
      assert.equal(ok.so.error, undefined);
      assert.equal((await si.done).error, undefined);
      assert.equal(sink.connections(), 1);
      assert.equal(si.stats.sessions, 1);
      assert.equal(si.stats.refused.length, 4);
    } finally {
      await si.close();
    }
    // a stream-out with a key and a stream-in without: stream-in has nothing to check it against, and says so
    const noKeyIn = await throughProxies({ data, image, out: { psk: key } });
    assert.match(noKeyIn.si.error ?? "", /the stream-out wants a pre-shared key, but this stream-in has none/);
    assert.match(noKeyIn.so.error ?? "", /stream-in aborted the migration: .*has none/);
    assert.equal(noKeyIn.qemuConnections, 0);
    assert.equal(noKeyIn.out.length, 0);
  } finally {
    sink.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream TLS: mutual TLS carries the stream byte-identical; certificates from another CA are refused on either side before QEMU gets a byte", { timeout: 90_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-stream-tls-"));
  try {
    const c = makeCerts(dir);
    const { image, data } = await fixture(dir);
    const inTls = { cert: c.dstCert, key: c.dstKey, ca: c.ca };
    const outTls = { cert: c.srcCert, key: c.srcKey, ca: c.ca };
    const ok = await throughProxies({ data, image, out: { tls: outTls }, in: { tls: inTls }, record: true });
    assert.equal(ok.so.error, undefined);
    assert.equal(ok.si.error, undefined);
    assert.ok(ok.out.equals(data), "stream rebuilt byte-identical");
    assert.equal(ok.so.twinsReplaced, 256);
    // encrypted: not even the stream's magic is readable on the link
    assert.equal(Buffer.concat(ok.linkBytes).indexOf(Buffer.from("QEVM")), -1);

    // TLS and a key together
    const key = randomBytes(32);
    const both = await throughProxies({ data, image, out: { tls: outTls, psk: key }, in: { tls: inTls, psk: key } });
    assert.ok(both.out.equals(data));

    const rogueOut = await throughProxies({ data, image, out: { tls: { cert: c.rogueCert, key: c.rogueKey, ca: c.ca } }, in: { tls: inTls } });
    const plainOut = await throughProxies({ data, image, out: {}, in: { tls: inTls } });
    for (const [what, r] of [["a stream-out with a foreign certificate", rogueOut], ["a stream-out without TLS", plainOut]] as const) {
      assert.ok(r.so.error, `${what}: stream-out reports a failure`);
      assert.ok(r.sourceCut, `${what}: the source QEMU's connection was closed`);
      assert.equal(r.qemuConnections, 0, `${what}: stream-in connected to its QEMU`);
      assert.equal(r.si.sessions, 0, what);
      assert.equal(r.si.refused.length, 1, `${what}: ${JSON.stringify(r.si.refused)}`);
    }
    assert.match(rogueOut.si.refused[0]!, /its certificate is not signed by the CA this side trusts \(DEPTH_ZERO_SELF_SIGNED_CERT\)/);
    assert.match(rogueOut.so.error!, /stream-in aborted the migration: stream-in refused this stream-out: its certificate is not signed/);
    assert.match(plainOut.si.refused[0]!, /failed the TLS handshake/);
    assert.match(plainOut.so.error!, /the link to stream-in closed during the handshake \(does stream-in want TLS/);
    // stream-out refuses a stream-in whose certificate its CA did not sign
    const rogueIn = await throughProxies({ data, image, out: { tls: outTls }, in: { tls: { cert: c.rogueCert, key: c.rogueKey, ca: c.ca } } });
    assert.match(rogueIn.so.error ?? "", /cannot connect to 127\.0\.0\.1:\d+: .*certificate/i);
    assert.equal(rogueIn.so.bytesOutLink, 0);
    assert.equal(rogueIn.so.bytesFromQemu, 0);
    assert.ok(rogueIn.sourceCut, "the source QEMU's connection was closed, not read to the end");
    assert.equal(rogueIn.qemuConnections, 0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("stream-out/stream-in --help name the security options; a missing key file is a clear error", () => {
  const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
  for (const cmd of ["stream-out", "stream-in"]) {
    const h = spawnSync(process.execPath, [cli, cmd, "--help"], { encoding: "utf8" });
    assert.equal(h.status, 0);
    for (const opt of ["--psk-file", "--tls-cert", "--tls-key", "--tls-ca"]) assert.match(h.stdout, new RegExp(`\\n  ${opt} `), `${cmd} --help: ${opt}`);
    const required = cmd === "stream-out" ? ["--to", "127.0.0.1:1", "--image", "/nonexistent"] : ["--qemu", "127.0.0.1:1", "--image", "/nonexistent"];
    const bad = spawnSync(process.execPath, [cli, cmd, ...required, "--psk-file", "/nonexistent-key"], { encoding: "utf8" });
    assert.equal(bad.status, 1, bad.stderr);
    assert.match(bad.stderr, /^pagetwin: cannot read the key file \/nonexistent-key: ENOENT/);
    const half = spawnSync(process.execPath, [cli, cmd, ...required, "--tls-cert", "x.pem"], { encoding: "utf8" });
    assert.equal(half.status, 2);
    assert.match(half.stderr, /TLS needs all of --tls-cert, --tls-key and --tls-ca/);
  }
});
