// `pagetwin libvirt`: the domain XML, virsh option and job parsers always;
// with libvirtd, virsh, QEMU and the guest installed (scripts/install-deps.sh),
// two libvirt daemons on one machine (helpers/libvirt.ts) and the test guest
// with two disks migrated live between them through the command.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { domainDisks, domainUuid, twinDisks, unescapeXml } from "../src/libvirt/domain-xml.js";
import { splitArgs } from "../src/libvirt/virsh-options.js";
import { jobProgress, parseSize } from "../src/libvirt/job.js";
import { bandwidthArg, migrateArgs, virshHint } from "../src/libvirt/migrate.js";
import { UsageError } from "../src/errors.js";
import { virshAvailable } from "../src/adapters/libvirt/virsh.js";
import { ServeClient } from "../src/serve/client.js";
import { DEFAULT_QEMU_SOCKETS } from "../src/serve/qemu-sockets.js";
import { cliPath, jsonLines, jsonResult } from "./helpers/cli.js";
import { LibvirtPair, QEMU_USER, SERVE_PEER_PORT, qemuIds, skipLibvirt, type LibvirtHost, type PairService } from "./helpers/libvirt.js";
import { replayShows } from "./helpers/trace-page.js";
import { TraceModel } from "../src/trace/model.js";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Runs `pagetwin libvirt ...` to its end: exit code, stdout, stderr. */
function cli(args: string[], timeoutMs = 180_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [cliPath, "libvirt", ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "", stderr = "";
    p.stdout.on("data", (d: Buffer) => { stdout += d; });
    p.stderr.on("data", (d: Buffer) => { stderr += d; });
    const t = setTimeout(() => { p.kill("SIGKILL"); reject(new Error(`pagetwin libvirt ${args.join(" ")}: no end in ${timeoutMs} ms; ${stderr}`)); }, timeoutMs);
    p.once("close", (code) => { clearTimeout(t); resolve({ code, stdout, stderr }); });
  });
}

const skip = skipLibvirt();
const virshMissing = virshAvailable() ? false : "virsh not installed (apt-get install libvirt-clients)";

// ------------------------------------------------------------ parsers

const XML = `<domain type='kvm' id='3'>
  <name>web1</name>
  <uuid>5974a1b2-0000-4000-8000-00000000abcd</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/nas/web&apos;s disk.img' index='2'/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2"/>
      <source file="/nas/data.qcow2"/>
      <backingStore type='file'><format type='raw'/><source file='/nas/base.img'/></backingStore>
      <target dev="vdb" bus="virtio"/>
      <shareable/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='vmdk'/>
      <source dev='/dev/mapper/vm'/>
      <target dev='vdd'/>
    </disk>
  </devices>
</domain>`;

test("domainDisks reads each disk's target, source (its own, not its backing store's), format and flags", () => {
  const d = domainDisks(XML);
  assert.deepEqual(d.map((x) => [x.target, x.type, x.device, x.source, x.format]), [
    ["vda", "file", "disk", "/nas/web's disk.img", "raw"],
    ["vdb", "file", "disk", "/nas/data.qcow2", "qcow2"],
    ["vdc", "network", "disk", undefined, undefined],
    ["sda", "file", "cdrom", "/iso/install.iso", undefined],
    ["vdd", "block", "disk", "/dev/mapper/vm", "vmdk"],
  ]);
  assert.deepEqual(d.map((x) => [x.readonly, x.shareable]), [[true, false], [false, true], [false, false], [false, false], [false, false]]);
  assert.equal(domainUuid(XML), "5974a1b2-0000-4000-8000-00000000abcd");
  assert.equal(unescapeXml("a&amp;b&lt;&#65;&#x42;"), "a&b<AB");
});

test("twinDisks keeps local raw and qcow2 disks and says why it leaves out the others", () => {
  const { usable, skipped } = twinDisks(domainDisks(XML));
  assert.deepEqual(usable.map((d) => d.target), ["vda", "vdb"]);
  assert.deepEqual(skipped, [
    { target: "vdc", reason: "a network disk without a local path" },
    { target: "sda", reason: "a cdrom" },
    { target: "vdd", reason: "format vmdk" },
  ]);
});

