/**
 * QemuVm: one qemu-system-x86_64 process whose guest RAM is a shared
 * memory-backend-file (share=on) that pagetwin can read and write, with a QMP
 * socket and the serial console in a log file.
 *
 * KVM does not work on the machines this was built on (DESIGN.md): the
 * default accelerator is TCG. Use detectKvm() before asking for 'kvm'.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient, QmpClosedError } from './qmp.js';

export const QEMU_BINARY = 'qemu-system-x86_64';
/**
 * A max-bandwidth (bytes/s) far above the links compared here: QEMU's own
 * default, 128 MiB/s in 7.2, would throttle it below a 1 Gbit/s link once
 * multifd compresses, so the comparisons lift it and the link is the limit.
 */
export const QEMU_UNTHROTTLED = 10_000_000_000;

/**
 * KiB added to the guest's RAM under TCG, so that its size is not a multiple of 256 KiB. QEMU before 9.0 syncs
 * the migration dirty bitmap of such a RAM block 64 pages at a time without resetting TCG's TLB
 * (cpu_physical_memory_sync_dirty_bitmap; fixed upstream by commit 03bfc2188f, "physmem: Fix migration dirty
 * bitmap coherency with TCG memory access"): the vCPU's later stores through TLB entries it already holds are
 * not marked dirty, so the destination gets stale pages (docs/STREAM.md, "Destination guests that fail after RESUME").
 * Any other size takes QEMU's page-by-page path, which resets the TLB. Under KVM the pad is not needed.
 */
export const TCG_RAM_PAD_KIB = 8;

/** Kernel command line used when none is given (the guest of scripts/build-guest.sh). */
export const DEFAULT_APPEND = 'console=ttyS0 quiet panic=1 no_timer_check';

export type DiskCacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';

export interface QemuVmOptions {
  kernel: string;
  initrd: string;
  /** Kernel command line (default DEFAULT_APPEND). pt_dirty=N etc. go here. */
  append?: string;
  /** Disk image, attached as virtio-blk /dev/vda. */
  disk: string;
  /** Its format (default 'raw'). */
  diskFormat?: 'raw' | 'qcow2';
  /** Attach the disk read-only (default true: both sides of a migration share it). */
  diskReadOnly?: boolean;
  /** -drive cache= mode (default: 'none' when the image's file system takes O_DIRECT, else 'writeback'). */
  diskCache?: DiskCacheMode;
  /** Guest RAM in MiB (default 512); under TCG QEMU gets TCG_RAM_PAD_KIB more unless `exactRam`. */
  memoryMiB?: number;
  /** Give QEMU exactly `memoryMiB` even under TCG (only to show what TCG_RAM_PAD_KIB avoids). */
  exactRam?: boolean;
  /** File backing guest RAM (memory-backend-file, share=on), e.g. /dev/shm/NAME. */
  memPath: string;
  /**
   * Guest RAM in anonymous memory (memory-backend-ram), as libvirt gives a guest by default, instead of memPath
   * (not created then): for comparisons of QEMU's own migration, where nothing else reads the guest's RAM and
   * the file's page cache would cost QEMU more than a guest on a real host pays.
   */
  anonymousRam?: boolean;
  /**
   * Allocate all guest RAM as QEMU starts (the backend's prealloc=on; libvirt's
   * <allocation mode='immediate'/>), not as the guest, or an incoming migration, first writes each page.
   */
  preallocRam?: boolean;
  /** cleanup() removes memPath (default true). */
  ownsMemFile?: boolean;
  /** Path of the QMP unix socket to create (keep it short: 107 bytes max). */
  qmpSocket: string;
  /**
   * More QMP unix sockets, each its own monitor, for other programs (e.g. `pagetwin migrate`)
   * while this object keeps `qmpSocket`. A QMP socket serves one client at a time.
   */
  extraQmpSockets?: string[];
  /** File that receives the serial console (ttyS0). Truncated at start. */
  serialLog: string;
  /** -incoming value, e.g. 'defer' or 'tcp:0.0.0.0:4444'. */
  incoming?: string;
  /** Run QEMU inside this network namespace (`ip netns exec NS ...`). */
  netns?: string;
  /** Accelerator (default 'tcg'). */
  accel?: 'tcg' | 'kvm';
  /** A name for the guest (-name). */
  name?: string;
  /** Extra QEMU arguments, appended last. */
  extraArgs?: string[];
  /** QEMU binary (default qemu-system-x86_64). */
  qemuBinary?: string;
  /** How long to wait for QEMU's QMP socket (default 30 s). */
  startTimeoutMs?: number;
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

const live = new Set<QemuVm>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Last resort if a test or tool dies without cleanup(): never leave a QEMU
  // or a 512 MiB RAM file behind.
  process.on('exit', () => {
    for (const vm of live) vm.cleanupSync();
  });
}

