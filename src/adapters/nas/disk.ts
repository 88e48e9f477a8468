// Opens the guest-visible disk of an image whatever its format: qcow2 when it
// starts with qcow2's magic (or when told so), raw otherwise.

import { closeSync, openSync, readSync, realpathSync } from "node:fs";
import { UnsupportedImageError } from "../../errors.js";
import { DiskImage, type DiskFormat, type GuestDisk } from "./image.js";
import { Qcow2Image } from "./qcow2.js";
import { QCOW2_MAGIC } from "./qcow2-header.js";

/** Backing chains deeper than this are refused (a chain that loops would never end). */
const MAX_CHAIN = 64;

export interface OpenDiskOptions {
  /** The format, when known (a backing format recorded in the overlay); detected from the magic otherwise. */
  format?: DiskFormat | null;
  /** Real paths of the overlays above this file (internal: a chain that loops is refused). */
  above?: string[];
}

export function openDisk(path: string, opts: OpenDiskOptions = {}): GuestDisk {
  const above = opts.above ?? [];
  const real = realPath(path);
  if (above.includes(real)) throw new UnsupportedImageError(above[0]!, `a backing chain that loops back to ${path}`);
  if (above.length >= MAX_CHAIN) throw new UnsupportedImageError(above[0]!, `a backing chain deeper than ${MAX_CHAIN}`);
  const format = opts.format ?? detect(path);
  if (format === "raw") return DiskImage.open(path);
  const fd = openSync(path, "r");
  try {
    return Qcow2Image.open(path, fd, (p, f) => openDisk(p, { format: f, above: [...above, real] }));
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

function detect(path: string): DiskFormat {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return "raw"; // DiskImage.open reports why it cannot be opened
  }
  const magic = Buffer.alloc(4);
  try {
    // (a raw disk whose guest wrote a qcow2 header at its start reads as qcow2: give its format then)
    if (readSync(fd, magic, 0, 4, 0) === 4 && magic.readUInt32BE(0) === QCOW2_MAGIC) return "qcow2";
  } finally {
    closeSync(fd);
  }
  return "raw";
}

function realPath(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}
