// A minimal migration driver on the public API: agent mode between two ends
// in this process, over loopback, inside TLS-PSK with a fresh random key.
// The "VM" is a RAM file of a demo guest (no QEMU needed): the source agent
// reads it, the destination agent writes another, verifying every NAS block.
//
//   node migrate-driver.mjs            # Ctrl-C aborts: the source "VM" keeps running
//
// Prints progress on stderr and the result as JSON; exits 1 if the copy differs.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PAGE_SIZE } from "pagetwin";
import { openNasIndex, RamFile } from "pagetwin/nas";
import { DestinationAgent, migrateSource, PSK_BYTES } from "pagetwin/agent";

const dir = mkdtempSync(join(tmpdir(), "pagetwin-driver-"));
const pages = 4096; // 16 MiB
const image = join(dir, "disk.img"), srcRam = join(dir, "src.ram"), dstRam = join(dir, "dst.ram");
const disk = randomBytes(pages * PAGE_SIZE);
const ram = Buffer.alloc(pages * PAGE_SIZE);
for (let p = 0; p < pages; p++) {
  if (p % 2 === 0) disk.copy(ram, p * PAGE_SIZE, ((p * 5) % pages) * PAGE_SIZE, ((p * 5) % pages + 1) * PAGE_SIZE);
  else if (p % 4 === 1) randomBytes(PAGE_SIZE).copy(ram, p * PAGE_SIZE);
}
writeFileSync(image, disk);
writeFileSync(srcRam, ram);

const ac = new AbortController();
process.once("SIGINT", () => ac.abort(new Error("interrupted")));
const psk = randomBytes(PSK_BYTES); // both ends in one process: a key of this run's own
const log = { info: (m) => console.error(m), warn: (m) => console.error(`warning: ${m}`), error: (m) => console.error(`error: ${m}`) };

const nas = await openNasIndex(image, { signal: ac.signal });
const destination = new DestinationAgent({ ramPath: dstRam, createRam: true, imagePath: image, psk, log });
const port = await destination.listen();
const source = RamFile.open(srcRam);
let status = 1;
try {
  const result = await migrateSource({
    engine: nas.engine, index: nas.index, indexId: nas.header.indexId, ram: source,
    host: "127.0.0.1", port, bandwidth: 0, psk, signal: ac.signal,
    // a real driver stops and resumes the guest here (QMP `stop` / `cont`)
    vm: { pause: async () => log.info("source paused for the final pass"), resume: async () => log.info("source resumed") },
    onProgress: (p) => { if (p.done === p.total) log.info(`${p.phase} ${p.iteration}: ${p.total} pages, ${p.bytes} bytes`); },
  });
  const identical = readFileSync(srcRam).equals(readFileSync(dstRam));
  console.log(JSON.stringify({
    status: result.status, verified: result.verified, identical, iterations: result.iterations,
    pages: result.pages, transferredBytes: result.transferredBytes, ramBytes: pages * PAGE_SIZE,
  }));
  status = identical && result.verified ? 0 : 1;
} catch (err) {
  console.error(`${err.name} (${err.code}): ${err.message}`);
} finally {
  source.close();
  destination.close();
  nas.image.close();
  rmSync(dir, { recursive: true, force: true });
}
process.exitCode = status;