function rmQuiet(p: string): void {
  try {
    fs.rmSync(p, { force: true });
  } catch {
    /* ignore */
  }
}

/** True if the file system holding `file` accepts O_DIRECT opens (what cache=none needs). */
export function supportsODirect(file: string): boolean {
  const flag = fs.constants.O_DIRECT;
  if (flag === undefined) return false;
  try {
    const fd = fs.openSync(file, fs.constants.O_RDONLY | flag);
    fs.closeSync(fd);
    return true;
  } catch {
    return false;
  }
}

let qemuAvailableCache: boolean | undefined;
/** True if qemu-system-x86_64 runs (`--version`). */
export function qemuAvailable(binary: string = QEMU_BINARY): boolean {
  if (binary === QEMU_BINARY && qemuAvailableCache !== undefined) return qemuAvailableCache;
  const r = spawnSync(binary, ['--version'], { stdio: 'ignore', timeout: 10_000 });
  const ok = r.status === 0;
  if (binary === QEMU_BINARY) qemuAvailableCache = ok;
  return ok;
}

let kvmCache: boolean | undefined;
/**
 * True only if /dev/kvm exists, opens read-write, and QEMU with -accel kvm
 * starts a machine that keeps running for 2 s (on this project's machines
 * KVM is present but QEMU aborts: "MSR 0x10a"). A KVM that hangs later in a
 * guest's boot cannot be seen here. PAGETWIN_KVM=0/1 overrides the probe.
 */
export function detectKvm(): boolean {
  const env = process.env['PAGETWIN_KVM'];
  if (env === '0') return false;
  if (kvmCache !== undefined) return kvmCache;
  kvmCache = probeKvm(env === '1');
  return kvmCache;
}

function probeKvm(trustDevice: boolean): boolean {
  if (!fs.existsSync('/dev/kvm')) return false;
  try {
    fs.closeSync(fs.openSync('/dev/kvm', 'r+'));
  } catch {
    return false;
  }
  if (trustDevice) return true;
  if (!qemuAvailable()) return false;
  // No boot device: SeaBIOS runs and waits forever, which is what a working KVM does.
  const r = spawnSync(QEMU_BINARY, [
    '-accel', 'kvm', '-machine', 'pc', '-cpu', 'host', '-m', '64', '-nodefaults',
    '-display', 'none', '-no-reboot',
  ], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 2000, killSignal: 'SIGKILL' });
  const timedOut = (r.error as NodeJS.ErrnoException | undefined)?.code === 'ETIMEDOUT';
  return timedOut && r.signal === 'SIGKILL';
}

