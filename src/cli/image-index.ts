// The commands' way to get a NAS image's block index: progress while it is
// hashed, and a warning for the tail of an image that is not whole blocks.

import { openNasIndex, type NasIndex, type OpenIndexOptions } from "../adapters/nas/index-file.js";
import { BLOCK_SIZE } from "../adapters/nas/image.js";
import type { ProgressReporter } from "./progress.js";

export async function openImageIndex(image: string, progress: ProgressReporter, opts: Omit<OpenIndexOptions, "onProgress"> = {}): Promise<NasIndex> {
  const nas = await openNasIndex(image, { ...opts, onProgress: (p) => progress.update("indexing", p.done, p.total, "blocks") });
  const tail = nas.image.size % BLOCK_SIZE;
  if (tail) {
    process.stderr.write(`pagetwin: warning: ${image} is ${nas.image.size} bytes, not a whole number of ${BLOCK_SIZE}-byte blocks: ` +
      `its last ${tail} bytes are not indexed (no page can be found there)\n`);
  }
  return nas;
}
