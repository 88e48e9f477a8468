// How fresh an image's index is, for `pagetwin index --status`: read from
// the index header and the image's stat, nothing hashed.

import { statSync } from "node:fs";
import { BLOCK_SIZE } from "./image.js";
import { defaultIndexPath, readIndexHeader } from "./index-file.js";
import { sameIdentity } from "./index-header.js";

export interface IndexStatus {
  image: string;
  index: string;
  /**
   * fresh: the image is as it was when the index was last built or refreshed;
   * stale: it was written since (the index is still used, stale entries cost resends);
   * missing: no index; mismatch: the image was resized (the next use rebuilds it).
   */
  state: "fresh" | "stale" | "missing" | "mismatch";
  generation?: number;
  blocks?: number;
  format?: string;
  chain?: string[];
  /** The index reflects the image as of this time (its last build or refresh), ISO 8601. */
  indexedAt?: string;
  refreshedBy?: string;
  builtAt?: string;
  /** Stale: the image's last write (its mtime), ISO 8601. */
  imageWrittenAt?: string;
  version?: number;
  why?: string;
}

export function indexStatus(imagePath: string, indexPath = defaultIndexPath(imagePath)): IndexStatus {
  const base = { image: imagePath, index: indexPath };
  let h;
  try {
    h = readIndexHeader(indexPath);
  } catch (err) {
    return { ...base, state: "missing", why: (err as Error).message };
  }
  const st = statSync(imagePath, { bigint: true });
  const identity = { size: Number(st.size), mtimeNs: st.mtimeNs, ino: st.ino };
  const iso = (ms: number) => (ms ? new Date(ms).toISOString() : undefined);
  const fields = {
    generation: h.generation, blocks: h.blocks, format: h.format, chain: h.chain, version: h.version, refreshedBy: h.refreshedBy,
    ...(h.refreshedAt ? { indexedAt: iso(h.refreshedAt)! } : {}), ...(h.builtAt ? { builtAt: iso(h.builtAt)! } : {}),
  };
  if (h.blockSize !== BLOCK_SIZE || h.blocks !== Math.floor(identity.size / BLOCK_SIZE)) {
    return { ...base, ...fields, state: "mismatch", why: `the index covers ${h.blocks} blocks, the image now has ${Math.floor(identity.size / BLOCK_SIZE)}` };
  }
  if (sameIdentity(h.identity, identity)) return { ...base, ...fields, state: "fresh" };
  return { ...base, ...fields, state: "stale", imageWrittenAt: new Date(Number(st.mtimeNs / 1_000_000n)).toISOString() };
}

/** One line for a terminal. */
export function formatStatus(s: IndexStatus): string {
  if (s.state === "missing") return `no index for ${s.image} (${s.why})`;
  const what = `${s.index}: generation ${s.generation}, ${s.blocks} blocks, ${s.format} (${s.chain?.length ? s.chain.join(" <- ") : "chain not recorded"})`;
  const when = s.indexedAt ? `indexed ${s.indexedAt} by ${s.refreshedBy}` : "indexed at an unrecorded time (version 1 index)";
  if (s.state === "fresh") return `fresh: ${what}; ${when}`;
  if (s.state === "mismatch") return `mismatch: ${what}; ${s.why}`;
  return `stale since ${s.indexedAt ?? "an unrecorded time"} (image last written ${s.imageWrittenAt}): ${what}; used as it is, stale entries cost resends until refreshed`;
}
