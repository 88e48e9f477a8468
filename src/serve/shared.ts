// One open thing per key for the whole service, reference-counted: every
// migration of an image uses the same open index (or, on the destination,
// the same open image and engine). The last release closes it; an open that
// failed is forgotten, so the next migration tries again.

export class Shared<T> {
  private readonly open = new Map<string, { value: Promise<T>; refs: number }>();

  constructor(private readonly opener: (key: string) => Promise<T>, private readonly closer: (v: T) => void) {}

  acquire(key: string): Promise<T> {
    let e = this.open.get(key);
    if (!e) {
      e = { value: this.opener(key), refs: 0 };
      this.open.set(key, e);
      const entry = e;
      entry.value.catch(() => { if (this.open.get(key) === entry) this.open.delete(key); });
    }
    e.refs++;
    return e.value;
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
    if (!e) return;
    if (--e.refs > 0) return;
    this.open.delete(key);
    e.value.then((v) => this.closer(v), () => {});
  }

  /** Keys open now, with their users (for status). */
  users(): Record<string, number> {
    return Object.fromEntries([...this.open].map(([k, e]) => [k, e.refs]));
  }
}
