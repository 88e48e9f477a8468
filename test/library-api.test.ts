// The library API's promises: no silent wrong answers (async readers,
// foreign indexes and seeds), cancellation that leaves things as they were,
// typed errors with stable codes, createEngine's source and flavor.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync, rmSync, existsSync, readdirSync, readFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { createEngine, PAGE_SIZE, coreUrl } from "../src/index.js";
import * as errors from "../src/errors.js";
import { Planner, planIteration, planIterationAsync } from "../src/plan/planner.js";
import { planIterationPooled } from "../src/plan/pooled.js";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { EnginePool } from "../src/pool/pool.js";
import { RamFile } from "../src/adapters/ram/ram-file.js";
import { DestinationAgent } from "../src/agent/destination.js";
import { migrateSource } from "../src/agent/source.js";
import { streamIn } from "../src/stream/in.js";
import type { Progress } from "../src/log.js";

const { AbortError, AsyncReaderError, EngineMismatchError, PagetwinError } = errors;

/** A disk image and a RAM file whose pages are: a copy of a block (p % 3 == 0), zero (1), random (2). */
function vm(pages: number) {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-lib-"));
  const disk = new Uint8Array(randomBytes(pages * PAGE_SIZE));
  const ram = new Uint8Array(pages * PAGE_SIZE);
  for (let p = 0; p < pages; p++) {
    const at = p * PAGE_SIZE;
    if (p % 3 === 0) ram.set(disk.subarray(((p * 7) % pages) * PAGE_SIZE, ((p * 7) % pages + 1) * PAGE_SIZE), at);
    else if (p % 3 === 2) ram.set(randomBytes(PAGE_SIZE), at);
  }
  const image = join(dir, "disk.img"), ramPath = join(dir, "ram");
  writeFileSync(image, disk);
  writeFileSync(ramPath, ram);
  const want = { twin: Math.ceil(pages / 3), zero: Math.floor((pages + 1) / 3), normal: Math.floor(pages / 3) };
  return { dir, image, ramPath, ram, want, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

const isAbort = (cause: unknown) => (e: Error) =>
  e instanceof AbortError && e.name === "AbortError" && (e as errors.AbortError).code === "ABORT_ERR" && e.cause === cause;

test("every error class is a PagetwinError with a stable code, and keeps its cause", () => {
  const codes = new Set<string>();
  for (const [name, C] of Object.entries(errors)) {
    if (typeof C !== "function" || !(C.prototype instanceof Error)) continue;
    const e = name.startsWith("Qmp") && name !== "QmpError" && name !== "QmpProtocolError"
      ? new (C as new (...a: unknown[]) => errors.PagetwinError)("cmd", "x", "y")
      : name === "UnsupportedImageError" ? new errors.UnsupportedImageError("img", "a feature", "", { cause: 1 })
      : name === "LibvirtMigrationError" ? new errors.LibvirtMigrationError("m", { cause: 1, sourceState: "running" })
      : name === "ServeError" ? new errors.ServeError("PAGETWIN_SERVE_TEST", "m", { cause: 1 })
      : name.endsWith("MigrationError") ? new (C as new (...a: unknown[]) => errors.PagetwinError)("m", {}, { cause: 1 })
      : new (C as new (m: string, o: object) => errors.PagetwinError)("m", { cause: 1 });
    assert.ok(e instanceof PagetwinError, name);
    assert.equal(e.name, name);
    assert.match(e.code, name === "AbortError" ? /^ABORT_ERR$/ : /^PAGETWIN_[A-Z_]+$/, name);
    if (!name.startsWith("Qmp")) assert.equal(e.cause, 1, name);
    codes.add(e.code);
  }
  assert.ok(codes.size >= 18, `${codes.size} codes`);
  assert.equal(new errors.UsageError("x").code, "PAGETWIN_USAGE");
  assert.equal(new errors.SecurityError("x").code, "PAGETWIN_SECURITY");
  assert.equal(new errors.ProtocolError("x").code, "PAGETWIN_PROTOCOL");
});

test("the errors module imports nothing, so the browser entry's types need no Node types", () => {
  const dist = fileURLToPath(new URL("../src/", import.meta.url));
  for (const f of ["errors.js", "errors.d.ts"]) assert.doesNotMatch(readFileSync(join(dist, f), "utf8"), /^\s*(import|export .* from)\b/m, f);
});

test("pagetwin/trace: exported (types and code), and its whole import graph is free of Node modules (the visualizer and any page use it)", async () => {
  const root = fileURLToPath(new URL("../../", import.meta.url));
  const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as { exports: Record<string, Record<string, string>> };
  const entry = pkg.exports["./trace"]!;
  assert.ok(entry["types"] && entry["default"], "types and a default (any runtime) condition");
  for (const f of [entry["types"]!, entry["default"]!]) assert.ok(existsSync(join(root, f)), f);
  const seen = new Set<string>();
  const walk = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    for (const m of readFileSync(file, "utf8").matchAll(/^\s*(?:import|export)\b[^;]*?from\s+"([^"]+)"/gm)) {
      const spec = m[1]!;
      assert.ok(spec.startsWith("."), `${relative(root, file)} imports ${spec}`);
      walk(join(file, "..", file.endsWith(".d.ts") ? spec.replace(/\.js$/, ".d.ts") : spec));
    }
  };
  walk(join(root, entry["default"]!));
  walk(join(root, entry["types"]!));
  assert.ok(seen.size >= 4, [...seen].join(", "));
  const trace = await import(pathToFileURL(join(root, entry["default"]!)).href) as typeof import("../src/entry/trace.js");
  const model = trace.TraceModel.parse(JSON.stringify({ type: "start", format: trace.TRACE_FORMAT, version: trace.TRACE_VERSION, id: "x", mode: "agent", method: "pagetwin", label: "l", pages: 8, startedAt: 0, baseline: "estimated" }));
  assert.equal(model.migrations.get("x")!.pages, 8);
});

