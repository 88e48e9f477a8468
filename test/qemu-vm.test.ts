// Boots the real test guest (scripts/build-guest.sh) under QEMU/TCG, if available.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { QemuVm, TCG_RAM_PAD_KIB, detectKvm, qemuAvailable, qemuArgs } from '../src/adapters/qemu/vm.js';
import { guest, skipRealGuest } from './helpers/guest.js';
import { tcgPadWrapper } from './helpers/libvirt.js';
import { spawnSync } from 'node:child_process';

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie still answers kill(0); look at its state.
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) Z/.test(stat);
  } catch {
    return false;
  }
}

test('qemuArgs: shared RAM file, virtio disk, QMP socket, serial file, incoming', () => {
  const args = qemuArgs({
    kernel: '/k', initrd: '/i', disk: '/dev/null', memPath: '/dev/shm/x', qmpSocket: '/tmp/q.sock',
    serialLog: '/tmp/s.log', memoryMiB: 256, incoming: 'defer', diskCache: 'writeback',
  });
  const joined = args.join(' ');
  assert.match(joined, /-accel tcg/);
  assert.match(joined, /-m 262152K/);
  assert.match(joined, /-machine memory-backend=mem/);
  assert.match(joined, /memory-backend-file,id=mem,size=262152K,mem-path=\/dev\/shm\/x,share=on/);
  assert.match(joined, /file=\/dev\/null,if=virtio,format=raw,cache=writeback,readonly=on/);
  assert.match(joined, /-serial file:\/tmp\/s\.log/);
  assert.match(joined, /-qmp unix:\/tmp\/q\.sock,server=on,wait=off/);
  assert.match(joined, /-incoming defer$/);
});

test('qemuArgs: anonymous RAM (as libvirt gives a guest) on request: no file, the same padded size', () => {
  const args = qemuArgs({ kernel: '/k', initrd: '/i', disk: '/dev/null', memPath: '/dev/shm/x', anonymousRam: true, qmpSocket: '/q', serialLog: '/s', memoryMiB: 256, diskCache: 'none' });
  const joined = args.join(' ');
  assert.match(joined, /-m 262152K -machine memory-backend=mem -object memory-backend-ram,id=mem,size=262152K /);
  assert.doesNotMatch(joined, /mem-path|share=on|\/dev\/shm/);
});

test('qemuArgs: RAM allocated as QEMU starts on request (prealloc=on), anonymous or file-backed; not by default', () => {
  const base = { kernel: '/k', initrd: '/i', disk: '/dev/null', memPath: '/dev/shm/x', qmpSocket: '/q', serialLog: '/s', memoryMiB: 256, diskCache: 'none' as const };
  assert.match(qemuArgs({ ...base, anonymousRam: true, preallocRam: true }).join(' '), / memory-backend-ram,id=mem,size=262152K,prealloc=on /);
  assert.match(qemuArgs({ ...base, preallocRam: true }).join(' '), / memory-backend-file,id=mem,size=262152K,mem-path=\/dev\/shm\/x,share=on,prealloc=on /);
  assert.doesNotMatch(qemuArgs(base).join(' '), /prealloc/);
});

test('qemuArgs: under TCG the RAM is not a multiple of 256 KiB (QEMU < 9.0 loses dirty pages then), whole pages, exact on request or under KVM', () => {
  const ramKiB = (o: { accel?: 'tcg' | 'kvm'; exactRam?: boolean; memoryMiB?: number }): number => {
    const args = qemuArgs({ kernel: '/k', initrd: '/i', disk: '/dev/null', memPath: '/m', qmpSocket: '/q', serialLog: '/s', diskCache: 'none', ...o });
    const m = /^(\d+)K$/.exec(args[args.indexOf('-m') + 1]!);
    assert.ok(m, 'the -m value is in KiB');
    assert.match(args.join(' '), new RegExp(`memory-backend-file,id=mem,size=${m[1]}K,`), 'the backend has the same size');
    return Number(m[1]);
  };
  for (const mib of [64, 512, 2048]) {
    const k = ramKiB({ memoryMiB: mib });
    assert.equal(k, mib * 1024 + TCG_RAM_PAD_KIB);
    assert.notEqual(k % 256, 0);
    assert.equal(k % 4, 0);
  }
  assert.equal(ramKiB({ exactRam: true }), 512 * 1024);
  assert.equal(ramKiB({ accel: 'kvm' }), 512 * 1024);
});

