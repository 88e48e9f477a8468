// Security of stream mode's link (stream-out <-> stream-in): every byte after
// the handshake inside TLS (a pre-shared key or mutual certificates). A relay
// on the path that changes a byte makes the session fail before the
// destination QEMU has the whole stream; one that changes the handshake is
// refused before stream-in connects to QEMU; pages never cross in clear; no
// proxy starts without protection unless told --insecure; unauthenticated
// peers cost stream-in little and do not keep the real stream-out out; two
// sessions on one stream-in never mix.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, closeSync, mkdtempSync, openSync, writeSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as net from "node:net";
import { streamIn } from "../src/stream/in.js";
import { streamOut } from "../src/stream/out.js";
import { SecurityError } from "../src/errors.js";
import { openNasIndex, type NasIndex } from "../src/adapters/nas/index-file.js";
import { cliPath as cli, startAndStop } from "./helpers/cli.js";
import {
  CANARY, canaryPages, certsOnce, qemuStream, TEST_KEY, testKeyFile, throughProxies, tlsRecordTamper, TLS_RECORD, type ProxyRun, type TlsRecordTamper,
} from "./helpers/stream.js";

const PAGE = 4096;

const work = mkdtempSync(join(tmpdir(), "pagetwin-stream-sec-"));
after(() => rmSync(work, { recursive: true, force: true }));
const certs = () => certsOnce(work);
const inTls = () => ({ tls: { cert: certs().dstCert, key: certs().dstKey, ca: certs().ca } });
const outTls = () => ({ tls: { cert: certs().srcCert, key: certs().srcKey, ca: certs().ca } });
const psk = { psk: TEST_KEY };

/** An image of 512 random blocks, indexed, and a stream of 256 twins of its blocks between 256 random pages (~2 MiB). */
async function fixture(): Promise<{ image: string; data: Buffer; blocks: Buffer }> {
  const dir = mkdtempSync(join(work, "img-"));
  const image = join(dir, "disk.img");
  const blocks = randomBytes(512 * PAGE);
  writeFileSync(image, blocks);
  (await openNasIndex(image, { rebuild: true })).image.close();
  return { image, blocks, data: qemuStream(Buffer.concat([randomBytes(128 * PAGE), blocks.subarray(0, 256 * PAGE), randomBytes(128 * PAGE)])) };
}
let fx: Awaited<ReturnType<typeof fixture>> | null = null;
const fixtureOnce = async () => (fx ??= await fixture());

/** The destination QEMU got a strict prefix of the stream: never a changed byte, never the whole stream. */
function assertCleanPrefix(r: ProxyRun, data: Buffer, what: string): void {
  assert.ok(r.out.length < data.length, `${what}: the destination QEMU got all ${r.out.length} bytes`);
  assert.ok(data.subarray(0, r.out.length).equals(r.out), `${what}: the destination QEMU got bytes that are not the source's`);
  assert.ok(r.sourceCut, `${what}: the source QEMU's connection was closed (its migration fails, the VM runs on)`);
  assert.equal(r.si.streamsVerified, 0, what);
}

/** Refused in the handshake: no session, QEMU never connected, nothing of the source QEMU's stream read. */
function assertRefused(r: ProxyRun, what: string): void {
  assert.ok(r.so.error, `${what}: stream-out reports a failure`);
  assert.ok(r.sourceCut, `${what}: the source QEMU's connection was closed`);
  assert.equal(r.qemuConnections, 0, `${what}: stream-in connected to its QEMU`);
  assert.equal(r.si.sessions, 0, `${what}: a session began`);
  assert.ok(r.si.refused.length > 0, `${what}: stream-in reports no refused peer`);
  assert.equal(r.out.length, 0, what);
  assert.equal(r.si.bytesToQemu, 0, what);
}

/** Changes one ciphertext byte of the 20th application-data record from stream-out (~300 KiB into ~2 MiB). */
function changeMidTraffic(counter: { n: number }): TlsRecordTamper {
  return (dir, rec) => {
    if (dir === "up" && rec[0] === TLS_RECORD.applicationData && ++counter.n === 20) rec[rec.length >> 1]! ^= 0x01;
    return rec;
  };
}

