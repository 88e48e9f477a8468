// Synthetic QEMU 7.2 multifd channels (compression none), for the multifd
// tests and the multifd bench.

import { randomBytes } from "node:crypto";
import { encodeInit, encodePacket, MULTIFD_FLAG, MULTIFD_PAGE, MULTIFD_PAGES_ALLOC } from "../../src/stream/multifd-format.js";

export interface ChannelOptions {
  id: number;
  /** Pages in order (4096 bytes each), sent in packets of up to 128. */
  pages: Buffer[];
  block?: string;
  uuid?: Buffer;
  /** Packet flags added to every packet with pages (e.g. a compression). */
  flags?: number;
}

/** Init packet, a SYNC, the pages in packets (offsets left over past pages_used, as QEMU's buffer reuse leaves them), a final SYNC. */
export function multifdChannel(o: ChannelOptions): Buffer {
  const offsets = Array.from({ length: MULTIFD_PAGES_ALLOC }, () => 0n);
  const block = o.block ?? "pc.ram";
  let num = BigInt(o.id);
  const sync = () => encodePacket({ flags: MULTIFD_FLAG.SYNC, pagesAlloc: MULTIFD_PAGES_ALLOC, pagesUsed: 0, ramblock: block, offsets: [...offsets], packetNum: num++, nextPacketSize: 0 });
  const parts = [encodeInit({ uuid: o.uuid ?? Buffer.alloc(16), channel: o.id }), sync()];
  for (let i = 0; i < o.pages.length; i += MULTIFD_PAGES_ALLOC) {
    const batch = o.pages.slice(i, i + MULTIFD_PAGES_ALLOC);
    batch.forEach((_, j) => { offsets[j] = BigInt((i + j) * MULTIFD_PAGE); });
    parts.push(encodePacket({ flags: o.flags ?? 0, pagesAlloc: MULTIFD_PAGES_ALLOC, pagesUsed: batch.length, ramblock: block, offsets: [...offsets], packetNum: num++ }), ...batch);
  }
  parts.push(sync());
  return Buffer.concat(parts);
}

/** `n` pages: every other one a copy of a block of `image` (a twin), the rest random. */
export function mixedPages(image: Buffer, n: number): Buffer[] {
  const blocks = image.length / MULTIFD_PAGE;
  return Array.from({ length: n }, (_, i) => (i % 2 === 0
    ? Buffer.from(image.subarray(((i * 7) % blocks) * MULTIFD_PAGE, ((i * 7) % blocks + 1) * MULTIFD_PAGE))
    : randomBytes(MULTIFD_PAGE)));
}