test("planIteration refuses an async reader; planIterationAsync plans what it reads", async () => {
  const v = vm(300);
  try {
    const nas = await openNasIndex(v.image);
    const planner = new Planner(nas.engine, { pages: 300, windowPages: 128, index: nas.index });
    const fh = await open(v.ramPath);
    const reader = async (first: number, count: number, into: Uint8Array) => { await fh.read(into, 0, count * PAGE_SIZE, first * PAGE_SIZE); };
    assert.throws(() => planIteration(planner, 1, reader as never), (e: Error) => e instanceof AsyncReaderError && (e as errors.PagetwinError).code === "PAGETWIN_ASYNC_READER");
    const fresh = new Planner(nas.engine, { pages: 300, windowPages: 128, index: nas.index });
    const seen: Progress[] = [];
    const plan = await planIterationAsync(fresh, 1, reader, { onProgress: (p) => seen.push(p) });
    assert.deepEqual({ twin: plan.twin, zero: plan.zero, normal: plan.normal }, { ...v.want, zero: 0 }, "zero pages are not dirty on a zeroed destination");
    assert.deepEqual(seen.map((p) => p.done), [128, 256, 300]);
    const again = await planIterationAsync(fresh, 2, reader);
    assert.equal(again.dirty, 0);
    const ac = new AbortController();
    const reason = new Error("stop");
    const slow = planIterationAsync(fresh, 3, async (f, c, into) => { ac.abort(reason); await reader(f, c, into); }, { signal: ac.signal });
    await assert.rejects(slow, isAbort(reason));
    await fh.close();
    nas.image.close();
  } finally {
    v.cleanup();
  }
});

test("a Planner given an index of another engine, or a pool session of another seed, is an EngineMismatchError", async () => {
  const v = vm(128);
  const pool = await EnginePool.create({ size: 1 });
  try {
    const nas = await openNasIndex(v.image);
    const other = await createEngine({ seed: nas.engine.seed });
    assert.throws(() => new Planner(other, { pages: 128, index: nas.index }), (e: Error) => e instanceof EngineMismatchError && (e as errors.PagetwinError).code === "PAGETWIN_ENGINE_MISMATCH");
    const planner = new Planner(nas.engine, { pages: 128, index: nas.index });
    await assert.rejects(planIterationPooled(planner, 1, pool.session({ seed: nas.engine.seed + 1n }), v.ramPath), EngineMismatchError);
    const s = pool.session({ seed: nas.engine.seed });
    const plan = await planIterationPooled(planner, 1, s, v.ramPath);
    assert.deepEqual({ twin: plan.twin, normal: plan.normal }, { twin: v.want.twin, normal: v.want.normal });
    nas.image.close();
  } finally {
    await pool.close();
    v.cleanup();
  }
});

test("openNasIndex with the caller's engine: builds with its seed, loads a match, refuses another seed unless rebuild", async () => {
  const v = vm(200);
  try {
    const mine = await createEngine({ seed: 0x1234n });
    const a = await openNasIndex(v.image, { engine: mine });
    assert.equal(a.engine, mine);
    assert.equal(a.header.seed, 0x1234n);
    assert.equal(a.built, true);
    a.image.close();
    const b = await openNasIndex(v.image, { engine: mine });
    assert.equal(b.built, false);
    b.image.close();
    const planner = new Planner(mine, { pages: 200, index: b.index });
    assert.equal(planIteration(planner, 1, (f, c, into) => into.set(v.ram.subarray(f * PAGE_SIZE, (f + c) * PAGE_SIZE))).twin, v.want.twin);
    const other = await createEngine({ seed: 99n });
    await assert.rejects(openNasIndex(v.image, { engine: other }), (e: Error) => e instanceof EngineMismatchError && /another hash seed/.test(e.message));
    const c = await openNasIndex(v.image, { engine: other, rebuild: true });
    assert.equal(c.header.seed, 99n);
    c.image.close();
  } finally {
    v.cleanup();
  }
});

