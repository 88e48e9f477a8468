import { test } from "node:test";
import assert from "node:assert/strict";
import { classify, formatSoak } from "../bench/guest-soak.js";
import { counterRestarted, kernelFailure } from "../src/compare/guest.js";
import type { RunResult } from "../src/compare/stream.js";

const OOPS = [
  "pagetwin-counter 41",
  "[   52.101] BUG: kernel NULL pointer dereference, address: 0000000000000000",
  "[   52.102] RIP: 0010:0x0",
  "[   52.103] Kernel panic - not syncing: Attempted to kill the idle task!",
].join("\n");

function run(ok: boolean, last: number, first: number): RunResult {
  return {
    mode: "relay", ok, totalTimeMs: 1, downtimeMs: 1, ramTransferred: 1, normalPages: 1, endToEndMs: 1, observedDowntimeMs: 1,
    linkBytes: 1, linkBytesReturn: 0, lastSourceCounter: last, firstDestCounter: first, cpuMs: {}, ...(ok ? {} : { error: "failed" }),
  };
}

test("kernelFailure: the oops text from a little before its first line; none in a clean log", () => {
  const ex = kernelFailure(`pagetwin-ready\n${OOPS}\n`);
  assert.ok(ex?.startsWith("pagetwin-counter 41") || ex?.includes("BUG: kernel NULL"), ex);
  assert.match(ex!, /Attempted to kill the idle task/);
  assert.equal(kernelFailure("pagetwin-counter 1\npagetwin-counter 2\n"), undefined);
});

test("counterRestarted: only when a counter goes backwards", () => {
  assert.equal(counterRestarted("pagetwin-counter 7\npagetwin-counter 8\n"), false);
  assert.equal(counterRestarted("pagetwin-counter 7\npagetwin-counter 0\npagetwin-counter 1\n"), true);
});

test("classify: ok, panic by serial, by event, by restart; other", () => {
  const clean = "pagetwin-counter 41\npagetwin-counter 42\npagetwin-counter 46\n";
  assert.equal(classify(run(true, 40, 41), { serial: clean, events: ["RESUME"] }).outcome, "ok");
  const p = classify(run(true, 40, 41), { serial: OOPS, events: ["RESUME"] });
  assert.equal(p.outcome, "panic");
  assert.match(p.excerpt!, /Kernel panic/);
  assert.equal(classify(run(false, 40, -1), { serial: "", events: ["RESUME", "SHUTDOWN {\"reason\":\"guest-reset\"}"] }).outcome, "panic");
  assert.equal(classify(run(false, 40, 0), { serial: "pagetwin-counter 0\n", events: [] }).outcome, "panic");
  assert.equal(classify(run(true, 40, 41), { serial: clean, events: [], watchError: "counter did not reach 46" }).outcome, "other");
  assert.equal(classify(run(false, 40, -1), { serial: "", events: [] }).outcome, "other");
  const hung = classify(run(false, 40, -1), { serial: "", events: ["RESUME"], watchError: "no counter: hung", diagnosis: "no counter: hung\nRIP=ffffffff81000000" });
  assert.equal(hung.outcome, "other");
  assert.match(hung.excerpt!, /RIP=/);
});

test("formatSoak: one row per mode with its counts", () => {
  const t = formatSoak(["qemu", "relay"], [
    { mode: "relay", run: 0, outcome: "panic", why: "x", counters: "", events: [] },
    { mode: "relay", run: 1, outcome: "ok", why: "x", counters: "", events: [] },
    { mode: "qemu", run: 0, outcome: "other", why: "x", counters: "", events: [] },
  ]);
  assert.match(t, /^qemu\s+1\s+0\s+0\s+1$/m);
  assert.match(t, /^relay\s+2\s+1\s+1\s+0$/m);
});
