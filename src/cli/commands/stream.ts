// `pagetwin stream-out` / `pagetwin stream-in`: argument parsing, help, and
// the final stats (human-readable, or one JSON object with --json).

import { parseCompressionMode, type CompressionMode } from "../../codec/compress.js";
import { helpText, parse, parseRate, securityOptions, security, UsageError, type CommandSpec } from "../args.js";
import { parseEndpoint } from "../../link/endpoint.js";
import { streamIn } from "../../stream/in.js";
import { streamOut } from "../../stream/out.js";
import type { StreamStats } from "../../stream/stats.js";

const common: CommandSpec["options"] = {
  keep: { type: "boolean", help: "serve further migrations instead of exiting after the first" },
  json: { type: "boolean", help: "print the stats as JSON on stdout" },
  quiet: { type: "boolean", help: "no progress lines on stderr" },
};

const SECURITY_NOTE = `Security of the link (docs/SECURITY.md): give both proxies the same --psk-file (TLS-PSK),
or --tls-cert/--tls-key/--tls-ca with certificates from one CA (TLS 1.3, mutual). Every byte
between the proxies is then encrypted and authenticated. stream-in refuses a peer that fails
the TLS handshake before it connects to QEMU; stream-out sends nothing of QEMU's stream to a
stream-in that failed it. Without either, both refuse to start unless given --insecure.`;

export const outSpec: CommandSpec = {
  name: "stream-out",
  summary: "source-side proxy in QEMU's own migration stream",
  usage: "pagetwin stream-out --to HOST:PORT --image IMAGE [--listen [HOST:]PORT | unix:PATH] (--psk-file KEY | --tls-cert C --tls-key K --tls-ca CA | --insecure) [--json]",
  options: {
    listen: { type: "string", default: "127.0.0.1:4446", help: "where the source QEMU connects: a loopback [HOST:]PORT, or unix:PATH (a 0600 socket: only this user's processes can connect)" },
    to: { type: "string", help: "HOST:PORT (or unix:PATH) of the destination's pagetwin stream-in" },
    image: { type: "string", help: "raw disk image on the NAS (its block index is built or loaded beside it)" },
    index: { type: "string", help: "index file (default IMAGE.pagetwin-index)" },
    "refresh-rate": { type: "string", default: "32MB", help: "a stale index (the image was written since indexing) is used as it is and re-read in the background at this rate (0: not re-read)" },
    window: { type: "string", default: "16384", help: "referenced pages kept for resends until acknowledged (16384 pages = 64 MiB)" },
    "no-dedup": { type: "boolean", help: "forward everything raw (a baseline through the same proxies)" },
    compress: { type: "string", default: "auto", help: "what still travels raw: auto (compress when the compressor outruns the link and the data compresses), off, zstd or brotli" },
    bandwidth: { type: "string", help: "the link's rate if known (e.g. 1gbit, 125MB): auto compares the compressor with it; without it, the rate is measured from the link's backlog" },
    ...securityOptions("stream-in", false),
    ...common,
  },
  details: `Point the source QEMU at it:  migrate tcp:127.0.0.1:PORT  (or migrate unix:PATH)
RAM pages that are copies of blocks of IMAGE (on the NAS both hosts mount)
travel as references; everything else passes through unchanged. stream-in
always checks that it handed its QEMU exactly the stream the source QEMU sent
(length and CRC-32 of the whole stream) and fails the migration otherwise.

${SECURITY_NOTE}`,
};

export const inSpec: CommandSpec = {
  name: "stream-in",
  summary: "destination-side proxy: rebuilds QEMU's migration stream",
  usage: "pagetwin stream-in --qemu HOST:PORT --image IMAGE [--listen [HOST:]PORT] (--psk-file KEY | --tls-cert C --tls-key K --tls-ca CA | --insecure) [--json]",
  options: {
    listen: { type: "string", default: "127.0.0.1:4447", help: "[HOST:]PORT where stream-out connects (give the address stream-out reaches: the default is loopback only), or unix:PATH" },
    qemu: { type: "string", help: "HOST:PORT or unix:PATH, the destination QEMU's -incoming address" },
    image: { type: "string", help: "the same raw disk image, as mounted on this host" },
    index: { type: "string", help: "index file (default IMAGE.pagetwin-index; only its seed and id are read)" },
    ...securityOptions("stream-out", true),
    ...common,
  },
  details: `Start the destination QEMU with -incoming tcp:HOST:PORT first. Every referenced
NAS block is read and its hash checked; a block that no longer matches (or cannot
be read) is asked for from stream-out. QEMU receives the exact byte stream the
source QEMU sent. A peer refused before it authenticated does not end stream-in:
it is reported (stats "refused") and stream-in waits for the real stream-out.

${SECURITY_NOTE}`,
};

