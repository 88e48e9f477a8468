// Worker threads that serve the proxies' sessions (stream-out's encoders,
// stream-in's rebuilders): a session takes the worker with the fewest
// sessions and keeps it; every call it makes is one message, answered in
// order, so answers resolve the session's calls oldest first. A plain
// MessagePort protocol: comlink's proxies cost more per message than these
// per-chunk calls can spend. A worker that fails fails its sessions' calls.

import { Worker, isMainThread, parentPort } from "node:worker_threads";

/** Every message names its session (0: the worker itself); the rest is the call's. */
export interface Message { t: string; id: number; [field: string]: unknown }
/** A worker's refusal of a call. */
export interface ErrorAnswer extends Message { t: "error"; message: string }

export class SessionWorkers {
  private constructor(private readonly members: WorkerHandle[]) {}

  /** `size` workers of the script at `url`, each started with `data`; resolves once every one is ready. */
  static async start(url: URL, data: unknown, size: number, what: string): Promise<SessionWorkers> {
    const started = await Promise.allSettled(Array.from({ length: size }, () => WorkerHandle.start(url, data)));
    const up = started.flatMap((m) => (m.status === "fulfilled" ? [m.value] : []));
    const failed = started.find((m) => m.status === "rejected");
    if (failed) {
      await Promise.all(up.map((m) => m.close()));
      throw new Error(`${what}: a worker did not start: ${(failed.reason as Error).message}`);
    }
    return new SessionWorkers(up);
  }

  get size(): number {
    return this.members.length;
  }

  /** The worker with the fewest sessions. */
  pick(): WorkerHandle {
    return this.members.reduce((a, b) => (b.sessions.size < a.sessions.size ? b : a));
  }

  async close(): Promise<void> {
    await Promise.all(this.members.map((m) => m.close()));
  }
}

export class WorkerHandle {
  readonly sessions = new Map<number, WorkerSession>();
  private closing = false;
  private static nextId = 1;

  private constructor(private readonly worker: Worker) {
    worker.on("message", (m: Message) => this.sessions.get(m.id)?.answer(m));
    worker.on("error", (e) => this.lost(`the worker failed: ${e.message}`));
    worker.on("exit", (code) => { if (!this.closing) this.lost(`the worker exited (code ${code})`); });
  }

  static start(url: URL, data: unknown): Promise<WorkerHandle> {
    const worker = new Worker(url, { workerData: data });
    return new Promise((resolve, reject) => {
      const early = (e: Error | number) => reject(typeof e === "number" ? new Error(`it exited (code ${e})`) : e);
      worker.once("error", early);
      worker.once("exit", early);
      worker.once("message", (m: Message) => {
        worker.off("error", early);
        worker.off("exit", early);
        if (m.t === "ready") resolve(new WorkerHandle(worker));
        else reject(new Error(m.t === "error" ? (m as ErrorAnswer).message : `unexpected ${m.t}`));
      });
    });
  }

  /** A new session's id on this worker. */
  join(s: WorkerSession): number {
    const id = WorkerHandle.nextId++;
    this.sessions.set(id, s);
    return id;
  }

  leave(id: number): void {
    this.sessions.delete(id);
  }

  post(m: Message, transfer: ArrayBuffer[] = []): void {
    this.worker.postMessage(m, transfer);
  }

  /** Asks the worker to let go of what it opened (files) and end; ends it anyway after a second. */
  async close(): Promise<void> {
    this.closing = true;
    const exited = new Promise((r) => this.worker.once("exit", r));
    this.worker.postMessage({ t: "shutdown", id: 0 } satisfies Message);
    const t = setTimeout(() => void this.worker.terminate(), 1000);
    await exited;
    clearTimeout(t);
  }

  private lost(why: string): void {
    for (const s of this.sessions.values()) s.lost(new Error(why));
    this.sessions.clear();
  }
}

