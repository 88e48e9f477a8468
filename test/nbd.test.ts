// Our NBD client against Debian's qemu-nbd: reads byte for byte, block status
// of a sparse file, errors on bad requests, a clean disconnect; and the
// socket-free parser fed one byte at a time.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeSync, ftruncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NbdClient } from "../src/adapters/nbd/client.js";
import { dirtyRuns } from "../src/adapters/qemu/dirty-tracker.js";
import { Cmd, NbdParser, NbdProtocolError, NbdServerError, STATE_HOLE, STATE_ZERO, OPT_REPLY_MAGIC, NBDMAGIC, IHAVEOPT, STRUCTURED_REPLY_MAGIC } from "../src/adapters/nbd/protocol.js";

const MiB = 1 << 20;
const haveQemuNbd = spawnSync("qemu-nbd", ["--version"]).status === 0;
const skip = haveQemuNbd ? false : "qemu-nbd not installed (apt-get install qemu-utils)";

/** qemu-nbd serving `file` read-only on a unix socket; stopped after the test. */
async function serve(t: { after(fn: () => void | Promise<void>): void }, file: string, dir: string): Promise<{ path: string; proc: ChildProcess }> {
  const path = join(dir, "nbd.sock");
  const proc = spawn("qemu-nbd", ["--read-only", "--persistent", "--format=raw", "--socket", path, file], { stdio: ["ignore", "ignore", "pipe"] });
  t.after(async () => {
    if (proc.exitCode === null) {
      proc.kill("SIGTERM");
      await new Promise((r) => proc.once("exit", r));
    }
  });
  for (let i = 0; i < 200 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 25));
  assert.ok(existsSync(path), "qemu-nbd did not create its socket");
  return { path, proc };
}

/** A 16 MiB file: random data at 0..2 MiB and 8..9 MiB, a hole elsewhere. */
function sparseImage(dir: string): string {
  const file = join(dir, "disk.raw");
  const fd = openSync(file, "w");
  ftruncateSync(fd, 16 * MiB);
  writeSync(fd, randomBytes(2 * MiB), 0, 2 * MiB, 0);
  writeSync(fd, randomBytes(MiB), 0, MiB, 8 * MiB);
  closeSync(fd);
  return file;
}

test("NBD client against qemu-nbd: reads match the file byte for byte, at any offset and across the 4 MiB request size", { skip, timeout: 30_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-nbd-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = sparseImage(dir);
  const want = readFileSync(file);
  const { path } = await serve(t, file, dir);
  const c = await NbdClient.connect({ path }, { metaContexts: ["base:allocation"] });
  assert.equal(c.size, 16 * MiB);
  for (const [off, len] of [[0, 4096], [4096 * 3, 4096 * 5], [1234, 77], [MiB - 100, 300], [0, 16 * MiB], [7 * MiB, 3 * MiB]] as const) {
    const got = await c.read(off, len);
    assert.ok(got.equals(want.subarray(off, off + len)), `read ${off}+${len} differs`);
  }
  // several in flight together come back each to its own request
  const many = await Promise.all([0, 1, 2, 3, 8, 9].map((m) => c.read(m * MiB, MiB)));
  many.forEach((b, i) => assert.ok(b.equals(want.subarray([0, 1, 2, 3, 8, 9][i]! * MiB, ([0, 1, 2, 3, 8, 9][i]! + 1) * MiB))));
  await c.disconnect();
});

test("NBD block status of a sparse file: data where written, holes reading as zeroes elsewhere", { skip, timeout: 30_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-nbd-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = sparseImage(dir);
  const { path } = await serve(t, file, dir);
  const c = await NbdClient.connect({ path }, { metaContexts: ["base:allocation"] });
  const ext = await c.blockStatus("base:allocation", 0, c.size);
  // contiguous, covering the whole export
  let at = 0;
  for (const e of ext) { assert.equal(e.offset, at); at += e.length; }
  assert.equal(at, 16 * MiB);
  const flagsAt = (off: number) => ext.find((e) => off >= e.offset && off < e.offset + e.length)!.flags;
  assert.equal(flagsAt(0) & STATE_HOLE, 0, "written data is allocated");
  assert.equal(flagsAt(8 * MiB + 4096) & STATE_HOLE, 0);
  assert.equal(flagsAt(4 * MiB), STATE_HOLE | STATE_ZERO, "the hole reads as zeroes");
  assert.equal(flagsAt(12 * MiB), STATE_HOLE | STATE_ZERO);
  await c.disconnect();
});

