// `pagetwin stream-out` / `pagetwin stream-in`: argument parsing, help, and
// the final stats (human-readable, or one JSON object with --json).

import { parseCompressionMode, type CompressionMode } from "../migrate/compress.js";
import { parseRate } from "../cli/args.js";
import { parseArgs } from "node:util";
import { streamIn, streamOut, type StreamStats } from "./proxy.js";

const OUT_HELP = `pagetwin stream-out — source-side proxy in QEMU's own migration stream

Usage: pagetwin stream-out --to HOST:PORT --image IMAGE [--listen [HOST:]PORT] [--json]

Point the source QEMU at it:  migrate tcp:127.0.0.1:PORT
RAM pages that are copies of blocks of IMAGE (on the NAS both hosts mount)
travel as references; everything else passes through unchanged.

Options:
  --listen [HOST:]PORT   where QEMU connects (default 127.0.0.1:4446)
  --to HOST:PORT         the destination's pagetwin stream-in
  --image PATH           raw disk image on the NAS (its block index is built or loaded beside it)
  --index PATH           index file (default IMAGE.pagetwin-index)
  --window PAGES         referenced pages kept for resends until acknowledged (default 16384 = 64 MiB)
  --no-dedup             forward everything raw (a baseline through the same proxies)
  --compress MODE        what still travels raw: auto (compress when the compressor outruns the link
                         and the data compresses; default), off, zstd or brotli
  --bandwidth RATE       the link's rate if known (e.g. 1gbit, 125MB): auto compares the compressor
                         with it; without it, the rate is measured from the link's backlog
  --keep                 serve further migrations instead of exiting after the first
  --json                 print the stats as JSON on stdout
  --quiet                no progress lines on stderr
  --help                 this help`;

const IN_HELP = `pagetwin stream-in — destination-side proxy: rebuilds QEMU's migration stream

Usage: pagetwin stream-in --qemu HOST:PORT --image IMAGE [--listen [HOST:]PORT] [--json]

Start the destination QEMU with -incoming tcp:HOST:PORT first. Every referenced
NAS block is read and its hash checked; a block that no longer matches is asked
for from stream-out. QEMU receives the exact byte stream the source QEMU sent.

Options:
  --listen [HOST:]PORT   where stream-out connects (default 0.0.0.0:4447)
  --qemu HOST:PORT       the destination QEMU's -incoming tcp address
  --image PATH           the same raw disk image, as mounted on this host
  --index PATH           index file (default IMAGE.pagetwin-index; only its seed and id are read)
  --keep                 serve further migrations instead of exiting after the first
  --json                 print the stats as JSON on stdout
  --quiet                no progress lines on stderr
  --help                 this help`;

function listenAddr(v: string | undefined, defHost: string, defPort: number): { host: string; port: number } {
  if (!v) return { host: defHost, port: defPort };
  const m = /^(?:(.*):)?(\d+)$/.exec(v);
  if (!m) throw new Error(`--listen must be PORT or HOST:PORT (got "${v}")`);
  return { host: m[1] || defHost, port: Number(m[2]) };
}

function report(stats: StreamStats, json: boolean): void {
  if (json) {
    process.stdout.write(JSON.stringify(stats) + "\n");
    return;
  }
  const mb = (n: number) => (n / 1e6).toFixed(1) + " MB";
  const lines = [
    `${stats.role}: ${stats.error ? `FAILED: ${stats.error}` : "migration stream complete"}`,
    `  pages seen ${stats.pagesSeen}, zero ${stats.zeroPages}, twins replaced ${stats.twinsReplaced}` +
      (stats.pagesSeen ? ` (${((100 * stats.twinsReplaced) / stats.pagesSeen).toFixed(1)}%)` : "") + `, resends ${stats.resends}`,
    `  QEMU bytes in ${mb(stats.bytesFromQemu)}, out ${mb(stats.bytesToQemu)}; link out ${mb(stats.bytesOutLink)}, in ${mb(stats.bytesInLink)}; return path ${stats.returnBytes} B`,
    `  ${(stats.ms / 1000).toFixed(2)} s`,
  ];
  const c = stats.compression;
  if (c.algorithm) lines.push(`  compression ${c.algorithm}: ${c.framesCompressed} RAW frames compressed (${mb(c.bytesBefore)} -> ${mb(c.bytesAfter)})` + (stats.role === "stream-out" ? `, ${c.framesRaw} raw (${c.rawSlow} compressor slower than the link, ${c.rawPoorRatio} did not compress)` : ""));
  for (const p of stats.passthrough) lines.push(`  pass-through: ${p}`);
  process.stdout.write(lines.join("\n") + "\n");
}

