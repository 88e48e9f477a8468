// The visualizer's Web Worker: hosts one real Engine (the wasm core) and one
// simulated migration, stepped one round per call (each call covers all of
// RAM, so comlink's per-call cost does not matter). The page runs two of these
// workers side by side: pagetwin and plain pre-copy.

// @ts-ignore -- comlink 4.4.2 has no exports map; types come from its declarations below
import * as comlinkEsm from "comlink/dist/esm/comlink.mjs";
import type * as ComlinkTypes from "comlink";
import { createEngine, type Engine } from "../../src/browser.js";
import { Simulation, type SimConfig, type SimIteration, type SimMode, type SimResult, type SimSetup } from "./sim.js";

const { expose, transfer } = comlinkEsm as typeof ComlinkTypes;

let engine: Promise<Engine> | null = null;
let sim: Simulation | null = null;

function getEngine(): Promise<Engine> {
  // the browser entry's inlined core: SIMD where the browser has it
  engine ??= createEngine();
  return engine;
}

export interface StartReply {
  setup: SimSetup;
  /** Time the worker took to make the VM and index its disk (real, ms). */
  setupMs: number;
}

const api = {
  async start(config: SimConfig, mode: SimMode): Promise<StartReply> {
    sim = null;
    const e = await getEngine();
    const t0 = performance.now();
    sim = Simulation.create(e, config, mode);
    return { setup: sim.setup(), setupMs: performance.now() - t0 };
  },

  /** The next round, or null when the migration is over. Its page map is transferred, not copied. */
  next(): (SimIteration & { computeMs: number }) | null {
    if (!sim) throw new Error("pagetwin worker: start a simulation first");
    const t0 = performance.now();
    const rec = sim.next();
    if (!rec) return null;
    const out = { ...rec, computeMs: performance.now() - t0 };
    return transfer(out, [rec.pageMap.buffer]);
  },

  result(): SimResult | null {
    return sim?.result() ?? null;
  },
};

export type WorkerApi = typeof api;

expose(api);
