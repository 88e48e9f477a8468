// The guest's pause under libvirt is QEMU's downtime plus what QEMU's
// downtime-limit does not count: libvirt's finish (the destination resuming
// the guest after both QEMUs completed) and QEMU's last step after the stop.
// Asked to (`--downtime-reserve`), a migration asks QEMU for the guest's limit
// less a reserve for those, so that the pause the guest sees stays within the
// limit it has; on a failure the source's limit is set back (on success the
// domain left it). Not by default: under TCG the step after the stop varies by
// hundreds of ms, and runs with and without a reserve did not differ
// (docs/LIBVIRT.md).

import type { Virsh } from "../adapters/libvirt/virsh.js";

/** QEMU is never asked for less than this share of the guest's limit: a tight limit converges later, or never. */
const LEAST_SHARE = 0.5;

export interface DowntimeReserved {
  /** The guest's limit (virsh migrate-getmaxdowntime), ms. */
  limitMs: number;
  /** What QEMU was asked for during the migration, ms. */
  askedMs: number;
}

export class DowntimeReserve {
  private reserved: DowntimeReserved | null = null;

  constructor(private readonly virsh: Virsh, private readonly domain: string, private readonly reserveMs: number) {}

  /** The guest's limit (virsh migrate-getmaxdowntime), or why it is not known; null: nothing is to be kept back. */
  limit(): Promise<number | Error | null> {
    return this.reserveMs > 0 ? this.virsh.maxDowntime(this.domain).catch((err: unknown) => err as Error) : Promise.resolve(null);
  }

  /** Lowers the source's limit (`limit()`'s answer) by the reserve; what it did, a note why it did not, or null when not asked to. */
  async apply(limitMs: number | Error | null): Promise<{ reserved: DowntimeReserved } | { note: string } | null> {
    if (limitMs === null) return null;
    if (limitMs instanceof Error) return { note: `QEMU's downtime-limit left as the guest has it (${limitMs.message})` };
    const askedMs = Math.max(limitMs - this.reserveMs, Math.ceil(limitMs * LEAST_SHARE));
    if (askedMs >= limitMs) return { note: `QEMU's downtime-limit left at ${limitMs} ms: too small to keep ${this.reserveMs} ms back` };
    await this.virsh.setMaxDowntime(this.domain, askedMs);
    this.reserved = { limitMs, askedMs };
    return { reserved: this.reserved };
  }

  /** After a failure: the guest is still on the source, with the limit it had. */
  async restore(): Promise<void> {
    if (!this.reserved) return;
    await this.virsh.setMaxDowntime(this.domain, this.reserved.limitMs);
    this.reserved = null;
  }
}
