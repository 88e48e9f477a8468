// One open thing per key for the whole service, reference-counted: every
// migration of an image uses the same open index (or, on the destination,
// the same open image and engine). After the last release it stays open for
// `idleMs` (the next migration of the same images then starts without
// loading them again), unless `current` says the file changed meanwhile; an
// open that failed is forgotten, so the next migration tries again.

interface Entry<T> { value: Promise<T>; refs: number; idle: NodeJS.Timeout | null }

export interface SharedOptions<T> {
  /** How long an unused value stays open, ms (default 0: closed at once). */
  idleMs?: number;
  /** Whether an idle value still stands for its key's file (false: it is closed and opened again). */
  current?: (key: string, value: T) => boolean;
}

export class Shared<T> {
  private readonly open = new Map<string, Entry<T>>();

  constructor(private readonly opener: (key: string) => Promise<T>, private readonly closer: (v: T) => void, private readonly o: SharedOptions<T> = {}) {}

  acquire(key: string): Promise<T> {
    let e = this.open.get(key);
    if (e?.idle) {
      clearTimeout(e.idle);
      e.idle = null;
      e.value = this.reopenIfChanged(key, e.value);
    }
    if (!e) {
      e = { value: this.opener(key), refs: 0, idle: null };
      this.open.set(key, e);
    }
    const entry = e;
    entry.value.catch(() => { if (this.open.get(key) === entry) this.open.delete(key); });
    entry.refs++;
    return entry.value;
  }

  /** Acquires every key; on a failure, what was acquired is released again. */
  async acquireAll(keys: readonly string[]): Promise<T[]> {
    const got = keys.map((k) => this.acquire(k));
    try {
      return await Promise.all(got);
    } catch (err) {
      await Promise.allSettled(got);
      for (const k of keys) this.release(k);
      throw err;
    }
  }

  release(key: string): void {
    const e = this.open.get(key);
    if (!e || e.refs === 0) return;
    if (--e.refs > 0) return;
    const idleMs = this.o.idleMs ?? 0;
    if (idleMs <= 0) { this.close(key, e); return; }
    e.idle = setTimeout(() => this.close(key, e), idleMs);
    e.idle.unref();
  }

  /** Closes every idle value now (the service stops). */
  closeIdle(): void {
    for (const [k, e] of this.open) if (e.refs === 0) this.close(k, e);
  }

  /** Keys open now, with their users (for status; 0: open, unused). */
  users(): Record<string, number> {
    return Object.fromEntries([...this.open].map(([k, e]) => [k, e.refs]));
  }

  private close(key: string, e: Entry<T>): void {
    if (e.idle) clearTimeout(e.idle);
    e.idle = null;
    if (this.open.get(key) === e) this.open.delete(key);
    e.value.then((v) => this.closer(v), () => {});
  }

  private async reopenIfChanged(key: string, value: Promise<T>): Promise<T> {
    const v = await value;
    if (!this.o.current || this.o.current(key, v)) return v;
    this.closer(v);
    return this.opener(key);
  }
}
