// The fault matrix for agent mode on the embedded VM: every case ends with
// nothing lost (source running and untouched, or destination identical) and
// a message that says what happened.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, readFileSync, truncateSync, writeFileSync } from "node:fs";
import { createHash, randomBytes } from "node:crypto";
import { spawn } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { runEmbeddedMigration, type EmbeddedRunResult } from "../src/demo/embedded-run.js";
import { FrameType, AGENT_FRAMES } from "../src/agent/protocol.js";
import { FrameReader } from "../src/wire/envelope.js";
import { DestinationAgent } from "../src/agent/destination.js";
import { tamperProxy, TEST_KEY, testKeyFile } from "./helpers/stream.js";

const tmp = () => mkdtempSync(join(tmpdir(), "pagetwin-fault-"));
const sha = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");
const quietVm = (dir: string, ramMiB = 16) => ({ dir, ramMiB, twinShare: 0.5, zeroShare: 0.1, dirtyPagesPerSecond: 0, rewriteBlocksPerSecond: 0 });

const proxy = tamperProxy;

function assertNothingLost(r: EmbeddedRunResult, ramBefore: string, pattern: RegExp): void {
  assert.equal(r.status, "failed");
  assert.match(r.error ?? "", pattern);
  assert.equal(r.sourceRunningAfter, true, "the source guest runs on");
  assert.equal(sha(r.ramPath), ramBefore, "source RAM untouched");
  assert.equal(r.verified, false);
}

