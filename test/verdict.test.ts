// The destination agent's verdict at switchover, the one thing that lets the
// destination VM run: it answers Done ok:true only when the digest of what it
// wrote into its RAM file equals the source's. A wrong digest from the source,
// a RAM page changed behind the agent's back (--verify reread), a twin written
// wrongly (held mode: the hashes are of what was written): each ends in
// ok:false, the source VM resumed, the destination's onVerified never run.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, openSync, rmSync, writeFileSync, writeSync, closeSync } from "node:fs";
import { randomBytes } from "node:crypto";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { RamFile } from "../src/adapters/ram/ram-file.js";
import { DestinationAgent, type DestinationOptions } from "../src/agent/destination.js";
import { migrateSource, MigrationError, type MigrationResult, type SourceOptions } from "../src/agent/source.js";
import { AGENT_FRAMES, FrameType } from "../src/agent/protocol.js";
import { frame, jsonFrame } from "../src/wire/envelope.js";
import { availableAlgorithms } from "../src/codec/compress.js";
import { compareFiles } from "../src/adapters/ram/ram-diff.js";
import { vmStub, type VmStub } from "./helpers/vm-stub.js";
import { frameTamper, tamperProxy, TEST_KEY, type FrameTamper } from "./helpers/stream.js";

const PAGE = 4096;
/** Source RAM: pages 0..TWINS-1 are blocks 0..TWINS-1 of the image (one run), then random pages, then zero pages. */
const TWINS = 256, RANDOM = 128, ZEROS = 128, PAGES = TWINS + RANDOM + ZEROS;

const work = mkdtempSync(join(tmpdir(), "pagetwin-verdict-"));
after(() => rmSync(work, { recursive: true, force: true }));

interface Run {
  r: MigrationResult;
  agent: DestinationAgent;
  vm: VmStub;
  srcRam: string;
  dstRam: string;
  /** Times the destination's onVerified ran (what resumes the destination VM). */
  verifiedCalls: number;
}

interface RunOptions {
  dst?: Partial<DestinationOptions>;
  src?: Partial<SourceOptions>;
  /** Called when the source pauses its VM for the final round, with the destination's RAM file path. */
  onPause?: (dstRam: string) => void;
  /** A man in the middle on the agents' link (then in the clear: --insecure at both ends). */
  via?: FrameTamper;
  /** The last ZEROS pages start random and become zero after the first round (so that Zeros frames carry them). */
  zeroLater?: boolean;
  /** Image blocks rewritten after indexing (their twins no longer verify). */
  rewrite?: number[];
  /** How many zero pages end the RAM (default ZEROS; over 4096, the destination reads and hashes in several batches). */
  zeros?: number;
  /** With zeroLater: the tail's first-round bytes are this byte repeated (cheap to send compressed), not random. */
  fill?: number;
}

/** An indexed image of TWINS random blocks and a source RAM file of twins, random and zero pages; one migration of it. */
async function migrate(o: RunOptions = {}): Promise<Run> {
  const dir = mkdtempSync(join(work, "run-"));
  const zeros = o.zeros ?? ZEROS;
  const image = join(dir, "disk.img"), srcRam = join(dir, "src-ram"), dstRam = join(dir, "dst-ram");
  const img = randomBytes(TWINS * PAGE);
  writeFileSync(image, img);
  writeFileSync(srcRam, Buffer.concat([img, randomBytes(RANDOM * PAGE), o.zeroLater ? (o.fill ? Buffer.alloc(zeros * PAGE, o.fill) : randomBytes(zeros * PAGE)) : Buffer.alloc(zeros * PAGE)]));
  const zeroLater = () => {
    const fd = openSync(srcRam, "r+");
    writeSync(fd, Buffer.alloc(zeros * PAGE), 0, zeros * PAGE, (TWINS + RANDOM) * PAGE);
    closeSync(fd);
  };
  const nas = await openNasIndex(image, { rebuild: true });
  if (o.rewrite?.length) {
    const fd = openSync(image, "r+");
    for (const b of o.rewrite) writeSync(fd, randomBytes(PAGE), 0, PAGE, b * PAGE);
    closeSync(fd);
  }
  const link = o.via ? { insecure: true } : { psk: TEST_KEY };
  let verifiedCalls = 0;
  const agent = new DestinationAgent({ ramPath: dstRam, createRam: true, imagePath: image, onVerified: async () => { verifiedCalls++; }, ...link, ...o.dst });
  const port = await agent.listen();
  const relay = o.via ? await tamperProxy(port, frameTamper(o.via, AGENT_FRAMES)) : null;
  const vm = vmStub(() => o.onPause?.(dstRam));
  const ram = RamFile.open(srcRam);
  try {
    const r = await migrateSource({
      engine: nas.engine, index: nas.index, indexId: nas.header.indexId, ram, vm,
      host: "127.0.0.1", port: relay?.port ?? port, bandwidth: 0, compress: "off", ...link,
      onIteration: (it) => { if (o.zeroLater && it.iteration === 1) zeroLater(); }, ...o.src,
    }).catch((e) => { if (e instanceof MigrationError) return e.result; throw e; });
    for (const t = Date.now(); agent.results.length === 0 && Date.now() - t < 3000;) await new Promise((res) => setTimeout(res, 20));
    return { r, agent, vm, srcRam, dstRam, verifiedCalls };
  } finally {
    ram.close();
    nas.image.close();
    relay?.close();
    agent.close();
  }
}