test("stream relay, same key at both ends: one byte changed mid-stream -> both proxies fail, the destination QEMU got a clean prefix, never the changed byte", { timeout: 60_000 }, async () => {
  const { image, blocks } = await fixtureOnce();
  // longer than what stream-out may take ahead of stream-in's credits (8 MiB of QEMU's stream before a rate is
  // measured): it cannot have taken the whole stream when the failure comes, so the source QEMU sees its connection cut
  const data = qemuStream(Buffer.concat([randomBytes(128 * PAGE), blocks.subarray(0, 256 * PAGE), randomBytes(8192 * PAGE)]));
  const clean = await throughProxies({ data, image, out: { ...psk }, in: { ...psk }, via: tlsRecordTamper((_d, rec) => rec) });
  assert.equal(clean.si.error, undefined, "the relay alone changes nothing");
  assert.ok(clean.out.equals(data));
  for (const [how, out, inn] of [["key", psk, psk], ["certificates", outTls(), inTls()]] as const) {
    const seen = { n: 0 };
    const r = await throughProxies({ data, image, out: { ...out, compress: "off" }, in: { ...inn }, via: tlsRecordTamper(changeMidTraffic(seen)) });
    assert.ok(seen.n >= 20, `${how}: the relay saw ${seen.n} records, the change never happened`);
    assert.match(r.si.error ?? "", /decrypt|bad record mac/i, how);
    assert.ok(r.so.error, `${how}: stream-out reports the failure`);
    assert.equal(r.si.sessions, 1, how);
    assertCleanPrefix(r, data, how);
  }
});

test("stream relay changing or deleting handshake records -> refused before stream-in opens QEMU", { timeout: 60_000 }, async () => {
  const { image, data } = await fixtureOnce();
  const cases: [string, TlsRecordTamper, RegExp][] = [
    ["ClientHello changed", (dir, rec, i) => { if (dir === "up" && i === 0) rec[5 + 4 + 2 + 7]! ^= 0x01; return rec; }, /bad record mac/],
    ["PSK identity changed", (dir, rec) => {
      const at = dir === "up" && rec[0] === TLS_RECORD.handshake ? rec.indexOf("pagetwin") : -1;
      if (at >= 0) rec.write("PAGETWIN", at, "latin1");
      return rec;
    }, /psk identity not found/],
    ["ChangeCipherSpec deleted", (dir, rec) => (dir === "up" && rec[0] === TLS_RECORD.changeCipherSpec ? null : rec), /unexpected message/],
    ["ServerHello changed", (dir, rec, i) => { if (dir === "down" && i === 0) rec[5 + 4 + 2 + 3]! ^= 0x01; return rec; }, /bad record mac|alert/],
  ];
  for (const [what, tamper, why] of cases) {
    const r = await throughProxies({ data, image, out: { ...psk }, in: { ...psk }, via: tlsRecordTamper(tamper) });
    assertRefused(r, what);
    assert.match(r.si.refused[0]!, /failed the TLS handshake/, what);
    assert.match(r.si.refused[0]!, why, what);
    assert.equal(r.so.bytesFromQemu, 0, `${what}: stream-out read the source QEMU's stream before it was authenticated`);
  }
});