test("NBD errors: a read past the end, a write to a read-only export and an unknown context fail clearly; the connection stays usable", { skip, timeout: 30_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-nbd-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = sparseImage(dir);
  const { path } = await serve(t, file, dir);
  await assert.rejects(NbdClient.connect({ path }, { metaContexts: ["qemu:dirty-bitmap:nope"] }), NbdServerError);
  await assert.rejects(NbdClient.connect({ path }, { exportName: "no-such-export" }), /unknown export|refused/);
  const c = await NbdClient.connect({ path });
  await assert.rejects(c.rawRequest(Cmd.Read, 0, 16 * MiB - 4096, 8192), (e: NbdServerError) => e instanceof NbdServerError && e.errno === 22);
  await assert.rejects(c.rawRequest(Cmd.Write, 0, 0, 0), NbdServerError);
  await assert.rejects(c.blockStatus("base:allocation", 0, 4096), /not negotiated/);
  assert.ok((await c.read(0, 4096)).equals(readFileSync(file).subarray(0, 4096)), "still reads after the errors");
  await c.disconnect();
});

test("NBD clean disconnect: NBD_CMD_DISC waits for reads in flight, then the server closes and serves the next client", { skip, timeout: 30_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-nbd-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = sparseImage(dir);
  const { path, proc } = await serve(t, file, dir);
  const c = await NbdClient.connect({ path });
  const r = c.read(0, 8 * MiB);
  await c.disconnect();
  assert.equal((await r).length, 8 * MiB);
  await assert.rejects(c.read(0, 4096), /disconnected/);
  const again = await NbdClient.connect({ path });
  assert.equal(again.size, 16 * MiB);
  await again.disconnect();
  assert.equal(proc.exitCode, null, "qemu-nbd --persistent is still serving");
});

test("NBD parser: messages split at every byte come out whole; garbage is refused", () => {
  const p = new NbdParser();
  const greet = Buffer.alloc(18);
  greet.writeBigUInt64BE(NBDMAGIC, 0);
  greet.writeBigUInt64BE(IHAVEOPT, 8);
  greet.writeUInt16BE(3, 16);
  const rep = Buffer.alloc(20 + 3);
  rep.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  rep.writeUInt32BE(8, 8);
  rep.writeUInt32BE(1, 12);
  rep.writeUInt32BE(3, 16);
  rep.write("abc", 20);
  const got = [];
  for (const b of Buffer.concat([greet, rep])) got.push(...p.push(Buffer.from([b])));
  assert.deepEqual(got.map((m) => m.kind), ["greeting", "option-reply"]);
  assert.equal((got[1] as { data: Buffer }).data.toString(), "abc");
  p.phase = "transmission";
  const chunk = Buffer.alloc(20 + 12);
  chunk.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  chunk.writeUInt16BE(1, 4);
  chunk.writeUInt16BE(2, 6);
  chunk.writeBigUInt64BE(7n, 8);
  chunk.writeUInt32BE(12, 16);
  const parts = [...p.push(chunk.subarray(0, 5)), ...p.push(chunk.subarray(5))];
  assert.equal(parts.length, 1);
  assert.equal((parts[0] as { handle: bigint }).handle, 7n);
  assert.throws(() => p.push(Buffer.from("HTTP/1.1 200 OK\r\n")), NbdProtocolError);
});

test("dirty extents become runs of whole blocks: partial blocks rounded out, neighbours joined, the end clipped", () => {
  const e = (offset: number, length: number, flags: number) => ({ offset, length, flags });
  assert.deepEqual(dirtyRuns([e(0, 8192, 0), e(8192, 4096, 1), e(12288, 4096, 1), e(16384, 100, 0), e(16484, 5000, 1), e(21484, 1 << 20, 0)], 1000), [[2, 4]]);
  assert.deepEqual(dirtyRuns([e(0, 4096, 1), e(4096, 4096, 0), e(8192, 4096, 1)], 1000), [[0, 1], [2, 1]]);
  assert.deepEqual(dirtyRuns([e(0, 40960, 1)], 4), [[0, 4]], "blocks past the index are left out");
});
