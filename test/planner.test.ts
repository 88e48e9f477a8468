import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { createEngine, PAGE_SIZE } from "../src/index.js";
import { Planner, planIteration } from "../src/plan/planner.js";
import { ConvergencePolicy } from "../src/plan/convergence.js";

test("each iteration's send / map / zero lists equal a naive model of dirty, zero and twin pages", async () => {
  const engine = await createEngine({ seed: 5n });
  const pages = 1000, blocks = 600;
  const disk = new Uint8Array(randomBytes(blocks * PAGE_SIZE));
  disk.fill(0, 0, PAGE_SIZE); // a zero block is never a twin
  const index = engine.createIndex(blocks);
  index.setBlocks(engine.hashPages(disk), 0);
  const ram = new Uint8Array(pages * PAGE_SIZE);
  const planner = new Planner(engine, { pages, windowPages: 256, index });
  const block = (b: number) => disk.subarray(b * PAGE_SIZE, (b + 1) * PAGE_SIZE);
  const held = ram.slice(); // what the destination holds (starts zero)
  for (let it = 1; it <= 4; it++) {
    // mutate RAM: some twins, some random, some zero
    for (let k = 0; k < 300; k++) {
      const p = randomInt(pages), r = randomInt(3);
      const dst = ram.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      if (r === 0) dst.set(block(1 + randomInt(blocks - 1)));
      else if (r === 1) dst.set(randomBytes(PAGE_SIZE));
      else dst.fill(0);
    }
    const plan = planIteration(planner, it, (first, count, into) => into.set(ram.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE)));
    const want = { send: [] as number[], map: [] as number[], zero: [] as number[] };
    for (let p = 0; p < pages; p++) {
      const cur = ram.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      if (Buffer.compare(cur, held.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)) === 0) continue;
      if (cur.every((x) => x === 0)) want.zero.push(p);
      else {
        let twin = -1;
        for (let b = 1; b < blocks && twin < 0; b++) if (Buffer.compare(cur, block(b)) === 0) twin = b;
        if (twin >= 0) {
          want.map.push(p);
          assert.equal(plan.twinBlocks[plan.twinPages.indexOf(p)], twin, `page ${p} maps to its block`);
        } else want.send.push(p);
      }
      held.set(cur, p * PAGE_SIZE);
    }
    assert.deepEqual(Array.from(plan.send), want.send, `iteration ${it} send`);
    assert.deepEqual(Array.from(plan.twinPages), want.map, `iteration ${it} map`);
    assert.deepEqual(Array.from(plan.zeroPages), want.zero, `iteration ${it} zero`);
    // the windows' plans joined: counts and the blocks in the order of their pages
    assert.deepEqual([plan.iteration, plan.dirty, plan.normal, plan.twin, plan.zero, plan.resent], [it, want.send.length + want.map.length + want.zero.length, want.send.length, want.map.length, want.zero.length, 0]);
    assert.equal(plan.twinBlocks.length, plan.twinPages.length);
  }
  // an unchanged RAM plans nothing
  const idle = planIteration(planner, 5, (first, count, into) => into.set(ram.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE)));
  assert.equal(idle.dirty, 0);
});

test("convergence: QEMU's rule with Xen's caps", () => {
  const p = new ConvergencePolicy({ downtimeMs: 300, maxIterations: 5, maxSentFactor: 3 });
  const m = { iteration: 2, wireBytes: 10e6, scanMs: 20, bytesPerSecond: 125e6, totalBytes: 1e8, ramBytes: 1e9 };
  assert.deepEqual(p.decide(m).action, "switchover"); // 80 ms + 20 ms <= 300 ms
  assert.deepEqual(p.decide({ ...m, wireBytes: 100e6 }).action, "continue"); // 800 ms
  assert.deepEqual(p.decide({ ...m, wireBytes: 100e6, iteration: 5 }), { action: "switchover", reason: "max-iterations", expectedDowntimeMs: 820 });
  assert.equal(p.decide({ ...m, wireBytes: 100e6, totalBytes: 3e9 }).action, "switchover");
  const strict = new ConvergencePolicy({ maxIterations: 3, onCap: "abort" });
  assert.equal(strict.decide({ ...m, wireBytes: 1e9, iteration: 3 }).action, "abort");
  // no progress: the expected downtime stays put (a scan of RAM alone over the target)
  const stuck = new ConvergencePolicy({ downtimeMs: 100 });
  const slow = { ...m, wireBytes: 1e6, scanMs: 400 };
  const reasons = [1, 2, 3, 4].map((iteration) => stuck.decide({ ...slow, iteration }));
  assert.deepEqual(reasons.map((d) => d.action), ["continue", "continue", "continue", "switchover"]);
  assert.equal((reasons[3] as { reason: string }).reason, "no-progress");
  // progress resets it
  const shrinking = new ConvergencePolicy({ downtimeMs: 10 });
  for (let it = 1; it <= 8; it++) assert.equal(shrinking.decide({ ...slow, scanMs: 0, wireBytes: 1e9 / 2 ** it, iteration: it }).action, "continue");
});

