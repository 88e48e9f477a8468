// Run by bench/index-refresh.ts, one process per step, as a migration or a
// `pagetwin index` run is one: `node dist/bench/open-index.js IMAGE [--rebuild]`
// opens (or rebuilds) IMAGE's index and prints, as one JSON line, the wall
// and CPU (user + system, all threads) milliseconds of openNasIndex alone
// (not the process's start), and what it found.

import { openNasIndex } from "../src/adapters/nas/index-file.js";

const [image, flag] = process.argv.slice(2);
if (!image) throw new Error("bench: open-index.js IMAGE [--rebuild]");
const t0 = performance.now(), c0 = process.cpuUsage();
const nas = await openNasIndex(image, { rebuild: flag === "--rebuild" });
const c = process.cpuUsage(c0);
const out = { ms: performance.now() - t0, cpu: (c.user + c.system) / 1000, stale: nas.stale, built: nas.built, bytes: nas.index.bytes, indexId: nas.header.indexId };
nas.image.close();
nas.index.free();
console.log(JSON.stringify(out));
