/**
 * A minimal, strict QMP (QEMU Machine Protocol) client over a unix socket.
 *
 * Protocol: on connect QEMU sends a greeting `{"QMP": {...}}`; the client must
 * send `qmp_capabilities` before any other command. Each command may carry an
 * `id`, echoed in its reply (`{"return": ...}` or `{"error": {"class", "desc"}}`).
 * Asynchronous events (`{"event": ..., "data": ..., "timestamp": {...}}`) may
 * arrive at any time. Messages are JSON objects separated by CRLF/LF.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export interface QmpEvent {
  event: string;
  data?: unknown;
  timestamp?: QmpTimestamp;
}

export interface QmpGreeting {
  QMP: {
    version?: {
      qemu?: { major: number; minor: number; micro: number };
      package?: string;
    };
    capabilities?: unknown[];
  };
}

export interface QmpConnectOptions {
  /** Time allowed for connect + greeting + qmp_capabilities (default 10 s). */
  timeoutMs?: number;
}

export interface QmpExecuteOptions {
  /** Reject with QmpTimeoutError after this long (default 30 s; 0 = never). */
  timeoutMs?: number;
}

export { QmpError, QmpProtocolError, QmpCommandError, QmpTimeoutError, QmpClosedError } from '../../errors.js';
import { QmpProtocolError, QmpCommandError, QmpTimeoutError, QmpClosedError } from '../../errors.js';

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;
/** A single QMP message larger than this is treated as a protocol error. */
const MAX_LINE_BYTES = 64 * 1024 * 1024;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function preview(line: string): string {
  return line.length > 120 ? `${JSON.stringify(line.slice(0, 120))}...` : JSON.stringify(line);
}

export interface QmpClient {
  on(event: 'event', listener: (ev: QmpEvent) => void): this;
  on(event: 'close', listener: (err: Error | undefined) => void): this;
  once(event: 'event', listener: (ev: QmpEvent) => void): this;
  once(event: 'close', listener: (err: Error | undefined) => void): this;
  off(event: 'event', listener: (ev: QmpEvent) => void): this;
  off(event: 'close', listener: (err: Error | undefined) => void): this;
  emit(event: 'event', ev: QmpEvent): boolean;
  emit(event: 'close', err: Error | undefined): boolean;
}

/** A QMP client on a unix socket: connect(), execute(), QEMU events as "event", "close" when the connection ends. */
export class QmpClient extends EventEmitter {
  /** The greeting QEMU sent (version, capabilities). */
  readonly greeting: QmpGreeting;
  private readonly socket: net.Socket;
  private readonly pending = new Map<string, Pending>();
  private nextId = 1;
  private buffer = '';
  private closedError: QmpClosedError | undefined;