test("convergence: a sampled estimate of the next round lets the first round switch over, only when it fits", () => {
  const p = new ConvergencePolicy({ downtimeMs: 300 });
  // the first round sent all of RAM: on its own bytes it never switches over
  const first = { iteration: 1, wireBytes: 500e6, scanMs: 120, bytesPerSecond: 125e6, totalBytes: 500e6, ramBytes: 512e6 };
  assert.equal(p.decide(first).action, "continue");
  // not even a first round small and fast enough to fit the target (1 ms scan, 1 MB at 1 GB/s = 2 ms):
  // its bytes are all of RAM and say nothing about what the guest dirties meanwhile
  const fits = { iteration: 1, wireBytes: 1e6, scanMs: 1, bytesPerSecond: 1e9, totalBytes: 1e6, ramBytes: 1e6 };
  assert.equal(new ConvergencePolicy({ downtimeMs: 300 }).decide(fits).action, "continue");
  // the same bytes measured in round 2 do switch over (the rule itself is not what keeps round 1 going)
  assert.equal(new ConvergencePolicy({ downtimeMs: 300 }).decide({ ...fits, iteration: 2 }).action, "switchover");
  // a sample says 3 MB are dirty: 120 + 24 ms
  assert.deepEqual(p.decide({ ...first, nextRoundBytes: 3e6 }), { action: "switchover", reason: "converged", expectedDowntimeMs: 144 });
  // a sample says 40 MB are dirty: 120 + 320 ms, over the target
  assert.equal(p.decide({ ...first, nextRoundBytes: 40e6 }).action, "continue");
});

test("convergence: options checked, the target inclusive, no bandwidth means never, progress measured against 90% of the best", () => {
  for (const bad of [{ downtimeMs: 0 }, { maxIterations: 0 }, { maxSentFactor: 0 }]) {
    assert.throws(() => new ConvergencePolicy(bad), (e: unknown) => e instanceof RangeError && /downtime, iteration cap and traffic cap must be positive/.test(e.message), JSON.stringify(bad));
  }
  assert.equal(new ConvergencePolicy({ maxIterations: 1 }).maxIterations, 1);
  // by default a cap switches over
  const capped = new ConvergencePolicy({ maxIterations: 2 });
  const big = { iteration: 2, wireBytes: 1e9, scanMs: 0, bytesPerSecond: 1e6, totalBytes: 1e9, ramBytes: 1e9 };
  assert.deepEqual(capped.decide(big), { action: "switchover", reason: "max-iterations", expectedDowntimeMs: 1e6 });
  // exactly the target: converged (100 ms of scan + 200 ms of bytes = 300 ms)
  const exact = new ConvergencePolicy({ downtimeMs: 300 });
  assert.equal(exact.decide({ ...big, iteration: 2, wireBytes: 2e5, scanMs: 100, totalBytes: 2e5 }).action, "switchover");
  // no bandwidth measured: the downtime is unknown, whatever the bytes
  assert.equal(exact.expectedDowntimeMs({ ...big, wireBytes: 0, bytesPerSecond: 0 }), Infinity);
  // rounds that only reach 90% of the best do not count as progress: the third such ends pre-copy
  const p = new ConvergencePolicy({ downtimeMs: 10 });
  const round = (iteration: number, scanMs: number) => p.decide({ iteration, wireBytes: 0, scanMs, bytesPerSecond: 1e9, totalBytes: 0, ramBytes: 1e9 });
  assert.equal(round(1, 1000).action, "continue");
  assert.deepEqual([2, 3].map((it) => round(it, 900).action), ["continue", "continue"]);
  assert.deepEqual(round(4, 900), { action: "switchover", reason: "no-progress", expectedDowntimeMs: 900 });
});

test("countDirty counts the pages changed since they were planned, and changes nothing", async () => {
  const engine = await createEngine({ seed: 9n });
  const pages = 512;
  const ram = new Uint8Array(randomBytes(pages * PAGE_SIZE));
  const planner = new Planner(engine, { pages, windowPages: 128 });
  const read = (first: number, count: number, into: Uint8Array) => into.set(ram.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE));
  planIteration(planner, 1, read);
  const changed = new Set<number>();
  while (changed.size < 37) changed.add(randomInt(pages));
  for (const p of changed) { const i = p * PAGE_SIZE + randomInt(PAGE_SIZE); ram[i] = ram[i]! ^ 0xff; }
  let counted = 0;
  for (let first = 0; first < pages; first += 64) {
    read(first, 64, planner.window.view(0, 64 * PAGE_SIZE));
    const n = planner.countDirty(first, 64);
    assert.equal(n, [...changed].filter((p) => p >= first && p < first + 64).length, `pages ${first}..${first + 63}`);
    counted += n;
  }
  assert.equal(counted, changed.size);
  // nothing was recorded: the next round still sends every changed page
  const plan = planIteration(planner, 2, read);
  assert.deepEqual(Array.from(plan.send), [...changed].sort((a, b) => a - b));
});

