// One worker thread of a pool and the promise that fails the moment it is
// gone, so a call on a dead worker fails instead of hanging.

import { Worker } from "node:worker_threads";
import { wrap, nodeEndpoint } from "./comlink.js";
import type { PoolWorkerApi, PoolWorkerCalls, WorkerConfig } from "./worker-api.js";
import { PoolClosedError, PoolWorkerError } from "../errors.js";

export interface Member {
  /** Slot in the pool. */
  slot: number;
  /** Counts the workers this slot has had: state kept by an earlier one is gone. */
  generation: number;
  worker: Worker;
  api: PoolWorkerCalls;
  /** Rejects when the worker dies (PoolWorkerError) or the pool closes it (PoolClosedError). */
  dead: Promise<never>;
  /** Set once the worker is gone. */
  gone: boolean;
}

export interface StartMember {
  slot: number;
  generation: number;
  url: URL;
  config: WorkerConfig;
  /** True while the pool is closing: an exit then is not a crash. */
  closing: () => boolean;
  /** Told when the worker dies on its own (the pool replaces it). */
  onCrash: (m: Member, err: PoolWorkerError) => void;
}

export async function startMember(s: StartMember): Promise<Member> {
  // a small young generation: a worker's pages live in its wasm memory and it
  // allocates little else, which a default-sized one would still let grow resident
  const worker = new Worker(s.url, { workerData: s.config, resourceLimits: { maxYoungGenerationSizeMb: 4 } });
  let fail: (e: Error) => void = () => {};
  const dead = new Promise<never>((_, reject) => { fail = reject; });
  dead.catch(() => {}); // observed by calls; not an unhandled rejection on its own
  const member: Member = { slot: s.slot, generation: s.generation, worker, api: null as unknown as PoolWorkerCalls, dead, gone: false };
  const gone = (why: string, cause?: unknown) => {
    if (member.gone) return;
    member.gone = true;
    if (s.closing()) return fail(new PoolClosedError("pagetwin pool: the pool was closed during this call"));
    const err = new PoolWorkerError(`pagetwin pool: worker ${s.slot} ${why}; the call on it failed, the pool starts a new worker`, { cause });
    fail(err);
    s.onCrash(member, err);
  };
  worker.on("error", (err) => gone(`died: ${err.message}`, err));
  worker.on("exit", (code) => gone(`exited (code ${code})`));
  await Promise.race([new Promise<void>((resolve) => worker.once("message", () => resolve())), dead]);
  worker.unref();
  member.api = wrap<PoolWorkerApi>(nodeEndpoint(worker)) as unknown as PoolWorkerCalls;
  return member;
}