const SPEC = { connect: { type: "string", short: "c" }, json: { type: "boolean" }, xml: { type: "string" } } as const;

test("splitArgs: pagetwin's options, the positionals, virsh's options with their values in order", () => {
  const a = splitArgs(["-c", "qemu:///system", "web1", "--p2p", "--timeout", "30", "qemu+tcp://b/system", "--json", "--bandwidth=100", "--xml", "d.xml", "--live", "--verbose", "--persistent"], SPEC);
  assert.deepEqual(a.values, { connect: "qemu:///system", json: true, xml: "d.xml" });
  assert.deepEqual(a.positionals, ["web1", "qemu+tcp://b/system"]);
  assert.deepEqual(a.virsh, ["--p2p", "--timeout", "30", "--bandwidth=100", "--persistent"]);
  assert.deepEqual(a.notes, []);
});

test("splitArgs refuses --tunnelled and --offline, and notes what passes through without dedup", () => {
  assert.throws(() => splitArgs(["d", "u", "--tunnelled"], SPEC), (e: unknown) => e instanceof UsageError && /no proxy can be/.test((e as Error).message));
  assert.throws(() => splitArgs(["d", "u", "--offline"], SPEC), UsageError);
  assert.throws(() => splitArgs(["d", "u", "--timeout"], SPEC), /--timeout needs a value/);
  assert.throws(() => splitArgs(["d", "u", "--xml"], SPEC), /--xml needs a value/);
  const a = splitArgs(["d", "u", "--parallel", "--parallel-connections", "4", "--tls"], SPEC);
  assert.deepEqual(a.virsh, ["--parallel", "--parallel-connections", "4", "--tls"]);
  assert.equal(a.notes.length, 1, "--parallel's multifd channels get dedup: no note");
  assert.match(a.notes[0]!, /--tls/);
});

test("virshHint: what to do about libvirt's postcopy refusal; nothing for other messages", () => {
  assert.match(virshHint("internal error: unable to execute QEMU command 'migrate-set-capabilities': Postcopy is not supported"), /sysctl vm\.unprivileged_userfaultfd=1/);
  assert.equal(virshHint("operation failed: job 'migration out' failed: Unable to write to socket"), "");
});

test("migrateArgs: always --live, virsh's options, then the ends' addresses and --xml", () => {
  assert.deepEqual(migrateArgs({ domain: "d", destUri: "u", virshArgs: ["--p2p"], xml: "x.xml" }, { migrateUri: "tcp://127.0.0.1:49152", listenAddress: "127.0.0.1" }),
    ["migrate", "--live", "--p2p", "d", "u", "--migrateuri", "tcp://127.0.0.1:49152", "--listen-address", "127.0.0.1", "--xml", "x.xml"]);
  assert.deepEqual(migrateArgs({ domain: "d", destUri: "u" }, {}), ["migrate", "--live", "d", "u"]);
});

test("--bandwidth: read from virsh's options; the ends' QEMU bandwidth replaces the user's in virsh's command line", () => {
  assert.equal(bandwidthArg(["--p2p", "--bandwidth", "40"]), 40);
  assert.equal(bandwidthArg(["--bandwidth=25", "--timeout", "3"]), 25);
  assert.equal(bandwidthArg(["--timeout", "3"]), undefined);
  assert.equal(bandwidthArg(["--bandwidth", "0"]), undefined);
  assert.deepEqual(migrateArgs({ domain: "d", destUri: "u", virshArgs: ["--bandwidth", "40", "--p2p", "--bandwidth=7"] }, { qemuBandwidthMiBs: 99 }),
    ["migrate", "--live", "--p2p", "--bandwidth", "99", "d", "u"]);
  assert.deepEqual(migrateArgs({ domain: "d", destUri: "u", virshArgs: ["--bandwidth", "40"] }, {}), ["migrate", "--live", "--bandwidth", "40", "d", "u"]);
});

