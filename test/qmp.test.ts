// Protocol unit tests of QmpClient against a fake QMP server on a unix socket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  QmpClient,
  QmpClosedError,
  QmpCommandError,
  QmpProtocolError,
  QmpTimeoutError,
  type QmpEvent,
} from '../src/adapters/qemu/qmp.js';

const GREETING = JSON.stringify({
  QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'Debian 1:7.2+dfsg-7' }, capabilities: ['oob'] },
});

interface Cmd {
  execute: string;
  id?: unknown;
  arguments?: Record<string, unknown>;
}

interface Fake {
  path: string;
  commands: Cmd[];
  close(): Promise<void>;
}

type Greeter = (sock: net.Socket) => void | Promise<void>;

/** The default greeter: a valid greeting in one write. */
const sendGreeting: Greeter = (sock) => {
  sock.write(`${GREETING}\r\n`);
};

/**
 * Start a fake QMP server. On connect `greet(sock)` runs (default: a valid
 * greeting); qmp_capabilities is answered automatically unless `onCommand`
 * returns true for it; every command is passed to `onCommand`.
 */
async function fakeQmp(
  onCommand: (cmd: Cmd, sock: net.Socket) => boolean | void,
  greet: Greeter = sendGreeting,
): Promise<Fake> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pt-qmp-'));
  const sockPath = path.join(dir, 'qmp.sock');
  const commands: Cmd[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => {});
    sock.setEncoding('utf8');
    let buf = '';
    sock.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as Cmd;
        commands.push(cmd);
        if (onCommand(cmd, sock) === true) continue;
        if (cmd.execute === 'qmp_capabilities') {
          sock.write(`${JSON.stringify({ return: {}, id: cmd.id })}\r\n`);
        }
      }
    });
    void greet(sock);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(sockPath, () => resolve());
  });
  return {
    path: sockPath,
    commands,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

const reply = (sock: net.Socket, id: unknown, ret: unknown): void => {
  sock.write(`${JSON.stringify({ return: ret, id })}\r\n`);
};

const lineOf = (msg: unknown): string => `${JSON.stringify(msg)}\r\n`;

test('greeting is read and qmp_capabilities sent before anything else', async () => {
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'query-status') reply(sock, cmd.id, { status: 'running', singlestep: false, running: true });
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    assert.equal(qmp.qemuVersion, '7.2.22');
    assert.deepEqual(qmp.greeting.QMP.capabilities, ['oob']);
    assert.equal(fake.commands[0]?.execute, 'qmp_capabilities');
    const st = await qmp.execute<{ status: string; running: boolean }>('query-status');
    assert.deepEqual(st, { status: 'running', singlestep: false, running: true });
    assert.equal(fake.commands[1]?.execute, 'query-status');
    assert.notEqual(fake.commands[0]?.id, fake.commands[1]?.id, 'each request has its own id');
    qmp.close();
    assert.equal(qmp.closed, true);
  } finally {
    await fake.close();
  }
});

test('arguments are sent as "arguments"', async () => {
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'migrate-set-capabilities') reply(sock, cmd.id, {});
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    const caps = { capabilities: [{ capability: 'x-ignore-shared', state: true }] };
    assert.deepEqual(await qmp.execute('migrate-set-capabilities', caps), {});
    assert.deepEqual(fake.commands[1]?.arguments, caps);
    assert.equal('arguments' in (fake.commands[0] ?? {}), false, 'no arguments key when none given');
    qmp.close();
  } finally {
    await fake.close();
  }
});

test('replies split across writes, several in one write, and out of order are matched by id', async () => {
  let held: Cmd[] = [];
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'split') {
      const text = lineOf({ return: { big: 'x'.repeat(5000), n: 1 }, id: cmd.id });
      // Byte by byte for the first bytes, then in chunks, pausing between writes.
      void (async () => {
        for (let i = 0; i < text.length;) {
          const n = i < 10 ? 1 : 997;
          sock.write(text.slice(i, i + n));
          i += n;
          await sleep(2);
        }
      })();
    } else if (cmd.execute === 'a' || cmd.execute === 'b' || cmd.execute === 'c') {
      held.push(cmd);
      if (held.length === 3) {
        // Answer in reverse order, all in one write, with an event in between.
        const [a, b, c] = held as [Cmd, Cmd, Cmd];
        held = [];
        sock.write(
          lineOf({ return: 'C', id: c.id }) +
          lineOf({ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }) +
          lineOf({ return: 'B', id: b.id }) + lineOf({ return: 'A', id: a.id }),
        );
      }
    }
  }, async (sock) => {
    // The greeting in two writes.
    sock.write(GREETING.slice(0, 9));
    await sleep(20);
    sock.write(`${GREETING.slice(9)}\r\n`);
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    const events: QmpEvent[] = [];
    qmp.on('event', (ev) => events.push(ev));
    const big = await qmp.execute<{ big: string; n: number }>('split');
    assert.equal(big.n, 1);
    assert.equal(big.big.length, 5000);
    const [a, b, c] = await Promise.all([qmp.execute('a'), qmp.execute('b'), qmp.execute('c')]);
    assert.deepEqual([a, b, c], ['A', 'B', 'C']);
    assert.deepEqual(events, [{ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }]);
    qmp.close();
  } finally {
    await fake.close();
  }
});

