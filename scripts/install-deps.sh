#!/usr/bin/env bash
# System packages the tests and the QEMU comparisons use, from Debian: QEMU
# (and qemu-utils: qemu-img and qemu-io make the qcow2 test images, qemu-nbd serves the NBD tests),
# what the guest builder needs, iproute2 (network namespaces), Chromium
# (the visualizer's browser test) and libvirt's daemon and virsh (the libvirt tests). Installs only what is missing; then builds
# the guest (kernel + initrd + NAS disk image) into .cache/, reused after.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
command -v node >/dev/null || { echo "install-deps: Node.js 20+ is required" >&2; exit 1; }
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
{ command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null; } || need+=(qemu-utils)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || need+=(kmod)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v chromium >/dev/null || need+=(chromium)
[ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system)
command -v virsh >/dev/null || need+=(libvirt-clients)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y --no-install-recommends "${need[@]}"; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${need[@]}"
  fi
fi
bash scripts/build-guest.sh
