// Which 4 KiB pages differ between two RAM files of the same size: after a
// migration, the source's (stopped) RAM against the destination's (paused
// before it runs) shows any page the migration left stale.

import { closeSync, openSync, readSync } from "node:fs";

const PAGE = 4096;
const CHUNK = 8 << 20;

export interface RamDiff {
  /** Pages compared, and their bytes. */
  pages: number;
  bytes: number;
  /** How many differ. */
  differing: number;
  /** The first differing pages' byte offsets (at most `keep`). */
  offsets: number[];
}

/** Compares two RAM files page by page; throws if their sizes differ. */
export function diffRamFiles(a: string, b: string, keep = 16): RamDiff {
  const fa = openSync(a, "r"), fb = openSync(b, "r");
  const ba = Buffer.allocUnsafe(CHUNK), bb = Buffer.allocUnsafe(CHUNK);
  const out: RamDiff = { pages: 0, bytes: 0, differing: 0, offsets: [] };
  try {
    for (let pos = 0; ; pos += CHUNK) {
      const na = readSync(fa, ba, 0, CHUNK, pos), nb = readSync(fb, bb, 0, CHUNK, pos);
      if (na !== nb) throw new Error(`${a} and ${b} differ in size near byte ${pos + Math.min(na, nb)}`);
      if (na === 0) return out;
      out.pages += Math.ceil(na / PAGE);
      out.bytes += na;
      if (ba.compare(bb, 0, na, 0, na) === 0) continue;
      for (let p = 0; p < na; p += PAGE) {
        const end = Math.min(p + PAGE, na);
        if (ba.compare(bb, p, end, p, end) === 0) continue;
        out.differing++;
        if (out.offsets.length < keep) out.offsets.push(pos + p);
      }
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

/** Two files, byte for byte (a migration's RAM at both ends): the bytes compared, or an error naming the first differing page. */
export function compareFiles(a: string, b: string): number {
  const d = diffRamFiles(a, b, 1);
  if (d.differing) {
    const at = d.offsets[0]!;
    throw new Error(`${a} and ${b} differ at byte ${at} (page ${at / PAGE}; ${d.differing} of ${d.pages} pages differ)`);
  }
  return d.bytes;
}
