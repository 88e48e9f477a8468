// A planner iteration hashed on a pool: the workers read the RAM file and
// hash each window while this thread joins the previous one against the index.

import type { PoolSession } from "../pool/session.js";
import { Planner, collect, type IterationPlan, type PlanIterationOptions, type WindowPlan } from "./planner.js";
import { EngineMismatchError } from "../errors.js";
import { throwIfAborted } from "../abort.js";
import { PAGE_SIZE } from "../core/engine.js";

/**
 * Plans iteration `iteration` of the VM whose RAM is the file `ramPath`,
 * hashed by `session`'s workers (the next window is scanned while this one
 * is planned). The session's seed must be the planner engine's. The bytes of
 * the last window's pages stay in the workers: `session.pagesOf(pages)`.
 */
export async function planIterationPooled(planner: Planner, iteration: number, session: PoolSession, ramPath: string, o: PlanIterationOptions = {}): Promise<IterationPlan> {
  if (session.seed !== planner.engine.seed) {
    throw new EngineMismatchError("pagetwin: the pool session hashes with another seed than the Planner's engine; make it with pool.session({ seed: planner.engine.seed })");
  }
  const parts: WindowPlan[] = [];
  const scan = (first: number) => session.scanFile(ramPath, first, planner.windowCount(first), { signal: o.signal });
  let pending = scan(0);
  for (let first = 0; first < planner.pages; first += planner.windowPages) {
    const count = planner.windowCount(first);
    const { hashes, zeroBits } = await pending;
    const next = first + planner.windowPages;
    if (next < planner.pages) {
      pending = scan(next);
      pending.catch(() => {}); // awaited on the next turn; a failure before that must not go unhandled
    }
    throwIfAborted(o.signal, "planning the iteration");
    parts.push(planner.planWindowHashed(first, count, hashes, zeroBits));
    o.onProgress?.({ phase: "iteration", iteration, done: first + count, total: planner.pages, bytes: (first + count) * PAGE_SIZE });
  }
  return collect(iteration, parts);
}
