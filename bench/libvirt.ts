// A libvirt guest migrated with plain `virsh migrate --live` and with
// `pagetwin libvirt migrate`, side by side, over the same 1 Gbit/s namespace
// link between two libvirt daemons (test/helpers/libvirt.ts): bytes on the
// veth, wall time of the migration command, and libvirt's downtime.
//   node dist/bench/libvirt.js [--runs N] [--json]
// Plain runs go from host a to b, pagetwin runs back from b to a (the link is
// shaped the same both ways), alternating, on the same running guest.
import { parseArgs } from "node:util";
import { spawn } from "node:child_process";
import { LibvirtPair, skipLibvirt, type LibvirtHost, type PairService } from "../test/helpers/libvirt.js";
import { cliPath } from "../test/helpers/cli.js";
import { parseSize } from "../src/libvirt/job.js";

const { values } = parseArgs({ options: { runs: { type: "string", default: "1" }, json: { type: "boolean" } } });
const G = "pt-bench";

interface Row { mode: "virsh" | "pagetwin"; run: number; ok: boolean; linkBytes: number; wallMs: number; downtimeMs?: number; streamBytes?: number; note?: string }

function run(cmd: string, args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "", err = "";
    p.stdout.on("data", (d: Buffer) => { out += d; });
    p.stderr.on("data", (d: Buffer) => { err += d; });
    p.on("close", (code) => resolve({ code, out, err }));
  });
}

/** libvirt's figures of the last completed migration, as the destination keeps them. */
async function completed(host: LibvirtHost): Promise<{ downtimeMs?: number; streamBytes?: number }> {
  try {
    const info = await host.virsh.jobInfo(G, ["--completed"]);
    const d = /^(\d+)/.exec(info.get("Total downtime") ?? "")?.[1];
    const bytes = parseSize(info.get("Data processed"));
    return { ...(d ? { downtimeMs: Number(d) } : {}), ...(bytes !== undefined ? { streamBytes: bytes } : {}) };
  } catch {
    return {};
  }
}

async function migrate(pair: LibvirtPair, mode: Row["mode"], from: LibvirtHost, to: LibvirtHost, services: Map<LibvirtHost, PairService>, i: number): Promise<Row> {
  const xml = await pair.destXml(G, from, to);
  const tx0 = pair.link.txBytes(from.ns);
  const t0 = performance.now();
  const r = mode === "virsh"
    ? await run("virsh", ["-c", from.uri, "migrate", "--live", G, to.uri, "--migrateuri", `tcp://${to.ip}:49400`, "--xml", xml])
    : await run(process.execPath, [cliPath, "libvirt", "migrate", G, to.uri, "-c", from.uri, "--control", services.get(from)!.control, "--peer", services.get(to)!.peer, "--xml", xml, "--quiet"]);
  const wallMs = performance.now() - t0;
  const linkBytes = pair.link.txBytes(from.ns) - tx0;
  return { mode, run: i, ok: r.code === 0, linkBytes, wallMs, ...(await completed(to)), ...(r.code === 0 ? {} : { note: r.err.trim().slice(-300) }) };
}

const skip = skipLibvirt();
if (skip) {
  console.log(`libvirt bench skipped: ${skip}`);
  process.exit(0);
}
for (const sig of ["SIGINT", "SIGTERM"] as const) process.once(sig, () => process.exit(130));
const pair = await LibvirtPair.start();
const rows: Row[] = [];
try {
  const services = new Map<LibvirtHost, PairService>();
  for (const h of pair.hosts) services.set(h, await pair.startService(h));
  await pair.startGuest(pair.a, G);
  for (let i = 1; i <= Number(values.runs); i++) {
    rows.push(await migrate(pair, "virsh", pair.a, pair.b, services, i));
    rows.push(await migrate(pair, "pagetwin", pair.b, pair.a, services, i));
  }
} finally {
  await pair.close();
}
const median = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.floor((s.length - 1) / 2)]! : NaN; };
const summary = (["virsh", "pagetwin"] as const).map((mode) => {
  const ok = rows.filter((r) => r.mode === mode && r.ok);
  return { mode, runs: ok.length, linkBytes: median(ok.map((r) => r.linkBytes)), wallMs: median(ok.map((r) => r.wallMs)), downtimeMs: median(ok.flatMap((r) => (r.downtimeMs !== undefined ? [r.downtimeMs] : []))) };
});
const [v, p] = summary;
const ratios = { linkBytes: p!.linkBytes / v!.linkBytes, wallMs: p!.wallMs / v!.wallMs };
if (values.json) console.log(JSON.stringify({ rows, summary, ratios }, null, 2));
else {
  console.log("| mode | runs | bytes on the link | migration command | downtime (libvirt) |");
  console.log("|---|---|---|---|---|");
  for (const s of summary) console.log(`| ${s.mode === "virsh" ? "virsh migrate --live" : "pagetwin libvirt migrate"} | ${s.runs} | ${(s.linkBytes / 1e6).toFixed(1)} MB | ${(s.wallMs / 1000).toFixed(1)} s | ${Number.isFinite(s.downtimeMs) ? `${s.downtimeMs} ms` : "-"} |`);
  console.log(`\npagetwin / virsh: bytes on the link ${ratios.linkBytes.toFixed(3)}×, time ${ratios.wallMs.toFixed(2)}×`);
  for (const r of rows.filter((x) => !x.ok)) console.log(`failed: ${r.mode} run ${r.run}: ${r.note}`);
}
