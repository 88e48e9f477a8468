/**
 * `pagetwin/nas` (Node): the NAS side. The block index of a disk image, raw
 * or qcow2 with its backing chain (built once, kept beside the image, used as
 * it is when the image was written since, and refreshed), the image itself,
 * guest RAM files, and the verifier that checks blocks against their hashes
 * before anything uses them.
 *
 * @example
 * ```ts
 * import { openNasIndex } from "pagetwin/nas";
 * const ac = new AbortController();
 * const nas = await openNasIndex("/nas/vm.img", { signal: ac.signal, onProgress: (p) => console.log(p.done, "/", p.total) });
 * console.log(nas.header.blocks, "blocks,", nas.built ? "built" : "loaded");
 * nas.image.close();
 * ```
 * @packageDocumentation
 */

/** The block index: open (load or build) it, read its header, make a seed. */
export {
  openNasIndex, readIndexHeader, defaultIndexPath, randomSeed,
  type NasIndex, type OpenIndexOptions, type IndexHeader,
} from "../adapters/nas/index-file.js";
/** The image on the NAS, in 4 KiB guest blocks: raw, or qcow2 read through its chain (openDisk picks by magic). */
export { DiskImage, BLOCK_SIZE, type ImageIdentity, type GuestDisk, type DiskFormat } from "../adapters/nas/image.js";
export { openDisk, type OpenDiskOptions } from "../adapters/nas/disk.js";
/** How fresh an index is, and bringing a stale one up to date by re-reading the image (at a bounded rate). */
export { indexStatus, formatStatus, type IndexStatus } from "../adapters/nas/index-status.js";
export { refreshByReread, type RefreshOptions, type RefreshResult } from "../adapters/nas/refresh.js";
/** Guest RAM as a file of pages. */
export { RamFile } from "../adapters/ram/ram-file.js";
/** Reads blocks and checks them against the hashes they must have. */
export { BlockVerifier } from "../adapters/nas/verify.js";
/** The errors this entry throws on purpose. */
export { PagetwinError, NasError, RamFileError, EngineMismatchError, AbortError, ImageFormatError, UnsupportedImageError, IndexFormatError } from "../errors.js";
export type { AbortOptions } from "../abort.js";
export type { Progress } from "../log.js";
