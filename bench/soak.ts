// Soak: many migrations back and forth between two RAM files over TCP, the
// "guest" changing memory between them, with a random fault in most:
// the link cut after a random number of bytes, a random bit flipped, a
// stall longer than the answer timeout, NAS blocks rewritten. Counts
// migrations completed (destination byte-identical), aborted cleanly (source
// untouched), and corrupted (anything else) — which must be 0. The link runs
// in TLS-PSK, as deployed: a flipped bit fails TLS's record check.
//
//   node dist/bench/soak.js [--migrations 40] [--json]

import { createServer, connect, type Socket } from "node:net";
import { mkdtempSync, rmSync, writeFileSync, readFileSync, readSync, openSync, writeSync, closeSync } from "node:fs";
import { createHash, randomBytes, randomInt } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openNasIndex } from "../src/adapters/nas/index-file.js";
import { RamFile } from "../src/adapters/ram/ram-file.js";
import { DestinationAgent } from "../src/agent/destination.js";
import { migrateSource, MigrationError, type MigrationResult } from "../src/agent/source.js";
import { argValue, benchArgs, isMain } from "./cli.js";

type Fault = "none" | "cut" | "flip" | "stall" | "rewrite";

export interface SoakResult {
  migrations: number;
  completed: number;
  abortedCleanly: number;
  corrupted: number;
  stranded: number;
  byFault: Record<Fault, { runs: number; completed: number; aborted: number }>;
  errors: string[];
}

const sha = (p: string) => createHash("sha256").update(readFileSync(p)).digest("hex");

export async function soak(opts: { migrations?: number; pages?: number; json?: boolean; quiet?: boolean } = {}): Promise<SoakResult> {
  const n = opts.migrations ?? 40, pages = opts.pages ?? 2048;
  const dir = mkdtempSync(join(tmpdir(), "pagetwin-soak-"));
  const log = (s: string) => { if (!opts.json && !opts.quiet) process.stderr.write(s + "\n"); };
  const res: SoakResult = {
    migrations: 0, completed: 0, abortedCleanly: 0, corrupted: 0, stranded: 0, errors: [],
    byFault: { none: { runs: 0, completed: 0, aborted: 0 }, cut: { runs: 0, completed: 0, aborted: 0 }, flip: { runs: 0, completed: 0, aborted: 0 }, stall: { runs: 0, completed: 0, aborted: 0 }, rewrite: { runs: 0, completed: 0, aborted: 0 } },
  };
  try {
    const image = join(dir, "disk.img");
    const disk = randomBytes(pages * 4096);
    writeFileSync(image, disk);
    const nas = await openNasIndex(image);
    const files = [join(dir, "ram-a"), join(dir, "ram-b")];
    // A's RAM: half copies of disk blocks, a quarter random, a quarter zero
    const ram = Buffer.alloc(pages * 4096);
    for (let p = 0; p < pages; p++) {
      const r = p % 4;
      if (r < 2) disk.copy(ram, p * 4096, randomInt(pages) * 4096, randomInt(pages) * 4096 + 4096);
      else if (r === 2) randomBytes(4096).copy(ram, p * 4096);
    }
    writeFileSync(files[0]!, ram);
    writeFileSync(files[1]!, Buffer.alloc(pages * 4096));
    let src = 0; // which file holds the running VM
    const psk = randomBytes(32); // the link's key
    for (let i = 0; i < n; i++) {
      const srcPath = files[src]!, dstPath = files[1 - src]!;
      // the guest runs a little: random pages change (some to disk-block copies)
      const fd = openSync(srcPath, "r+");
      for (let k = 0; k < 64; k++) {
        const page = randomInt(pages);
        writeSync(fd, randomInt(2) ? randomBytes(4096) : readBlock(image, randomInt(pages)), 0, 4096, page * 4096);
      }
      closeSync(fd);
      const fault: Fault = (["none", "cut", "flip", "stall", "rewrite"] as const)[randomInt(5)]!;
      res.byFault[fault].runs++;
      const before = sha(srcPath);
      const agent = new DestinationAgent({ ramPath: dstPath, imagePath: image, idleTimeoutMs: 3000, psk });
      const dport = await agent.listen();
      const sockets: Socket[] = [];
      let seen = 0;
      const limit = randomInt(20_000, 6_000_000);
      const proxy = createServer((c) => {
        const up = connect(dport, "127.0.0.1");
        sockets.push(c, up);
        const cut = () => { c.destroy(); up.destroy(); };
        c.on("data", (d) => {
          seen += d.length;
          if (fault === "cut" && seen > limit) return cut();
          if (fault === "flip" && seen > limit && seen - d.length <= limit) d[randomInt(d.length)]! ^= 1 << randomInt(8);
          if (fault === "stall" && seen > limit) return; // swallow: the peers time out
          up.write(d);
        });
        up.on("data", (d) => c.write(d));
        c.on("error", cut);
        up.on("error", cut);
      });
      await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
      if (fault === "rewrite") {
        const ifd = openSync(image, "r+");
        for (let k = 0; k < 20; k++) writeSync(ifd, randomBytes(4096), 0, 4096, randomInt(pages) * 4096);
        closeSync(ifd);
      }
      const reader = RamFile.open(srcPath);
      let r: MigrationResult;
      try {
        r = await migrateSource({
          engine: nas.engine, index: nas.index, indexId: nas.header.indexId, ram: reader,
          vm: { pause: async () => {}, resume: async () => {} },
          host: "127.0.0.1", port: (proxy.address() as { port: number }).port, bandwidth: 0, answerTimeoutMs: 3000, psk,
        });
      } catch (err) {
        if (!(err instanceof MigrationError)) throw err;
        r = err.result;
      } finally {
        reader.close();
        sockets.forEach((s) => s.destroy());
        proxy.close();
        agent.close();
      }
      res.migrations++;
      const after = sha(srcPath);
      if (after !== before) {
        res.corrupted++;
        res.errors.push(`migration ${i} (${fault}): the source RAM changed`);
      } else if (r.status === "completed") {
        if (sha(dstPath) === before) {
          res.completed++;
          res.byFault[fault].completed++;
          src = 1 - src; // the VM now runs on the other side: migrate it back next
        } else {
          res.corrupted++;
          res.errors.push(`migration ${i} (${fault}): completed but the destination differs`);
        }
      } else {
        res.abortedCleanly++;
        res.byFault[fault].aborted++;
        if (!r.error) { res.stranded++; res.errors.push(`migration ${i} (${fault}): failed without a message`); }
      }
      log(`  ${String(i + 1).padStart(3)} ${fault.padEnd(7)} ${r.status}${r.error ? `: ${r.error.slice(0, 90)}` : ""}`);
    }
    nas.image.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  if (opts.json) console.log(JSON.stringify(res));
  else if (!opts.quiet) console.log(`soak: ${res.migrations} migrations: ${res.completed} completed, ${res.abortedCleanly} aborted cleanly, ${res.corrupted} corrupted, ${res.stranded} stranded`);
  return res;
}

/** A copy of a disk block as it is now (the guest reading a file into its page cache). */
function readBlock(image: string, b: number): Buffer {
  const fd = openSync(image, "r");
  const buf = Buffer.alloc(4096);
  try {
    readSync(fd, buf, 0, 4096, b * 4096);
    return buf;
  } finally {
    closeSync(fd);
  }
}

if (isMain(import.meta.url)) {
  const args = benchArgs("node dist/bench/soak.js [--migrations N] [--json]: many migrations between two RAM files with a random fault in most", ["--migrations", "--json"]);
  soak({ migrations: argValue(args, "--migrations"), json: args.includes("--json") }).catch((err) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