/** The destination said no: the source VM runs again, the destination never vouched nor resumed its VM. */
function assertRefusedAtSwitchover(x: Run, why: RegExp): void {
  assert.equal(x.r.status, "failed", "the source agent reports a failed migration");
  assert.equal(x.r.verified, false);
  assert.match(x.r.error ?? "", why);
  assert.equal(x.vm.pauses, 1, "the source VM was paused for the final round");
  assert.equal(x.vm.resumes, 1, "and resumed after the destination's ok:false");
  assert.equal(x.vm.running, true);
  assert.equal(x.verifiedCalls, 0, "the destination's onVerified (its `cont`) never ran");
  assert.equal(x.agent.results.length, 1);
  const d = x.agent.results[0]!;
  assert.equal(d.status, "failed");
  assert.equal(d.verified, false);
  assert.match(d.error ?? "", /RAM digest [0-9a-f]+ differs from the source's/);
}

test("baseline: held and reread both complete with twins, random and zero pages; RAM identical", async () => {
  for (const verify of ["held", "reread"] as const) {
    const x = await migrate({ dst: { verify } });
    assert.equal(x.r.status, "completed", `${verify}: ${x.r.error}`);
    assert.equal(x.r.verified, true, verify);
    assert.equal(x.verifiedCalls, 1, verify);
    const d = x.agent.results[0]!;
    assert.equal(d.status, "completed", verify);
    assert.equal(d.verified, true, verify);
    assert.equal(d.digest, x.r.digest, `${verify}: the destination's digest is the source's`);
    assert.equal(d.twinsVerified, TWINS, `${verify}: every twin came from the image`);
    assert.equal(d.twinsRejected, 0, verify);
    assert.equal(compareFiles(x.srcRam, x.dstRam), PAGES * PAGE, verify);
  }
});

test("twins whose blocks were rewritten after indexing: exactly those rejected and resent, each once; the verdict holds", async () => {
  const rewrite = [0, 1, 2, 100, TWINS - 1];
  const x = await migrate({ rewrite });
  assert.equal(x.r.status, "completed", x.r.error);
  assert.equal(x.r.pages.resent, rewrite.length);
  const d = x.agent.results[0]!;
  assert.equal(d.twinsRejected, rewrite.length);
  assert.equal(d.twinsVerified, TWINS - rewrite.length);
  assert.equal(x.verifiedCalls, 1);
  assert.equal(compareFiles(x.srcRam, x.dstRam), PAGES * PAGE);
});

test("a source announcing a wrong RAM digest at switchover: Done ok:false, the source VM resumed, the destination never resumed", async () => {
  for (const verify of ["held", "reread"] as const) {
    let changed = false;
    // the Switchover frame rewritten on the way (a link in the clear lets a relay do it): one hex digit of the digest
    const x = await migrate({
      dst: { verify },
      via: (type, sealed, payload) => {
        if ((type as number) !== FrameType.Switchover) return sealed;
        const { digest } = JSON.parse(payload.toString("utf8")) as { digest: string };
        changed = true;
        return jsonFrame(FrameType.Switchover, { digest: (digest[0] === "0" ? "1" : "0") + digest.slice(1) });
      },
    });
    assert.ok(changed, `${verify}: the relay saw the Switchover frame`);
    assertRefusedAtSwitchover(x, /RAM digest|differs/);
    // what the destination wrote is right; only the source's claim was wrong
    assert.equal(compareFiles(x.srcRam, x.dstRam), PAGES * PAGE, verify);
  }
});

test("--verify reread: a destination RAM page changed behind the agent's back before switchover is caught (ok:false, source resumed)", async () => {
  const scribble = (dstRam: string) => {
    const fd = openSync(dstRam, "r+");
    writeSync(fd, randomBytes(64), 0, 64, (TWINS + 3) * PAGE + 100);
    closeSync(fd);
  };
  const x = await migrate({ dst: { verify: "reread" }, onPause: scribble });
  assertRefusedAtSwitchover(x, /differs/);
});

test("held: a twin written wrongly (the RAM file's writer puts the run's first page where its last belongs) cannot pass the verdict", async () => {
  const orig = Object.getOwnPropertyDescriptor(RamFile.prototype, "writePages")!;
  let miswritten = 0;
  // a test seam without production code: the destination's writes of twin runs (pages < TWINS, more than one page) go wrong
  RamFile.prototype.writePages = function (this: RamFile, first: number, data: Uint8Array) {
    if (first < TWINS && data.length > PAGE) {
      const d = Buffer.from(data);
      d.copyWithin(d.length - PAGE, 0, PAGE);
      miswritten++;
      return (orig.value as RamFile["writePages"]).call(this, first, d);
    }
    return (orig.value as RamFile["writePages"]).call(this, first, data);
  };
  let x: Run;
  try {
    x = await migrate({ dst: { verify: "held" } });
  } finally {
    Object.defineProperty(RamFile.prototype, "writePages", orig);
  }
  assert.ok(miswritten > 0, "the faulty writer wrote a twin run");
  assert.throws(() => compareFiles(x.srcRam, x.dstRam), /differ at byte/, "the destination's RAM really is wrong");
  assertRefusedAtSwitchover(x, /differs/);
  assert.ok(x.agent.results[0]!.twinsVerified > 0, "the twins' blocks verified: only the write went wrong");
});

test("the verdict covers pages sent in full and zero pages too: a wrong write of either is caught in held mode", async () => {
  const orig = Object.getOwnPropertyDescriptor(RamFile.prototype, "writePages")!;
  const write = orig.value as RamFile["writePages"];
  for (const target of ["random", "zero"] as const) {
    let miswritten = 0;
    // the destination writes spans of pages: the write that holds page TWINS (the first random one), or a run of zeros
    RamFile.prototype.writePages = function (this: RamFile, first: number, data: Uint8Array) {
      const at = target === "random" ? (TWINS - first) * PAGE : 0;
      const hit = target === "random" ? at >= 0 && at < data.length : data.every((b) => b === 0);
      if (hit && miswritten === 0) {
        miswritten++;
        const d = Buffer.from(data);
        d[at + 7] = d[at + 7]! ^ 0x01;
        return write.call(this, first, d);
      }
      return write.call(this, first, data);
    };
    let x: Run;
    try {
      x = await migrate({ dst: { verify: "held" }, zeroLater: true });
    } finally {
      Object.defineProperty(RamFile.prototype, "writePages", orig);
    }
    assert.equal(miswritten, 1, target);
    assertRefusedAtSwitchover(x, /differs/);
  }
});

test("NAS references sent to a destination that has no image (its Hello rewritten to say no index): refused with the reason, nothing verified", async () => {
  let rewritten = false;
  const x = await migrate({
    via: (type, sealed, payload) => {
      if ((type as number) !== FrameType.Hello) return sealed;
      rewritten = true;
      return jsonFrame(FrameType.Hello, { ...JSON.parse(payload.toString("utf8")) as object, dedup: false, indexId: null });
    },
  });
  assert.ok(rewritten, "the relay saw the Hello");
  assert.equal(x.r.status, "failed");
  assert.equal(x.verifiedCalls, 0);
  const d = x.agent.results[0]!;
  assert.equal(d.status, "failed");
  assert.match(d.error ?? "", /^the source sent NAS references, but this destination has no image \(start it with --image\)$/);
  assert.equal(d.twinsVerified, 0);
});

test("the device state crosses the link only after the verdict, and reaches the destination QEMU's socket whole", async () => {
  const state = randomBytes(200_000);
  const got: Buffer[] = [];
  let verified = 0, verifiedBeforeDevice = false;
  // the destination QEMU's incoming socket: reads until the end, then closes (QEMU has the device state)
  const dstQemu = net.createServer((s) => {
    verifiedBeforeDevice = verified === 1;
    s.on("data", (d: Buffer) => got.push(d));
  });
  await new Promise<void>((r) => dstQemu.listen(0, "127.0.0.1", r));
  // the source QEMU's device-state connection, handed to the tunnel
  const srcQemu = net.createServer();
  await new Promise<void>((r) => srcQemu.listen(0, "127.0.0.1", r));
  try {
    const x = await migrate({
      dst: { deviceIncoming: `tcp:127.0.0.1:${(dstQemu.address() as net.AddressInfo).port}`, onVerified: async () => { verified++; } },
      src: {
        deviceTunnel: true,
        handover: async (device) => {
          assert.ok(device, "the source got a device tunnel");
          const accepted = new Promise<net.Socket>((r) => srcQemu.once("connection", r));
          net.connect((srcQemu.address() as net.AddressInfo).port, "127.0.0.1").end(state);
          await device.carry(await accepted);
        },
      },
    });
    assert.equal(x.r.status, "completed", x.r.error);
    const d = x.agent.results[0]!;
    assert.equal(d.status, "completed", d.error);
    assert.ok(verifiedBeforeDevice, "the destination QEMU was reached after onVerified");
    assert.equal(d.deviceBytes, state.length);
    assert.deepEqual(Buffer.concat(got), state);
  } finally {
    dstQemu.close();
    srcQemu.close();
  }
});

test("RAM over 4096 pages (the destination reads and hashes it in batches): held and reread complete; reread catches a page changed past the first batch", async () => {
  const zeros = 4096 + 64, last = TWINS + RANDOM + zeros - 1;
  // held: the tail goes (compressed) in round 1, then as one Zeros frame of more than 4096 pages (a window of 8192)
  const src = { windowPages: 8192, compress: availableAlgorithms()[0]! };
  const held = await migrate({ dst: { verify: "held" }, src, zeros, zeroLater: true, fill: 0x5a });
  assert.equal(held.r.status, "completed", held.r.error);
  assert.equal(held.agent.results[0]!.zeroPages, zeros);
  assert.equal(compareFiles(held.srcRam, held.dstRam), (last + 1) * PAGE);
  // and without an onVerified (a destination that only receives RAM)
  const reread = await migrate({ dst: { verify: "reread", onVerified: undefined }, zeros });
  assert.equal(reread.r.status, "completed", reread.r.error);
  assert.equal(reread.agent.results[0]!.status, "completed", reread.agent.results[0]!.error);
  const scribble = (dstRam: string) => {
    const fd = openSync(dstRam, "r+");
    writeSync(fd, randomBytes(64), 0, 64, (last - 1) * PAGE + 100);
    closeSync(fd);
  };
  assertRefusedAtSwitchover(await migrate({ dst: { verify: "reread" }, zeros, onPause: scribble }), /differs/);
});

test("held does not read the RAM file again at switchover (the guest's downtime does not pay for it); reread reads all of it", async () => {
  const orig = Object.getOwnPropertyDescriptor(RamFile.prototype, "readPages")!;
  const read = orig.value as RamFile["readPages"];
  let paused = false, readWhilePaused = 0;
  RamFile.prototype.readPages = function (this: RamFile, first: number, count: number, into: Uint8Array) {
    if (paused) readWhilePaused += count;
    return read.call(this, first, count, into);
  };
  const pagesRead: Record<string, number> = {};
  try {
    for (const verify of ["held", "reread"] as const) {
      paused = false;
      readWhilePaused = 0;
      // the source reads its own RAM file in the final round too: only the destination's reads are over PAGES
      const x = await migrate({ dst: { verify }, onPause: () => { paused = true; } });
      assert.equal(x.r.status, "completed", `${verify}: ${x.r.error}`);
      pagesRead[verify] = readWhilePaused;
    }
  } finally {
    Object.defineProperty(RamFile.prototype, "readPages", orig);
  }
  assert.ok(pagesRead.reread! >= 2 * PAGES, JSON.stringify(pagesRead));
  assert.ok(pagesRead.held! < 2 * PAGES, JSON.stringify(pagesRead));
});

test("an IterEnd or a Switchover frame that is not JSON: refused, the frame named in the reason, nothing verified", async () => {
  for (const [type, name] of [[FrameType.IterEnd, "IterEnd"], [FrameType.Switchover, "Switchover"]] as const) {
    let rewritten = false;
    const x = await migrate({
      via: (t, sealed) => {
        if ((t as number) !== type || rewritten) return sealed;
        rewritten = true;
        return frame(type, Buffer.from("not json"));
      },
    });
    assert.ok(rewritten, `the relay saw the ${name} frame`);
    assert.equal(x.r.status, "failed");
    assert.equal(x.verifiedCalls, 0);
    const d = x.agent.results[0]!;
    assert.equal(d.status, "failed");
    assert.equal(d.verified, false);
    assert.match(d.error ?? "", new RegExp(`^${name} frame does not hold a JSON object: `));
  }
});
