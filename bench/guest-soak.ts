// Many migrations of the real guest per mode, interleaved, each destination
// outcome classified: the counter went on, the guest panicked (a kernel
// failure on the destination's serial console, a GUEST_PANICKED / SHUTDOWN /
// RESET event from the destination QEMU, or its counter starting again), or
// another failure. For whether the destination-guest panics follow the
// proxies or any relay in their place (mode relay: plain socket.pipe()).
//   node dist/bench/guest-soak.js --runs N --modes qemu,relay,pagetwin [--rate 1gbit]
//     [--watch-s 5] [--panics FILE] [--jsonl FILE] [--json]
import * as fs from "node:fs";
import { parseArgs } from "node:util";
import type { QemuVm } from "../src/adapters/qemu/vm.js";
import { ALL_MODES, openCompareSetup, runOnce, type CompareMode, type DestinationWatch, type RunResult } from "../src/compare/stream.js";
import { counterRestarted, firstCounter, kernelFailure, lastCounter } from "../src/compare/guest.js";
import { isMain } from "./cli.js";

export type Outcome = "ok" | "panic" | "other";
/** What the destination showed by the end of a run. */
export interface DestinationSeen { serial: string; events: string[]; watchError?: string; diagnosis?: string }
export interface Classified { mode: CompareMode; run: number; outcome: Outcome; why: string; excerpt?: string; counters: string; events: string[] }

const PANIC_EVENTS = /^(GUEST_PANICKED|SHUTDOWN|RESET)\b/;

/** The destination's outcome from the run's result and what it printed and signalled. */
export function classify(res: RunResult, seen: DestinationSeen): Omit<Classified, "mode" | "run" | "events"> {
  const counters = `${res.lastSourceCounter} -> ${res.firstDestCounter}..${lastCounter(seen.serial)}`;
  const failure = kernelFailure(seen.serial);
  const ev = seen.events.find((e) => PANIC_EVENTS.test(e));
  const restarted = counterRestarted(seen.serial) || (res.firstDestCounter >= 0 && res.firstDestCounter < res.lastSourceCounter - 1);
  if (failure || ev || restarted) {
    const why = [failure && "kernel failure on the serial console", ev && `event ${ev}`, restarted && "counter started again"].filter(Boolean).join(", ");
    return { outcome: "panic", why, excerpt: failure ?? seen.serial.slice(-3000), counters };
  }
  if (res.ok && !seen.watchError) return { outcome: "ok", why: "counter continued", counters };
  const why = [res.error?.split("\n")[0], seen.watchError].filter(Boolean).join("; ") || "unknown";
  return { outcome: "other", why, excerpt: [seen.diagnosis, seen.serial.slice(-1500)].filter(Boolean).join("\n"), counters };
}

/** Records the destination's QMP events, then watches its counter go on for `watchS` seconds after the run. */
class Watch implements DestinationWatch {
  events: string[] = [];
  seen: DestinationSeen | undefined;
  constructor(private readonly watchS: number, private readonly lateS = 60) {}
  started(dst: QemuVm): void {
    dst.qmp.on("event", (ev) => this.events.push(`${ev.event}${ev.data ? ` ${JSON.stringify(ev.data)}` : ""}`));
  }
  async finished(dst: QemuVm, res: RunResult): Promise<void> {
    let watchError: string | undefined;
    if (res.ok) {
      const until = res.firstDestCounter + this.watchS;
      await dst.waitForSerial(new RegExp(`pagetwin-counter ${until}\\b`), this.watchS * 1000 + 20_000)
        .catch((e: Error) => { watchError = `counter did not reach ${until}: ${e.message.split("\n")[0]}`; });
    }
    const diagnosis = !res.ok && dst.running && firstCounter(dst.serialLog()) < 0 ? await this.silent(dst) : undefined;
    if (diagnosis) watchError = diagnosis.split("\n")[0];
    this.seen = { serial: dst.serialLog(), events: this.events, ...(watchError ? { watchError } : {}), ...(diagnosis ? { diagnosis } : {}) };
  }