test("planWindowHashed plans a window hashed elsewhere exactly as planWindow does; windows and lengths are checked; windowHash, recordSent, zeroHeld", async () => {
  const engine = await createEngine({ seed: 11n });
  const pages = 197, W = 64; // the last window holds 5 pages: a zero-bit byte only partly used
  const disk = new Uint8Array(randomBytes(64 * PAGE_SIZE));
  const index = engine.createIndex(64);
  index.setBlocks(engine.hashPages(disk), 0);
  const ram = new Uint8Array(pages * PAGE_SIZE);
  const page = (p: number) => ram.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
  for (let p = 0; p < pages; p++) {
    if (p % 3 === 0) page(p).set(disk.subarray((p % 64) * PAGE_SIZE, (p % 64 + 1) * PAGE_SIZE)); // a twin of block p % 64
    else if (p % 3 === 1) page(p).set(randomBytes(PAGE_SIZE)); // sent in full
  } // p % 3 === 2: zero, held by the destination already
  const direct = new Planner(engine, { pages, windowPages: W, index });
  const hashed = new Planner(engine, { pages, windowPages: W, index });
  const zeroBitsOf = (first: number, count: number) => {
    // exactly as long as needed; the last window's padded to a 64-bit word as a pool's (the padding not read)
    const bits = new Uint8Array(count === W ? W / 8 : 8).fill(0xff, Math.ceil(count / 8));
    for (let i = 0; i < count; i++) if (page(first + i).every((x) => x === 0)) bits[i >> 3]! |= 1 << (i & 7);
    return bits;
  };
  for (let round = 1; round <= 2; round++) {
    for (let first = 0; first < pages; first += W) {
      const count = direct.windowCount(first);
      direct.window.view(0, count * PAGE_SIZE).set(ram.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE));
      const a = direct.planWindow(first, count);
      const b = hashed.planWindowHashed(first, count, engine.hashPages(ram.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE)), zeroBitsOf(first, count));
      assert.deepEqual(b, a, `round ${round}, window ${first}`);
      const inWindow = (p: number) => p >= first && p < first + count;
      const all = [...Array(pages).keys()].filter(inWindow);
      if (round === 1) {
        assert.deepEqual(Array.from(a.twinPages), all.filter((p) => p % 3 === 0), `window ${first}: twins`);
        assert.deepEqual(Array.from(a.twinBlocks), all.filter((p) => p % 3 === 0).map((p) => p % 64), `window ${first}: their blocks`);
        assert.deepEqual(Array.from(a.send), all.filter((p) => p % 3 === 1), `window ${first}: sent in full`);
        assert.equal(a.dirty, a.twinPages.length + a.send.length);
        assert.equal(a.zeroHeld, all.filter((p) => p % 3 === 2).length, `window ${first}: zero pages held already`);
        assert.equal(a.zero.length, 0);
        // the hash of a page of this window, as planned
        const p = first + count - 1;
        assert.deepEqual(direct.windowHash(first, p), engine.hashPages(page(p)));
      } else {
        // round 2: the pages sent in round 1 turned zero, one of them recorded as re-sent (held) already
        assert.deepEqual(Array.from(a.zero), all.filter((p) => p % 3 === 1 && p !== 1), `window ${first}: zero`);
        assert.equal(a.zeroHeld, all.filter((p) => p % 3 === 2 || p === 1).length);
        assert.equal(a.send.length + a.twinPages.length, 0);
      }
    }
    if (round === 1) {
      for (let p = 1; p < pages; p += 3) page(p).fill(0);
      for (const pl of [direct, hashed]) pl.recordSent(1, engine.zeroPageHash());
    }
  }
  // only whole windows inside the VM, and hashes / zero bits that fit the window
  const h = engine.hashPages(ram.subarray(0, W * PAGE_SIZE));
  for (const [first, count] of [[1, 63], [0, 0], [0, W + 64], [192, 6], [128, 70]] as const) {
    assert.throws(() => hashed.planWindowHashed(first, count, h.subarray(0, count * 16), new Uint8Array(16)), /bad window/, `${first}+${count}`);
  }
  assert.throws(() => hashed.planWindowHashed(0, W, h.subarray(16), new Uint8Array(8)), (e: unknown) => e instanceof RangeError && /1008 bytes of hashes \/ 8 of zero bits for a window of 64 pages/.test(e.message));
  assert.throws(() => hashed.planWindowHashed(0, W, h, new Uint8Array(7)), /of zero bits for a window of 64 pages/);
  assert.throws(() => direct.countDirty(0, W + 64), /bad window 0\+128 for a VM of 197 pages/);
  direct.free();
  hashed.free();
});