test("stream canary: pages of a repeated 16-byte pattern never cross the link in clear with a key or certificates; with --insecure they do", { timeout: 60_000 }, async () => {
  const { image } = await fixtureOnce();
  const data = qemuStream(canaryPages(256));
  const run = (out: object, inn: object) => throughProxies({ data, image, out: { ...out, compress: "off" }, in: { ...inn }, record: true });
  const runs = { key: await run(psk, psk), certificates: await run(outTls(), inTls()), insecure: await run({ insecure: true }, { insecure: true }) };
  for (const [how, r] of Object.entries(runs)) {
    assert.equal(r.si.error, undefined, how);
    assert.ok(r.out.equals(data), `${how}: the stream arrived byte-identical`);
    assert.ok(r.linkBytes.reduce((n, b) => n + b.length, 0) > 256 * PAGE, `${how}: the relay saw the pages go by`);
    // inside TLS (which refuses a changed record) the data frames go without their own CRC-32; in the clear they keep it
    assert.equal(r.so.frameCrc, how === "insecure", `${how}: stream-out's frame CRC`);
    assert.equal(r.si.frameCrc, how === "insecure", `${how}: stream-in's frame CRC check`);
  }
  for (const how of ["key", "certificates"] as const) {
    assert.equal(Buffer.concat(runs[how].linkBytes).indexOf(CANARY), -1, `${how}: the pattern crossed the link in clear`);
    assert.equal(Buffer.concat(runs[how].linkBytes).indexOf(Buffer.from("QEVM")), -1, `${how}: the stream's magic crossed in clear`);
  }
  assert.notEqual(Buffer.concat(runs.insecure.linkBytes).indexOf(CANARY), -1, "insecure: the pattern is on the wire (the search works)");
});

test("stream TLS: mutual TLS carries the stream byte-identical; a foreign certificate or no TLS is refused on either side before QEMU gets a byte", { timeout: 60_000 }, async () => {
  const { image, data } = await fixtureOnce();
  const c = certs();
  const ok = await throughProxies({ data, image, out: outTls(), in: inTls() });
  assert.equal(ok.so.error, undefined);
  assert.equal(ok.si.error, undefined);
  assert.ok(ok.out.equals(data), "stream rebuilt byte-identical");
  assert.equal(ok.so.twinsReplaced, 256);
  assert.equal(ok.si.streamsVerified, 1);

  const rogueOut = await throughProxies({ data, image, out: { tls: { cert: c.rogueCert, key: c.rogueKey, ca: c.ca } }, in: inTls() });
  const plainOut = await throughProxies({ data, image, out: { insecure: true }, in: inTls() });
  const keyOut = await throughProxies({ data, image, out: psk, in: inTls() });
  for (const [what, r] of [["a stream-out with a foreign certificate", rogueOut], ["a stream-out without TLS", plainOut], ["a stream-out with a key", keyOut]] as const) {
    assertRefused(r, what);
    assert.equal(r.si.refused.length, 1, `${what}: ${JSON.stringify(r.si.refused)}`);
  }
  assert.match(rogueOut.si.refused[0]!, /its certificate is not signed by the CA this side trusts \(DEPTH_ZERO_SELF_SIGNED_CERT\)/);
  assert.match(rogueOut.so.error!, /stream-in aborted the migration: stream-in refused this stream-out: its certificate is not signed/);
  assert.match(plainOut.si.refused[0]!, /failed the TLS handshake/);
  assert.match(keyOut.si.refused[0]!, /failed the TLS handshake/);
  assert.match(keyOut.so.error!, /cannot connect to the stream-in at 127\.0\.0\.1:\d+: the TLS handshake failed/);
  // stream-out refuses a stream-in whose certificate its CA did not sign
  const rogueIn = await throughProxies({ data, image, out: outTls(), in: { tls: { cert: c.rogueCert, key: c.rogueKey, ca: c.ca } } });
  assert.match(rogueIn.so.error ?? "", /cannot connect to the stream-in at 127\.0\.0\.1:\d+: the TLS handshake failed .*certificate/i);
  assert.equal(rogueIn.so.bytesOutLink, 0);
  assert.equal(rogueIn.so.bytesFromQemu, 0);
  assert.ok(rogueIn.sourceCut, "the source QEMU's connection was closed, not read to the end");
  assert.equal(rogueIn.qemuConnections, 0);
});

