// The guest's pause under libvirt is QEMU's downtime plus what QEMU's
// downtime-limit does not count: libvirt's finish (the destination resuming
// the guest after both QEMUs completed) and QEMU's last step after the stop.
// A migration through pagetwin asks QEMU for the guest's limit less a reserve
// for those, so that the pause the guest sees stays within the limit it has;
// on a failure the source's limit is set back (on success the domain left it).

import type { Virsh } from "../adapters/libvirt/virsh.js";

/** ms kept back from the guest's limit by default: libvirt's finish took 40–85 ms in docs/LIBVIRT.md's runs. */
export const DEFAULT_DOWNTIME_RESERVE_MS = 100;
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

  /** The guest's limit (virsh migrate-getmaxdowntime), or why it is not known; not asked when nothing is to be kept back. */
  limit(): Promise<number | Error> {
    return this.reserveMs > 0 ? this.virsh.maxDowntime(this.domain).catch((err: unknown) => err as Error) : Promise.resolve(new Error("--downtime-reserve 0"));
  }

  /** Lowers the source's limit (`limit()`'s answer) by the reserve; what it did, or a note why it did not. */
  async apply(limitMs: number | Error): Promise<{ reserved: DowntimeReserved } | { note: string }> {
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
