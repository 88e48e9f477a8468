// `npm run bench`: every benchmark in one run, each printing ratios measured
// side by side. `--json` prints one object; `--quick` uses smaller sizes;
// `--no-qemu` skips the real-guest comparisons (they need root, QEMU and the
// guest of scripts/build-guest.sh, and take about 5 minutes); `--libvirt` adds
// libvirt's own migration against `pagetwin libvirt migrate` (bench/libvirt.ts:
// root, libvirtd and the guest, a few minutes more; `--libvirt-runs N` rounds of
// each, default 1); `--demo-runs N` demo pairs (default 5) and `--stream-runs N`
// stream-mode runs per mode and rate (default 3); `--write FILE` also keeps what it printed as a markdown record (bench/report.ts). The stream
// replay (bench/stream-replay.ts) needs the guest, and QEMU the first time.

import os from "node:os";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { benchHash } from "./hash.js";
import { benchIndexLookup } from "./index-lookup.js";
import { benchQcow2 } from "./qcow2.js";
import { benchPlanner } from "./planner.js";
import { benchPool } from "./pool.js";
import { benchChannel } from "./channel.js";
import { benchStreamReplay } from "./stream-replay.js";
import { benchMultifd } from "./multifd.js";
import { benchLibvirt, type LibvirtBench } from "./libvirt.js";
import { argString, benchArgs } from "./cli.js";
import { median } from "../src/compare/stats.js";
import { Report } from "./report.js";
import { findGuest, qemuAvailable } from "../src/adapters/qemu/vm.js";
import { netnsAvailable } from "../src/adapters/netns/link.js";
import { runComparison, formatComparison } from "../src/compare/agent.js";
import { benchAnalyzePredict } from "./analyze-predict.js";
import { compareStreamMode, formatCompare } from "../src/compare/stream.js";

const args = benchArgs("npm run bench -- [--json] [--quick] [--no-qemu] [--libvirt] [--libvirt-runs N] [--demo-runs N] [--stream-runs N] [--write FILE]:\n  every benchmark in one run, each printing ratios measured side by side (the header of bench/index.ts says more)", ["--json", "--quick", "--no-qemu", "--libvirt", "--libvirt-runs", "--demo-runs", "--stream-runs", "--write"]);
const json = args.includes("--json");
const quick = args.includes("--quick");
const writeTo = argString(args, "--write");

/** A whole number >= 1 given as `flag N`, or `def`. */
function runsArg(flag: string, def: number): number {
  const runs = Number(argString(args, flag) ?? def);
  if (!(Number.isInteger(runs) && runs >= 1)) throw new RangeError(`bench: ${flag} needs a whole number >= 1`);
  return runs;
}

interface DemoRun { mode: string; "total-time": number; downtime: number; verified: boolean; ram: { transferred: number } }
interface DemoJson { runs: DemoRun[]; ratios: Record<string, number> }
if (writeTo && json) throw new Error("bench: --write keeps the printed tables; leave out --json");
// the command as typed, to be recorded with the figures
const command = `${process.env.npm_lifecycle_event === "bench" ? "npm run bench --" : "node dist/bench/index.js"} ${args.join(" ")}`;
const report = writeTo ? new Report(command) : null;
/** Starts a benchmark's part of the output (and of the --write record). */
const part = (title: string) => { if (!json) console.log(""); report?.section(title); };
const machine = { cores: os.cpus().length, cpu: os.cpus()[0]?.model, memoryBytes: os.totalmem(), node: process.version, loadavg: os.loadavg() };
if (!json) console.log(`machine: ${machine.cores} cores (${machine.cpu}), ${(machine.memoryBytes / 2 ** 30).toFixed(1)} GiB, node ${machine.node}, load ${machine.loadavg.map((x) => x.toFixed(2)).join(" ")}`);

