// Mutation testing (`npm run mutate`, not run in CI): StrykerJS mutates the
// TypeScript in src/, builds the mutated tree once with tsc (mutants are
// switched at run time, not rebuilt), and drives a focused set of node:test
// files over dist/ for each mutant. One target per run, so that a run fits
// on a small machine: MUTATE=<target> npm run mutate (see docs/TESTING.md).
// The targets are the modules that carry pagetwin's guarantees.

import { readFileSync } from "node:fs";

// Targets name code by its text, not its line numbers, so that they follow it as files change: `block(file,
// from, to)` is from the first line holding `from` to the end of the block (a method, a function) that opens on
// the first line from there holding `to` (default: `from`'s own); `lines(file, from, to)` ends on `to`'s line.
const source = (file) => readFileSync(file, "utf8").split("\n");
function lineOf(text, needle, from = 0) {
  const i = text.findIndex((l, k) => k >= from && l.includes(needle));
  if (i < 0) throw new Error(`stryker.config.mjs: no line holds ${JSON.stringify(needle)}`);
  return i;
}
function lines(file, from, to = from) {
  const t = source(file), a = lineOf(t, from);
  return `${file}:${a + 1}-${lineOf(t, to, a) + 1}`;
}
function block(file, from, to = from) {
  const t = source(file), a = lineOf(t, from), o = lineOf(t, to, a);
  const close = t[o].match(/^\s*/)[0] + "}";
  return `${file}:${a + 1}-${t.findIndex((l, k) => k > o && l.startsWith(close) && l.trim().length <= 2) + 1}`;
}
const IN = "src/stream/in.ts", DEST = "src/agent/destination-session.ts", SEC = "src/link/security.ts";

const node = (files, pattern, flags = "") =>
  `node --test --test-concurrency=1${flags}${pattern ? ` --test-name-pattern="${pattern}"` : ""} ${files.map((f) => `dist/test/${f}.test.js`).join(" ")}`;

/** Per target: what is mutated (files, or file:line ranges) and the tests that must kill it. */
export const targets = {
  "replay-window": { mutate: ["src/stream/replay-window.ts"], command: node(["replay-window"]) },
  convergence: { mutate: ["src/plan/convergence.ts"], command: node(["planner"]) },
  // the planner's joins: the bit-vector logic that sorts dirty pages into send / map / zero (planWindow to
  // recordSent), and collect(), which joins the windows' plans into one iteration's
  planner: {
    mutate: [block("src/plan/planner.ts", "planWindow(first: number, count: number)", "recordSent(page: number"), block("src/plan/planner.ts", "export function collect(")],
    command: node(["planner"]),
  },
  // the destination's verification: Refs check, what is held, the verdict at switchover, hashing what was written
  destination: {
    mutate: [lines(DEST, "private refs(f: Frame)", 'r.status = "completed";'), block(DEST, "private hashRam(", "private ramDigest("), "src/agent/page-writer.ts"],
    // fastest tests first, each stage stopping the chain (a mutant killed early costs only its first stages):
    // the verdict's refusals and the baseline; the other checks; RAM over 4096 pages (the slowest, ~half the time)
    command: ["^(baseline|a source announcing|held: a twin)", "^(twins whose|--verify|the verdict covers|NAS references|the device state|held does not|an IterEnd)", "^RAM over"]
      .map((p) => node(["verdict"], p)).join(" && "),
  },
  // stream-in's rebuild of REFS frames, NEED/RESEND, the end-to-end check at END: onResend, step()'s
  // dispatch and END, toQemu()'s length and CRC, rebuildRefs, resend, checkEnd to compareEnd
  // (not the timing and flow-control counters around them, nor multifdRefs(): these tests send no MREFS frame)
  "stream-in": {
    mutate: [
      block(IN, "private onResend("),
      lines(IN, "if (f.type === SFrame.Raw || f.type === SFrame.RawZ) {", "} else if (f.type === SFrame.Refs"),
      lines(IN, "if (f.type !== SFrame.End) return false;", "if (!this.qemu!.destroyed) this.qemu!.end();"),
      lines(IN, "this.streamBytes += buf.length;", "mem.write(q, buf, from);"),
      block(IN, "private async rebuildRefs("),
      block(IN, "private async resend(", "private compareEnd("),
    ],
    // fastest tests first, each stage stopping the chain: a mutant killed early costs only its first stages;
    // a mutant that hangs a session fails at its test's own timeout, and the run exits with sockets still open
    command: ["^(stream-in's|a small)", "^runs of", "^(stream checked|stream fault: the NAS)"].map((p) => node(["stream-faults"], p, " --test-force-exit")).join(" && "),
  },
  // the handshake, in two targets so that each run stays short (security.test.js's key-file and CLI tests spawn
  // the CLI and touch none of these lines, so they are never run). security: which links are refused by the
  // options given to TLS (resolveSecurity, serverOptions to unverifiedPeer: versions, ciphers, the PSK identity,
  // the certificate check); the option unit test first, then the refusals, then the migrations through a relay
  security: {
    mutate: [block(SEC, "export function resolveSecurity("), block(SEC, "export function serverOptions(", "export function unverifiedPeer(")],
    command: ["^(handshake: TLS options|handshake: the reason|a destination agent without)", "^(handshake: a certificate|TLS: a source|the destination refuses)", "^(key: a migration|on-path|canary)"]
      .map((p) => node(["security"], p, " --test-force-exit")).join(" && "),
  },
  // listen: the listener's door (createServer to authenticated: the handshake cap, its deadline, refusals, the
  // refusal frame); the listener's own tests first, then the refusals, then the migrations
  listen: {
    mutate: [block("src/link/listen.ts", "private static createServer(", "private authenticated(")],
    command: ["^handshake: (silent|a silent|a certificate|a local)", "^(TLS: a source|the destination refuses|on-path relay changing)", "^(key: a migration|canary)"]
      .map((p) => node(["security"], p, " --test-force-exit")).join(" && "),
  },
};

const which = process.env.MUTATE ?? "replay-window";
const t = targets[which];
if (!t) throw new Error(`stryker.config.mjs: MUTATE=${which} is not a target (${Object.keys(targets).join(", ")})`);

export default {
  testRunner: "command",
  commandRunner: { command: t.command },
  buildCommand: "npx tsc -p tsconfig.json",
  mutate: t.mutate,
  coverageAnalysis: "off",
  concurrency: 1,
  // a mutant that hangs a migration is a kill by timeout: do not wait long for it
  timeoutMS: 5000,
  ignorePatterns: ["dist", ".cache", ".stryker-tmp", "web/dist", "reports", "*.log"],
  // the mutated tree is built by tsc; assembly/ (AssemblyScript) is not TypeScript Stryker can parse
  disableTypeChecks: "{src,test,bench}/**/*.ts",
  reporters: ["clear-text", "progress", "json"],
  jsonReporter: { fileName: `reports/mutation/${which}.json` },
  tempDirName: `.stryker-tmp/${which}`,
  cleanTempDir: true,
};