test('the greeting and a first event in one write', async () => {
  const fake = await fakeQmp(() => {}, (sock) => {
    sock.write(`${GREETING}\r\n${lineOf({ event: 'RESUME' })}`);
  });
  try {
    // The event arrives before anyone listens: connect must not choke on it.
    const qmp = await QmpClient.connect(fake.path);
    assert.equal(qmp.qemuVersion, '7.2.22');
    qmp.close();
  } finally {
    await fake.close();
  }
});

test('an error reply rejects with QmpCommandError carrying class and desc', async () => {
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'migrate-incoming') {
      sock.write(lineOf({ error: { class: 'GenericError', desc: "'-incoming' was not specified on the command line" }, id: cmd.id }));
    }
    if (cmd.execute === 'query-status') reply(sock, cmd.id, { status: 'paused', running: false });
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    const err = await qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:4444' }).then(
      () => assert.fail('should have been rejected'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof QmpCommandError);
    assert.equal(err.errorClass, 'GenericError');
    assert.equal(err.desc, "'-incoming' was not specified on the command line");
    assert.equal(err.command, 'migrate-incoming');
    assert.match(err.message, /migrate-incoming/);
    assert.match(err.message, /GenericError/);
    // The connection is still usable.
    assert.deepEqual(await qmp.execute('query-status'), { status: 'paused', running: false });
    qmp.close();
  } finally {
    await fake.close();
  }
});

test('a command with no reply times out with QmpTimeoutError; late replies are dropped', async () => {
  let slowId: unknown;
  let slowSock: net.Socket | undefined;
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'slow') {
      slowId = cmd.id;
      slowSock = sock;
    }
    if (cmd.execute === 'query-name') reply(sock, cmd.id, { name: 'pt' });
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    const t0 = Date.now();
    await assert.rejects(qmp.execute('slow', undefined, { timeoutMs: 80 }), (e: unknown) => {
      assert.ok(e instanceof QmpTimeoutError);
      assert.equal(e.command, 'slow');
      assert.match(e.message, /'slow' timed out after 80 ms/);
      return true;
    });
    assert.ok(Date.now() - t0 >= 70);
    // A reply that comes after the timeout must not confuse the next command.
    reply(slowSock!, slowId, 'late');
    assert.deepEqual(await qmp.execute('query-name'), { name: 'pt' });
    qmp.close();
  } finally {
    await fake.close();
  }
});

test('the socket closing mid-command rejects pending commands with QmpClosedError', async () => {
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'quit') setTimeout(() => sock.destroy(), 10);
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    const closed = new Promise<Error | undefined>((resolve) => qmp.once('close', resolve));
    const [r1, r2] = await Promise.allSettled([qmp.execute('quit'), qmp.execute('query-status')]);
    for (const [r, name] of [[r1, 'quit'], [r2, 'query-status']] as const) {
      assert.equal(r.status, 'rejected');
      const e = (r as PromiseRejectedResult).reason as unknown;
      assert.ok(e instanceof QmpClosedError, String(e));
      assert.equal(e.command, name);
      assert.match(e.message, new RegExp(`'${name}'`));
    }
    assert.ok((await closed) instanceof QmpClosedError);
    assert.equal(qmp.closed, true);
    // Later commands fail at once.
    await assert.rejects(qmp.execute('query-status'), QmpClosedError);
    await assert.rejects(qmp.waitForEvent('STOP', 1000), QmpClosedError);
  } finally {
    await fake.close();
  }
});

