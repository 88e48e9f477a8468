import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { EmbeddedVm } from "../src/adapters/embedded/vm.js";

const CLI = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

test("analyze counts the zero, twin and unique pages of a RAM file against its image, before migrating", () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-cli-"));
  try {
    const vm = EmbeddedVm.create({ dir, ramMiB: 8, twinShare: 0.4, zeroShare: 0.25 });
    const out = JSON.parse(execFileSync(process.execPath, [CLI, "analyze", "--ram", vm.layout.ramPath, "--image", vm.layout.imagePath, "--bandwidth", "100MB", "--json"], { encoding: "utf8" }).trim().split("\n").pop()!);
    assert.equal(out.pages, vm.layout.pages);
    assert.equal(out.zero, vm.layout.zeroPages);
    assert.equal(out.twin, vm.layout.cachePages);
    assert.equal(out.normal, vm.layout.anonPages);
    assert.equal(out.baseline.bytes, (out.twin + out.normal) * 4096);
    // the embedded VM's anonymous pages are random: they do not compress, so they travel in full
    assert.equal(out.compression.used, false);
    assert.ok(out.pagetwin.bytes >= out.normal * 4096 + out.twin * 24 && out.pagetwin.bytes <= out.normal * 4100 + out.twin * 24 + 4096, `${out.pagetwin.bytes}`);
    assert.equal(out.baseline.timeMs, Math.round((out.baseline.bytes / 100e6) * 1e4) / 10);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("every command answers --help, and a bad invocation says what to do", () => {
  const top = spawnSync(process.execPath, [CLI, "--help"], { encoding: "utf8" });
  assert.equal(top.status, 0);
  for (const cmd of ["demo", "analyze", "index", "listen", "send", "migrate", "compare-qemu", "stream-out", "stream-in", "serve"]) {
    assert.match(top.stdout, new RegExp(`\\n  ${cmd} `));
    const h = spawnSync(process.execPath, [CLI, cmd, "--help"], { encoding: "utf8" });
    assert.equal(h.status, 0, `${cmd} --help`);
    assert.match(h.stdout, /Usage: pagetwin /);
  }
  const bad = spawnSync(process.execPath, [CLI, "analyze", "--bogus"], { encoding: "utf8" });
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /pagetwin analyze --help/);
  const missing = spawnSync(process.execPath, [CLI, "analyze", "--ram", "/nonexistent", "--image", "/nonexistent"], { encoding: "utf8" });
  assert.equal(missing.status, 2);
  assert.match(missing.stderr, /^pagetwin: cannot read the RAM file \/nonexistent: ENOENT/);
  const queue = spawnSync(process.execPath, [CLI, "serve", "--queue-ms", "0", "--insecure", "--control", "/nonexistent/serve.sock"], { encoding: "utf8" });
  assert.equal(queue.status, 2, queue.stderr);
  assert.match(queue.stderr, /--queue-ms must be a number between 1 and/);
  const unknown = spawnSync(process.execPath, [CLI, "frobnicate"], { encoding: "utf8" });
  assert.equal(unknown.status, 2);
  assert.match(unknown.stderr, /unknown command "frobnicate"/);
});

test("a demo run under node --cpu-prof --cpu-prof-dir DIR profiles its destination process too (the directory as a separate argument)", () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-prof-"));
  try {
    const prof = join(dir, "prof");
    const r = spawnSync(process.execPath, ["--cpu-prof", "--cpu-prof-dir", prof, CLI, "demo", "--run-only", "pagetwin", "--ram-mib", "16", "--dir", join(dir, "vm"), "--trace", "", "--json"], { encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    const files = readdirSync(prof).filter((f) => f.endsWith(".cpuprofile"));
    // this process's and the destination child's: two pids
    assert.equal(new Set(files.map((f) => f.split(".")[3])).size, 2, files.join(", "));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the demo removes each run's files once that run is over: the second run does not start with the first's (nor leaves its own in --dir)", () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-demo-dir-"));
  try {
    const r = spawnSync(process.execPath, [CLI, "demo", "--ram-mib", "8", "--dir", dir, "--trace", "", "--json"], { encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(readdirSync(dir), [], "a --dir the user gave is kept, empty");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
