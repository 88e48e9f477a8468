// The two ends of a libvirt migration: what listens where the source QEMU
// connects (--migrateuri) and what feeds the destination QEMU
// (--listen-address). pagetwin's services put their proxies there; "direct"
// leaves libvirt's own QEMU-to-QEMU connection (the baseline).

import type { DomainDisk } from "./domain-xml.js";

export interface EndsRequest {
  domain: string;
  uuid?: string;
  /** The disks twins may come from (shared storage, same path on both hosts). */
  disks: DomainDisk[];
  /** The virsh migrate options that reach QEMU's stream (--parallel, --compressed, --tls, ...), for the ends to judge. */
  virshArgs: string[];
  /** The migration's bandwidth, MiB/s, as the user gave libvirt (virsh migrate --bandwidth, or migrate-setspeed before); absent: none. */
  bandwidthMiBs?: number;
}

/** What the ends report when the migration ended (their own stats: bytes on the link, twins per disk, verdict). */
export type EndsReport = Record<string, unknown>;

export interface PreparedEnds {
  /** libvirt's --migrateuri (undefined: libvirt picks its own). */
  migrateUri?: string;
  /** libvirt's --listen-address (undefined: the destination's default). */
  listenAddress?: string;
  /** What the user should know (a stream passed through without dedup, ...). */
  notes: string[];
  /** QEMU's max-bandwidth for this migration, MiB/s (virsh migrate --bandwidth, replacing the user's): the ends took the user's limit over. */
  qemuBandwidthMiBs?: number;
  /** The migration ended (ok: libvirt reported success): the final report; releases what prepare() set up. */
  finish(ok: boolean): Promise<EndsReport>;
}

export interface MigrationEnds {
  /** "pagetwin" or "direct", in reports. */
  readonly kind: string;
  prepare(req: EndsRequest): Promise<PreparedEnds>;
}

/** No proxies: libvirt's own migration, with the addresses the user gave (the baseline a pagetwin run is compared with). */
export class DirectEnds implements MigrationEnds {
  readonly kind = "direct";
  constructor(private readonly migrateUri?: string, private readonly listenAddress?: string) {}

  async prepare(): Promise<PreparedEnds> {
    return {
      ...(this.migrateUri ? { migrateUri: this.migrateUri } : {}),
      ...(this.listenAddress ? { listenAddress: this.listenAddress } : {}),
      notes: [],
      finish: async () => ({}),
    };
  }
}
