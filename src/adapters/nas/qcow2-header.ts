// The qcow2 header (docs/interop/qcow2.txt in QEMU): what a reader of the
// guest-visible disk needs, checked, and every feature that would change what
// the guest sees but is not read here refused by name.

import { readSync } from "node:fs";
import { ImageFormatError, UnsupportedImageError } from "../../errors.js";

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Guest-visible bytes. */
  size: number;
  l1Size: number;
  l1Offset: number;
  compression: "zlib" | "zstd";
  /** As written in the image (relative names are relative to the image's directory). */
  backingFile: string | null;
  /** From the backing format extension; null when the image does not say. */
  backingFormat: string | null;
}

const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;

/** Incompatible feature bits: the ones this reader handles, and the names of the ones it refuses. */
const INCOMPAT_DIRTY = 0n, INCOMPAT_CORRUPT = 1n, INCOMPAT_EXTERNAL_DATA = 2n, INCOMPAT_COMPRESSION = 3n, INCOMPAT_EXTENDED_L2 = 4n;

export function readQcow2Header(fd: number, path: string): Qcow2Header {
  const fixed = readExact(fd, path, 0, 104, "the header", true);
  if (fixed.readUInt32BE(0) !== QCOW2_MAGIC) throw new ImageFormatError(`pagetwin: ${path} is not a qcow2 image (bad magic)`);
  const version = fixed.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new UnsupportedImageError(path, `qcow version ${version}`, "convert it with `qemu-img convert -O qcow2`");
  const clusterBits = fixed.readUInt32BE(20);
  if (clusterBits < 9) throw new ImageFormatError(`pagetwin: ${path}: cluster_bits ${clusterBits} is below the minimum 9`);
  if (clusterBits > 21) throw new UnsupportedImageError(path, `a cluster size of 2^${clusterBits} bytes (over 2 MiB)`);
  const clusterSize = 2 ** clusterBits;
  const crypt = fixed.readUInt32BE(32);
  if (crypt !== 0) throw new UnsupportedImageError(path, crypt === 1 ? "encryption (AES)" : crypt === 2 ? "encryption (LUKS)" : `encryption method ${crypt}`);
  const headerLength = version === 2 ? 72 : fixed.readUInt32BE(100);
  if (version === 3 && (headerLength < 104 || headerLength % 8 !== 0 || headerLength > clusterSize)) {
    throw new ImageFormatError(`pagetwin: ${path}: bad header_length ${headerLength}`);
  }
  const first = readExact(fd, path, 0, clusterSize, "the first cluster", false);
  const names = version === 3 ? featureNames(first, headerLength, path) : new Map<string, string>();
  const incompatible = version === 3 ? fixed.readBigUInt64BE(72) : 0n;
  const compression = checkIncompatible(incompatible, first, headerLength, names, path);
  const h: Qcow2Header = {
    version, clusterBits, clusterSize,
    size: safe(fixed.readBigUInt64BE(24), "size", path),
    l1Size: fixed.readUInt32BE(36),
    l1Offset: safe(fixed.readBigUInt64BE(40), "l1_table_offset", path),
    compression,
    backingFile: backingName(fd, fixed, path),
    backingFormat: null,
  };
  if (h.backingFile !== null) h.backingFormat = extension(first, headerLength, EXT_BACKING_FORMAT, path)?.toString("utf8") ?? null;
  checkL1(h, path);
  return h;
}