test("jobProgress reads domjobinfo's sizes and gives virsh --verbose's percent", () => {
  assert.equal(parseSize("38.125 MiB"), 39976960);
  assert.equal(parseSize("0.000 B"), 0);
  assert.equal(parseSize("12 parsecs"), undefined);
  const info = new Map([["Time elapsed", "5770         ms"], ["Data processed", "38.125 MiB"], ["Data remaining", "384.000 MiB"], ["Data total", "512.000 MiB"]]);
  assert.deepEqual(jobProgress(info), { processedBytes: 39976960, remainingBytes: 384 * 2 ** 20, totalBytes: 512 * 2 ** 20, percent: 25, elapsedMs: 5770 });
  assert.equal(jobProgress(new Map([["Job type", "Unbounded"]])), undefined);
  assert.equal(jobProgress(new Map([["Data total", "512.000 MiB"], ["Data remaining", "0.000 B"]]))!.percent, 100);
});

test("the command: usage errors exit 2 before anything starts; an unreachable libvirt exits 1 with PAGETWIN_LIBVIRT", { skip: virshMissing }, async () => {
  const help = await cli(["migrate", "--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /drop-in for `virsh migrate --live/);
  for (const args of [["migrate"], ["migrate", "dom"], ["migrate", "dom", "uri", "--tunnelled"], ["migrate", "dom", "uri", "extra"], ["nonsense"], ["migrate", "dom", "uri", "--no-pagetwin", "--ui"],
    ["migrate", "dom", "uri", "--peer", "h:1", "--qemu-side", "udp"], ["migrate", "dom", "uri", "--peer", "h:1", "--migrateuri", "unix:///x.sock", "--listen-address", "127.0.0.2"],
    ["migrate", "dom", "uri", "--peer", "h:1", "--qemu-side", "unix", "--migrateuri", "tcp://127.0.0.1"], ["prepare", "dom", "--peer", "h:1", "--migrateuri", "unix://relative"],
    ["migrate", "dom", "uri", "--peer", "h:1", "--downtime-reserve", "50ms"], ["prepare", "dom", "--peer", "h:1", "--downtime-reserve", "50"]]) {
    const r = await cli(args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, /^pagetwin: /);
  }
  const r = await cli(["migrate", "dom", "qemu:///system", "-c", "qemu+unix:///system?socket=/nonexistent/sock", "--no-pagetwin", "--json"]);
  assert.equal(r.code, 1, r.stderr);
  const res = jsonResult(r.stdout);
  assert.equal(res.ok, false);
  assert.equal(res.errorCode, "PAGETWIN_LIBVIRT");
  assert.match(res.error, /virsh domstate/);
});

// ------------------------------------------------------------ two libvirt daemons



describe("two libvirt daemons, the test guest with two disks, a pagetwin service per host", { skip }, () => {
  let pair: LibvirtPair;
  const G = "pt-guest1";
  /** A second guest, for two migrations at once. */
  const G2 = "pt-guest2";
  const services = new Map<LibvirtHost, PairService>();
  /** Where the guest runs now. */
  let here: LibvirtHost;
  let there: LibvirtHost;
  /** The services' reports of the migrations through pagetwin, in order. */
  const reports: Record<string, any>[] = [];

  before(async () => {
    pair = await LibvirtPair.start();
    try {
      for (const h of pair.hosts) services.set(h, await pair.startService(h));
      await pair.startGuest(pair.a, G);
    } catch (err) {
      await pair.close();
      throw err;
    }
    [here, there] = [pair.a, pair.b];
  });
  after(() => pair?.close());

  /** Waits until guest `name` prints a counter above `after` on `host`'s log. */
  async function countsOn(host: LibvirtHost, after: number, name = G): Promise<void> {
    try {
      await pair.waitSerial(name, host, new RegExp(`pagetwin-counter (?:${after + 1}|${after + 2}|${after + 3})\\b`), 30_000);
    } catch (err) {
      // a silent destination: the guest (a panic, starved by the load, hung) or pagetwin? Say which before failing.
      throw new Error(`${(err as Error).message}\n${name} on ${host.name}: ${await pair.silence(name, host)}`, { cause: err });
    }
  }

  /** After a migration from `from` to `to` (whose log had `seen` counters before): the guest's counter went on with the next number. */
  async function counterWentOn(from: LibvirtHost, to: LibvirtHost, seen: number, name = G): Promise<void> {
    const srcLast = pair.counters(name, from).at(-1)!;
    await countsOn(to, srcLast, name);
    const first = pair.counters(name, to)[seen];
    assert.equal(first, srcLast + 1, `${name}: the destination's first counter follows the source's last (${srcLast})`);
  }

  /** `pagetwin libvirt migrate NAME` from `from` to `to` through the services, --json, `extra` for virsh; checks where it runs and its counter. */
  async function migrateGuest(name: string, from: LibvirtHost, to: LibvirtHost, extra: string[] = []): Promise<{ res: Record<string, any>; lines: Record<string, any>[] }> {
    const seen = pair.counters(name, to).length;
    const xml = await pair.destXml(name, from, to);
    const r = await cli(["migrate", name, to.uri, "-c", from.uri, "--control", services.get(from)!.control, "--peer", services.get(to)!.peer, "--xml", xml, "--json", ...extra]);
    assert.equal(r.code, 0, `${name}: ${r.stderr}\nsource service: ${services.get(from)!.log()}\ndestination service: ${services.get(to)!.log()}\nthe guest's last lines on ${from.name}: ${pair.serialText(name, from).slice(-1500)}`);
    const res = jsonResult(r.stdout);
    const why = () => `${name}: ${JSON.stringify({ ...res, disks: undefined, job: undefined })}\non ${to.name}: ${pair.serialText(name, to).slice(-400)}`;
    assert.equal(res.ok, true, why());
    assert.equal(res.destState, "running", why());
    assert.equal(res.sourceState, "absent", why());
    assert.equal(await to.virsh.domstate(name), "running", why());
    assert.equal(await from.virsh.domstate(name), "absent", why());
    await counterWentOn(from, to, seen, name);
    return { res, lines: jsonLines(r.stdout) };
  }

  /** The migrated stream passed pagetwin's end-to-end check on both sides, and pages of both disks travelled as references. */
  function verifiedWithTwins(rep: Record<string, any>): void {
    assert.equal(rep.state, "completed", JSON.stringify(rep));
    assert.equal(rep.verdict, "verified");
    assert.equal(rep.destination.verdict, "verified");
    assert.equal(rep.destination.bytesToQemu, rep.bytesFromQemu, "the destination QEMU got as many bytes as the source QEMU sent");
    for (const d of rep.disks) assert.ok(d.dedup && d.twins > 1000, `pages from ${d.path} travelled as references: ${JSON.stringify(d)}`);
  }

  /** The guest G from `here` to `there` (alone on the link): the result line and the link's bytes. */
  async function migrateThroughPagetwin(extra: string[] = []): Promise<{ res: Record<string, any>; lines: Record<string, any>[]; linkBytes: number }> {
    const tx0 = pair.link.txBytes(here.ns);
    const { res, lines } = await migrateGuest(G, here, there, extra);
    const linkBytes = pair.link.txBytes(here.ns) - tx0;
    [here, there] = [there, here];
    reports.push(res.report);
    return { res, lines, linkBytes };
  }

  test("the guest reads both disks, and libvirt lists them as pagetwin reads them", async () => {
    const log = pair.serialText(G, here);
    assert.match(log, /pagetwin-read-bytes [1-9]\d{7,}/);
    assert.match(log, /pagetwin-read-bytes-vdb [1-9]\d{6,}/);
    const disks = twinDisks(domainDisks(await here.virsh.dumpxml(G)));
    assert.deepEqual(disks.usable.map((d) => [d.target, d.source, d.format]), [["vda", pair.guest.disk, "raw"], ["vdb", pair.disk2, "raw"]]);
  });

  test("pagetwin libvirt migrate: live to the other daemon through both services; pages travel as references from both disks, verified; the counter goes on", async () => {
    const to = there, from = here;
    // what QEMU's downtime-limit is while the migration runs (libvirt answers this query during its migration job)
    const limits = new Set<number>();
    let polling = true;
    const poll = (async () => {
      while (polling) {
        limits.add(await from.virsh.maxDowntime(G).catch(() => -1));
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    const { res, lines, linkBytes } = await migrateThroughPagetwin(["--downtime-reserve", "100"]).finally(() => { polling = false; });
    await poll;
    assert.deepEqual(res.downtime, { limitMs: 300, askedMs: 200 }, "the guest's 300 ms less the 100 ms reserve");
    assert.ok(limits.has(200), `QEMU's downtime-limit during the migration: ${[...limits]}`);
    // the destination QEMU, which listened on the service's socket directory, is not root: the directory let its group in
    assert.equal(pair.qemuCredentials(to, G).uid, qemuIds()!.uid, `the destination QEMU runs as ${QEMU_USER.user}`);
    assert.ok(lines.some((l) => l.event === "progress" && l.phase === "migration" && l.total > 400e6), "progress events with libvirt's job figures");
    // unix sockets at both QEMUs by default: one path, on each host its own directory
    assert.equal(res.migrateUri, `unix://${DEFAULT_QEMU_SOCKETS}/${G}.sock`);
    assert.equal(res.listenAddress, undefined);
    const rep = res.report;
    assert.deepEqual(rep.disks.map((d: { path: string }) => d.path), [pair.guest.disk, pair.disk2]);
    for (const d of rep.disks) assert.ok(d.dedup && d.twins > 1000, `pages from ${d.path} travelled as references: ${JSON.stringify(d)}`);
    assert.equal(rep.twinsReplaced, rep.disks[0].twins + rep.disks[1].twins);
    assert.equal(rep.destination.bytesToQemu, rep.bytesFromQemu, "the destination QEMU got as many bytes as the source QEMU sent");
    assert.ok(rep.bytesOutLink < rep.bytesFromQemu * 0.5, `the link carried ${rep.bytesOutLink} B of QEMU's ${rep.bytesFromQemu} B`);
    // The veth carries the service's link bytes plus TLS and TCP/IP framing (and the lease): a little more, not much.
    assert.ok(linkBytes >= rep.bytesOutLink && linkBytes < rep.bytesOutLink * 1.1 + 2e6, `veth ${linkBytes} B vs the service's ${rep.bytesOutLink} B`);
  });

  test("and back with --trace: the guest returns to the first daemon through the same services; the trace (the source service's) has its stats' totals and replays them", async (t) => {
    const dir = mkdtempSync(join(tmpdir(), "pt-libvirt-trace-"));
    try {
      const file = join(dir, "libvirt.ndjson");
      const { res } = await migrateThroughPagetwin(["--trace", file]);
      assert.equal(res.downtime, undefined, "without --downtime-reserve QEMU's limit is left as it is");
      const rep = res.report;
      for (const d of rep.disks) assert.ok(d.twins > 1000, `twins from ${d.path}`);
      assert.equal(rep.destination.bytesToQemu, rep.bytesFromQemu);
      const text = readFileSync(file, "utf8");
      const ms = [...TraceModel.parse(text).migrations.values()];
      assert.equal(ms.length, 1, "one migration (every connection of QEMU's in one)");
      const m = ms[0]!, e = m.end!;
      assert.match(m.start.label, new RegExp(`migration ${G} \\(out\\)`));
      assert.equal(e.ok, true);
      assert.equal(e.verified, true);
      assert.equal(e.transferredBytes, rep.bytesOutLink);
      assert.equal(e.baselineBytes, rep.bytesFromQemu);
      assert.equal(e.pages.twin, rep.twinsReplaced);
      assert.equal(e.pages.normal + e.pages.twin, rep.pagesSeen);
      assert.equal(e.pages.zero, rep.zeroPages);
      assert.equal(e.pages.resent, rep.resends);
      assert.ok(m.rounds.length >= 2, `${m.rounds.length} rounds`);
      const skipped = await replayShows(text, { transferred: rep.bytesOutLink, iterations: m.rounds.length, twin: rep.twinsReplaced, zero: rep.zeroPages, resent: rep.resends }, "libvirt trace replayed");
      if (skipped) t.diagnostic(`not replayed in a page: ${skipped}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("each migration passed pagetwin's end-to-end check (verdict verified on both sides, state completed)", () => {
    assert.equal(reports.length, 2);
    for (const rep of reports) {
      assert.equal(rep.state, "completed", JSON.stringify(rep));
      assert.equal(rep.verdict, "verified");
      assert.equal(rep.destination.verdict, "verified");
      assert.equal(rep.destination.bytesInLink, rep.bytesOutLink, "what the destination service read is what the source service sent");
    }
  });

  test("two guests migrated at the same time through the same services: both arrive, each verified with twins from both disks", async () => {
    assert.equal(here, pair.a);
    // started only now: a second TCG guest slows every migration before this one on a 2-core machine
    await pair.startGuest(pair.a, G2);
    const [one, two] = await Promise.all([migrateGuest(G, pair.a, pair.b), migrateGuest(G2, pair.a, pair.b)]);
    [here, there] = [pair.b, pair.a];
    for (const { res } of [one, two]) verifiedWithTwins(res.report);
    assert.deepEqual([one.res.report.migration, two.res.report.migration], [G, G2]);
    assert.notEqual(one.res.migrateUri, two.res.migrateUri, "each migration has its own socket");
    const src = await ServeClient.connect(services.get(pair.a)!.control);
    try {
      const { migrations, indexes } = await src.request<{ migrations: { migration: string; direction: string; state: string; startedAt: string; endedAt: string }[]; indexes: Record<string, number> }>("list");
      const out = [G, G2].map((id) => migrations.filter((m) => m.migration === id && m.direction === "out").at(-1)!);
      for (const m of out) assert.equal(m.state, "completed");
      // they overlapped: each started before the other ended
      assert.ok(out[0]!.startedAt < out[1]!.endedAt && out[1]!.startedAt < out[0]!.endedAt, JSON.stringify(out));
      assert.equal(indexes[pair.guest.disk], 0, "the disk's index stays open, unused, for the next migration");
    } finally {
      src.close();
    }
    // the second guest goes back: host b's service opens (or still has) the disks' indexes, and keeps them open
    verifiedWithTwins((await migrateGuest(G2, pair.b, pair.a)).res.report);
  });

  test("--parallel: libvirt's multifd channels go through the services with dedup, each channel verified", async () => {
    const { res } = await migrateGuest(G, here, there, ["--parallel", "--parallel-connections", "2"]);
    [here, there] = [there, here];
    const rep = res.report;
    verifiedWithTwins(rep);
    assert.ok(!res.notes.some((n: string) => /parallel|multifd/.test(n)), `no pass-through note: ${res.notes}`);
    assert.deepEqual(rep.passthrough, [], "every channel's pages looked up");
    assert.equal(rep.multifd.channels, 2, JSON.stringify(rep.multifd));
    assert.equal(rep.sessions, 3, "the main channel and two multifd channels");
    assert.ok(rep.multifd.twins > 1000 && rep.multifd.twins <= rep.twinsReplaced, `twins on the multifd channels: ${JSON.stringify(rep.multifd)}`);
    assert.equal(rep.destination.streamsVerified, 3, "every channel's stream verified at the destination");
    // the same images as the second guest's migration from this host just before: their indexes were still open
    assert.ok(rep.timings.indexesOpen < 200, `an open index is not loaded again: ${JSON.stringify(rep.timings)}`);
  });

  test("--postcopy: without userfaultfd refused by libvirt, the command saying what to do; with it (postcopy-ram on at both ends, completing in pre-copy) deduplicated and verified as without it", async () => {
    // QEMU 7.2 run as libvirt-qemu gets userfaultfd (which the destination needs to accept postcopy-ram) only with
    // this sysctl, as on any Debian host: set for these migrations, then put back
    const sysctl = "/proc/sys/vm/unprivileged_userfaultfd";
    const was = existsSync(sysctl) ? readFileSync(sysctl, "utf8").trim() : null;
    let res: Record<string, any>, lines: Record<string, any>[];
    try {
      if (was !== null) {
        // first without: libvirt refuses, the command says what to do, the guest stays where it was
        writeFileSync(sysctl, "0");
        const r = await cli(["migrate", G, there.uri, "-c", here.uri, "--control", services.get(here)!.control, "--peer", services.get(there)!.peer, "--json", "--postcopy"]);
        assert.equal(r.code, 1, r.stderr);
        const failed = jsonResult(r.stdout);
        assert.match(failed.error, /Postcopy is not supported.*sysctl vm\.unprivileged_userfaultfd=1/);
        assert.equal(failed.sourceState, "running");
        assert.equal(await here.virsh.domstate(G), "running");
        writeFileSync(sysctl, "1");
      }
      ({ res, lines } = await migrateGuest(G, here, there, ["--postcopy"]));
    } finally {
      if (was !== null) writeFileSync(sysctl, was);
    }
    [here, there] = [there, here];
    const rep = res.report;
    verifiedWithTwins(rep);
    assert.deepEqual(rep.passthrough, [], "the ADVISE command that postcopy-ram puts before the RAM section stops nothing");
    const notes = lines.filter((l) => l.phase === "note").map((l) => String(l.message));
    assert.ok(notes.some((n) => /after the switch to post-copy/.test(n)), `the note says what would pass through: ${notes}`);
  });

  test("--parallel through services with --workers 2: each channel encoded and rebuilt on the workers, with dedup, verified", async () => {
    // services of their own beside the suite's (another peer port), with worker threads
    const plain = new Map(services);
    try {
      for (const h of pair.hosts) services.set(h, await pair.startService(h, { peerPort: SERVE_PEER_PORT + 1, args: ["--workers", "2"] }));
      const { res } = await migrateGuest(G, here, there, ["--parallel", "--parallel-connections", "2"]);
      [here, there] = [there, here];
      const rep = res.report;
      verifiedWithTwins(rep);
      assert.equal(rep.multifd.channels, 2, JSON.stringify(rep.multifd));
      assert.ok(rep.multifd.twins > 1000, `twins on the multifd channels: ${JSON.stringify(rep.multifd)}`);
      assert.equal(rep.destination.streamsVerified, 3, "every channel's stream verified at the destination");
      assert.deepEqual([rep.workers, rep.destination.workers], [{ threads: 2, sessions: 3 }, { threads: 2, sessions: 3 }]);
    } finally {
      for (const h of pair.hosts) { const s = services.get(h)!; if (s !== plain.get(h)) await s.stop(); services.set(h, plain.get(h)!); }
    }
  });

  test("migrate-setspeed, --qemu-side tcp: the link carries at most that rate, and QEMU's stream is not held to it", async () => {
    const MIBS = 3;
    await here.virsh.run(["migrate-setspeed", G, String(MIBS)]);
    const { res } = await migrateGuest(G, here, there, ["--qemu-side", "tcp"]);
    assert.match(res.migrateUri, /^tcp:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(res.listenAddress, "127.0.0.1");
    [here, there] = [there, here];
    const rep = res.report;
    verifiedWithTwins(rep);
    assert.ok(res.notes.some((n: string) => n.includes(`at most ${MIBS} MiB/s`)), `the note: ${res.notes}`);
    const s = (rep.timings.sessionsEnded - rep.timings.qemuConnected) / 1000;
    const cap = MIBS * 2 ** 20;
    assert.ok(rep.bytesOutLink <= cap * s * 1.1 + 1e6, `link ${(rep.bytesOutLink / s / 2 ** 20).toFixed(2)} MiB/s over ${s} s, cap ${MIBS}`);
    assert.ok(rep.bytesFromQemu > cap * s * 1.5, `QEMU's stream ${(rep.bytesFromQemu / s / 2 ** 20).toFixed(2)} MiB/s: not held to the cap`);
  });

  test("pagetwin libvirt prepare: both services ready, the addresses for libvirt printed; cancelled, nothing stays", async () => {
    const r = await cli(["prepare", G, "-c", here.uri, "--control", services.get(here)!.control, "--peer", services.get(there)!.peer, "--json"]);
    assert.equal(r.code, 0, r.stderr);
    const res = jsonResult(r.stdout);
    assert.equal(res.migration, G);
    assert.equal(res.migrateUri, `unix://${DEFAULT_QEMU_SOCKETS}/${G}.sock`);
    assert.equal(res.listenAddress, undefined);
    assert.deepEqual(res.disks.map((d: { path: string; dedup: boolean }) => [d.path, d.dedup]), [[pair.guest.disk, true], [pair.disk2, true]]);
    const src = await ServeClient.connect(services.get(here)!.control);
    const dst = await ServeClient.connect(services.get(there)!.control);
    try {
      assert.equal((await dst.request<{ state: string }>("status", { migration: G, direction: "in" })).state, "ready");
      assert.equal((await src.request<{ state: string }>("cancel", { migration: G, direction: "out" })).state, "cancelled");
      const end = Date.now() + 10_000;
      while ((await dst.request<{ state: string }>("status", { migration: G, direction: "in" })).state === "ready" && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
      assert.notEqual((await dst.request<{ state: string }>("status", { migration: G, direction: "in" })).state, "ready", "the destination dropped its half");
    } finally {
      src.close();
      dst.close();
    }
    assert.equal(await here.virsh.domstate(G), "running");
  });

  test("a migration that fails once QEMU's limit was lowered sets the source's back (here the guest's own 400 ms); the guest keeps running", async () => {
    await here.virsh.setMaxDowntime(G, 400);
    try {
      const r = await cli(["migrate", G, there.uri, "-c", here.uri, "--control", services.get(here)!.control, "--peer", services.get(there)!.peer,
        "--xml", join(tmpdir(), "pt-no-such-domain.xml"), "--downtime-reserve", "100", "--json"]);
      assert.equal(r.code, 1, r.stderr);
      const res = jsonResult(r.stdout);
      assert.equal(res.errorCode, "PAGETWIN_LIBVIRT_MIGRATION", r.stderr);
      assert.match(r.stderr + r.stdout, /QEMU's downtime-limit 300 ms: the guest's 400 ms/);
      assert.equal(await here.virsh.maxDowntime(G), 400);
      assert.equal(await here.virsh.domstate(G), "running");
    } finally {
      await here.virsh.setMaxDowntime(G, 300);
    }
  });

  test("the destination's service down: the command fails cleanly, the guest keeps running on the source", async () => {
    const last = pair.counters(G, here).at(-1)!;
    await services.get(there)!.stop();
    const r = await cli(["migrate", G, there.uri, "-c", here.uri, "--control", services.get(here)!.control, "--peer", services.get(there)!.peer, "--json"]);
    assert.equal(r.code, 1, r.stderr);
    const res = jsonResult(r.stdout);
    assert.equal(res.ok, false);
    assert.equal(res.errorCode, "PAGETWIN_LIBVIRT_MIGRATION");
    assert.equal(res.sourceState, "running");
    assert.match(res.error, /PAGETWIN_PEER_UNREACHABLE|destination pagetwin serve|cannot reach|refused/i);
    assert.match(res.error, /the guest is running on the source/);
    assert.equal(await here.virsh.domstate(G), "running");
    assert.equal(await there.virsh.domstate(G), "absent");
    await countsOn(here, last);
  });
});
