// Security of agent mode's link (pagetwin listen <-> the source agent): every
// byte after the handshake inside TLS (a pre-shared key or mutual
// certificates), a relay on the path that changes or deletes bytes makes the
// migration fail with the source running and the destination never resumed,
// RAM never in clear, and nothing listens without protection unless told
// --insecure.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createEngine } from "../src/index.js";
import { SecurityError } from "../src/errors.js";
import * as net from "node:net";
import * as tls from "node:tls";
import { clientOptions, loadKey, serverOptions, unverifiedPeer } from "../src/link/security.js";
import { Listener } from "../src/link/listen.js";
import { MAX_PENDING_HANDSHAKES, TIMEOUTS } from "../src/link/timeouts.js";
import { jsonFrame } from "../src/wire/envelope.js";
import { FrameType, PROTOCOL_VERSION } from "../src/agent/protocol.js";
import { RamFile } from "../src/adapters/ram/ram-file.js";
import { DestinationAgent, type DestinationOptions } from "../src/agent/destination.js";
import { migrateSource, MigrationError, type MigrationResult, type SourceOptions } from "../src/agent/source.js";
import { vmStub, type VmStub } from "./helpers/vm-stub.js";
import { cliPath as cli, startAndStop } from "./helpers/cli.js";
import { CANARY, canaryPages, certsOnce, tamperProxy, TEST_KEY, testKeyFile, tlsRecordTamper, TLS_RECORD, type TlsRecordTamper } from "./helpers/stream.js";

const PAGES = 256;

const work = mkdtempSync(join(tmpdir(), "pagetwin-sec-"));
after(() => rmSync(work, { recursive: true, force: true }));
const certs = () => certsOnce(work);
const dstTls = () => ({ cert: certs().dstCert, key: certs().dstKey, ca: certs().ca });
const srcTls = () => ({ cert: certs().srcCert, key: certs().srcKey, ca: certs().ca });

interface Run {
  r: MigrationResult;
  agent: DestinationAgent;
  vm: VmStub;
  srcRam: string;
  dstRam: string;
  /** Times the destination's onVerified ran (what sends `cont` to the destination QEMU). */
  verifiedCalls: number;
  /** What crossed the link each way (with a relay). */
  up: Buffer;
  down: Buffer;
}

interface RunOptions {
  src?: Partial<SourceOptions>;
  dst?: Partial<DestinationOptions>;
  /** The source VM's RAM (default: PAGES random pages). */
  ram?: Buffer;
  /** Put a relay on the path (it records the bytes; `tamper` may change them). */
  relay?: boolean;
  tamper?: (vm: VmStub) => TlsRecordTamper;
}

/** One migration of a RAM file to a DestinationAgent (created here: no RAM file before Hello), through a relay if asked. */
async function migrate(o: RunOptions): Promise<Run> {
  const dir = mkdtempSync(join(work, "run-"));
  const srcRam = join(dir, "src-ram"), dstRam = join(dir, "dst-ram");
  writeFileSync(srcRam, o.ram ?? randomBytes(PAGES * 4096));
  let verifiedCalls = 0;
  const agent = new DestinationAgent({ ramPath: dstRam, createRam: true, onVerified: async () => { verifiedCalls++; }, ...o.dst });
  const port = await agent.listen();
  const vm = vmStub();
  const up: Buffer[] = [], down: Buffer[] = [];
  const tamper = o.tamper ? tlsRecordTamper(o.tamper(vm)) : null;
  const relay = o.relay || tamper
    ? await tamperProxy(port, (dir, chunk, cut) => {
      (dir === "up" ? up : down).push(Buffer.from(chunk));
      return tamper ? tamper(dir, chunk, cut) : chunk;
    })
    : null;
  const ram = RamFile.open(srcRam);
  try {
    const r = await migrateSource({
      engine: await createEngine(), index: null, indexId: null, ram, vm,
      host: "127.0.0.1", port: relay?.port ?? port, bandwidth: 0, ...o.src,
    }).catch((e) => { if (e instanceof MigrationError) return e.result; throw e; });
    // the destination's side of a failure (its result, or a refused peer) may come a moment later
    for (const t = Date.now(); agent.results.length === 0 && agent.refused.length === 0 && Date.now() - t < 3000;) await new Promise((res) => setTimeout(res, 20));
    return { r, agent, vm, srcRam, dstRam, verifiedCalls, up: Buffer.concat(up), down: Buffer.concat(down) };
  } finally {
    ram.close();
    relay?.close();
    agent.close();
  }
}