  private constructor(socket: net.Socket, greeting: QmpGreeting, rest: string) {
    super();
    this.socket = socket;
    this.greeting = greeting;
    this.buffer = rest;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err: Error) => this.shutdown(`socket error: ${err.message}`));
    socket.on('close', () => this.shutdown('socket closed by peer'));
  }

  /**
   * Connect to a QMP unix socket, read and validate the greeting, and enter
   * command mode (qmp_capabilities).
   */
  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const started = Date.now();
    const { socket, greeting, rest } = await new Promise<{
      socket: net.Socket; greeting: QmpGreeting; rest: string;
    }>((resolve, reject) => {
      const socket = net.createConnection({ path });
      socket.setEncoding('utf8');
      let buf = '';
      let done = false;
      const finish = (err: Error | undefined, value?: { greeting: QmpGreeting; rest: string }): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        socket.off('data', onData);
        socket.off('error', onError);
        socket.off('close', onClose);
        if (err) {
          socket.on('error', () => {});
          socket.destroy();
          reject(err);
        } else {
          socket.pause();
          resolve({ socket, greeting: value!.greeting, rest: value!.rest });
        }
      };
      const onData = (chunk: string): void => {
        buf += chunk;
        const nl = buf.indexOf('\n');
        if (nl < 0) {
          if (buf.length > MAX_LINE_BYTES) finish(new QmpProtocolError(`QMP greeting from ${path} is too long`));
          return;
        }
        const line = buf.slice(0, nl).trim();
        const rest = buf.slice(nl + 1);
        let msg: unknown;
        try {
          msg = JSON.parse(line);
        } catch {
          finish(new QmpProtocolError(`malformed QMP greeting from ${path} (not JSON): ${preview(line)}`));
          return;
        }
        if (!isObject(msg) || !isObject(msg['QMP'])) {
          finish(new QmpProtocolError(`malformed QMP greeting from ${path} (no "QMP" object): ${preview(line)}`));
          return;
        }
        finish(undefined, { greeting: msg as unknown as QmpGreeting, rest });
      };
      const onError = (err: Error): void => {
        finish(new QmpClosedError(undefined, `cannot connect to ${path}: ${err.message}`));
      };
      const onClose = (): void => {
        finish(new QmpClosedError(undefined, `${path} closed before the QMP greeting`));
      };
      const timer = setTimeout(() => {
        finish(new QmpTimeoutError(path, timeoutMs, 'greeting from'));
      }, timeoutMs);
      socket.on('data', onData);
      socket.on('error', onError);
      socket.on('close', onClose);
    });
    const client = new QmpClient(socket, greeting, '');
    socket.resume();
    // Lines that arrived together with the greeting are processed now.
    if (rest.length > 0) client.onData(rest);
    const left = Math.max(1, timeoutMs - (Date.now() - started));
    try {
      await client.execute('qmp_capabilities', undefined, { timeoutMs: left });
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /** True once the connection is closed; further commands reject at once. */
  get closed(): boolean {
    return this.closedError !== undefined;
  }

  /** QEMU's version from the greeting, e.g. "7.2.22", or undefined. */
  get qemuVersion(): string | undefined {
    const q = this.greeting.QMP.version?.qemu;
    return q ? `${q.major}.${q.minor}.${q.micro}` : undefined;
  }

  /** Run a command; resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: object, opts: QmpExecuteOptions = {}): Promise<T> {
    if (this.closedError) {
      return Promise.reject(new QmpClosedError(command, this.closedError.message));
    }
    const id = `pt-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg['arguments'] = args;
    return new Promise<T>((resolve, reject) => {
      const entry: Pending = {
        command,
        resolve: resolve as (value: unknown) => void,
        reject,
        timer: undefined,
      };
      if (timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new QmpTimeoutError(command, timeoutMs));
        }, timeoutMs);
      }
      this.pending.set(id, entry);
      this.socket.write(`${JSON.stringify(msg)}\n`, (err) => {
        if (err && this.pending.get(id) === entry) {
          this.pending.delete(id);
          if (entry.timer) clearTimeout(entry.timer);
          reject(new QmpClosedError(command, `write failed: ${err.message}`));
        }
      });
    });
  }

  /**
   * Wait for the next event called `name` (for which `predicate` holds, if given).
   * Rejects with QmpTimeoutError after timeoutMs, or QmpClosedError on close.
   */
  waitForEvent(name: string, timeoutMs: number, predicate?: (ev: QmpEvent) => boolean): Promise<QmpEvent> {
    if (this.closedError) {
      return Promise.reject(new QmpClosedError(undefined, `waiting for event ${name}: ${this.closedError.message}`));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      const onEvent = (ev: QmpEvent): void => {
        if (ev.event !== name) return;
        let ok = true;
        if (predicate) {
          try {
            ok = predicate(ev);
          } catch (err) {
            cleanup();
            reject(err instanceof Error ? err : new Error(String(err)));
            return;
          }
        }
        if (!ok) return;
        cleanup();
        resolve(ev);
      };
      const onClose = (err: Error | undefined): void => {
        cleanup();
        reject(new QmpClosedError(undefined, `while waiting for event ${name}: ${err?.message ?? 'closed'}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new QmpTimeoutError(name, timeoutMs, 'event'));
      }, timeoutMs);
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  /** Close the connection; pending commands reject with QmpClosedError. */
  close(): void {
    this.shutdown('closed by client');
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    if (this.closedError) return;
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line.length === 0) continue;
      this.onLine(line);
      if (this.closedError) return;
    }
    if (this.buffer.length > MAX_LINE_BYTES) {
      this.protocolError(`QMP message longer than ${MAX_LINE_BYTES} bytes`);
    }
  }

  private onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      this.protocolError(`malformed QMP message (not JSON): ${preview(line)}`);
      return;
    }
    if (!isObject(msg)) {
      this.protocolError(`malformed QMP message (not an object): ${preview(line)}`);
      return;
    }
    if (typeof msg['event'] === 'string') {
      const ev: QmpEvent = { event: msg['event'] };
      if ('data' in msg) ev.data = msg['data'];
      if (isObject(msg['timestamp'])) ev.timestamp = msg['timestamp'] as unknown as QmpTimestamp;
      this.emit('event', ev);
      return;
    }
    const isReturn = 'return' in msg;
    const isError = isObject(msg['error']);
    if (!isReturn && !isError) {
      this.protocolError(`unexpected QMP message: ${preview(line)}`);
      return;
    }
    const id = msg['id'];
    let key: string | undefined = typeof id === 'string' ? id : undefined;
    if (key === undefined) {
      // A reply without our id (e.g. to a malformed request QEMU could not parse):
      // attribute it to the oldest pending command, as QMP answers in order.
      key = this.pending.keys().next().value;
    }
    const entry = key !== undefined ? this.pending.get(key) : undefined;
    if (!entry || key === undefined) {
      // Reply to a command that already timed out: drop it.
      return;
    }
    this.pending.delete(key);
    if (entry.timer) clearTimeout(entry.timer);
    if (isError) {
      const e = msg['error'] as Record<string, unknown>;
      entry.reject(new QmpCommandError(
        entry.command,
        typeof e['class'] === 'string' ? e['class'] : 'GenericError',
        typeof e['desc'] === 'string' ? e['desc'] : JSON.stringify(e),
      ));
    } else {
      entry.resolve(msg['return']);
    }
  }

  private protocolError(message: string): void {
    const err = new QmpProtocolError(message);
    this.shutdown(message, err);
    this.socket.destroy();
  }

  private shutdown(reason: string, cause?: QmpProtocolError): void {
    if (this.closedError) return;
    this.closedError = new QmpClosedError(undefined, reason);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      if (p.timer) clearTimeout(p.timer);
      if (cause) {
        p.reject(new QmpProtocolError(`QMP command '${p.command}' aborted: ${cause.message}`));
      } else {
        p.reject(new QmpClosedError(p.command, reason));
      }
    }
    this.emit('close', cause ?? (reason === 'closed by client' ? undefined : this.closedError));
  }
}
