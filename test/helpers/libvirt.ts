// Two libvirt "hosts" on one machine for the libvirt tests and benchmark
// (recipe: docs/LIBVIRT.md): each libvirtd in its own network namespace (the
// two joined by a 1 Gbit/s veth, helpers' NetnsLink) and its own mount
// namespace, where a private /etc/libvirt, /run/libvirt, /var/lib/libvirt,
// /var/cache/libvirt and /var/log/libvirt are bind-mounted from a temp dir,
// and so is pagetwin's QEMU socket directory (/run/pagetwin-qemu: one path,
// a different directory on each host, as libvirt's unix:// migrate URI
// needs); its own host_uuid and a unix socket dir virsh reaches from here.
// A host's pagetwin service runs in its daemon's namespaces, network and mount.
// QEMU runs as Debian's libvirt runs it, as libvirt-qemu:kvm (QEMU_USER), not
// root; the images and files it opens are made readable to it the way an
// operator would (grantQemu), and pagetwin serve's socket directory must let
// that user's groups in, or the destination QEMU cannot listen there.
// close() removes everything (domains, QEMU processes, services, daemons,
// namespaces, files); teardown() does the same synchronously, on failure and at process exit.
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, chownSync, cpSync, existsSync, statSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, appendFileSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createNetnsLink, netnsAvailable, type NetnsLink } from "../../src/adapters/netns/link.js";
import { Virsh, virshAvailable } from "../../src/adapters/libvirt/virsh.js";
import { TCG_RAM_PAD_KIB, findGuest, qemuAvailable, type GuestImage } from "../../src/adapters/qemu/vm.js";
import { cliPath } from "./cli.js";
import { kernelFailure } from "../../src/compare/guest.js";
import { DEFAULT_QEMU_SOCKETS } from "../../src/serve/qemu-sockets.js";

const LIBVIRTD = "/usr/sbin/libvirtd";
/** Private per host: bind-mounted over the system's dirs inside the daemon's mount namespace. */
const PRIVATE_DIRS = [["etc", "/etc/libvirt"], ["run", "/run/libvirt"], ["lib", "/var/lib/libvirt"], ["cache", "/var/cache/libvirt"], ["log", "/var/log/libvirt"],
  ["qemu-sockets", DEFAULT_QEMU_SOCKETS]] as const;

/** The second disk of the test guest (scripts/build-guest.sh), beside the NAS image. */
const secondDisk = (g: GuestImage) => join(g.disk, "..", "disk2.img");

/** The user and group libvirt runs QEMU as (Debian's package; qemu.conf's user and group). */
export const QEMU_USER = { user: "libvirt-qemu", group: "kvm" } as const;

/** The peer port of the services the tests start (each host has its own address). */
export const SERVE_PEER_PORT = 4447;

export interface PairService {
  /** The service's process (node; `ip netns exec` execs it). */
  pid: number;
  control: string;
  /** HOST:PORT of its peer port. */
  peer: string;
  /** The end of its stderr. */
  log(): string;
  /** SIGTERM, and waits for it to exit. */
  stop(): Promise<void>;
}

export interface LibvirtHost {
  name: "a" | "b";
  /** The host's network namespace. */
  ns: string;
  /** Its address on the veth between the two namespaces. */
  ip: string;
  dir: string;
  /** qemu+unix:///system?socket=... (reachable from this process's namespaces). */
  uri: string;
  virsh: Virsh;
  daemon: ChildProcess;
  /** The end of what libvirtd wrote to stderr. */
  stderrTail(): string;
}

/** false, or why the libvirt tests are skipped. */
export function skipLibvirt(): string | false {
  if (typeof process.getuid === "function" && process.getuid() !== 0) return "needs root (libvirtd runs as root in its own namespaces)";
  if (!existsSync(LIBVIRTD)) return "libvirtd not installed (apt-get install libvirt-daemon-system libvirt-clients, or scripts/install-deps.sh)";
  if (!virshAvailable()) return "virsh not installed (apt-get install libvirt-clients)";
  if (!qemuAvailable()) return "qemu-system-x86_64 not installed";
  if (!netnsAvailable()) return "cannot create network namespaces (ip netns / tc missing)";
  const g = findGuest();
  if (!g) return "guest not built: run scripts/build-guest.sh";
  if (!existsSync(secondDisk(g))) return "the guest's second disk (nas/disk2.img) not built: run scripts/build-guest.sh";
  if (qemuIds() === null) return `no user ${QEMU_USER.user} or group ${QEMU_USER.group} (libvirt-daemon-system creates them)`;
  if (["unshare", "nsenter", "setpriv"].some((c) => spawnSync(c, ["--version"], { stdio: "ignore" }).status !== 0)) return "unshare, nsenter or setpriv (util-linux) missing";
  return false;
}

