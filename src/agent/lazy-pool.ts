// The source's worker pool, as the caller gave it: a pool, or a function that
// starts one when first needed (so that with workersWhen "switchover" the
// workers start during the live rounds, not during the connection). A pool
// that fails to start is no pool: the agent's own thread hashes.

import type { EnginePool } from "../pool/pool.js";
import type { PoolSession } from "../pool/session.js";

export class LazyPool {
  private scans: PoolSession | null = null;
  private started: Promise<EnginePool | null> | null = null;
  /** Workers in the pool (0 until its session exists). */
  size = 0;

  constructor(private readonly pool: EnginePool | (() => Promise<EnginePool>) | null | undefined, private readonly seed: bigint) {}

  /** The pool's session, once the pool has started (null: no pool, or it failed to start). */
  async session(): Promise<PoolSession | null> {
    if (this.scans || !this.pool) return this.scans;
    let pool: EnginePool | null;
    if (typeof this.pool === "function") {
      this.started ??= this.pool().catch(() => null);
      pool = await this.started;
    } else pool = this.pool;
    if (pool && !this.scans) {
      this.scans = pool.session({ seed: this.seed });
      this.size = pool.size;
    }
    return this.scans;
  }

  /** Start it now without waiting (a failure is no pool). */
  warm(): void {
    void this.session().catch(() => {});
  }

  /** Close the session, and the pool if this started it. */
  async close(): Promise<void> {
    await this.scans?.close();
    await this.started?.then((p) => p?.close());
  }
}