type Values = Record<string, string | boolean | undefined>;

function parse(argv: string[], options: Record<string, { type: "string" | "boolean" }>): Values {
  return parseArgs({ args: argv, options: { ...options, help: { type: "boolean", short: "h" } }, strict: true, allowPositionals: false }).values as Values;
}

async function run(argv: string[], help: string, options: Record<string, { type: "string" | "boolean" }>,
  start: (v: Values, log: (m: string) => void) => Promise<{ done: Promise<StreamStats>; close(): Promise<void> }>): Promise<number> {
  let v: Values;
  try {
    v = parse(argv, options);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n\n${help}\n`);
    return 2;
  }
  if (v["help"]) {
    process.stdout.write(help + "\n");
    return 0;
  }
  const log = v["quiet"] ? () => {} : (m: string) => process.stderr.write(`[pagetwin] ${m}\n`);
  let proxy;
  try {
    proxy = await start(v, log);
  } catch (err) {
    process.stderr.write(`pagetwin: ${(err as Error).message}\n`);
    return err instanceof UsageErr ? 2 : 1;
  }
  const onSig = () => { void proxy.close(); };
  process.once("SIGINT", onSig);
  process.once("SIGTERM", onSig);
  const stats = await proxy.done;
  process.off("SIGINT", onSig);
  process.off("SIGTERM", onSig);
  report(stats, Boolean(v["json"]));
  return stats.error ? 1 : 0;
}

class UsageErr extends Error {}

function need(v: Values, k: string): string {
  const x = v[k];
  if (typeof x !== "string" || !x) throw new UsageErr(`--${k} is required (see --help)`);
  return x;
}

const common = { listen: { type: "string" }, image: { type: "string" }, index: { type: "string" }, keep: { type: "boolean" }, json: { type: "boolean" }, quiet: { type: "boolean" } } as const;

export function runStreamOutCli(argv: string[]): Promise<number> {
  return run(argv, OUT_HELP, { ...common, to: { type: "string" }, window: { type: "string" }, "no-dedup": { type: "boolean" }, compress: { type: "string" }, bandwidth: { type: "string" } }, async (v, log) => {
    const l = listenAddr(v["listen"] as string | undefined, "127.0.0.1", 4446);
    const to = need(v, "to");
    const image = need(v, "image");
    const window = v["window"] ? Number(v["window"]) : undefined;
    if (window !== undefined && !(Number.isInteger(window) && window > 0)) throw new UsageErr("--window must be a positive number of pages");
    let compress: CompressionMode;
    try { compress = parseCompressionMode(v["compress"] as string | undefined); } catch (err) { throw new UsageErr((err as Error).message); }
    let bandwidth = 0;
    try { if (v["bandwidth"]) bandwidth = parseRate(v["bandwidth"] as string); } catch (err) { throw new UsageErr((err as Error).message); }
    return streamOut({
      listenPort: l.port, listenHost: l.host, to, image, log, keep: Boolean(v["keep"]), noDedup: Boolean(v["no-dedup"]), compress, bandwidth,
      ...(v["index"] ? { indexPath: v["index"] as string } : {}), ...(window ? { windowPages: window } : {}),
    });
  });
}

export function runStreamInCli(argv: string[]): Promise<number> {
  return run(argv, IN_HELP, { ...common, qemu: { type: "string" } }, async (v, log) => {
    const l = listenAddr(v["listen"] as string | undefined, "0.0.0.0", 4447);
    return streamIn({
      listenPort: l.port, listenHost: l.host, qemu: need(v, "qemu"), image: need(v, "image"), log, keep: Boolean(v["keep"]),
      ...(v["index"] ? { indexPath: v["index"] as string } : {}),
    });
  });
}
