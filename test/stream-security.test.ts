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
import { streamIn } from "../src/stream/in.js";
import { SFrame, STREAM_PROTOCOL_VERSION, STREAM_FRAMES } from "../src/stream/frames.js";
import { FrameReader, abortReason, frame, jsonFrame, parseJson, type Frame } from "../src/wire/envelope.js";
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
