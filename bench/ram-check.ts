// Plain QEMU, no pagetwin: does a TCG migration deliver the guest's RAM as it
// was when the source stopped? Boots the test guest, migrates it from QEMU to
// QEMU over a unix socket again and again (each destination the next source),
// and after each migration compares the stopped source's RAM file with the
// destination's, paused (-S) before it runs, page by page; then lets the
// destination run and checks its counter goes on. Modes, alternated chain by
// chain: "exact" (RAM of exactly --memory-mib, a multiple of 256 KiB, as QEMU
// < 9.0 mishandles under TCG) and "padded" (QemuVm's default: TCG_RAM_PAD_KIB more).
//   node dist/bench/ram-check.js [--migrations 20] [--chain 5] [--modes exact,padded]
//     [--memory-mib 256] [--append "..."] [--watch-s 3] [--jsonl FILE]
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { parseArgs } from "node:util";
import { DEFAULT_APPEND, QEMU_UNTHROTTLED, QemuVm, findGuest, type GuestImage } from "../src/adapters/qemu/vm.js";
import { CpuMeter } from "../src/adapters/proc/cpu.js";
import { kernelFailure, lastCounter } from "../src/compare/guest.js";
import { diffRamFiles } from "../src/adapters/ram/ram-diff.js";
import { median } from "../src/compare/stats.js";
import { isMain } from "./cli.js";

export type RamMode = "exact" | "padded";
export interface Migration { mode: RamMode; staleOffsets: number[]; stalePages: number; guestOk: boolean; why?: string; console?: string; sourceCpuMs: number; downtimeMs: number }
interface Opts { memoryMiB: number; append: string; watchS: number; dir: string; log: (m: string) => void }

/** One chain: boots a guest, then up to `hops` migrations, each destination the next source; stops early once a guest fails. */
export async function runChain(mode: RamMode, hops: number, guest: GuestImage, o: Opts, done: (m: Migration) => void): Promise<void> {
  let n = 0;
  const start = (incoming?: string): Promise<QemuVm> => {
    const id = `${mode}-${n++}`;
    return QemuVm.start({
      ...guest, append: o.append, memoryMiB: o.memoryMiB, exactRam: mode === "exact", memPath: `/dev/shm/pt-ramcheck-${process.pid}-${id}`,
      qmpSocket: path.join(o.dir, `${id}.qmp`), serialLog: path.join(o.dir, `${id}.log`), name: `pt-ramcheck-${id}`,
      ...(incoming ? { incoming, extraArgs: ["-S"] } : {}),
    });
  };
  let src: QemuVm | null = await start();
  try {
    await src.waitForSerial(/pagetwin-counter 2\b/, 600_000);
    for (let hop = 0; hop < hops && src; hop++) {
      const sock = path.join(o.dir, `mig-${n}.sock`);
      const dst: QemuVm = await start(`unix:${sock}`);
      try {
        const m = await migrateAndCompare(mode, src, dst, sock, o);
        done(m);
        await src.cleanup();
        src = m.guestOk ? dst : null;
      } finally {
        if (src !== dst) await dst.cleanup();
      }
    }
  } finally {
    await src?.cleanup();
  }
}