const psk = { psk: TEST_KEY };

/** Nothing was lost: the source runs (resumed if it was paused), the destination never verified nor resumed. */
function assertSourceRunsDestinationNot(x: Run): void {
  assert.equal(x.r.status, "failed");
  assert.equal(x.r.verified, false);
  assert.equal(x.vm.running, true, "the source VM runs");
  assert.equal(x.vm.resumes, x.vm.pauses, "every pause of the source VM was undone");
  assert.equal(x.verifiedCalls, 0, "the destination's onVerified (its `cont`) never ran");
  assert.ok(x.agent.results.every((d) => d.status === "failed" && !d.verified), JSON.stringify(x.agent.results.map((d) => [d.status, d.error])));
}

test("key: a migration over TLS-PSK through a relay completes byte-identical (the baseline the tamper tests depart from)", async () => {
  const x = await migrate({ src: psk, dst: psk, relay: true });
  assert.equal(x.r.status, "completed", x.r.error);
  assert.equal(x.r.verified, true);
  assert.equal(x.verifiedCalls, 1);
  assert.deepEqual(readFileSync(x.dstRam), readFileSync(x.srcRam));
  assert.equal(x.vm.running, false, "a completed migration leaves the source paused for the handover");
});

/** Changes one ciphertext byte of the 20th application-data record from the source (~300 KiB into 1 MiB of pages). */
function changeMidTraffic(counter: { n: number }): () => TlsRecordTamper {
  return () => (dir, rec) => {
    if (dir === "up" && rec[0] === TLS_RECORD.applicationData && ++counter.n === 20) rec[rec.length >> 1]! ^= 0x01;
    return rec;
  };
}

test("on-path relay, same key at both ends: one byte changed in the middle of the traffic -> the migration fails, source runs, destination never verified", async () => {
  const seen = { n: 0 };
  const x = await migrate({ src: { ...psk, compress: "off" }, dst: psk, tamper: changeMidTraffic(seen) });
  assert.ok(seen.n >= 20, `the relay saw only ${seen.n} records: the change never happened`);
  assertSourceRunsDestinationNot(x);
  assert.equal(x.agent.results.length, 1, "the destination saw the session fail");
  assert.match(x.agent.results[0]!.error ?? "", /decrypt|bad record mac/i);
  assert.ok(x.agent.results[0]!.pagesWritten < PAGES, "the destination did not get every page");
});

test("on-path relay: one byte changed after the source VM was paused (final round / switchover) -> the source VM is resumed, the destination never verified", async () => {
  let changed = false;
  const x = await migrate({
    src: psk, dst: psk,
    tamper: (vm) => (dir, rec) => {
      if (!changed && dir === "up" && vm.pauses > 0 && rec[0] === TLS_RECORD.applicationData) { rec[rec.length - 3]! ^= 0x80; changed = true; }
      return rec;
    },
  });
  assert.ok(changed, "the relay changed a record after the pause");
  assert.equal(x.vm.pauses, 1, "the source VM was paused for the final round");
  assert.equal(x.vm.resumes, 1, "and resumed after the failure");
  assertSourceRunsDestinationNot(x);
});

test("on-path relay with certificates (TLS 1.3): one byte changed mid-traffic -> the migration fails, source runs, destination never verified", async () => {
  const seen = { n: 0 };
  const x = await migrate({ src: { tls: srcTls(), compress: "off" }, dst: { tls: dstTls() }, tamper: changeMidTraffic(seen) });
  assert.ok(seen.n >= 20);
  assertSourceRunsDestinationNot(x);
  assert.equal(x.agent.results.length, 1);
});

/** Refused in the handshake: no session, no RAM file created, no page written, the VM never paused. */
function assertRefused(x: Run, what: string): void {
  assert.equal(x.r.status, "failed", what);
  assert.equal(x.r.iterations, 0, what);
  assert.equal(x.vm.pauses, 0, `${what}: the source VM was never paused`);
  assert.ok(x.agent.refused.length > 0, `${what}: the destination reports a refused peer`);
  assert.equal(x.agent.results.length, 0, `${what}: a migration session began`);
  assert.equal(existsSync(x.dstRam), false, `${what}: the destination created its RAM file`);
  assert.equal(x.verifiedCalls, 0);
}

