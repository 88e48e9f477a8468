// The real guest of scripts/build-guest.sh, for the tests that boot QEMU: the
// guest if it is there, or why those tests are skipped.

import { findGuest, qemuAvailable, type GuestImage } from "../../src/adapters/qemu/vm.js";

export const guest: GuestImage | undefined = findGuest();

/** false, or the reason the real-QEMU tests are skipped. */
export const skipRealGuest: string | false = !qemuAvailable()
  ? "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
  : !guest
    ? "guest not built: run scripts/build-guest.sh (outputs in $PAGETWIN_CACHE or ./.cache)"
    : false;