/** Build the QEMU argument list for `opts` (exported for inspection and tests). */
export function qemuArgs(opts: QemuVmOptions): string[] {
  const mem = opts.memoryMiB ?? 512;
  if (!Number.isInteger(mem) || mem <= 0) throw new RangeError(`memoryMiB must be a positive integer, got ${mem}`);
  const accel = opts.accel ?? 'tcg';
  const ramKiB = mem * 1024 + (accel === 'tcg' && !opts.exactRam ? TCG_RAM_PAD_KIB : 0);
  const cache = opts.diskCache ?? (supportsODirect(opts.disk) ? 'none' : 'writeback');
  const ro = opts.diskReadOnly ?? true;
  // QEMU option values escape ',' as ',,'.
  const commaSafe = (v: string): string => v.replace(/,/g, ',,');
  const args = [
    '-name', opts.name ?? 'pagetwin',
    '-accel', accel,
    '-m', `${ramKiB}K`,
    '-machine', 'memory-backend=mem',
    '-object', (opts.anonymousRam ? `memory-backend-ram,id=mem,size=${ramKiB}K` : `memory-backend-file,id=mem,size=${ramKiB}K,mem-path=${commaSafe(opts.memPath)},share=on`) + (opts.preallocRam ? ',prealloc=on' : ''),
    '-kernel', opts.kernel,
    '-initrd', opts.initrd,
    '-append', opts.append ?? DEFAULT_APPEND,
    '-drive', `file=${commaSafe(opts.disk)},if=virtio,format=${opts.diskFormat ?? 'raw'},cache=${cache}${ro ? ',readonly=on' : ''}`,
    '-nodefaults',
    '-display', 'none',
    '-no-reboot',
    '-serial', `file:${opts.serialLog}`,
    '-qmp', `unix:${commaSafe(opts.qmpSocket)},server=on,wait=off`,
  ];
  for (const sock of opts.extraQmpSockets ?? []) args.push('-qmp', `unix:${commaSafe(sock)},server=on,wait=off`);
  if (opts.incoming !== undefined) args.push('-incoming', opts.incoming);
  if (opts.extraArgs) args.push(...opts.extraArgs);
  return args;
}

export class QemuVm {
  readonly options: Readonly<QemuVmOptions>;
  readonly pid: number;
  /** QMP client, connected and in command mode. */
  readonly qmp: QmpClient;
  /** Resolves when the QEMU process has exited. */
  readonly exited: Promise<QemuExit>;
  private readonly child: ChildProcess;
  private exitInfo: QemuExit | undefined;
  private stderrText: string;
  private cleaned = false;

  private constructor(options: QemuVmOptions, child: ChildProcess, exited: Promise<QemuExit>,
    stderr: { text: string }, qmp: QmpClient) {
    this.options = options;
    this.child = child;
    this.pid = child.pid!;
    this.exited = exited;
    this.qmp = qmp;
    this.stderrText = stderr.text;
    // Keep collecting stderr.
    child.stderr?.on('data', (d: Buffer) => {
      this.stderrText = (this.stderrText + d.toString('utf8')).slice(-64 * 1024);
    });
    void exited.then((e) => { this.exitInfo = e; });
  }