test("on-path relay changing or deleting handshake records -> refused: no session, no page written", async () => {
  // a byte of the ClientHello's random: the transcripts differ, the Finished messages do not verify
  const hello = await migrate({
    src: psk, dst: psk,
    tamper: () => (dir, rec, i) => { if (dir === "up" && i === 0) rec[5 + 4 + 2 + 7]! ^= 0x01; return rec; },
  });
  assertRefused(hello, "ClientHello changed");
  assert.match(hello.agent.refused[0]!, /failed the TLS handshake: .*bad record mac/);
  assert.doesNotMatch(hello.agent.refused[0]!, /\s$/, "OpenSSL's reason on one line, without its newline");
  // the PSK identity in the ClientKeyExchange renamed: the listener knows no such key
  let renamed = false;
  const identity = await migrate({
    src: psk, dst: psk,
    tamper: () => (dir, rec) => {
      const at = rec[0] === TLS_RECORD.handshake ? rec.indexOf("pagetwin") : -1;
      if (dir === "up" && at >= 0) { rec.write("PAGETWIN", at, "latin1"); renamed = true; }
      return rec;
    },
  });
  assert.ok(renamed, "the relay found the PSK identity");
  assertRefused(identity, "PSK identity changed");
  assert.match(identity.agent.refused[0]!, /failed the TLS handshake: .*psk identity not found/);
  // the source's ChangeCipherSpec deleted: the listener gets an encrypted Finished it does not expect
  const deleted = await migrate({
    src: psk, dst: psk,
    tamper: () => (dir, rec) => (dir === "up" && rec[0] === TLS_RECORD.changeCipherSpec ? null : rec),
  });
  assertRefused(deleted, "ChangeCipherSpec deleted");
  assert.match(deleted.agent.refused[0]!, /failed the TLS handshake: .*unexpected message/);
  // the listener's ServerHello changed (the source is the one who notices; the listener hears its alert)
  const serverHello = await migrate({
    src: psk, dst: psk,
    tamper: () => (dir, rec, i) => { if (dir === "down" && i === 0) rec[5 + 4 + 2 + 3]! ^= 0x01; return rec; },
  });
  assertRefused(serverHello, "ServerHello changed");
  assert.match(serverHello.r.error ?? "", /TLS handshake failed/);
});

test("canary: RAM of a repeated 16-byte pattern never crosses the link in clear with a key or certificates; with --insecure it does", async () => {
  const ram = canaryPages(PAGES);
  const runs = {
    key: await migrate({ ram, src: { ...psk, compress: "off" }, dst: psk, relay: true }),
    certificates: await migrate({ ram, src: { tls: srcTls(), compress: "off" }, dst: { tls: dstTls() }, relay: true }),
    insecure: await migrate({ ram, src: { insecure: true, compress: "off" }, dst: { insecure: true }, relay: true }),
  };
  for (const [how, x] of Object.entries(runs)) {
    assert.equal(x.r.status, "completed", `${how}: ${x.r.error}`);
    assert.deepEqual(readFileSync(x.dstRam), ram, how);
    assert.ok(x.up.length > PAGES * 4096, `${how}: the relay saw the pages go by (${x.up.length} bytes)`);
  }
  for (const how of ["key", "certificates"] as const) {
    assert.equal(runs[how].up.indexOf(CANARY), -1, `${how}: the pattern appears in the source's bytes`);
    assert.equal(runs[how].down.indexOf(CANARY), -1, `${how}: the pattern appears in the destination's bytes`);
  }
  assert.notEqual(runs.insecure.up.indexOf(CANARY), -1, "insecure: the pattern is on the wire (the search works)");
});

test("inside TLS the agents leave the data frames' CRC-32 out (both say so, the RAM arrives whole); with --insecure every frame carries it", async () => {
  const ram = randomBytes(PAGES * 4096);
  const runs = {
    key: await migrate({ ram, src: { ...psk, compress: "off" }, dst: psk }),
    insecure: await migrate({ ram, src: { insecure: true, compress: "off" }, dst: { insecure: true } }),
  };
  for (const [how, x] of Object.entries(runs)) {
    assert.equal(x.r.status, "completed", `${how}: ${x.r.error}`);
    assert.deepEqual(readFileSync(x.dstRam), ram, how);
  }
  assert.deepEqual([runs.key.r.frameCrc, runs.key.agent.results[0]!.frameCrc], [false, false]);
  assert.deepEqual([runs.insecure.r.frameCrc, runs.insecure.agent.results[0]!.frameCrc], [true, true]);
});

