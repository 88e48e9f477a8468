// One pass over the source's RAM, window by window in page order: read and
// hashed on this thread, or hashed by the pool's workers, which scan the next
// window while this one is on the link.

import { PAGE_SIZE } from "../core/engine.js";
import type { Planner, WindowPlan } from "../plan/planner.js";
import type { PoolSession } from "../pool/session.js";
import type { ScanResult } from "../pool/worker-api.js";
import type { RamReader } from "./source-types.js";

export interface PlannedWindow {
  plan: WindowPlan;
  /** The bytes of plan.send[i], valid until the next window is planned. */
  bytesOf: (i: number) => Uint8Array;
}

export class PassWindows {
  private pending: Promise<ScanResult> | null = null;

  constructor(private readonly planner: Planner, private readonly ram: RamReader, private readonly pool: PoolSession | null, private readonly ramPath = "") {
    if (pool) this.pending = this.scan(0);
  }

  /** Plan the window at `first` (windows must be asked for in order). */
  async plan(first: number): Promise<PlannedWindow> {
    const count = this.planner.windowCount(first);
    if (!this.pool) return this.planHere(first, count);
    const scan = await this.pending!;
    const plan = this.planner.planWindowHashed(first, count, scan.hashes, scan.zeroBits);
    const bytes = await this.pool.pagesOf(plan.send);
    const next = first + this.planner.windowPages;
    if (next < this.planner.pages) this.pending = this.scan(next);
    return { plan, bytesOf: (i) => bytes.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE) };
  }

  private planHere(first: number, count: number): PlannedWindow {
    this.ram.readPages(first, count, this.planner.window.view(0, count * PAGE_SIZE));
    const plan = this.planner.planWindow(first, count);
    const win = this.planner.window.view();
    return {
      plan,
      bytesOf: (i) => {
        const off = this.planner.pageOffset(first, plan.send[i]!);
        return win.subarray(off, off + PAGE_SIZE);
      },
    };
  }

  private scan(first: number): Promise<ScanResult> {
    const p = this.pool!.scanFile(this.ramPath, first, this.planner.windowCount(first));
    p.catch(() => {}); // awaited by plan(); a failure (or an abort) before that must not go unhandled
    return p;
  }
}