test("the libvirt test domains' QEMU wrapper pads -m and libvirt's pc.ram backend together, or neither", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pt-tcgpad-'));
  try {
    // the wrapper with its exec replaced by printing the arguments it would pass
    const script = path.join(dir, 'wrapper');
    fs.writeFileSync(script, tcgPadWrapper().replace(/^exec \S+ /m, 'printf "%s\\n" '));
    const argv = (...args: string[]) => spawnSync('bash', [script, ...args], { encoding: 'utf8' }).stdout.trimEnd().split('\n');
    const backend = (size: number) => `{"qom-type":"memory-backend-ram","id":"pc.ram","size":${size}}`;
    const padded = argv('-name', 'g', '-m', '512', '-object', backend(512 * 2 ** 20), '-overcommit', 'mem-lock=off');
    assert.deepEqual(padded, ['-name', 'g', '-m', `${512 * 1024 + TCG_RAM_PAD_KIB}k`, '-object', backend(512 * 2 ** 20 + TCG_RAM_PAD_KIB * 1024), '-overcommit', 'mem-lock=off']);
    assert.deepEqual(argv('-m', '512'), ['-m', '512']);
    assert.deepEqual(argv('-machine', 'none', '-qmp', 'stdio'), ['-machine', 'none', '-qmp', 'stdio']);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('QemuVm.start rejects with qemu stderr when qemu exits early', { skip: qemuAvailable() ? false : 'qemu-system-x86_64 not installed' }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pt-vm-'));
  const memPath = `/dev/shm/pagetwin-test-bad-${process.pid}`;
  try {
    for (const f of ['k', 'i', 'd']) fs.writeFileSync(path.join(dir, f), 'x');
    await assert.rejects(QemuVm.start({
      kernel: path.join(dir, 'k'), initrd: path.join(dir, 'i'), disk: path.join(dir, 'd'),
      memPath, qmpSocket: path.join(dir, 'q.sock'), serialLog: path.join(dir, 's.log'),
      extraArgs: ['-no-such-option'],
    }), (e: unknown) => {
      assert.ok(e instanceof Error);
      assert.match(e.message, /qemu exited during start/);
      assert.match(e.message, /no-such-option/);
      return true;
    });
    assert.equal(fs.existsSync(memPath), false);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(memPath, { force: true });
  }
});

const skipBoot = skipRealGuest;

test('boots the real guest under TCG, counts on serial, answers QMP, cleans up', { skip: skipBoot, timeout: 240_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pt-vm-'));
  const memPath = `/dev/shm/pagetwin-test-${process.pid}`;
  const g = guest!;
  const t0 = Date.now();
  const vm = await QemuVm.start({
    ...g,
    append: 'console=ttyS0 quiet panic=1 no_timer_check pt_dirty=1',
    memoryMiB: 512,
    memPath,
    qmpSocket: path.join(dir, 'qmp.sock'),
    serialLog: path.join(dir, 'serial.log'),
    accel: 'tcg',
    name: 'pagetwin-test',
  });
  try {
    assert.ok(fs.existsSync(memPath), 'the RAM file exists while the guest runs');
    assert.equal(fs.statSync(memPath).size, (512 * 1024 + TCG_RAM_PAD_KIB) * 1024);
    assert.match(vm.qmp.qemuVersion ?? '', /^\d+\.\d+\.\d+$/);
    await vm.waitForSerial(/pagetwin-ready/, 180_000);
    const tReady = Date.now() - t0;
    await vm.waitForSerial(/pagetwin-counter 3\b/, 30_000);
    const read = /pagetwin-read-bytes (\d+)/.exec(vm.serialLog());
    t.diagnostic(`kvm usable: ${detectKvm()}; guest ready after ${tReady} ms, counter 3 after ${Date.now() - t0} ms; ` +
      `read ${read ? (Number(read[1]) / 1e6).toFixed(1) : '?'} MB from the disk`);
    const st = await vm.qmp.execute<{ status: string; running: boolean }>('query-status');
    assert.equal(st.status, 'running');
    assert.equal(st.running, true);
  } finally {
    await vm.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  assert.equal(vm.running, false);
  assert.equal(processAlive(vm.pid), false, 'qemu process is gone');
  assert.equal(fs.existsSync(memPath), false, 'RAM file removed');
  assert.equal(fs.existsSync(path.join(dir, 'qmp.sock')), false, 'QMP socket removed');
});
