// The package as a Node user gets it: npm pack, install into a fresh
// project (once for this file: the install is slow), type-check a consumer
// importing every public entry point (strict, NodeNext), run it, and run the
// examples from inside that project. The consumer's tsconfig has the DOM
// lib: the core's types name WebAssembly and BufferSource, which TypeScript
// declares there (and @types/node 20 does not).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, symlinkSync } from "node:fs";
import path from "node:path";
import { packAndInstall, REPO, type PackedProject } from "./helpers/pack.js";

const FIXTURE = path.join(REPO, "test", "fixtures", "consumer");
const TSC = path.join(REPO, "node_modules", "typescript", "bin", "tsc");
let packed: PackedProject;

before(() => {
  packed = packAndInstall();
  for (const f of ["consumer.ts", "tsconfig.json"]) copyFileSync(path.join(FIXTURE, f), path.join(packed.project, f));
  // the repo's @types/node for the consumer's type check (a real project installs its own)
  mkdirSync(path.join(packed.project, "node_modules", "@types"), { recursive: true });
  try {
    symlinkSync(path.join(REPO, "node_modules", "@types", "node"), path.join(packed.project, "node_modules", "@types", "node"));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
  }
  mkdirSync(path.join(packed.project, "examples"));
  for (const f of ["service-pool.mjs", "migrate-driver.mjs"]) copyFileSync(path.join(REPO, "examples", f), path.join(packed.project, "examples", f));
}, { timeout: 600_000 });

after(() => packed?.cleanup());

function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { cwd: packed.project, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], timeout: 180_000 });
}

test("a consumer importing every entry point type-checks (strict, NodeNext, skipLibCheck off)", () => {
  try {
    run(process.execPath, [TSC, "--noEmit", "-p", "tsconfig.json"]);
  } catch (err) {
    assert.fail(`tsc: ${(err as { stdout?: string }).stdout ?? err}`);
  }
});

test("the consumer runs: hash, index, async plan, pool, a pool shared in a worker-thread service, abort, every entry", () => {
  run(process.execPath, [TSC, "-p", "tsconfig.json"]);
  const out = run(process.execPath, ["out/consumer.js"]);
  const r = JSON.parse(out.trim().split("\n").at(-1)!) as { ok: boolean; done: string[] };
  assert.equal(r.ok, true);
  assert.deepEqual(r.done, ["hash", "index", "plan-async", "pool", "shared-pool", "abort", "entries"]);
});

test("the entry points are the only way in: internal files stay unexported", () => {
  const code = `import("pagetwin/dist/src/plan/planner.js").then(() => console.log("open"), (e) => console.log(e.code))`;
  assert.equal(run(process.execPath, ["--input-type=module", "-e", code]).trim(), "ERR_PACKAGE_PATH_NOT_EXPORTED");
});

test("examples/service-pool.mjs plans three VMs concurrently through one pool", () => {
  const lines = run(process.execPath, ["examples/service-pool.mjs"]).trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.deepEqual(lines.at(-1), { summary: true, vms: 3, workers: 2, ok: true });
  assert.equal(lines.filter((l) => l["iteration"] === 1 && (l["twin"] as number) > 0).length, 3);
});

test("examples/migrate-driver.mjs migrates a RAM file over loopback TLS-PSK, byte-identical", () => {
  const r = JSON.parse(run(process.execPath, ["examples/migrate-driver.mjs"]).trim()) as { status: string; verified: boolean; identical: boolean; pages: { twin: number } };
  assert.equal(r.status, "completed");
  assert.equal(r.verified, true);
  assert.equal(r.identical, true);
  assert.ok(r.pages.twin > 0);
});