test("torn during switchover (the destination's Done never arrives): the source is resumed, untouched", { timeout: 90_000 }, async () => {
  const dir = tmp();
  let before = "";
  let p = null as Awaited<ReturnType<typeof proxy>> | null;
  try {
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 0, destination: "inproc", vm: quietVm(dir), link: { insecure: true },
      beforeConnect: async (port, vm) => {
        before = sha(vm.layout.ramPath);
        const down = new FrameReader(AGENT_FRAMES);
        p = await proxy(port, (dir, chunk, cut) => {
          if (dir === "down" && down.push(chunk).some((f) => f.type === FrameType.Done)) { cut(); return null; }
          return chunk;
        });
        return { host: "127.0.0.1", port: p.port };
      },
    });
    assertNothingLost(r, before, /connection to destination agent .* closed/);
    assert.ok(r.iterationLog.some((i) => i.final), "it got as far as the final round");
  } finally {
    p?.sockets.forEach((s) => s.destroy());
    p?.server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("flipped bits on the wire: the destination refuses the frame, the source stops with its reason", { timeout: 90_000 }, async () => {
  const dir = tmp();
  let before = "";
  let p = null as Awaited<ReturnType<typeof proxy>> | null;
  try {
    let seen = 0;
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 50e6, destination: "inproc", vm: quietVm(dir), link: { insecure: true },
      beforeConnect: async (port, vm) => {
        before = sha(vm.layout.ramPath);
        p = await proxy(port, (dir, chunk) => {
          if (dir === "up") {
            seen += chunk.length;
            if (seen > 2e6 && seen - chunk.length <= 2e6) chunk[chunk.length >> 1] ^= 0x10;
          }
          return chunk;
        });
        return { host: "127.0.0.1", port: p.port };
      },
    });
    assertNothingLost(r, before, /aborted the migration: .*fails its CRC-32/);
    assert.equal(r.destination?.status, "failed");
    assert.match(r.destination?.error ?? "", /fails its CRC-32/);
  } finally {
    p?.sockets.forEach((s) => s.destroy());
    p?.server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the destination agent process is killed mid-migration: clear error, source runs on untouched", { timeout: 90_000 }, async () => {
  const dir = tmp();
  let before = "";
  try {
    let pid = 0;
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 20e6, vm: quietVm(dir, 32),
      beforeConnect: async (_port, vm, destinationPid) => {
        before = sha(vm.layout.ramPath);
        pid = destinationPid!;
      },
      // killed once the first round is through, not on a timer: on a loaded machine a timer can fire during the handshake
      onIteration: (it) => { if (it.iteration === 1 && pid) process.kill(pid, "SIGKILL"); },
    });
    assertNothingLost(r, before, /connection to destination agent .* (closed|failed)/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the source agent process is killed: the destination reports it, stays up, and takes the next migration", { timeout: 90_000 }, async () => {
  const dir = tmp();
  const image = join(dir, "disk.img");
  writeFileSync(image, randomBytes(256 * 4096));
  const agent = new DestinationAgent({ ramPath: join(dir, "dst-ram"), createRam: true, imagePath: image, psk: TEST_KEY });
  try {
    const port = await agent.listen();
    const ram = join(dir, "src-ram");
    writeFileSync(ram, randomBytes(8192 * 4096));
    const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
    const args = [cli, "send", "--ram", ram, "--image", image, "--to", `127.0.0.1:${port}`, "--psk-file", testKeyFile(dir), "--bandwidth", "20mbit", "--no-dedup"];
    const child = spawn(process.execPath, args, { stdio: "ignore" });
    const first = agent.nextResult();
    // killed once the migration is under way (the destination created its RAM file), not during start-up
    while (!existsSync(join(dir, "dst-ram"))) await new Promise((r) => setTimeout(r, 20));
    setTimeout(() => child.kill("SIGKILL"), 500);
    const r1 = await first;
    assert.equal(r1.status, "failed");
    assert.match(r1.error ?? "", /connection to source agent .* closed/);
    // the next migration goes through
    const ok = spawn(process.execPath, [...args.slice(0, -3), "--bandwidth", "0", "--no-dedup"], { stdio: "ignore" });
    const r2 = await agent.nextResult();
    await new Promise((res) => ok.once("exit", res));
    assert.equal(r2.status, "completed", r2.error);
    assert.deepEqual(readFileSync(join(dir, "dst-ram")), readFileSync(ram));
  } finally {
    agent.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the NAS image is truncated after indexing: unreadable twins are resent, RAM identical", { timeout: 90_000 }, async () => {
  const dir = tmp();
  try {
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 0, destination: "inproc", vm: { ...quietVm(dir), twinShare: 0.7 },
      beforeConnect: async (_port, vm) => { truncateSync(vm.layout.imagePath, (vm.layout.imageBlocks / 2) * 4096); },
    });
    assert.equal(r.status, "completed", r.error);
    assert.ok(r.pages.resent > 0.25 * 16 * 256 * 0.7, `${r.pages.resent} pages resent`);
    assert.equal(r.verified, true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the NAS image is gone when the migration starts: refused with a clear error, source untouched", { timeout: 90_000 }, async () => {
  const dir = tmp();
  let before = "";
  try {
    const r = await runEmbeddedMigration({
      mode: "pagetwin", bandwidth: 0, destination: "inproc", vm: quietVm(dir),
      beforeConnect: async (_port, vm) => { before = sha(vm.layout.ramPath); rmSync(vm.layout.imagePath); },
    });
    assertNothingLost(r, before, /cannot open the disk image .*ENOENT/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a guest dirtying memory faster than the link: non-convergence is reported; abort or switch over as configured", { timeout: 90_000 }, async () => {
  for (const onCap of ["abort", "switchover"] as const) {
    const dir = tmp();
    try {
      const r = await runEmbeddedMigration({
        mode: "pagetwin", bandwidth: 8e6, destination: "inproc", convergence: { maxIterations: 3, downtimeMs: 50, onCap },
        vm: { dir, ramMiB: 8, twinShare: 0.2, zeroShare: 0.1, dirtyPagesPerSecond: 4000, rewriteBlocksPerSecond: 0 },
      });
      assert.equal(r.convergence, "max-iterations");
      if (onCap === "abort") {
        assert.equal(r.status, "failed");
        assert.match(r.error!, /did not converge .* the source VM keeps running/);
        assert.equal(r.sourceRunningAfter, true);
      } else {
        assert.equal(r.status, "completed", r.error);
        assert.equal(r.verified, true);
        assert.ok(r.downtimeMs > 0);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
});