function checkIncompatible(bits: bigint, first: Buffer, headerLength: number, names: Map<string, string>, path: string): "zlib" | "zstd" {
  const has = (bit: bigint) => (bits >> bit) & 1n;
  if (has(INCOMPAT_CORRUPT)) throw new ImageFormatError(`pagetwin: ${path} is marked corrupt by QEMU; repair it with \`qemu-img check -r all\` first`);
  if (has(INCOMPAT_EXTERNAL_DATA)) throw new UnsupportedImageError(path, "an external data file (incompatible feature bit 2)");
  if (has(INCOMPAT_EXTENDED_L2)) throw new UnsupportedImageError(path, "extended L2 entries (subclusters, incompatible feature bit 4)", "convert it with `qemu-img convert -O qcow2 -o extended_l2=off`");
  const known = (1n << INCOMPAT_DIRTY) | (1n << INCOMPAT_COMPRESSION);
  for (let bit = 0n; bit < 64n; bit++) {
    if (has(bit) && !((known >> bit) & 1n)) {
      const name = names.get(`0:${bit}`);
      throw new UnsupportedImageError(path, `incompatible feature bit ${bit}${name ? ` ("${name}")` : ""}`);
    }
  }
  if (!has(INCOMPAT_COMPRESSION)) return "zlib";
  const type = headerLength > 104 ? first[104]! : 0;
  if (type === 1) return "zstd";
  throw new UnsupportedImageError(path, `compression type ${type}`);
}

/** The feature name table: "type:bit" -> name, so an unknown feature is named as QEMU names it. */
function featureNames(first: Buffer, headerLength: number, path: string): Map<string, string> {
  const names = new Map<string, string>();
  const table = extension(first, headerLength, EXT_FEATURE_NAMES, path);
  for (let at = 0; table && at + 48 <= table.length; at += 48) {
    const raw = table.subarray(at + 2, at + 48);
    const end = raw.indexOf(0);
    names.set(`${table[at]}:${table[at + 1]}`, raw.subarray(0, end < 0 ? raw.length : end).toString("utf8"));
  }
  return names;
}

/** The data of header extension `type`, or null; the extension area ends at type 0 or the first cluster's end. */
function extension(first: Buffer, headerLength: number, type: number, path: string): Buffer | null {
  for (let at = headerLength; at + 8 <= first.length;) {
    const t = first.readUInt32BE(at), len = first.readUInt32BE(at + 4);
    if (t === EXT_END) return null;
    if (at + 8 + len > first.length) throw new ImageFormatError(`pagetwin: ${path}: header extension 0x${t.toString(16)} runs past the first cluster`);
    if (t === type) return first.subarray(at + 8, at + 8 + len);
    at += 8 + Math.ceil(len / 8) * 8;
  }
  return null;
}

function backingName(fd: number, fixed: Buffer, path: string): string | null {
  const offset = safe(fixed.readBigUInt64BE(8), "backing_file_offset", path);
  if (offset === 0) return null;
  const len = fixed.readUInt32BE(16);
  if (len === 0 || len > 1023) throw new ImageFormatError(`pagetwin: ${path}: backing file name length ${len} (1..1023)`);
  return readExact(fd, path, offset, len, "the backing file name", true).toString("utf8");
}

function checkL1(h: Qcow2Header, path: string): void {
  if (h.l1Offset % h.clusterSize !== 0) throw new ImageFormatError(`pagetwin: ${path}: the L1 table is not cluster-aligned`);
  const perL2 = h.clusterSize / 8;
  const needed = Math.ceil(h.size / h.clusterSize / perL2);
  if (h.l1Size < needed) throw new ImageFormatError(`pagetwin: ${path}: L1 table of ${h.l1Size} entries is too small for ${h.size} bytes (${needed} needed)`);
  if (h.l1Size > 4 * 1024 * 1024) throw new ImageFormatError(`pagetwin: ${path}: L1 table of ${h.l1Size} entries is larger than QEMU's 32 MiB limit`);
}

/** Reads `len` bytes at `offset`; short reads are an error only when `whole` (the first cluster may be cut by the file's end). */
export function readExact(fd: number, path: string, offset: number, len: number, what: string, whole: boolean): Buffer {
  const b = Buffer.alloc(len);
  let done = 0;
  while (done < len) {
    const n = readSync(fd, b, done, len - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  if (whole && done < len) throw new ImageFormatError(`pagetwin: ${path}: ${what} (${len} bytes at ${offset}) runs past the end of the file`);
  return b;
}

function safe(v: bigint, field: string, path: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageFormatError(`pagetwin: ${path}: ${field} ${v} is out of range`);
  return Number(v);
}