  /** Launch QEMU, wait for its QMP socket, and connect. */
  static async start(opts: QemuVmOptions): Promise<QemuVm> {
    const bin = opts.qemuBinary ?? QEMU_BINARY;
    for (const [what, p] of [['kernel', opts.kernel], ['initrd', opts.initrd], ['disk', opts.disk]] as const) {
      if (!fs.existsSync(p)) throw new Error(`QemuVm: ${what} not found: ${p}`);
    }
    for (const sock of [opts.qmpSocket, ...(opts.extraQmpSockets ?? [])]) {
      if (Buffer.byteLength(sock) > 107) throw new Error(`QemuVm: QMP socket path too long for a unix socket: ${sock}`);
    }
    const args = qemuArgs(opts);
    fs.mkdirSync(path.dirname(opts.serialLog), { recursive: true });
    fs.mkdirSync(path.dirname(opts.qmpSocket), { recursive: true });
    fs.writeFileSync(opts.serialLog, '');
    rmQuiet(opts.qmpSocket);
    for (const sock of opts.extraQmpSockets ?? []) rmQuiet(sock);

    const [cmd, cmdArgs] = opts.netns !== undefined
      ? ['ip', ['netns', 'exec', opts.netns, bin, ...args]]
      : [bin, args];
    const child = spawn(cmd, cmdArgs, { stdio: ['ignore', 'pipe', 'pipe'] });
    const stderr = { text: '' };
    const onErr = (d: Buffer): void => { stderr.text = (stderr.text + d.toString('utf8')).slice(-64 * 1024); };
    child.stderr!.on('data', onErr);
    child.stdout!.on('data', onErr);
    let exitInfo: QemuExit | undefined;
    let spawnError: Error | undefined;
    const exited = new Promise<QemuExit>((resolve) => {
      child.once('error', (err) => {
        spawnError = err;
        exitInfo = { code: null, signal: null };
        resolve(exitInfo);
      });
      child.once('exit', (code, signal) => {
        exitInfo = { code, signal };
        resolve(exitInfo);
      });
    });
    const ownsMem = opts.ownsMemFile ?? true;
    const failStart = async (why: string): Promise<never> => {
      if (!exitInfo) {
        child.kill('SIGKILL');
        await exited;
      }
      rmQuiet(opts.qmpSocket);
      for (const sock of opts.extraQmpSockets ?? []) rmQuiet(sock);
      if (ownsMem) rmQuiet(opts.memPath);
      const text = stderr.text.trim();
      throw new Error(`QemuVm: ${why}${text ? `\nqemu stderr:\n${text}` : ' (qemu printed nothing on stderr)'}` +
        `\ncommand: ${[cmd, ...cmdArgs].join(' ')}`);
    };

    const deadline = Date.now() + (opts.startTimeoutMs ?? 30_000);
    let qmp: QmpClient | undefined;
    let lastErr: unknown;
    while (!qmp) {
      if (spawnError) return failStart(`cannot run ${cmd}: ${spawnError.message}`);
      if (exitInfo) {
        return failStart(`qemu exited during start (code ${exitInfo.code}, signal ${exitInfo.signal})`);
      }
      if (Date.now() > deadline) {
        return failStart(`QMP socket ${opts.qmpSocket} not ready after ${opts.startTimeoutMs ?? 30_000} ms` +
          (lastErr instanceof Error ? ` (last error: ${lastErr.message})` : ''));
      }
      if (fs.existsSync(opts.qmpSocket)) {
        try {
          qmp = await QmpClient.connect(opts.qmpSocket, { timeoutMs: Math.max(1000, deadline - Date.now()) });
          break;
        } catch (err) {
          lastErr = err;
          if (!(err instanceof QmpClosedError)) return failStart(`QMP handshake failed: ${(err as Error).message}`);
        }
      }
      await Promise.race([sleep(50), exited]);
    }
    child.stderr!.off('data', onErr);
    child.stdout!.off('data', onErr);
    child.stdout!.resume();
    const vm = new QemuVm(opts, child, exited, stderr, qmp);
    vm.exitInfo = exitInfo;
    live.add(vm);
    installExitHook();
    return vm;
  }

  /** Exit status once QEMU has exited, else undefined. */
  get exitStatus(): QemuExit | undefined {
    return this.exitInfo;
  }

  /** True while the QEMU process runs. */
  get running(): boolean {
    return this.exitInfo === undefined;
  }

  /**
   * QEMU's best configuration for a migration over a network: multifd with
   * `channels` channels and zstd compression. Both ends must be set before
   * the stream starts (the destination with `-incoming defer`).
   */
  async useMultifdZstd(channels = 2): Promise<void> {
    await this.useMultifd(channels, 'zstd');
  }