  /** A running destination that never printed a counter: only slow under load, or hung? Waits longer, then keeps where its CPU is. */
  private async silent(dst: QemuVm): Promise<string> {
    const late = await dst.waitForSerial(/pagetwin-counter (\d+)/, this.lateS * 1000).then(() => true, () => false);
    const status = await dst.qmp.execute("query-status").then((s) => (s as { status: string }).status, (e: Error) => e.message);
    const regs = await dst.qmp.execute("human-monitor-command", { "command-line": "info registers" }).then(String, (e: Error) => e.message);
    const head = late ? `its first counter came more than 30 s after RESUME` : `no counter ${this.lateS} s more (QEMU status ${status}): hung`;
    return `${head}\n${regs.split("\n").slice(0, 8).join("\n")}`;
  }
}

export function formatSoak(modes: CompareMode[], all: Classified[]): string {
  const rows = [["mode", "runs", "ok", "panics", "other"]];
  for (const m of modes) {
    const r = all.filter((c) => c.mode === m);
    rows.push([m, ...[r.length, ...(["ok", "panic", "other"] as const).map((o) => r.filter((c) => c.outcome === o).length)].map(String)]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  return rows.map((row) => row.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd()).join("\n");
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: "string", default: "10" }, modes: { type: "string", default: "qemu,relay,pagetwin" }, rate: { type: "string", default: "1gbit" },
      "watch-s": { type: "string", default: "5" }, panics: { type: "string", default: "guest-soak-panics.txt" }, jsonl: { type: "string" },
      json: { type: "boolean" },
    },
  });
  const modes = values.modes!.split(",") as CompareMode[];
  for (const m of modes) if (!ALL_MODES.includes(m)) throw new Error(`--modes: unknown "${m}" (use ${ALL_MODES.join(", ")})`);
  // The first Ctrl-C / SIGTERM stops after the run under way (everything removed, the table printed);
  // a second exits through process.exit, whose hooks remove the VMs and namespaces.
  let stopping = false;
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.on(sig, () => {
      if (stopping) process.exit(130);
      stopping = true;
      process.stderr.write("[soak] stopping after the run under way\n");
    });
  }
  const opts = { rate: values.rate!, log: (m: string) => process.stderr.write(`[soak] ${m}\n`) };
  const setup = await openCompareSetup(opts);
  const all: Classified[] = [];
  try {
    for (let i = 0; i < Number(values.runs) && !stopping; i++) {
      for (const mode of modes) {
        if (stopping) break;
        const watch = new Watch(Number(values["watch-s"]));
        const res = await runOnce(mode, setup.link, setup.guest, { ...opts, indexPath: setup.indexPath, watchDestination: watch }, i);
        const c = { mode, run: i, events: watch.events, ...classify(res, watch.seen ?? { serial: "", events: watch.events, watchError: "destination never started" }) };
        all.push(c);
        process.stderr.write(`[soak] run ${i} ${mode}: ${c.outcome} (${c.why}; counters ${c.counters})\n`);
        if (values.jsonl) fs.appendFileSync(values.jsonl, `${JSON.stringify({ ...c, rate: values.rate, time: new Date().toISOString() })}\n`);
        if (c.outcome === "panic") {
          fs.appendFileSync(values.panics!, `=== ${new Date().toISOString()} run ${i} ${mode}, ${values.rate}: ${c.why}; counters ${c.counters}\n${c.excerpt}\n\n`);
        }
      }
    }
  } finally {
    setup.close();
  }
  if (values.json) console.log(JSON.stringify(all, null, 2));
  else console.log(`guest soak, link ${values.rate}, destination watched ${values["watch-s"]} s after its first counter\n${formatSoak(modes, all)}`);
}

if (isMain(import.meta.url)) await main();