test("stream-in and stream-out without a key, certificates or insecure refuse to start (SecurityError PAGETWIN_SECURITY); a short key too", async () => {
  const { image } = await fixtureOnce();
  const isSecurity = (e: unknown) => {
    assert.ok(e instanceof SecurityError, String(e));
    assert.equal(e.code, "PAGETWIN_SECURITY");
    assert.match(e.message, /--psk-file/);
    assert.match(e.message, /--insecure/);
    return true;
  };
  await assert.rejects(streamIn({ listenPort: 0, qemu: "127.0.0.1:1", image }), isSecurity);
  await assert.rejects(streamOut({ listenPort: 0, to: "127.0.0.1:1", image }), isSecurity);
  await assert.rejects(streamIn({ listenPort: 0, qemu: "127.0.0.1:1", image, psk: randomBytes(16) }), /32 random bytes/);
  const open = await streamIn({ listenPort: 0, qemu: "127.0.0.1:1", image, insecure: true });
  await open.close();
});

test("stream CLI: stream-in / stream-out without protection exit 2 naming --psk-file and --insecure; with --insecure they start and warn; key files checked", async () => {
  const { image } = await fixtureOnce();
  const required = { "stream-in": ["--qemu", "127.0.0.1:1", "--image", image], "stream-out": ["--to", "127.0.0.1:1", "--image", image] };
  const openKey = join(work, "open.key");
  writeFileSync(openKey, randomBytes(32));
  chmodSync(openKey, 0o644);
  const shortKey = join(work, "short.key");
  writeFileSync(shortKey, randomBytes(16), { mode: 0o600 });
  for (const [cmd, args] of Object.entries(required)) {
    const run = (...more: string[]) => spawnSync(process.execPath, [cli, cmd, ...args, "--listen", "127.0.0.1:0", ...more], { encoding: "utf8" });
    const no = run();
    assert.equal(no.status, 2, `${cmd}: ${no.stderr}`);
    assert.match(no.stderr, /--psk-file/, cmd);
    assert.match(no.stderr, /--insecure/, cmd);
    const a = run("--psk-file", openKey);
    assert.equal(a.status, 2, a.stderr);
    assert.match(a.stderr, /can be read by group or others \(mode 644\): chmod 600/, cmd);
    const b = run("--psk-file", shortKey);
    assert.equal(b.status, 2, b.stderr);
    assert.match(b.stderr, /holds 16 bytes; it must hold 32 random bytes/, cmd);
  }
  const si = await startAndStop([cli, "stream-in", ...required["stream-in"], "--listen", "127.0.0.1:0", "--insecure"], /WARNING[^\n]*\n/);
  assert.match(si, /listening on 127\.0\.0\.1:\d+ \(none \(--insecure\)/);
  assert.match(si, /WARNING.*--insecure.*authenticates nobody and encrypts nothing/);
  const so = await startAndStop([cli, "stream-out", ...required["stream-out"], "--listen", "127.0.0.1:0", "--insecure"], /listening on[^\n]*\n/, 500);
  // stream-out dials the link rather than listening for it: its QEMU side is local only, and it warns about the link
  assert.match(so, /listening on 127\.0\.0\.1:\d+ \(local only\)/);
  assert.match(so, /WARNING.*--insecure.*authenticates nobody and encrypts nothing/);
});

test("stream-out/stream-in --help name the security options; a missing key file is a clear error (exit 2, nothing started)", () => {
  for (const cmd of ["stream-out", "stream-in"]) {
    const h = spawnSync(process.execPath, [cli, cmd, "--help"], { encoding: "utf8" });
    assert.equal(h.status, 0);
    for (const opt of ["--psk-file", "--tls-cert", "--tls-key", "--tls-ca", "--insecure"]) assert.match(h.stdout, new RegExp(`\\n  ${opt} `), `${cmd} --help: ${opt}`);
    const required = cmd === "stream-out" ? ["--to", "127.0.0.1:1", "--image", "/nonexistent"] : ["--qemu", "127.0.0.1:1", "--image", "/nonexistent"];
    const bad = spawnSync(process.execPath, [cli, cmd, ...required, "--psk-file", "/nonexistent-key"], { encoding: "utf8" });
    assert.equal(bad.status, 2, bad.stderr);
    assert.match(bad.stderr, /^pagetwin: cannot read the key file \/nonexistent-key: ENOENT/);
    const half = spawnSync(process.execPath, [cli, cmd, ...required, "--tls-cert", "x.pem"], { encoding: "utf8" });
    assert.equal(half.status, 2);
    assert.match(half.stderr, /TLS needs all of --tls-cert, --tls-key and --tls-ca/);
  }
});

/** A destination QEMU stand-in keeping each connection's bytes apart. */
async function sink(): Promise<{ port: number; streams: Buffer[][]; close(): void }> {
  const streams: Buffer[][] = [];
  const s = net.createServer({ allowHalfOpen: true }, (c) => {
    const got: Buffer[] = [];
    streams.push(got);
    c.on("data", (d: Buffer) => got.push(d));
    c.on("end", () => c.end());
    c.on("error", () => {});
  });
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  return { port: (s.address() as net.AddressInfo).port, streams, close: () => s.close() };
}

const rssKiB = (pid: number) => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);