test("TLS: a source with a certificate from elsewhere, without TLS, or with another key is refused before any page", async () => {
  const ok = await migrate({ src: { tls: srcTls() }, dst: { tls: dstTls() } });
  assert.equal(ok.r.status, "completed", ok.r.error);
  const c = certs();
  const rogue = await migrate({ src: { tls: { cert: c.rogueCert, key: c.rogueKey, ca: c.ca } }, dst: { tls: dstTls() } });
  assertRefused(rogue, "foreign certificate");
  assert.match(rogue.r.error!, /refused the migration: TLS: this destination refuses the source: its certificate is not signed by the CA/);
  assert.match(rogue.agent.refused[0]!, /its certificate is not signed by the CA this side trusts/);
  const plain = await migrate({ src: { insecure: true }, dst: { tls: dstTls() } });
  assertRefused(plain, "no TLS");
  const wrongKey = await migrate({ src: { psk: randomBytes(32) }, dst: psk });
  assertRefused(wrongKey, "another key");
  assert.match(wrongKey.r.error!, /TLS handshake failed .*same --psk-file/);
});

/** A Hello as a source sends it first (what an impostor would follow the handshake with). */
const hello = () => jsonFrame(FrameType.Hello, { version: PROTOCOL_VERSION, pages: PAGES, pageSize: 4096, dedup: false, indexId: null });

/** Connects a raw client, sends a Hello as soon as it can, resolves with what came back once the connection is over. */
function impostor(port: number, how: "plain" | "other-key" | "no-psk"): Promise<{ got: Buffer; secured: boolean }> {
  return new Promise((resolve) => {
    const got: Buffer[] = [];
    let secured = false;
    const s: net.Socket = how === "plain"
      ? net.connect(port, "127.0.0.1", () => s.write(hello()))
      : tls.connect({
        port, host: "127.0.0.1",
        // another 32-byte key under the same identity; or a plain TLS client that offers no PSK at all
        ...(how === "other-key" ? clientOptions({ kind: "psk", key: randomBytes(32) }, "127.0.0.1") : { rejectUnauthorized: false }),
      }, () => { secured = true; s.write(hello()); });
    s.on("data", (d: Buffer) => got.push(d));
    s.on("error", () => {});
    s.on("close", () => resolve({ got: Buffer.concat(got), secured }));
    setTimeout(() => s.destroy(), 5000).unref();
  });
}

test("the destination refuses by itself a peer with another key, no PSK, or plain TCP: nothing opened, no session, counted as refused; a real source then gets through", async () => {
  const dir = mkdtempSync(join(work, "impostor-"));
  const dstRam = join(dir, "dst-ram");
  let verifiedCalls = 0;
  const agent = new DestinationAgent({ ramPath: dstRam, createRam: true, onVerified: async () => { verifiedCalls++; }, ...psk });
  const port = await agent.listen();
  try {
    for (const how of ["other-key", "no-psk", "plain"] as const) {
      const before = agent.refused.length;
      const x = await impostor(port, how);
      for (const t = Date.now(); agent.refused.length === before && Date.now() - t < 3000;) await new Promise((r) => setTimeout(r, 20));
      assert.equal(x.secured, false, `${how}: the TLS handshake completed for the impostor`);
      assert.equal(x.got.indexOf(Buffer.from("HelloAck")), -1, `${how}: the impostor was answered`);
      assert.equal(agent.refused.length, before + 1, `${how}: the destination counted the refused peer`);
      assert.match(agent.refused.at(-1)!, /failed the TLS handshake/, how);
      assert.equal(agent.results.length, 0, `${how}: a migration session began`);
      assert.equal(existsSync(dstRam), false, `${how}: the destination created its RAM file`);
    }
    // the same agent takes the real source next
    const srcRam = join(dir, "src-ram");
    writeFileSync(srcRam, randomBytes(PAGES * 4096));
    const ram = RamFile.open(srcRam);
    try {
      const r = await migrateSource({ engine: await createEngine(), index: null, indexId: null, ram, vm: vmStub(), host: "127.0.0.1", port, bandwidth: 0, ...psk });
      assert.equal(r.status, "completed", r.error);
    } finally {
      ram.close();
    }
    assert.equal(verifiedCalls, 1);
    assert.deepEqual(readFileSync(dstRam), readFileSync(srcRam));
  } finally {
    agent.close();
  }
});

