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
  for (let attempt = 1; ; attempt++) {
    try {
      return execFileSync("qemu-img", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    } catch (err) {
      // LUKS key setup times PBKDF on the thread's CPU clock, which can read 0 ms on a tick-accounted VM: QEMU's own flake
      if (attempt >= 5 || !String((err as { stderr?: unknown }).stderr).includes("Unable to get accurate CPU usage")) throw err;
    }
  }
}

/** Runs qemu-io commands (e.g. "write -z 0 64k") on an image. */
export function qemuIo(image: string, format: string, ...commands: string[]): void {
  execFileSync("qemu-io", ["-f", format, ...commands.flatMap((c) => ["-c", c]), image], { stdio: ["ignore", "pipe", "pipe"] });
}