/** --listen as stream options: a unix socket, or a host and port. */
function listenAt(v: string | undefined, defHost: string, defPort: number): { listenSocket: string } | { listenHost: string; listenPort: number } {
  const e = parseEndpoint(v ?? String(defPort), "--listen", defHost);
  return e.kind === "unix" ? { listenSocket: e.path } : { listenHost: e.host, listenPort: e.port };
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
  if (stats.streamsVerified) lines.push(`  stream checked end to end (length and CRC-32 equal to the source's): ${stats.streamsVerified} of ${stats.sessions} session(s)`);
  const c = stats.compression;
  if (c.algorithm) lines.push(`  compression ${c.algorithm}: ${c.framesCompressed} RAW frames compressed (${mb(c.bytesBefore)} -> ${mb(c.bytesAfter)})` + (stats.role === "stream-out" ? `, ${c.framesRaw} raw (${c.rawSlow} compressor slower than the link, ${c.rawPoorRatio} did not compress)` : ""));
  for (const p of stats.passthrough) lines.push(`  pass-through: ${p}`);
  for (const r of stats.refused) lines.push(`  refused: ${r}`);
  process.stdout.write(lines.join("\n") + "\n");
}

type Values = Record<string, string | boolean | undefined>;

const prefixed = (msg: string) => (msg.startsWith("pagetwin") ? msg : `pagetwin: ${msg}`);

async function run(argv: string[], spec: CommandSpec,
  start: (v: Values, log: (m: string) => void) => Promise<{ done: Promise<StreamStats>; close(): Promise<void> }>): Promise<number> {
  let v: Values;
  try {
    const p = parse(spec, argv);
    if (p.help) {
      process.stdout.write(helpText(spec) + "\n");
      return 0;
    }
    v = p.values;
  } catch (err) {
    process.stderr.write(`${prefixed((err as Error).message)}\n`);
    return 2;
  }
  const log = v["quiet"] ? () => {} : (m: string) => process.stderr.write(`[pagetwin] ${m}\n`);
  let proxy;
  try {
    proxy = await start(v, log);
  } catch (err) {
    process.stderr.write(`${prefixed((err as Error).message)}\n`);
    return err instanceof UsageError ? 2 : 1;
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

function need(v: Values, k: string): string {
  const x = v[k];
  if (typeof x !== "string" || !x) throw new UsageError(`--${k} is required (see --help)`);
  return x;
}

export function runStreamOutCli(argv: string[]): Promise<number> {
  return run(argv, outSpec, async (v, log) => {
    const l = listenAt(v["listen"] as string | undefined, "127.0.0.1", 4446);
    const to = need(v, "to");
    const image = need(v, "image");
    const window = Number(v["window"]);
    if (!(Number.isInteger(window) && window > 0)) throw new UsageError("--window must be a positive number of pages");
    let compress: CompressionMode;
    try { compress = parseCompressionMode(v["compress"] as string | undefined); } catch (err) { throw new UsageError((err as Error).message); }
    const bandwidth = v["bandwidth"] ? parseRate(v["bandwidth"] as string) : 0;
    return streamOut({
      ...l, to, image, log, keep: Boolean(v["keep"]), noDedup: Boolean(v["no-dedup"]), compress, bandwidth,
      windowPages: window, ...security(v), refreshRate: parseRate(v["refresh-rate"] as string),
      ...(v["index"] ? { indexPath: v["index"] as string } : {}),
    });
  });
}

export function runStreamInCli(argv: string[]): Promise<number> {
  return run(argv, inSpec, async (v, log) => {
    const l = listenAt(v["listen"] as string | undefined, "127.0.0.1", 4447);
    return streamIn({
      ...l, qemu: need(v, "qemu"), image: need(v, "image"), log, keep: Boolean(v["keep"]),
      ...security(v),
      ...(v["index"] ? { indexPath: v["index"] as string } : {}),
    });
  });
}