/** A process's CPU time so far (user + system), ms; 0 once it is gone. */
export function cpuMs(pid: number): number {
  try {
    // fields after the command's closing parenthesis: utime and stime are the 12th and 13th
    const f = readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\) /s, "").split(" ");
    return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
  } catch {
    return 0;
  }
}

const sleepSync = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
/** Running (a zombie not yet reaped, while a synchronous teardown blocks the event loop, counts as gone). */
function alive(pid: number): boolean {
  try { return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8")); } catch { return false; }
}
const live = new Set<LibvirtPair>();
let hooked = false;

export class LibvirtPair {
  readonly hosts: [LibvirtHost, LibvirtHost];
  private tornDown = false;
  private readonly services = new Set<ChildProcess>();

  private constructor(readonly dir: string, readonly link: NetnsLink, readonly guest: GuestImage, hosts: LibvirtHost[], private readonly caps: CapsCache) {
    this.hosts = hosts as [LibvirtHost, LibvirtHost];
  }

  /** The domains' emulator: QEMU with TCG_RAM_PAD_KIB more RAM than libvirt asks for (tcgPadWrapper), at one path for all pairs (libvirt keeps its probe by path). */
  get emulator(): string {
    return this.caps.emulator();
  }

  get a(): LibvirtHost { return this.hosts[0]; }
  get b(): LibvirtHost { return this.hosts[1]; }

  /** Starts both daemons and waits until each answers; on any failure removes what it made and throws. */
  static async start(): Promise<LibvirtPair> {
    const guest = findGuest();
    if (!guest) throw new Error("guest not built");
    const dir = mkdtempSync(join(tmpdir(), "pt-libvirt-"));
    // QEMU (not root) runs the emulator wrapper and appends to the serial logs here
    const { gid } = qemuIds()!;
    chownSync(dir, 0, gid);
    chmodSync(dir, 0o770);
    let link: NetnsLink | undefined;
    const hosts: LibvirtHost[] = [];
    const fail = (err: unknown) => {
      const p = new LibvirtPair(dir, link ?? ({ destroy() {} } as NetnsLink), guest, hosts, new CapsCache(guest));
      p.teardown();
      throw err;
    };
    try {
      grantQemu([guest.kernel, guest.initrd, guest.disk, secondDisk(guest)]);
      link = createNetnsLink({ rate: "1gbit" });
      const caps = new CapsCache(guest);
      const pair = new LibvirtPair(dir, link, guest, hosts, caps);
      live.add(pair);
      if (!hooked) {
        hooked = true;
        process.on("exit", () => { for (const p of live) p.teardown(); });
      }
      for (const name of ["a", "b"] as const) {
        const h = startDaemon(dir, name, name === "a" ? link.srcNs : link.dstNs, name === "a" ? link.srcIp : link.dstIp, caps);
        hosts.push(h);
        // the first daemon on this machine probes QEMU; the second starts with its answer
        if (!caps.seeded) caps.sync([await waitReady(h)]);
      }
      for (const h of hosts) await waitReady(h);
      caps.sync(hosts);
      return pair;
    } catch (err) {
      return fail(err);
    }
  }

  /**
   * The test guest as a transient domain XML: kernel + initrd of the build, vda = the NAS image, vdb = the second
   * disk. No USB controller (libvirt adds one by default): the guests of the other real-guest tests have none.
   * The emulator pads the RAM as QemuVm does under TCG (libvirt rounds a domain's memory to MiB).
   */
  domainXml(name: string, serialLog: string, cmdline = ""): string {
    const disk = (file: string, dev: string) => `<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>` +
      `<source file='${file}'/><target dev='${dev}' bus='virtio'/><readonly/></disk>`;
    return `<domain type='qemu'><name>${name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>${this.guest.kernel}</kernel><initrd>${this.guest.initrd}</initrd>
  <cmdline>console=ttyS0 quiet panic=1 no_timer_check ${cmdline}</cmdline></os>
  <on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices><emulator>${this.emulator}</emulator>
    ${disk(this.guest.disk, "vda")}
    ${disk(secondDisk(this.guest), "vdb")}
    <serial type='file'><source path='${serialLog}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='${serialLog}' append='on'/><target type='serial' port='0'/></console>
    <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>`;
  }

  /** The uid and gid of guest `name`'s QEMU on `host` (from libvirt's pid file and /proc). */
  qemuCredentials(host: LibvirtHost, name: string): { uid: number; gid: number } {
    const pid = Number(readFileSync(join(host.dir, "run", "qemu", `${name}.pid`), "utf8").trim());
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const id = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(status)?.[1] ?? NaN);
    return { uid: id("Uid"), gid: id("Gid") };
  }

  /** The second disk's path. */
  get disk2(): string { return secondDisk(this.guest); }

  /** Starts the test guest on `host` and waits for "pagetwin-ready" on its serial log (under TCG, 15 s on an idle machine, minutes on a loaded one). */
  async startGuest(host: LibvirtHost, name: string, timeoutMs = 240_000): Promise<void> {
    const xmlFile = join(this.dir, `${name}.xml`);
    appendFileSync(xmlFile, this.domainXml(name, this.serialLog(name, host)));
    // the first start of the emulator wrapper on this machine probes it (tens of seconds): longer than virsh's 30 s
    await host.virsh.run(["create", xmlFile], 180_000);
    this.caps.sync(this.hosts); // the other daemon then has the wrapper's probe before a migration needs it
    await this.waitSerial(name, host, /pagetwin-ready/, timeoutMs);
  }

  /** Where `name`'s serial console goes while it runs on `host` (one file per host, so a log shows who printed what). */
  serialLog(name: string, host: LibvirtHost): string {
    return join(this.dir, `serial-${name}-${host.name}.log`);
  }

  serialText(name: string, host: LibvirtHost): string {
    try { return readFileSync(this.serialLog(name, host), "utf8"); } catch { return ""; }
  }

  /** The guest's counters on `host`'s serial log, in order. */
  counters(name: string, host: LibvirtHost): number[] {
    return [...this.serialText(name, host).matchAll(/pagetwin-counter (\d+)/g)].map((m) => Number(m[1]));
  }

  /**
   * Why guest `name` on `host` printed nothing it was waited for: a kernel failure on its console, or, after
   * `lateMs` more, whether it printed at last (starved by the load) or not (hung: its state and registers, from QEMU).
   */
  async silence(name: string, host: LibvirtHost, lateMs = 60_000): Promise<string> {
    const text = this.serialText(name, host);
    const before = text.length;
    if (kernelFailure(text)) {
      // everything after its last counter: the oops from its first line (kernelFailure() starts at the panic line when the header is one it does not know)
      const last = text.lastIndexOf("pagetwin-counter");
      return `kernel failure on its console, after its last counter:\n${text.slice(last < 0 ? 0 : last).slice(0, 6000)}`;
    }
    const late = await this.waitSerial(name, host, /pagetwin-counter \d+/, lateMs, before).then(() => true, () => false);
    const ask = (args: string[]) => host.virsh.run(args, 10_000).then((s) => s.trim(), (e: Error) => e.message);
    const state = await ask(["domstate", "--reason", name]);
    const regs = (await ask(["qemu-monitor-command", name, "--hmp", "info registers"])).split("\n").slice(0, 6).join("\n");
    const tail = this.serialText(name, host).slice(before).trim();
    return late ? `it printed again within ${lateMs} ms more (starved, not hung; state ${state}): ${tail.slice(-300)}`
      : `still silent ${lateMs} ms later (state ${state}; ${kernelFailure(this.serialText(name, host)) ?? "no kernel failure on its console"}); registers:\n${regs}`;
  }

  /** Waits for `re` on the serial log (from character `from` on). */
  async waitSerial(name: string, host: LibvirtHost, re: RegExp, timeoutMs = 60_000, from = 0): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (!re.test(this.serialText(name, host).slice(from))) {
      if (Date.now() > end) throw new Error(`${name} on ${host.name}: no ${re} on the serial log in ${timeoutMs} ms; log: ${this.serialText(name, host).slice(-500)}`);
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  /**
   * The XML a destination gets with --xml: the running domain's (`dumpxml
   * --migratable`, which keeps the UUID libvirt insists on) with the serial log
   * moved to `to`'s file. Written to a file; its path.
   */
  async destXml(name: string, from: LibvirtHost, to: LibvirtHost): Promise<string> {
    const xml = (await from.virsh.dumpxml(name, true)).split(this.serialLog(name, from)).join(this.serialLog(name, to));
    const file = join(this.dir, `${name}-to-${to.name}-${Date.now()}.xml`);
    appendFileSync(file, xml);
    return file;
  }

  /** Runs a command inside `host`'s daemon's network and mount namespaces: it sees that host's QEMU socket directory (nsenter execs: the child's pid is the command's). */
  spawnOnHost(host: LibvirtHost, cmd: string, args: string[]): ChildProcess {
    return spawn("nsenter", ["-t", String(host.daemon.pid), "-m", "-n", "--", cmd, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  }

  /**
   * `pagetwin serve` in `host`'s namespaces (control socket in the temp dir, peer port on the
   * host's veth address, the pair's key); resolves once it listens. `cli`: another pagetwin build's
   * dist/src/cli/main.js (the bench compares two); `peerPort`: beside another service on the host; `args`: more
   * of its options (e.g. --workers 2). teardown() stops it if the test did not.
   */
  async startService(host: LibvirtHost, o: { cli?: string; peerPort?: number; args?: string[] } = {}): Promise<PairService> {
    const key = join(this.dir, "peer.key");
    if (!existsSync(key)) writeFileSync(key, randomBytes(32), { mode: 0o600 });
    const port = o.peerPort ?? SERVE_PEER_PORT;
    const control = join(this.dir, `serve-${host.name}-${port}.sock`);
    const child = this.spawnOnHost(host, process.execPath, [o.cli ?? cliPath, "serve", "--control", control, "--peer-listen", `${host.ip}:${port}`, "--psk-file", key, "--json", ...(o.args ?? [])]);
    this.services.add(child);
    let out = "", err = "";
    child.stderr!.on("data", (d: Buffer) => { err = (err + d).slice(-4000); });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`pagetwin serve on ${host.name} not listening in 20 s: ${err}`)), 20_000);
      child.stdout!.on("data", (d: Buffer) => { out += d; if (/"listening"/.test(out)) { clearTimeout(t); resolve(); } });
      child.once("exit", (code) => { clearTimeout(t); reject(new Error(`pagetwin serve on ${host.name} exited (${code}): ${err}`)); });
    });
    const exited = new Promise<void>((r) => { if (child.exitCode !== null) r(); else child.once("exit", () => r()); });
    return {
      pid: child.pid!, control, peer: `${host.ip}:${port}`, log: () => err,
      stop: async () => { child.kill("SIGTERM"); await exited; this.services.delete(child); },
    };
  }

  /**
   * Removes everything, as teardown() does, but lets the event loop reap the services and daemons it
   * stops first: until a child is reaped, its namespaces stay and `ip netns delete` cannot remove them.
   */
  async close(): Promise<void> {
    if (this.tornDown) return;
    for (const h of this.hosts) destroyDomains(h);
    for (const h of this.hosts) killQemus(h);
    await Promise.all([...this.services, ...this.hosts.map((h) => h.daemon)].map((c) => exitOf(c)));
    this.teardown();
  }

  /** Removes everything: domains, QEMU processes, daemons, namespaces, temp dir. Synchronous (runs at exit too); idempotent. */
  teardown(): void {
    if (this.tornDown) return;
    this.tornDown = true;
    live.delete(this);
    for (const c of this.services) stopProcess(c.pid, c.exitCode !== null || c.signalCode !== null);
    for (const h of this.hosts) destroyDomains(h);
    for (const h of this.hosts) killQemus(h);
    for (const h of this.hosts) stopDaemon(h);
    this.link.destroy();
    // A namespace still held by a process on its way out stays behind the first delete: try again for a while.
    for (let i = 0; i < 100 && [this.link.srcNs, this.link.dstNs].some((ns) => existsSync(`/run/netns/${ns}`)); i++) {
      sleepSync(100);
      for (const ns of [this.link.srcNs, this.link.dstNs]) spawnSync("ip", ["netns", "delete", ns], { stdio: "ignore", timeout: 5000 });
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A private libvirt tree for one host, then libvirtd in its namespaces (not waited for). */
/**
 * libvirtd probes each QEMU binary's capabilities when its cache has none: tens of QMP commands, whose
 * answers libvirt 9.0 reads a byte per wakeup. On a machine where waking a thread is slow that took 35-72 s
 * per daemon (two probes at once: 72 s), over the 30 s a test waited. The probe's result (libvirt checks it
 * against the binaries, libvirt and the kernel) is kept beside the guest and given to every test daemon.
 */
class CapsCache {
  private readonly dir: string;
  constructor(guest: GuestImage) {
    this.dir = join(dirname(guest.kernel), "..", "libvirt-caps");
  }

  get seeded(): boolean {
    return existsSync(this.dir) && readdirSync(this.dir).some((f) => f.endsWith(".xml"));
  }

  /** The emulator wrapper, written once (libvirt's probe of it holds while the file's ctime does). */
  emulator(): string {
    const path = join(this.dir, "qemu-tcg-pad"), text = tcgPadWrapper();
    if (!existsSync(path) || readFileSync(path, "utf8") !== text) {
      mkdirSync(this.dir, { recursive: true });
      writeFileSync(path, text, { mode: 0o755 });
    }
    return path;
  }

  /** Into a daemon's cache directory, before it starts. */
  seed(daemonDir: string): void {
    if (this.seeded) cpSync(this.dir, capsDir(daemonDir), { recursive: true, filter: (f) => !f.endsWith("qemu-tcg-pad") });
  }

  /** Every probe any of `hosts` made, kept here and given to the others (libvirt reads a probe it lacks from its cache directory). */
  sync(hosts: LibvirtHost[]): void {
    mkdirSync(this.dir, { recursive: true });
    for (const h of hosts) {
      const from = capsDir(h.dir);
      if (!existsSync(from)) continue;
      // a probe newer than the one kept replaces it (libvirt probed again: the one kept was outdated)
      const newer = (x: string) => !existsSync(join(this.dir, x)) || statSync(join(from, x)).mtimeMs > statSync(join(this.dir, x)).mtimeMs;
      for (const f of readdirSync(from).filter((x) => x.endsWith(".xml") && newer(x))) {
        const tmp = join(this.dir, `.${f}.${process.pid}`);
        cpSync(join(from, f), tmp);
        renameSync(tmp, join(this.dir, f));
      }
    }
    for (const h of hosts) {
      mkdirSync(capsDir(h.dir), { recursive: true });
      for (const f of readdirSync(this.dir).filter((x) => x.endsWith(".xml") && !existsSync(join(capsDir(h.dir), x)))) cpSync(join(this.dir, f), join(capsDir(h.dir), f));
    }
  }
}

const capsDir = (daemonDir: string) => join(daemonDir, "cache", "qemu", "capabilities");

function startDaemon(root: string, name: "a" | "b", ns: string, ip: string, caps: CapsCache): LibvirtHost {
  const dir = join(root, name);
  for (const [d] of PRIVATE_DIRS) mkdirSync(join(dir, d), { recursive: true });
  caps.seed(dir);
  mkdirSync(join(dir, "sock"));
  cpSync("/etc/libvirt", join(dir, "etc"), { recursive: true });
  if (existsSync("/var/lib/libvirt")) cpSync("/var/lib/libvirt", join(dir, "lib"), { recursive: true });
  rmSync(join(dir, "etc", "qemu", "networks", "autostart"), { recursive: true, force: true });
  for (const [, sys] of PRIVATE_DIRS) mkdirSync(sys, { recursive: true });
  const uuid = `${name === "a" ? "aaaaaaaa" : "bbbbbbbb"}-${process.pid.toString(16).padStart(4, "0").slice(-4)}-4000-8000-${Date.now().toString(16).padStart(12, "0").slice(-12)}`;
  appendFileSync(join(dir, "etc", "libvirtd.conf"), `
# pagetwin test host ${name}
unix_sock_dir = "${dir}/sock"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "${uuid}"
log_outputs = "3:file:${dir}/libvirtd.log"
`);
  // QEMU as Debian runs it, but the images' owners left alone (grantQemu set what QEMU needs, as an operator
  // would on shared storage); no virtlogd, cgroups or apparmor: none exist for a test host.
  appendFileSync(join(dir, "etc", "qemu.conf"), `
# pagetwin test host ${name}
user = "${QEMU_USER.user}"
group = "${QEMU_USER.group}"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
`);
  const binds = PRIVATE_DIRS.map(([d, sys]) => `mount --bind '${join(dir, d)}' ${sys}`).join(" && ");
  // A /dev/kvm that only root may open (a host without udev's rule giving it to group kvm): libvirt's probe of
  // QEMU found KVM, its check that QEMU's user may open /dev/kvm said no, and it took every probe for outdated
  // and probed again at each use (4-35 s each; a domain took 52 s to start). The test hosts run TCG: their
  // /dev/kvm is an empty file nobody else may open, as on a host without KVM.
  const noKvm = join(dir, "no-kvm");
  writeFileSync(noKvm, "", { mode: 0o600 });
  const hideKvm = `if [ -e /dev/kvm ]; then mount --bind '${noKvm}' /dev/kvm; fi`;
  // ip netns exec, unshare and sh all exec: the child's pid is libvirtd's. The copies of the
  // /run/netns/* mounts in the new mount namespace are dropped, so that they do not keep
  // `ip netns delete` from removing the namespaces while a QEMU of this daemon is on its way out.
  const daemon = spawn("ip", ["netns", "exec", ns, "unshare", "-m", "-u", "--propagation", "private", "sh", "-c",
    `for f in /run/netns/*; do umount -l "$f" 2>/dev/null; done; ${binds} && ${hideKvm} && hostname pt-libvirt-${name} && exec ${LIBVIRTD} -p '${join(dir, "libvirtd.pid")}'`],
    { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  daemon.stderr!.on("data", (d: Buffer) => { err = (err + d).slice(-4000); });
  const uri = `qemu+unix:///system?socket=${join(dir, "sock", "libvirt-sock")}`;
  return { name, ns, ip, dir, uri, virsh: new Virsh(uri), daemon, stderrTail: () => err };
}

/** QEMU_USER's uid and gid; null when this host has no such user or group. */
export function qemuIds(): { uid: number; gid: number } | null {
  const id = (args: string[]) => {
    const r = spawnSync("id", args, { encoding: "utf8" });
    return r.status === 0 && /^\d+$/.test(r.stdout.trim()) ? Number(r.stdout.trim()) : null;
  };
  const uid = id(["-u", QEMU_USER.user]);
  const gid = spawnSync("getent", ["group", QEMU_USER.group], { encoding: "utf8" }).stdout?.split(":")[2];
  return uid === null || !gid || !/^\d+$/.test(gid) ? null : { uid, gid: Number(gid) };
}

/** Whether QEMU_USER (with its groups) can read `path`. */
function qemuCanRead(path: string): boolean {
  return spawnSync("setpriv", [`--reuid=${QEMU_USER.user}`, `--regid=${QEMU_USER.group}`, "--init-groups", "--", "test", "-r", path], { stdio: "ignore" }).status === 0;
}

/**
 * What an operator does for images QEMU (not root) must open: each file QEMU cannot read yet gets QEMU's group
 * with read access, and every directory above it the group's search bit. Files QEMU can read already stay as they are.
 */
function grantQemu(paths: string[]): void {
  const { gid } = qemuIds()!;
  for (const p of paths) {
    if (qemuCanRead(p)) continue;
    chownSync(p, statSync(p).uid, gid);
    chmodSync(p, statSync(p).mode | 0o040);
    for (let d = dirname(p); d !== "/"; d = dirname(d)) {
      const st = statSync(d);
      if ((st.mode & 0o001) === 0 && !(st.gid === gid && st.mode & 0o010)) { chownSync(d, st.uid, gid); chmodSync(d, st.mode | 0o010); }
    }
    if (!qemuCanRead(p)) throw new Error(`${p}: ${QEMU_USER.user} still cannot read it after granting group ${QEMU_USER.group} read access`);
  }
}

/** Resolves with `h` once its daemon answers (a daemon probing QEMU answers only when the probe is done). */
async function waitReady(h: LibvirtHost, timeoutMs = 180_000): Promise<LibvirtHost> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (h.daemon.exitCode !== null || h.daemon.signalCode !== null) {
      throw new Error(`libvirtd of host ${h.name} exited (${h.daemon.exitCode ?? h.daemon.signalCode}): ${h.stderrTail()}`);
    }
    if (existsSync(join(h.dir, "sock", "libvirt-sock"))) {
      try { await h.virsh.run(["version"], 5000); return h; } catch { /* not answering yet */ }
    }
    if (Date.now() > end) throw new Error(`libvirtd of host ${h.name} not ready in ${timeoutMs} ms (log: ${h.dir}/libvirtd.log)`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function destroyDomains(h: LibvirtHost): void {
  if (!alive(h.daemon.pid ?? -1)) return;
  const r = spawnSync("virsh", ["-c", h.uri, "list", "--all", "--name"], { encoding: "utf8", timeout: 10_000 });
  for (const dom of (r.stdout ?? "").split("\n").map((s) => s.trim()).filter(Boolean)) {
    spawnSync("virsh", ["-c", h.uri, "destroy", dom], { stdio: "ignore", timeout: 15_000 });
    spawnSync("virsh", ["-c", h.uri, "undefine", dom], { stdio: "ignore", timeout: 10_000 });
  }
}

/** QEMU processes libvirt started (daemonized, so not children of libvirtd): by the pid files in the host's run dir. */
function killQemus(h: LibvirtHost): void {
  const qdir = join(h.dir, "run", "qemu");
  let files: string[] = [];
  try { files = readdirSync(qdir).filter((f) => f.endsWith(".pid")); } catch { return; }
  for (const f of files) {
    const pid = Number(readFileSync(join(qdir, f), "utf8").trim());
    if (!(pid > 0) || !alive(pid)) continue;
    // Only a QEMU (a recycled pid could be anything).
    let comm = "";
    try { comm = readFileSync(`/proc/${pid}/comm`, "utf8"); } catch { continue; }
    if (comm.startsWith("qemu")) try { process.kill(pid, "SIGKILL"); } catch { /* gone */ }
    for (let i = 0; i < 50 && alive(pid); i++) sleepSync(100);
  }
}

function stopDaemon(h: LibvirtHost): void {
  stopProcess(h.daemon.pid, h.daemon.exitCode !== null);
}

/** SIGTERM, SIGKILL after `ms`; resolves once the child exited (and was reaped). */
async function exitOf(c: ChildProcess, ms = 5000): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const exited = new Promise<void>((r) => c.once("exit", () => r()));
  c.kill("SIGTERM");
  let t: NodeJS.Timeout | undefined;
  await Promise.race([exited, new Promise<void>((r) => { t = setTimeout(r, ms); })]);
  clearTimeout(t);
  if (c.exitCode === null && c.signalCode === null) {
    c.kill("SIGKILL");
    await exited;
  }
}

/** SIGTERM, up to 5 s, SIGKILL, and waits until it is gone: a process still in a namespace keeps `ip netns delete` from removing it. */
function stopProcess(pid: number | undefined, exited: boolean): void {
  if (!pid || exited || !alive(pid)) return;
  try { process.kill(pid, "SIGTERM"); } catch { return; }
  for (let i = 0; i < 50 && alive(pid); i++) sleepSync(100);
  if (alive(pid)) try { process.kill(pid, "SIGKILL"); } catch { /* gone */ }
  for (let i = 0; i < 50 && alive(pid); i++) sleepSync(100);
}

/**
 * A QEMU wrapper for the test domains: QEMU before 9.0 under TCG loses the guest's writes across a migration when
 * its RAM is a multiple of 256 KiB (docs/STREAM.md, "Destination guests that fail after RESUME"), and libvirt rounds
 * a domain's memory to whole MiB, so the wrapper adds TCG_RAM_PAD_KIB to `-m` and to the pc.ram backend libvirt
 * 9.0 passes (both, or neither: QEMU refuses a backend whose size differs from -m).
 */
export function tcgPadWrapper(): string {
  return String.raw`#!/bin/bash
pad_kib=${TCG_RAM_PAD_KIB}
args=("$@"); m=-1; obj=-1
backend='^(\{"qom-type":"memory-backend-[a-z]+","id":"pc\.ram","size":)([0-9]+)(.*)$'
for i in "${"$"}{!args[@]}"; do
  if [ "${"$"}{args[$i]}" = "-m" ] && [[ "${"$"}{args[$((i+1))]:-}" =~ ^[0-9]+$ ]]; then m=$((i+1)); fi
  if [[ "${"$"}{args[$i]}" =~ $backend ]]; then
    obj=$i; pre=${"$"}{BASH_REMATCH[1]}; size=${"$"}{BASH_REMATCH[2]}; post=${"$"}{BASH_REMATCH[3]}
  fi
done
if [ $m -ge 0 ] && [ $obj -ge 0 ]; then
  args[$m]="$(( ${"$"}{args[$m]} * 1024 + pad_kib ))k"
  args[$obj]="${"$"}{pre}$(( size + pad_kib * 1024 ))${"$"}{post}"
fi
exec /usr/bin/qemu-system-x86_64 "${"$"}{args[@]}"
`;
}