/** Counts gathered since the last call (per disk of a migration), for an answer, and zeroed; undefined when none were kept. */
export function takeCounts(counts: number[]): number[] | undefined {
  if (!counts.length) return undefined;
  const out = counts.slice();
  counts.fill(0);
  return out;
}

/** Adds what takeCounts took (in another thread) to `into`. */
export function addCounts(into: number[], from: readonly number[] | undefined): void {
  from?.forEach((n, i) => { if (n) into[i] = (into[i] ?? 0) + n; });
}

/**
 * Memory handed back and forth with a worker (transferred, then handed back
 * once used): a spare buffer that fits, else a new one of at least `min`
 * bytes, so that it fits again (fresh memory costs page faults every time).
 */
export class SpareBuffers {
  private readonly free: ArrayBuffer[] = [];

  constructor(private readonly min: number) {}

  take(n: number): ArrayBuffer {
    const i = this.free.findIndex((b) => b.byteLength >= n);
    return i >= 0 ? this.free.splice(i, 1)[0]! : new ArrayBuffer(Math.max(n, this.min));
  }

  give(...buffers: ArrayBuffer[]): void {
    this.free.push(...buffers);
  }
}

type Waiter = { resolve: (m: Message) => void; reject: (e: Error) => void };

/** A session's side of its worker: ask() posts a call and resolves with its answer. */
export abstract class WorkerSession {
  protected failure: Error | null = null;
  private readonly waiting: Waiter[] = [];
  protected readonly id: number;

  constructor(protected readonly worker: WorkerHandle) {
    this.id = worker.join(this);
  }

  /** The worker's answer to the oldest call. */
  answer(m: Message): void {
    const w = this.waiting.shift();
    if (!w) return;
    if (m.t === "error") w.reject(this.refused(m as ErrorAnswer));
    else w.resolve(m);
  }

  /** The worker is gone: every call fails, and every later one. */
  lost(err: Error): void {
    this.failure = err;
    for (const w of this.waiting.splice(0)) w.reject(err);
  }

  /** The error a refused call rejects with. */
  protected refused(m: ErrorAnswer): Error {
    return new Error(m.message);
  }

  protected ask(msg: Message, transfer: ArrayBuffer[] = []): Promise<Message> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.worker.post(msg, transfer);
    });
  }

  /** Posts a message no answer comes for. */
  protected tell(msg: Message): void {
    if (!this.failure) this.worker.post(msg);
  }

  protected leave(): void {
    this.worker.leave(this.id);
  }
}

/** A session call's answer, with what it transfers. */
export interface Reply { answer: Message; transfer?: ArrayBuffer[] }

/**
 * The worker's side: `setup` once (then "ready"), and each message handled
 * in order (a handler may wait: the next message waits behind it); a call's
 * reply goes back (null: none is due, as for a message told), a call that
 * throws is answered with its error. "shutdown" (SessionWorkers.close)
 * runs `teardown` and closes the port: the thread ends.
 */
export async function serveSessions<T>(setup: () => Promise<T>, handle: (m: Message, state: T) => Reply | null | Promise<Reply | null>,
  describe: (err: unknown, m: Message) => Message, teardown?: (state: T) => void): Promise<void> {
  if (isMainThread || !parentPort) return;
  const port = parentPort;
  let state: T;
  try {
    state = await setup();
  } catch (err) {
    port.postMessage({ t: "error", id: 0, message: (err as Error).message } satisfies ErrorAnswer);
    return;
  }
  let turn: Promise<void> = Promise.resolve();
  const reply = (r: Reply | null) => { if (r) port.postMessage(r.answer, r.transfer ?? []); };
  port.on("message", (m: Message) => {
    if (m.t === "shutdown") {
      void turn.then(() => { teardown?.(state); port.close(); });
      return;
    }
    // one message at a time, in the order they came: a handler that waits holds the later ones back
    turn = turn.then(() => handle(m, state)).then(reply, (err: unknown) => reply({ answer: describe(err, m) }));
  });
  port.postMessage({ t: "ready", id: 0 });
}
