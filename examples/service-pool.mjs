// A Node service that plans pre-copy iterations for several VMs at once,
// all through one shared pool of worker threads. Each VM gets its own pool
// session, so concurrent requests never see each other's hashes or pages.
//
//   node service-pool.mjs                      # 3 demo VMs made in a temp dir
//   node service-pool.mjs RAM IMAGE [RAM IMAGE ...]
//
// Prints one JSON line per VM and iteration, then a summary; exits 1 if a
// check fails. Uses only the public API: pagetwin, pagetwin/plan, pagetwin/pool, pagetwin/nas.

import { mkdtempSync, openSync, readSync, closeSync, rmSync, statSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PAGE_SIZE, PagetwinError } from "pagetwin";
import { Planner, planIterationPooled } from "pagetwin/plan";
import { EnginePool } from "pagetwin/pool";
import { openNasIndex } from "pagetwin/nas";

/** A demo VM: a disk image, and a RAM file of block copies (1/3), zero pages (1/3) and unique pages. */
function demoVm(dir, name, pages) {
  const disk = randomBytes(pages * PAGE_SIZE);
  const ram = Buffer.alloc(pages * PAGE_SIZE);
  for (let p = 0; p < pages; p++) {
    if (p % 3 === 0) disk.copy(ram, p * PAGE_SIZE, ((p * 7) % pages) * PAGE_SIZE, ((p * 7) % pages + 1) * PAGE_SIZE);
    else if (p % 3 === 2) randomBytes(PAGE_SIZE).copy(ram, p * PAGE_SIZE);
  }
  const vm = { name, ram: join(dir, `${name}.ram`), image: join(dir, `${name}.img`) };
  writeFileSync(vm.image, disk);
  writeFileSync(vm.ram, ram);
  return vm;
}

function readPage(path, page) {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(PAGE_SIZE);
    readSync(fd, b, 0, PAGE_SIZE, page * PAGE_SIZE);
    return b;
  } finally {
    closeSync(fd);
  }
}

/** One VM's request: open its index (hashed on the shared pool), plan two iterations, check the bytes the pool kept. */
async function planVm(pool, vm, signal) {
  const nas = await openNasIndex(vm.image, { pool, signal, indexPath: `${vm.image}.pagetwin-index` });
  const session = pool.session({ seed: nas.engine.seed });
  const pages = statSync(vm.ram).size / PAGE_SIZE;
  const planner = new Planner(nas.engine, { pages, windowPages: 1024, index: nas.index });
  try {
    const out = [];
    for (const iteration of [1, 2]) {
      const plan = await planIterationPooled(planner, iteration, session, vm.ram, { signal });
      out.push({ vm: vm.name, iteration, pages, dirty: plan.dirty, twin: plan.twin, zero: plan.zero, normal: plan.normal });
      if (iteration === 1 && plan.send.length) {
        // the last window's bytes stay in the workers, in this session's own buffers
        const last = plan.send[plan.send.length - 1];
        const bytes = await session.pagesOf(Uint32Array.of(last), { signal });
        if (!Buffer.from(bytes).equals(readPage(vm.ram, last))) throw new Error(`${vm.name}: the pool returned another VM's bytes for page ${last}`);
      }
    }
    return out;
  } finally {
    planner.free();
    await session.close();
    nas.image.close();
  }
}

const args = process.argv.slice(2);
const dir = args.length ? null : mkdtempSync(join(tmpdir(), "pagetwin-service-"));
const vms = dir
  ? ["vm-a", "vm-b", "vm-c"].map((n, i) => demoVm(dir, n, 3000 + 1000 * i))
  : Array.from({ length: args.length / 2 }, (_, i) => ({ name: args[2 * i], ram: args[2 * i], image: args[2 * i + 1] }));

const pool = await EnginePool.create({ size: 2, log: console });
let failed = false;
try {
  // every request at once, as a service would take them; all of them cancelled after 60 s
  const signal = AbortSignal.timeout(60_000);
  const results = await Promise.allSettled(vms.map((vm) => planVm(pool, vm, signal)));
  for (const [i, r] of results.entries()) {
    if (r.status === "fulfilled") for (const line of r.value) console.log(JSON.stringify(line));
    else {
      failed = true;
      const e = r.reason;
      console.error(JSON.stringify({ vm: vms[i].name, error: e.message, code: e instanceof PagetwinError ? e.code : undefined }));
    }
  }
  const ok = results.every((r) => r.status === "fulfilled" && r.value[0].twin > 0 && r.value[1].dirty === 0);
  failed ||= !ok;
  console.log(JSON.stringify({ summary: true, vms: vms.length, workers: pool.size, ok }));
} finally {
  await pool.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
}
process.exitCode = failed ? 1 : 0;
