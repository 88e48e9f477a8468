/**
 * `pagetwin/nas` (Node): the NAS side. The block index of a raw disk image
 * (built once, kept beside the image, reloaded while the image is
 * unchanged), the image itself, guest RAM files, and the verifier that
 * checks blocks against their hashes before anything uses them.
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
/** The raw image on the NAS, in 4 KiB blocks. */
export { DiskImage, BLOCK_SIZE, type ImageIdentity } from "../adapters/nas/image.js";
/** Guest RAM as a file of pages. */
export { RamFile } from "../adapters/ram/ram-file.js";
/** Reads blocks and checks them against the hashes they must have. */
export { BlockVerifier } from "../adapters/nas/verify.js";
/** The errors this entry throws on purpose. */
export { PagetwinError, NasError, RamFileError, EngineMismatchError, AbortError } from "../errors.js";
export type { AbortOptions } from "../abort.js";
export type { Progress } from "../log.js";