async function untilStatus(vm: QemuVm, final: string[]): Promise<Record<string, any>> {
  for (;;) {
    const info = await vm.qmp.execute<Record<string, any>>("query-migrate");
    if (final.includes(info["status"])) return info;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function migrateAndCompare(mode: RamMode, src: QemuVm, dst: QemuVm, sock: string, o: Opts): Promise<Migration> {
  await src.qmp.execute("migrate-set-parameters", { "max-bandwidth": QEMU_UNTHROTTLED });
  const cpu = new CpuMeter();
  cpu.start({ src: src.pid });
  await src.qmp.execute("migrate", { uri: `unix:${sock}` });
  const info = await untilStatus(src, ["completed", "failed", "cancelled"]);
  const sourceCpuMs = cpu.stop()["src"]!;
  if (info["status"] !== "completed") throw new Error(`migration ${info["status"]}: ${info["error-desc"] ?? ""}`);
  await untilStatus(dst, ["completed", "failed"]);
  const diff = diffRamFiles(src.options.memPath, dst.options.memPath);
  const last = lastCounter(src.serialLog());
  await dst.qmp.execute("cont");
  const m: Migration = { mode, staleOffsets: diff.offsets, stalePages: diff.differing, guestOk: true, sourceCpuMs, downtimeMs: info["downtime"] };
  try {
    await dst.waitForSerial(new RegExp(`pagetwin-counter ${last + 1 + o.watchS}\\b`), o.watchS * 1000 + 30_000);
  } catch (e) {
    m.guestOk = false;
    m.why = (e as Error).message.split("\n")[0];
    const serial = dst.serialLog();
    m.console = kernelFailure(serial, 3000) ?? serial.slice(-1500);
  }
  o.log(`${mode}: ${m.stalePages} stale pages${m.stalePages ? ` (at ${m.staleOffsets.map((x) => `0x${x.toString(16)}`).join(" ")})` : ""}, ` +
    `guest ${m.guestOk ? "went on" : `FAILED: ${m.why}`}; source QEMU CPU ${sourceCpuMs.toFixed(0)} ms, downtime ${m.downtimeMs} ms`);
  return m;
}

export function formatRamCheck(modes: RamMode[], all: Migration[]): string {
  const rows = [["mode", "migrations", "with stale pages", "stale pages", "guest failures", "source QEMU CPU (median)"]];
  for (const mode of modes) {
    const r = all.filter((m) => m.mode === mode);
    rows.push([mode, String(r.length), String(r.filter((m) => m.stalePages > 0).length), String(r.reduce((s, m) => s + m.stalePages, 0)),
      String(r.filter((m) => !m.guestOk).length), `${median(r.map((m) => m.sourceCpuMs)).toFixed(0)} ms`]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  return rows.map((row) => row.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd()).join("\n");
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      migrations: { type: "string", default: "20" }, chain: { type: "string", default: "5" }, modes: { type: "string", default: "exact,padded" },
      "memory-mib": { type: "string", default: "256" }, append: { type: "string", default: `${DEFAULT_APPEND} pt_read=0` },
      "watch-s": { type: "string", default: "3" }, jsonl: { type: "string" },
    },
  });
  const modes = values.modes!.split(",") as RamMode[];
  for (const m of modes) if (m !== "exact" && m !== "padded") throw new Error(`--modes: unknown "${m}" (use exact, padded)`);
  const guest = findGuest();
  if (!guest) throw new Error("guest not built: run scripts/build-guest.sh");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pt-ramcheck-"));
  const o: Opts = { memoryMiB: Number(values["memory-mib"]), append: values.append!, watchS: Number(values["watch-s"]), dir, log: (m) => process.stderr.write(`[ram-check] ${m}\n`) };
  const per = Number(values.migrations), chain = Number(values.chain);
  const all: Migration[] = [];
  let stopping = false;
  process.once("SIGINT", () => { stopping = true; process.stderr.write("[ram-check] stopping after the chain under way\n"); });
  try {
    const left = (mode: RamMode) => per - all.filter((m) => m.mode === mode).length;
    while (!stopping && modes.some((m) => left(m) > 0)) {
      for (const mode of modes) {
        if (stopping || left(mode) <= 0) continue;
        await runChain(mode, Math.min(chain, left(mode)), guest, o, (m) => {
          all.push(m);
          if (values.jsonl) fs.appendFileSync(values.jsonl, `${JSON.stringify({ ...m, memoryMiB: o.memoryMiB, time: new Date().toISOString() })}\n`);
        });
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`RAM after plain QEMU migrations under TCG, ${o.memoryMiB} MiB guest (source stopped vs destination before it runs)\n${formatRamCheck(modes, all)}`);
}

if (isMain(import.meta.url)) await main();