part("Page hashing");
const hash = await benchHash({ json: false, quiet: json, mib: quick ? 64 : 256 });
part("Block index lookup");
const lookup = await benchIndexLookup({ quiet: json, blocks: quick ? 1 << 20 : undefined });
part("qcow2 reading vs raw");
const qcow2 = await benchQcow2({ quiet: json, mib: quick ? 64 : 256 });
part("Planner");
const planner = await benchPlanner({ quiet: json, gib: quick ? [1] : [1, 4, 8] });
part("Worker pool");
const pool = await benchPool({ quiet: json, gib: quick ? 1 : 4, memGib: quick ? 2 : 8 });
part("Secure channel vs plain sockets");
const channel = await benchChannel({ quiet: json, mib: quick ? 128 : 512 });
part("Stream mode's proxies vs plain relays (a captured QEMU stream replayed)");
// needs the guest (and QEMU, the first time, to capture its stream)
const streamReplay = findGuest() ? await benchStreamReplay({ quiet: json, rounds: quick ? 1 : 3 }) : { skipped: "the guest is not built (scripts/build-guest.sh)" };
if (!json && "skipped" in streamReplay) console.log(`stream replay: skipped (${streamReplay.skipped})`);
part("multifd channels through the proxies (the same capture, its pages dealt to channels as QEMU deals them)");
const multifd = findGuest() ? await benchMultifd({ quiet: json, runs: quick ? 1 : 2, workers: [0, 2] }) : { skipped: "the guest is not built (scripts/build-guest.sh)" };
if (!json && "skipped" in multifd) console.log(`multifd: skipped (${multifd.skipped})`);
part("End to end: the demo");
// one demo invocation is one pair (plain pre-copy, then pagetwin, same VM, same link); the pairs' ratios vary run to run
const demoRuns = runsArg("--demo-runs", quick ? 1 : 5);
if (!json) console.log(`end to end: the demo (plain pre-copy vs pagetwin, same VM, same link; ${demoRuns} pairs, each ratio from its own pair, then the medians)`);
const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
const demoPairs: DemoJson[] = [];
for (let i = 0; i < demoRuns; i++) {
  const demo = JSON.parse(execFileSync(process.execPath, [cli, "demo", "--json", "--trace", "", ...(quick ? ["--ram-mib", "64"] : [])], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] })) as DemoJson;
  demoPairs.push(demo);
  if (!json) {
    const [b, p] = demo.runs;
    console.log(`  pair ${i + 1}: ${b!.mode} ${b!["total-time"]} ms, ${(b!.ram.transferred / 1e6).toFixed(1)} MB, downtime ${b!.downtime} ms, verified ${b!.verified}; ` +
      `${p!.mode} ${p!["total-time"]} ms, ${(p!.ram.transferred / 1e6).toFixed(1)} MB, downtime ${p!.downtime} ms, verified ${p!.verified}; ratios: time ${demo.ratios["total-time"]}x, bytes ${demo.ratios.transferred}x`);
  }
}
const demo = { pairs: demoPairs, medians: Object.fromEntries(["total-time", "transferred", "downtime"].map((k) => [k, Math.round(median(demoPairs.map((d) => d.ratios[k]!)) * 1000) / 1000])) };
if (!json) console.log(`  pagetwin / baseline, medians of ${demoRuns}: total time ${demo.medians["total-time"]}x, bytes ${demo.medians.transferred}x, downtime ${demo.medians.downtime}x`);
const streamRuns = runsArg("--stream-runs", quick ? 1 : 3);
// The real guest: agent mode and stream mode against QEMU's own migration (plain and multifd+zstd), one run each.
let qemu: { agentMode: unknown; streamMode: unknown; streamMode300: unknown } | { skipped: string } = { skipped: "--no-qemu" };
part("Real guest (QEMU)");
if (args.includes("--no-qemu")) {
  if (!json) console.log("real guest: skipped (--no-qemu); without it, and as root with QEMU and the guest of scripts/build-guest.sh, this part compares agent mode and stream mode with QEMU's own migration");
} else {
  const missing = !qemuAvailable() ? "qemu-system-x86_64 is not installed" : !netnsAvailable() ? "needs root (ip netns, tc)"
    : !findGuest() ? "the guest is not built (scripts/build-guest.sh)" : null;
  if (missing) {
    qemu = { skipped: missing };
    if (!json) console.log(`real guest: skipped (${missing})`);
  } else {
    const log = (m: string) => { if (!json) process.stderr.write(`  ${m}\n`); };
    if (!json) console.log("real guest, agent mode (compare-qemu --workers 2 --workers-when switchover, one run of each):");
    const agentMode = await runComparison({ repeat: 1, workers: 2, workersWhen: "switchover", log });
    if (!json) console.log(formatComparison(agentMode));
    if (!json) console.log(`\nreal guest, stream mode (bench/stream-compare, ${streamRuns} runs of each):`);
    const streamMode = await compareStreamMode({ runs: streamRuns, log });
    if (!json) console.log(formatCompare(streamMode));
    if (!json) console.log(`\nreal guest, stream mode on a 300 Mbit/s link (${streamRuns} runs of each):`);
    const streamMode300 = await compareStreamMode({ runs: streamRuns, rate: "300mbit", log });
    if (!json) console.log(formatCompare(streamMode300));
    qemu = { agentMode, streamMode, streamMode300 };
  }
}
// analyze's prediction against the migration it predicts (agent mode, the real guest)
let analyze: Awaited<ReturnType<typeof benchAnalyzePredict>> = { skipped: "--no-qemu" };
if (!args.includes("--no-qemu") && !("skipped" in qemu)) {
  part("analyze's prediction vs the migration");
  analyze = await benchAnalyzePredict({ quiet: json, runs: quick ? 1 : 3 });
}
// libvirt: only when asked for (it starts two libvirt daemons)
let libvirt: LibvirtBench = { skipped: "--libvirt not given" };
if (args.includes("--libvirt")) {
  part("libvirt: virsh migrate --live vs pagetwin libvirt migrate");
  const runs = runsArg("--libvirt-runs", 1);
  if (!json) console.log(`libvirt (bench/libvirt.ts, ${runs === 1 ? "one run" : `${runs} runs`} of each, alternating, the test guest over a 1 Gbit/s namespace link; medians):`);
  libvirt = await benchLibvirt({ runs, quiet: json });
}
if (json) console.log(JSON.stringify({ machine, hash, lookup, qcow2, planner, pool, channel, streamReplay, multifd, demo, qemu, analyze, libvirt }));
if (writeTo) {
  report!.write(writeTo);
  console.log(`\nwrote ${writeTo}`);
}
