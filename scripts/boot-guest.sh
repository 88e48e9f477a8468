#!/usr/bin/env bash
# Boot the pagetwin test guest (built by scripts/build-guest.sh) for manual checking.
#
#   scripts/boot-guest.sh [extra qemu args...]
#
# Environment:
#   PAGETWIN_CACHE   cache dir (default $PWD/.cache)
#   NAME             instance name: RAM file /dev/shm/pagetwin-$NAME, QMP socket
#                    $CACHE/run/$NAME.qmp (default "manual")
#   MEM_MB           guest RAM in MiB (default 512)
#   APPEND           extra kernel command line, e.g. "pt_dirty=4 pt_read=0"
#   SERIAL_LOG       if set, write the serial console to this file instead of stdio
#   TIMEOUT          if set, kill the guest after this many seconds
#   ACCEL            tcg (default) or kvm
#   DISK_CACHE       QEMU -drive cache= mode (default: none when the image's file
#                    system takes O_DIRECT, else writeback)
# Quit an interactive guest with Ctrl-A x. The RAM file is removed on exit.
set -euo pipefail

CACHE="${PAGETWIN_CACHE:-$PWD/.cache}"
GUEST="$CACHE/guest"
DISK="$CACHE/nas/disk.img"
NAME="${NAME:-manual}"
MEM_MB="${MEM_MB:-512}"
ACCEL="${ACCEL:-tcg}"
RUN="$CACHE/run"
RAM="/dev/shm/pagetwin-$NAME"
QMP="$RUN/$NAME.qmp"

for f in "$GUEST/vmlinuz" "$GUEST/initrd.gz" "$DISK"; do
  [ -s "$f" ] || { echo "missing $f: run scripts/build-guest.sh first" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 not installed" >&2; exit 1; }
mkdir -p "$RUN"

if [ -z "${DISK_CACHE:-}" ]; then
  if dd if="$DISK" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
    DISK_CACHE=none
  else
    DISK_CACHE=writeback
  fi
fi

if [ -n "${SERIAL_LOG:-}" ]; then
  SERIAL=(-serial "file:$SERIAL_LOG" -display none -monitor none)
else
  SERIAL=(-nographic -serial mon:stdio)
fi

cleanup() { rm -f "$RAM" "$QMP"; }
trap cleanup EXIT

# Under TCG, 8 KiB more than MEM_MB: QEMU < 9.0 loses guest writes when it migrates a RAM block whose size is a
# multiple of 256 KiB (TCG_RAM_PAD_KIB in src/adapters/qemu/vm.ts; docs/STREAM.md).
RAM_KIB=$(( MEM_MB * 1024 ))
[ "$ACCEL" = tcg ] && RAM_KIB=$(( RAM_KIB + 8 ))
echo "booting: ${MEM_MB} MiB, accel=$ACCEL, disk cache=$DISK_CACHE, RAM file $RAM, QMP $QMP" >&2
cmd=(qemu-system-x86_64
  -name "pagetwin-$NAME"
  -accel "$ACCEL"
  -m "${RAM_KIB}K"
  -machine memory-backend=mem
  -object "memory-backend-file,id=mem,size=${RAM_KIB}K,mem-path=$RAM,share=on"
  -kernel "$GUEST/vmlinuz"
  -initrd "$GUEST/initrd.gz"
  -append "console=ttyS0 quiet panic=1 no_timer_check ${APPEND:-}"
  -drive "file=$DISK,if=virtio,format=raw,readonly=on,cache=$DISK_CACHE"
  -nic none
  -no-reboot
  "${SERIAL[@]}"
  -qmp "unix:$QMP,server=on,wait=off"
  "$@")
if [ -n "${TIMEOUT:-}" ]; then
  timeout --foreground -s KILL "$TIMEOUT" "${cmd[@]}" || true
else
  "${cmd[@]}"
fi