test("a destination agent without key, certificates or insecure refuses to start (SecurityError PAGETWIN_SECURITY)", () => {
  assert.throws(() => new DestinationAgent({ ramPath: join(work, "never"), createRam: true }), (e: unknown) => {
    assert.ok(e instanceof SecurityError);
    assert.equal(e.code, "PAGETWIN_SECURITY");
    assert.match(e.message, /--psk-file/);
    assert.match(e.message, /--insecure/);
    return true;
  });
  assert.throws(() => new DestinationAgent({ ramPath: join(work, "never"), createRam: true, psk: randomBytes(16) }), /32 random bytes/);
  assert.throws(() => new DestinationAgent({ ramPath: join(work, "never"), createRam: true, psk: TEST_KEY, tls: dstTls() }),
    (e: unknown) => e instanceof SecurityError && e.message === "pagetwin listen: give either a pre-shared key or TLS certificates, not both");
  assert.doesNotThrow(() => new DestinationAgent({ ramPath: join(work, "never"), createRam: true, insecure: true }));
});

test("key files: readable by others refused (chmod 600), not 32 bytes refused; a TLS private key readable by others refused", () => {
  const open = join(work, "open.key");
  writeFileSync(open, randomBytes(32), { mode: 0o644 });
  chmodSync(open, 0o644); // whatever the umask
  assert.throws(() => loadKey(open), (e: unknown) => e instanceof SecurityError && /chmod 600/.test(e.message));
  const short = join(work, "short.key");
  writeFileSync(short, randomBytes(16), { mode: 0o600 });
  assert.throws(() => loadKey(short), (e: unknown) => e instanceof SecurityError && /holds 16 bytes; it must hold 32 random bytes/.test(e.message));
  const good = testKeyFile(mkdtempSync(join(work, "key-")));
  assert.deepEqual(loadKey(good), TEST_KEY);
  // the same through the CLI: exit 2 (nothing started) and the fix in the message
  const listen = (...args: string[]) => spawnSync(process.execPath, [cli, "listen", "--ram", join(work, "cli-ram"), "--create-ram", "--port", "0", ...args], { encoding: "utf8" });
  const a = listen("--psk-file", open);
  assert.equal(a.status, 2, a.stderr);
  assert.match(a.stderr, /can be read by group or others \(mode 644\): chmod 600/);
  const b = listen("--psk-file", short);
  assert.equal(b.status, 2, b.stderr);
  assert.match(b.stderr, /must hold 32 random bytes/);
  // a TLS private key others can read
  const c = certs();
  const key = join(work, "readable-tls.key");
  writeFileSync(key, readFileSync(c.dstKey));
  chmodSync(key, 0o644);
  assert.throws(() => new DestinationAgent({ ramPath: join(work, "never"), createRam: true, tls: { cert: c.dstCert, key, ca: c.ca } }),
    (e: unknown) => e instanceof SecurityError && /TLS private key .* can be read by group or others .*chmod 600/.test(e.message));
  chmodSync(key, 0o600);
  assert.doesNotThrow(() => new DestinationAgent({ ramPath: join(work, "never"), createRam: true, tls: { cert: c.dstCert, key, ca: c.ca } }));
});

