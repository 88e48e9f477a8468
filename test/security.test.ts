import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createEngine } from "../src/index.js";
import { RamFile } from "../src/adapters/ram/ram-file.js";
import { DestinationAgent, type DestinationOptions } from "../src/agent/destination.js";
import { migrateSource, MigrationError, type MigrationResult, type SourceOptions } from "../src/agent/source.js";
import { makeCerts } from "./helpers/stream.js";

const PAGES = 256;

async function migrate(dir: string, src: Partial<SourceOptions>, dst: Partial<DestinationOptions>): Promise<{ r: MigrationResult; dstRam: string; srcRam: string; agent: DestinationAgent }> {
  const srcRam = join(dir, "src-ram"), dstRam = join(dir, "dst-ram");
  writeFileSync(srcRam, randomBytes(PAGES * 4096));
  const agent = new DestinationAgent({ ramPath: dstRam, createRam: true, ...dst });
  const port = await agent.listen();
  const ram = RamFile.open(srcRam);
  try {
    const r = await migrateSource({
      engine: await createEngine(), index: null, indexId: null, ram, vm: { pause: async () => {}, resume: async () => {} },
      host: "127.0.0.1", port, bandwidth: 0, ...src,
    }).catch((e) => { if (e instanceof MigrationError) return e.result; throw e; });
    return { r, dstRam, srcRam, agent };
  } finally {
    ram.close();
    agent.close();
  }
}

test("TLS: a migration over mutual TLS completes; a source with a certificate from elsewhere is refused", async () => {
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-tls-"));
  try {
    const c = makeCerts(dir);
    const dstTls = { cert: c.dstCert!, key: c.dstKey!, ca: c.ca! };
    const ok = await migrate(dir, { tls: { cert: c.srcCert!, key: c.srcKey!, ca: c.ca! } }, { tls: dstTls });
    assert.equal(ok.r.status, "completed", ok.r.error);
    assert.deepEqual(readFileSync(ok.dstRam), readFileSync(ok.srcRam));
    const rogue = await migrate(dir, { tls: { cert: c.rogueCert!, key: c.rogueKey!, ca: c.ca! } }, { tls: dstTls });
    assert.equal(rogue.r.status, "failed");
    assert.match(rogue.r.error!, /refused the migration: TLS: this destination refuses the source: its certificate is not signed by the CA/);
    assert.equal(rogue.r.iterations, 0);
    const plain = await migrate(dir, {}, { tls: dstTls });
    assert.equal(plain.r.status, "failed");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