  /** Multifd with `channels` channels and QEMU's `compression` ('none': what stream mode deduplicates); both ends, as above. */
  async useMultifd(channels: number, compression: 'none' | 'zlib' | 'zstd'): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
    await this.qmp.execute('migrate-set-parameters', { 'multifd-channels': channels, 'multifd-compression': compression });
  }

  /** Everything QEMU wrote on stderr (last 64 KiB). */
  stderr(): string {
    return this.stderrText;
  }

  /** Everything the guest printed on its serial console so far. */
  serialLog(): string {
    try {
      return fs.readFileSync(this.options.serialLog, 'utf8');
    } catch {
      return '';
    }
  }

  /**
   * Wait until the serial log (from character `since` on) matches `re`.
   * Rejects on timeout or if QEMU exits first, quoting the end of the log.
   */
  async waitForSerial(re: RegExp, timeoutMs: number, since = 0): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = this.serialLog().slice(since);
      const m = text.match(re);
      if (m) return m;
      const tail = (): string => text.slice(-2000);
      if (this.exitInfo) {
        throw new Error(`QemuVm: qemu exited (code ${this.exitInfo.code}, signal ${this.exitInfo.signal}) ` +
          `before serial matched ${re}\nserial tail:\n${tail()}\nqemu stderr:\n${this.stderrText.trim()}`);
      }
      if (Date.now() >= deadline) {
        throw new Error(`QemuVm: serial did not match ${re} within ${timeoutMs} ms\nserial tail:\n${tail()}`);
      }
      await Promise.race([sleep(100), this.exited]);
    }
  }

  /** Ask QEMU to quit over QMP (SIGKILL after timeoutMs) and wait for it to exit. */
  async quit(timeoutMs = 5000): Promise<QemuExit> {
    if (!this.exitInfo) {
      await this.qmp.execute('quit', undefined, { timeoutMs }).catch(() => undefined);
      const t = setTimeout(() => { if (!this.exitInfo) this.child.kill('SIGKILL'); }, timeoutMs);
      await this.exited;
      clearTimeout(t);
    }
    return this.exited;
  }

  /** SIGKILL QEMU and wait for it to exit. */
  async kill(): Promise<QemuExit> {
    if (!this.exitInfo) this.child.kill('SIGKILL');
    return this.exited;
  }

  /** Close QMP, kill QEMU, remove the QMP socket and (if owned) the RAM file. Idempotent. */
  async cleanup(): Promise<void> {
    this.qmp.close();
    await this.kill();
    this.removeFiles();
    live.delete(this);
  }

  /** Synchronous cleanup for process exit hooks. */
  cleanupSync(): void {
    if (!this.exitInfo) {
      try {
        this.child.kill('SIGKILL');
      } catch {
        /* ignore */
      }
    }
    this.removeFiles();
    live.delete(this);
  }

  private removeFiles(): void {
    if (this.cleaned) return;
    this.cleaned = true;
    rmQuiet(this.options.qmpSocket);
    for (const sock of this.options.extraQmpSockets ?? []) rmQuiet(sock);
    if (this.options.ownsMemFile ?? true) rmQuiet(this.options.memPath);
  }
}

export interface GuestImage {
  kernel: string;
  initrd: string;
  disk: string;
}

/**
 * Where scripts/build-guest.sh put the guest: $PAGETWIN_CACHE (default ./.cache)
 * guest/vmlinuz, guest/initrd.gz, nas/disk.img. Undefined if any is missing.
 */
export function findGuest(cacheDir: string = process.env['PAGETWIN_CACHE'] ?? path.join(process.cwd(), '.cache')): GuestImage | undefined {
  const g: GuestImage = {
    kernel: path.join(cacheDir, 'guest', 'vmlinuz'),
    initrd: path.join(cacheDir, 'guest', 'initrd.gz'),
    disk: path.join(cacheDir, 'nas', 'disk.img'),
  };
  for (const p of [g.kernel, g.initrd, g.disk]) {
    try {
      if (fs.statSync(p).size === 0) return undefined;
    } catch {
      return undefined;
    }
  }
  return g;
}