test("CLI: `pagetwin listen` without a key, certificates or --insecure exits 2 naming --psk-file and --insecure; with --insecure it starts and warns", async () => {
  const ram = join(work, "cli-ram");
  const no = spawnSync(process.execPath, [cli, "listen", "--ram", ram, "--create-ram", "--port", "0"], { encoding: "utf8" });
  assert.equal(no.status, 2, no.stderr);
  assert.match(no.stderr, /--psk-file/);
  assert.match(no.stderr, /--insecure/);
  const stderr = await startAndStop([cli, "listen", "--ram", ram, "--create-ram", "--port", "0", "--insecure"], /waiting for a migration/);
  assert.match(stderr, /WARNING.*--insecure.*authenticates nobody and encrypts nothing/);
  assert.match(stderr, /listening on 127\.0\.0\.1:\d+ \(none \(--insecure\)/);
});

test("handshake: TLS options by link kind: certificates are TLS 1.3 with SNI for a host name only; a key is TLS 1.2 PSK under one identity; an insecure link has none", () => {
  const files = srcTls();
  const named = clientOptions({ kind: "tls", files }, "dst.example.org");
  assert.equal(named.servername, "dst.example.org");
  for (const host of ["node7", "10gbe.example", "localhost"]) assert.equal(clientOptions({ kind: "tls", files }, host).servername, host);
  assert.equal(named.host, "dst.example.org");
  assert.equal(named.minVersion, "TLSv1.3");
  // RFC 6066: no IP address as a server name (the certificate is still checked against the address)
  for (const ip of ["127.0.0.1", "10.20.30.40", "::1", "fe80::1"]) assert.equal(clientOptions({ kind: "tls", files }, ip).servername, undefined, ip);
  const server = serverOptions({ kind: "tls", files: dstTls() });
  assert.equal(server.minVersion, "TLSv1.3");
  assert.equal(server.requestCert, true, "the listener asks for the source's certificate");
  const key = { kind: "psk" as const, key: TEST_KEY };
  const c = clientOptions(key, "127.0.0.1"), l = serverOptions(key);
  for (const o of [c, l]) {
    assert.equal(o.minVersion, "TLSv1.2");
    assert.equal(o.maxVersion, "TLSv1.2", "OpenSSL negotiates a plain PSK only in TLS 1.2");
    assert.equal(o.ciphers, "ECDHE-PSK-CHACHA20-POLY1305");
  }
  assert.deepEqual(c.pskCallback!(null), { psk: TEST_KEY, identity: "pagetwin" });
  assert.equal(c.checkServerIdentity!("127.0.0.1", {} as tls.PeerCertificate), undefined, "the key authenticates the listener");
  assert.deepEqual(l.pskCallback!({} as tls.TLSSocket, "pagetwin"), TEST_KEY);
  assert.equal(l.pskCallback!({} as tls.TLSSocket, "PAGETWIN"), null, "another identity gets no key");
  assert.throws(() => serverOptions({ kind: "insecure" }), /^Error: serverOptions: an insecure link has no TLS$/);
  assert.throws(() => clientOptions({ kind: "insecure" }, "127.0.0.1"), /^Error: clientOptions: an insecure link has no TLS$/);
});

test("handshake: the reason a certificate listener gives: a certificate from elsewhere or none, with TLS's own reason or none", () => {
  const peer = (cert: object, err?: unknown) => ({ authorized: false, authorizationError: err, getPeerCertificate: () => cert }) as unknown as tls.TLSSocket;
  const tlsSec = { kind: "tls" as const, files: dstTls() };
  assert.equal(unverifiedPeer(peer({}, "UNABLE_TO_GET_ISSUER_CERT"), tlsSec), "it presented no certificate (UNABLE_TO_GET_ISSUER_CERT)");
  assert.equal(unverifiedPeer(peer({}), tlsSec), "it presented no certificate (no certificate)");
  assert.equal(unverifiedPeer(peer({ subject: { CN: "rogue" } }, new Error("self-signed")), tlsSec), "its certificate is not signed by the CA this side trusts (self-signed)");
  assert.equal(unverifiedPeer({ ...peer({}), authorized: true } as unknown as tls.TLSSocket, tlsSec), null);
  assert.equal(unverifiedPeer(peer({}), { kind: "psk", key: TEST_KEY }), null, "a key's peer has no certificate to check");
});

test("handshake: a certificate listener refuses by itself a TLS client that presents no certificate, tells it why, and opens nothing", async () => {
  const dir = mkdtempSync(join(work, "nocert-"));
  const dstRam = join(dir, "dst-ram");
  const agent = new DestinationAgent({ ramPath: dstRam, createRam: true, tls: dstTls() });
  const port = await agent.listen();
  try {
    const got = await new Promise<Buffer>((resolve) => {
      const out: Buffer[] = [];
      // TLS 1.3: the client's handshake is over before the listener has judged its (missing) certificate
      const s = tls.connect({ port, host: "127.0.0.1", ca: readFileSync(certs().ca), servername: "localhost" }, () => s.write(hello()));
      s.on("data", (d: Buffer) => out.push(d));
      s.on("error", () => {});
      s.on("close", () => resolve(Buffer.concat(out)));
      setTimeout(() => s.destroy(), 5000).unref();
    });
    for (const t = Date.now(); agent.refused.length === 0 && Date.now() - t < 3000;) await new Promise((r) => setTimeout(r, 20));
    assert.equal(agent.refused.length, 1);
    assert.match(agent.refused[0]!, /^a peer at 127\.0\.0\.1:\d+: it presented no certificate \([A-Z_]+\)$/);
    assert.match(got.toString("latin1"), /TLS: this destination refuses the source: it presented no certificate \(/, "the client is told why");
    assert.equal(agent.results.length, 0, "a migration session began");
    assert.equal(existsSync(dstRam), false, "the destination created its RAM file");
  } finally {
    agent.close();
  }
});

/** A PSK listener for the handshake tests, with what it refused and how many handshakes were under way at each refusal. */
async function pskListener(o: { maxPending?: number; authTimeoutMs?: number }) {
  const refused: string[] = [], underway: number[] = [], sessions: net.Socket[] = [], atSession: number[] = [];
  const l: Listener = await Listener.open({
    at: { kind: "tcp", host: "127.0.0.1", port: 0 }, security: { kind: "psk", key: TEST_KEY }, peer: "test peer", ...o,
    onSession: (s) => { sessions.push(s); atSession.push(l.handshakes); s.destroy(); },
    onRefused: (why) => { refused.push(why); underway.push(l.handshakes); },
  });
  return { l, refused, underway, sessions, atSession };
}

/** Waits for `ok` (5 s at most). */
async function until(ok: () => boolean, what: string): Promise<void> {
  for (const t = Date.now(); !ok(); await new Promise((r) => setTimeout(r, 10))) if (Date.now() - t > 5000) assert.fail(what);
}

/** A TCP connection to `port` that never says a word; resolves with it and its port once connected. */
async function silentPeer(port: number): Promise<{ s: net.Socket; port: number }> {
  const s = net.connect(port, "127.0.0.1");
  s.on("error", () => {});
  await new Promise((r) => s.once("connect", r));
  return { s, port: s.localPort! };
}

test("handshake: silent peers past the cap: the oldest is dropped at once and reported once, the rest keep their handshakes; a peer that leaves stops counting; a peer with the key gets its session", async () => {
  const { l, refused, underway, sessions, atSession } = await pskListener({ maxPending: 2 });
  const silent: net.Socket[] = [];
  try {
    const ports: number[] = [];
    for (let i = 0; i < 3; i++) {
      const p = await silentPeer(l.port);
      silent.push(p.s);
      ports.push(p.port);
      await until(() => l.handshakes === Math.min(i + 1, 2) && refused.length === (i === 2 ? 1 : 0), `connection ${i}: ${JSON.stringify(refused)}`);
    }
    assert.deepEqual(refused, [`a peer at 127.0.0.1:${ports[0]}: dropped before it authenticated, the oldest of 2 handshakes under way`]);
    assert.equal(underway[0], 1, "the dropped peer stopped counting when it was dropped");
    // closed now, not at its handshake deadline (10 s)
    await until(() => silent[0]!.destroyed, "the dropped peer's connection closed");
    assert.ok(!silent[1]!.destroyed && !silent[2]!.destroyed);
    // a peer that leaves in its handshake stops counting
    silent[1]!.destroy();
    await until(() => l.handshakes === 1 && refused.length === 2, "a peer that left still counts");
    assert.match(refused[1]!, new RegExp(`^a peer at 127\\.0\\.0\\.1:${ports[1]} failed the TLS handshake: \\S`), "the peer that left, by its address");
    const c = tls.connect({ port: l.port, ...clientOptions({ kind: "psk", key: TEST_KEY }, "127.0.0.1") });
    c.on("error", () => {});
    await until(() => sessions.length === 1, "the peer with the key");
    assert.deepEqual(atSession, [1], "an authenticated peer stops counting as a handshake when its session starts");
    c.destroy();
    assert.equal(l.handshakes, 1);
    assert.equal(refused.filter((w) => w.includes(`:${ports[0]}`)).length, 1, `the dropped peer was reported once: ${JSON.stringify(refused)}`);
  } finally {
    for (const s of silent) s.destroy();
    l.close();
  }
});

test("handshake: a silent peer past the handshake deadline is refused and counted out", async () => {
  const { l, refused, underway } = await pskListener({ authTimeoutMs: 300 });
  const p = await silentPeer(l.port);
  try {
    await until(() => refused.length === 1 && l.handshakes === 0, "the deadline");
    assert.deepEqual(refused, [`a peer at 127.0.0.1:${p.port} failed the TLS handshake: TLS handshake timeout`]);
    assert.deepEqual(underway, [0], "counted out when it is refused");
    await until(() => p.s.destroyed, "the peer's connection closed");
  } finally {
    p.s.destroy();
    l.close();
  }
});

/** Runs `f` with some of the link's timeouts changed (a test's own, restored after it). */
async function withTimeouts<T>(changed: Partial<Record<keyof typeof TIMEOUTS, number>>, f: () => Promise<T>): Promise<T> {
  const t = TIMEOUTS as Record<string, number>, saved = { ...t };
  Object.assign(t, changed);
  try {
    return await f();
  } finally {
    Object.assign(t, saved);
  }
}

test("handshake: the defaults: a listener holds at most MAX_PENDING_HANDSHAKES handshakes and refuses a silent peer after TIMEOUTS.authMs", async () => {
  const { l, refused } = await withTimeouts({ authMs: 300 }, () => pskListener({}));
  const silent: net.Socket[] = [];
  try {
    for (let i = 0; i <= MAX_PENDING_HANDSHAKES; i++) silent.push((await silentPeer(l.port)).s);
    await until(() => refused.length === MAX_PENDING_HANDSHAKES + 1 && l.handshakes === 0, `every silent peer refused: ${JSON.stringify(refused)}`);
    assert.match(refused[0]!, new RegExp(`dropped before it authenticated, the oldest of ${MAX_PENDING_HANDSHAKES} handshakes under way$`));
    assert.ok(refused.slice(1).every((w) => w.endsWith("failed the TLS handshake: TLS handshake timeout")), JSON.stringify(refused));
  } finally {
    for (const s of silent) s.destroy();
    l.close();
  }
});

test("handshake: a local listener takes any peer without TLS and keeps a half-open connection when asked", async () => {
  const l = await Listener.open({
    at: { kind: "tcp", host: "127.0.0.1", port: 0 }, security: { kind: "local" }, peer: "test peer", allowHalfOpen: true,
    // the peer has ended its side: an answer a moment later still goes back
    onSession: (s) => { s.on("error", () => {}); s.resume(); s.on("end", () => setTimeout(() => s.end("answer after the peer's end"), 20)); },
  });
  try {
    const got = await new Promise<string>((resolve) => {
      const out: Buffer[] = [];
      const c = net.connect({ port: l.port, host: "127.0.0.1", allowHalfOpen: true }, () => c.end("question"));
      c.on("data", (d: Buffer) => out.push(d));
      c.on("error", () => {});
      c.on("close", () => resolve(Buffer.concat(out).toString()));
      setTimeout(() => c.destroy(), 5000).unref();
    });
    assert.equal(got, "answer after the peer's end");
  } finally {
    l.close();
  }
});

/** A TLS client without a certificate; resolves with when it saw its connection end and close, in ms from its handshake. */
function noCertClient(port: number, allowHalfOpen: boolean): Promise<{ end: number; close: number }> {
  return new Promise((resolve) => {
    let t0 = 0, end = -1;
    const s = tls.connect({ port, host: "127.0.0.1", ca: readFileSync(certs().ca), servername: "localhost", allowHalfOpen } as tls.ConnectionOptions, () => { t0 = Date.now(); });
    s.resume();
    s.on("error", () => {});
    // a half-open peer learns that the listener's side is gone only when it writes (the reset comes back)
    s.on("end", () => { end = Date.now() - t0; if (allowHalfOpen) setInterval(() => s.writable && s.write("x"), 20).unref(); });
    s.on("close", () => resolve({ end, close: Date.now() - t0 }));
    setTimeout(() => s.destroy(), 5000).unref();
  });
}

test("handshake: a certificate listener with neither a refusal frame nor onRefused logs the refusal, ends the connection at once and destroys it after TIMEOUTS.refuseLingerMs", async () => {
  const log: string[] = [];
  const l = await Listener.open({
    at: { kind: "tcp", host: "127.0.0.1", port: 0 }, security: { kind: "tls", files: dstTls() }, peer: "test peer",
    onSession: (s) => s.destroy(), log: (m) => log.push(m),
  });
  try {
    // a peer that closes when the listener ends: gone long before the (long) linger
    const ended = await withTimeouts({ refuseLingerMs: 60_000 }, () => noCertClient(l.port, false));
    assert.ok(ended.end >= 0 && ended.close < 3000, JSON.stringify(ended));
    // a peer that keeps its side open is destroyed after the linger
    const held = await withTimeouts({ refuseLingerMs: 200 }, () => noCertClient(l.port, true));
    assert.ok(held.end >= 0 && held.close >= 200 && held.close < 3000, JSON.stringify(held));
    const refusals = log.filter((m) => m.startsWith("refused: "));
    assert.equal(refusals.length, 2, JSON.stringify(log));
    for (const m of refusals) assert.match(m, /^refused: a peer at 127\.0\.0\.1:\d+: it presented no certificate \(/);
  } finally {
    l.close();
  }
});
