/**
 * `pagetwin/plan`: the planner of pre-copy iterations. Per window of guest
 * RAM it tells which dirty pages are zero, which are twins of NAS blocks and
 * which travel in full; the convergence policy says when to switch over.
 * Works wherever the core does (Node and browsers); the pooled variant needs
 * a `pagetwin/pool` session (Node).
 *
 * @example
 * ```ts
 * import { Planner, planIterationAsync } from "pagetwin/plan";
 * import { openNasIndex } from "pagetwin/nas";
 * const nas = await openNasIndex("/nas/vm.img");
 * const planner = new Planner(nas.engine, { pages: ramBytes / 4096, index: nas.index });
 * const plan = await planIterationAsync(planner, 1, async (first, count, into) => {
 *   await fh.read(into, 0, count * 4096, first * 4096);
 * });
 * console.log(plan.twin, "twins,", plan.normal, "sent in full");
 * ```
 * @packageDocumentation
 */

/** The planner, and the runners of one whole iteration (sync reader, async reader, pool). */
export {
  Planner, planIteration, planIterationAsync,
  type PlannerOptions, type WindowPlan, type IterationStats, type IterationPlan,
  type WindowReader, type AsyncWindowReader, type PlanIterationOptions,
} from "../plan/planner.js";
export { planIterationPooled } from "../plan/pooled.js";
/** When to stop pre-copy. */
export {
  ConvergencePolicy, type ConvergenceOptions, type ConvergenceDecision, type CapReason, type IterationMeasure,
} from "../plan/convergence.js";
/** The errors this entry throws on purpose. */
export { PagetwinError, EngineMismatchError, AsyncReaderError, AbortError } from "../errors.js";
export type { AbortOptions } from "../abort.js";
export type { Progress } from "../log.js";