test("an aborted index build rejects with an AbortError, writes nothing and reports progress until then", async () => {
  const v = vm(4096);
  try {
    for (const workers of [0, 2]) {
      const ac = new AbortController();
      const reason = new Error(`enough (${workers})`);
      const seen: Progress[] = [];
      const build = openNasIndex(v.image, { batchBlocks: 256, workers, signal: ac.signal, onProgress: (p) => { seen.push(p); if (seen.length === 2) ac.abort(reason); } });
      await assert.rejects(build, isAbort(reason));
      assert.equal(seen[0]!.phase, "index");
      assert.ok(seen[0]!.total === 4096 && seen[0]!.bytes === seen[0]!.done * PAGE_SIZE);
      assert.ok(seen.length < (workers ? 8 : 16), `stopped early (${seen.length} batches)`);
      assert.deepEqual(readdirSync(v.dir).filter((f) => f.includes("index")), [], "no index file, no temporary file");
    }
  } finally {
    v.cleanup();
  }
});

test("createEngine: a relative path source resolves against the cwd; flavor is the build loaded", async () => {
  const scalar = fileURLToPath(coreUrl("scalar"));
  const e = await createEngine({ source: relative(process.cwd(), scalar) });
  assert.equal(e.flavor, "scalar");
  assert.equal(e.simd, false);
  const data = new Uint8Array(randomBytes(4 * PAGE_SIZE));
  assert.deepEqual(e.hashPages(data), (await createEngine()).hashPages(data));
  await assert.rejects(createEngine({ source: scalar, flavor: "simd" }), (err: Error) => err instanceof errors.CoreLoadError && /scalar build/.test(err.message));
  await assert.rejects(createEngine({ source: "./no/such.wasm" }), (err: Error) =>
    err instanceof errors.CoreLoadError && err.message.includes(join(process.cwd(), "no/such.wasm")) && !/npm run build/.test(err.message));
  assert.equal((await createEngine({ source: new Uint8Array(readFileSync(scalar)) })).flavor, "scalar");
});

test("an agent-mode migration aborted mid-way rejects with an AbortError and resumes the paused source VM", async () => {
  const v = vm(4096);
  const dst = join(v.dir, "dst.ram");
  try {
    const nas = await openNasIndex(v.image);
    const psk = randomBytes(32);
    for (const when of ["iteration", "final"] as const) {
      const agent = new DestinationAgent({ ramPath: dst, createRam: true, imagePath: v.image, psk });
      const port = await agent.listen();
      const ram = RamFile.open(v.ramPath);
      const calls: string[] = [];
      const ac = new AbortController();
      const reason = new Error(`operator (${when})`);
      const run = migrateSource({
        engine: nas.engine, index: nas.index, indexId: nas.header.indexId, ram, host: "127.0.0.1", port, bandwidth: 20e6, psk,
        convergence: { maxIterations: 1 }, windowPages: 256, signal: ac.signal,
        vm: { pause: async () => { calls.push("pause"); }, resume: async () => { calls.push("resume"); } },
        onProgress: (p) => { if (p.phase === when && p.done >= 1024) ac.abort(reason); },
      });
      await assert.rejects(run, isAbort(reason));
      assert.deepEqual(calls, when === "final" ? ["pause", "resume"] : [], "paused only for the final pass, then resumed");
      const r = await agent.nextResult();
      assert.equal(r.status, "failed");
      assert.equal(r.verified, false);
      ram.close();
      agent.close();
    }
    assert.ok(existsSync(v.ramPath));
    nas.image.close();
  } finally {
    v.cleanup();
  }
});

test("a stream proxy aborted while it waits closes, and its done rejects with an AbortError", async () => {
  const v = vm(64);
  try {
    await openNasIndex(v.image).then((n) => n.image.close());
    const ac = new AbortController();
    const proxy = await streamIn({ qemu: "127.0.0.1:1", image: v.image, psk: randomBytes(32), signal: ac.signal });
    const reason = new Error("shutting down");
    ac.abort(reason);
    await assert.rejects(proxy.done, isAbort(reason));
    assert.equal(proxy.stats.error, "aborted by the caller");
    await assert.rejects(streamIn({ qemu: "127.0.0.1:1", image: v.image, psk: randomBytes(32), signal: AbortSignal.abort(reason) }), isAbort(reason));
  } finally {
    v.cleanup();
  }
});
