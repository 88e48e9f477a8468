// The directory where the service and QEMU meet on unix sockets, one socket
// per migration, at the same path on every host (libvirt gives both QEMUs one
// `unix://` migrate URI). On the source the service listens there and
// libvirtd (QEMU itself with --parallel) connects; on the destination QEMU
// listens there and the service connects. QEMU under libvirt usually runs as
// its own user (Debian: libvirt-qemu), so the directory is root's with QEMU's
// group (0770) and nobody else's; without such a group, root's only (0700).

import { createHash } from "node:crypto";
import { chmodSync, chownSync, mkdirSync, readFileSync, unlinkSync } from "node:fs";
import { dirname, join } from "node:path";
import { UsageError } from "../errors.js";

/** `pagetwin serve`'s default directory for QEMU's migration sockets. */
export const DEFAULT_QEMU_SOCKETS = "/run/pagetwin-qemu";

/** Groups libvirt runs QEMU with by default: Debian and Ubuntu, then Fedora, RHEL and SUSE. */
const QEMU_GROUPS = ["libvirt-qemu", "qemu"];

/** sun_path holds 108 bytes with its NUL. */
const MAX_SOCKET_PATH = 107;

export class QemuSockets {
  /** `group`: QEMU's group id (null: root only). */
  constructor(readonly dir: string, readonly group: number | null) {
    if (!dir.startsWith("/")) throw new UsageError(`--qemu-sockets must be an absolute path (got "${dir}")`);
  }

  /** The directory and group from the options: `group` a name or a gid; undefined: the first of QEMU_GROUPS this host has. */
  static resolve(dir = DEFAULT_QEMU_SOCKETS, group?: string): QemuSockets {
    // not root: the socket directory is this user's alone, unless a group is named
    if (group === undefined) return new QemuSockets(dir, uid() === 0 ? QEMU_GROUPS.map(groupId).find((g) => g !== null) ?? null : null);
    if (group === "" || group === "none") return new QemuSockets(dir, null);
    const gid = /^\d+$/.test(group) ? Number(group) : groupId(group);
    if (gid === null) throw new UsageError(`--qemu-group: no group "${group}" on this host`);
    return new QemuSockets(dir, gid);
  }

  /** The socket of migration `id` (a short, safe name: the id itself when it is one). */
  pathFor(id: string): string {
    const plain = /^[\w.-]+$/.test(id) && this.dir.length + id.length + 6 <= MAX_SOCKET_PATH;
    const path = join(this.dir, `${plain ? id : `m-${createHash("sha256").update(id).digest("hex").slice(0, 20)}`}.sock`);
    if (path.length > MAX_SOCKET_PATH) throw new UsageError(`--qemu-sockets ${this.dir}: too long for a unix socket path`);
    return path;
  }

  /** Whether `path` is a socket in this directory. */
  owns(path: string): boolean {
    return dirname(path) === this.dir;
  }

  /** Makes the directory (again: /run may have been cleaned) with its owner and mode. */
  ensure(): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    if (this.group !== null) chownSync(this.dir, uid(), this.group);
    chmodSync(this.dir, this.group !== null ? 0o770 : 0o700);
  }

  /** A socket the service listens on: QEMU's group may connect (libvirt --parallel: QEMU connects itself). */
  grant(path: string): void {
    if (this.group === null || !this.owns(path)) return;
    chownSync(path, uid(), this.group);
    chmodSync(path, 0o660);
  }

  /** Removes what a destination QEMU left (its listening socket stays after the migration). */
  remove(path: string): void {
    if (!this.owns(path)) return;
    try { unlinkSync(path); } catch { /* gone already */ }
  }
}

const uid = () => process.getuid?.() ?? 0;

/** A group's id from /etc/group (null: none by that name). */
function groupId(name: string): number | null {
  let text = "";
  try { text = readFileSync("/etc/group", "utf8"); } catch { return null; }
  for (const line of text.split("\n")) {
    const [n, , gid] = line.split(":");
    if (n === name && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  return null;
}
