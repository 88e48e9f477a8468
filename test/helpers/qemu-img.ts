// qemu-img and qemu-io from Debian's qemu-utils, for the tests that make
// qcow2 images. (Not a test file.)

import { execFileSync } from "node:child_process";

function available(bin: string): boolean {
  try {
    execFileSync(bin, ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** false, or why the qcow2 tests are skipped. */
export const skipNoQemuImg: string | false = available("qemu-img") && available("qemu-io") ? false : "qemu-img/qemu-io not installed (apt-get install qemu-utils)";

export function qemuImg(...args: string[]): string {
  return execFileSync("qemu-img", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** Runs qemu-io commands (e.g. "write -z 0 64k") on an image. */
export function qemuIo(image: string, format: string, ...commands: string[]): void {
  execFileSync("qemu-io", ["-f", format, ...commands.flatMap((c) => ["-c", c]), image], { stdio: ["ignore", "pipe", "pipe"] });
}