test("50 unauthenticated connections to a stream-in with a key: its memory stays within 64 MiB of before, and a real stream-out gets through while they are open", { timeout: 60_000 }, async () => {
  const { image, data } = await fixtureOnce();
  const key = testKeyFile(mkdtempSync(join(work, "key-")));
  const qemu = await sink();
  // stream-in in a process of its own, so that its memory is its own (the attackers' buffers live in this one)
  const p = spawn(process.execPath, [cli, "stream-in", "--listen", "127.0.0.1:0", "--qemu", `127.0.0.1:${qemu.port}`, "--image", image, "--psk-file", key, "--json"], { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "", stdout = "";
  p.stdout.on("data", (d: Buffer) => { stdout += d; });
  const exited = new Promise<number | null>((r) => p.once("exit", r));
  const attackers: net.Socket[] = [];
  try {
    const port = await new Promise<number>((resolve, reject) => {
      p.stderr.on("data", (d: Buffer) => { stderr += d; const m = /listening on 127\.0\.0\.1:(\d+)/.exec(stderr); if (m) resolve(Number(m[1])); });
      void exited.then((c) => reject(new Error(`stream-in exited ${c}: ${stderr}`)));
    });
    await new Promise((r) => setTimeout(r, 300));
    const before = rssKiB(p.pid!);
    // a third send nothing, a third a few hundred bytes of garbage, a third the start of a TLS
    // record announcing 16 KiB and then 1 KiB of it (a handshake left hanging mid-record)
    for (let i = 0; i < 50; i++) {
      const s = net.connect(port, "127.0.0.1");
      s.on("error", () => {});
      s.on("data", () => {});
      if (i % 3 === 1) s.write(randomBytes(300));
      if (i % 3 === 2) s.write(Buffer.concat([Buffer.from([TLS_RECORD.handshake, 3, 1, 0x40, 0x00]), randomBytes(1024)]));
      attackers.push(s);
    }
    await new Promise((r) => setTimeout(r, 500));
    const during = rssKiB(p.pid!);
    // the real stream-out, same key, while the attackers are connected
    const r = await throughProxies({ data, image, streamIn: { port, stats: null as never, done: new Promise(() => {}), close: async () => {} }, out: { psk: TEST_KEY } });
    const code = await Promise.race([exited, new Promise((res) => setTimeout(() => res("still running"), 10_000))]);
    assert.equal(r.so.error, undefined, `the real stream-out got through: ${stderr}`);
    assert.equal(code, 0, `stream-in ended its one migration: ${stderr}`);
    const stats = JSON.parse(stdout.trim().split("\n").pop()!) as { sessions: number; streamsVerified: number; refused: string[] }; // the result is the last NDJSON line
    assert.equal(stats.sessions, 1, "only the real stream-out got a session");
    assert.equal(stats.streamsVerified, 1);
    assert.ok(stats.refused.length > 0, "the unauthenticated peers were refused");
    assert.equal(qemu.streams.length, 1, "stream-in connected to QEMU once, for the real stream-out");
    assert.ok(Buffer.concat(qemu.streams[0]!).equals(data), "the destination QEMU got the stream byte-identical");
    // Bound: an idle node process with stream-in is ~50-60 MiB; 50 refused or pending TLS
    // sockets cost well under 100 KiB each (OpenSSL keeps at most one record, 16 KiB,
    // per connection), ~5 MiB in all. A stream-in that gave each peer a session before
    // authenticating (4 MiB block buffers, a frame buffer of up to 4 MiB, a QEMU
    // connection) would add 200 MiB or more. 64 MiB leaves room for GC noise.
    assert.ok(during - before < 64 * 1024, `stream-in grew by ${((during - before) / 1024).toFixed(1)} MiB with 50 unauthenticated peers`);
  } finally {
    attackers.forEach((s) => s.destroy());
    if (p.exitCode === null) p.kill();
    qemu.close();
  }
});

test("two concurrent sessions on one stream-in never cross: each destination connection gets exactly its own stream, NEED/RESEND included", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(work, "two-"));
  const image = join(dir, "disk.img");
  const img = randomBytes(1024 * PAGE);
  writeFileSync(image, img);
  const nas: NasIndex = await openNasIndex(image, { rebuild: true });
  // A's twins are blocks 0..511, B's 512..1023, each between pages of its own
  const stream = (first: number) => {
    const pages: Buffer[] = [];
    for (let b = first; b < first + 512; b++) pages.push(randomBytes(PAGE), img.subarray(b * PAGE, (b + 1) * PAGE));
    return qemuStream(Buffer.concat(pages));
  };
  const a = stream(0), b = stream(512);
  // blocks rewritten after indexing: their twins fail verification at stream-in and are asked for again (NEED/RESEND)
  const rewritten = [10, 11, 12, 300, 520, 521, 900];
  const fd = openSync(image, "r+");
  for (const blk of rewritten) writeSync(fd, randomBytes(PAGE), 0, PAGE, blk * PAGE);
  closeSync(fd);
  const qemu = await sink();
  const si = await streamIn({ listenPort: 0, qemu: `127.0.0.1:${qemu.port}`, image, keep: true, ...psk });
  try {
    // small writes from both fake source QEMUs, so that the two sessions interleave on stream-in
    const [ra, rb] = await Promise.all([
      throughProxies({ data: a, image, nas, streamIn: si, out: { ...psk, compress: "off" }, split: 8192 }),
      throughProxies({ data: b, image, nas, streamIn: si, out: { ...psk, compress: "off" }, split: 8192 }),
    ]);
    assert.equal(ra.so.error, undefined);
    assert.equal(rb.so.error, undefined);
    assert.equal(ra.so.resends, 4, "A's rewritten blocks were resent");
    assert.equal(rb.so.resends, 3, "B's rewritten blocks were resent");
    for (const t = Date.now(); si.stats.streamsVerified < 2 && Date.now() - t < 5000;) await new Promise((r) => setTimeout(r, 20));
    assert.equal(si.stats.error, undefined);
    assert.equal(si.stats.sessions, 2);
    assert.equal(si.stats.streamsVerified, 2);
    assert.equal(si.stats.resends, rewritten.length);
    assert.equal(si.stats.twinsReplaced, 1024 - rewritten.length);
    assert.equal(qemu.streams.length, 2);
    const got = qemu.streams.map((s) => Buffer.concat(s));
    // which connection was A's: the one whose first page (past the ~100-byte header both share) is A's
    const firstPage = (x: Buffer) => x.subarray(200, 4000);
    const [forA, forB] = firstPage(got[0]!).equals(firstPage(a)) ? [got[0]!, got[1]!] : [got[1]!, got[0]!];
    assert.ok(forA.equals(a), "session A's destination got exactly A's stream");
    assert.ok(forB.equals(b), "session B's destination got exactly B's stream");
  } finally {
    await si.close();
    nas.image.close();
    qemu.close();
  }
});