test('close() rejects pending commands with QmpClosedError', async () => {
  const fake = await fakeQmp(() => {});
  try {
    const qmp = await QmpClient.connect(fake.path);
    const p = qmp.execute('never');
    qmp.close();
    await assert.rejects(p, (e: unknown) => e instanceof QmpClosedError && /'never'/.test(e.message));
  } finally {
    await fake.close();
  }
});

test('a malformed greeting rejects with QmpProtocolError', async () => {
  for (const [greeting, re] of [
    ['this is not qmp\r\n', /not JSON/],
    [`${JSON.stringify({ hello: 1 })}\r\n`, /no "QMP" object/],
    [`${JSON.stringify({ QMP: 'x' })}\r\n`, /no "QMP" object/],
    ['[1,2]\n', /no "QMP" object/],
  ] as const) {
    const fake = await fakeQmp(() => {}, (sock) => {
      sock.write(greeting);
    });
    try {
      await assert.rejects(QmpClient.connect(fake.path), (e: unknown) => {
        assert.ok(e instanceof QmpProtocolError, `${String(e)} for ${greeting}`);
        assert.match(e.message, re);
        assert.match(e.message, /greeting/);
        return true;
      });
    } finally {
      await fake.close();
    }
  }
});

test('no greeting: connect times out; no server: QmpClosedError', async () => {
  const fake = await fakeQmp(() => {}, () => {});
  try {
    await assert.rejects(QmpClient.connect(fake.path, { timeoutMs: 100 }), QmpTimeoutError);
  } finally {
    await fake.close();
  }
  const missing = path.join(os.tmpdir(), `pt-qmp-missing-${process.pid}.sock`);
  await assert.rejects(QmpClient.connect(missing), QmpClosedError);
});

test('an unanswered qmp_capabilities rejects connect with QmpTimeoutError', async () => {
  const fake = await fakeQmp((cmd) => cmd.execute === 'qmp_capabilities');
  try {
    await assert.rejects(QmpClient.connect(fake.path, { timeoutMs: 150 }), (e: unknown) =>
      e instanceof QmpTimeoutError && e.command === 'qmp_capabilities');
  } finally {
    await fake.close();
  }
});

test('a malformed line after the greeting rejects pending commands with QmpProtocolError and closes', async () => {
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'query-status') sock.write('{"return": {"status": "runn\r\n');
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    const closed = new Promise<Error | undefined>((resolve) => qmp.once('close', resolve));
    await assert.rejects(qmp.execute('query-status'), (e: unknown) => {
      assert.ok(e instanceof QmpProtocolError, String(e));
      assert.match(e.message, /query-status/);
      assert.match(e.message, /not JSON/);
      return true;
    });
    assert.ok((await closed) instanceof QmpProtocolError);
    assert.equal(qmp.closed, true);
    await assert.rejects(qmp.execute('query-status'), QmpClosedError);
  } finally {
    await fake.close();
  }
});

test('events are delivered to listeners and to waitForEvent with a predicate', async () => {
  const fake = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'migrate') {
      reply(sock, cmd.id, {});
      void (async () => {
        for (const status of ['setup', 'active', 'completed']) {
          await sleep(5);
          sock.write(lineOf({ event: 'MIGRATION', data: { status }, timestamp: { seconds: 10, microseconds: 5 } }));
        }
        sock.write(lineOf({ event: 'STOP', timestamp: { seconds: 11, microseconds: 0 } }));
      })();
    }
  });
  try {
    const qmp = await QmpClient.connect(fake.path);
    const seen: QmpEvent[] = [];
    qmp.on('event', (ev) => seen.push(ev));
    const done = qmp.waitForEvent('MIGRATION', 2000,
      (ev) => (ev.data as { status?: string } | undefined)?.status === 'completed');
    const stop = qmp.waitForEvent('STOP', 2000);
    await qmp.execute('migrate', { uri: 'tcp:127.0.0.1:1' });
    const ev = await done;
    assert.deepEqual(ev, { event: 'MIGRATION', data: { status: 'completed' }, timestamp: { seconds: 10, microseconds: 5 } });
    assert.deepEqual((await stop).event, 'STOP');
    assert.deepEqual(seen.map((e) => e.event), ['MIGRATION', 'MIGRATION', 'MIGRATION', 'STOP']);
    await assert.rejects(qmp.waitForEvent('RESUME', 50), (e: unknown) =>
      e instanceof QmpTimeoutError && /RESUME/.test(e.message));
    assert.equal(qmp.listenerCount('event'), 1, 'waitForEvent removes its listeners');
    qmp.close();
  } finally {
    await fake.close();
  }
});
