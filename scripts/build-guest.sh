#!/usr/bin/env bash
# Build a tiny Linux guest for pagetwin's real-QEMU tests, from Debian packages only.
#
# Outputs (reused when present; delete them to rebuild):
#   $CACHE/guest/vmlinuz       Debian cloud kernel (linux-image-*-cloud-amd64)
#   $CACHE/guest/initrd.gz     busybox-static + virtio/ext4 modules + /init
#   $CACHE/guest/guest.env     shell-sourceable description of the build
#   $CACHE/nas/disk.img        ext4 (4 KiB blocks) image of ~200 MB of real host files
#   $CACHE/nas/disk2.img       a second, smaller ext4 image (~40 MB of other host files) for two-disk guests
# where CACHE=${PAGETWIN_CACHE:-$PWD/.cache}.
#
# The guest's /init (kernel command line options):
#   pt_dirty=N      MiB written per second into a tmpfs buffer (default 1, 0 = off)
#   pt_dirty_ws=N   size of that buffer in MiB (default 16)
#   pt_read=0|1     read every file of /dev/vda into the page cache (default 1)
# and prints on ttyS0: "pagetwin-read-bytes N", "pagetwin-ready", then
# "pagetwin-counter N" once a second forever. A second disk (/dev/vdb), when the
# VM has one, is mounted and read the same way ("pagetwin-read-bytes-vdb N").
#
# Environment knobs: PAGETWIN_DISK_CONTENT_MB (default 200), PAGETWIN_DISK_SIZE_MB (default 320).
set -euo pipefail
# Bumped when /init changes, so a cached initrd built from an older one is rebuilt.
INIT_REV=2

CACHE="${PAGETWIN_CACHE:-$PWD/.cache}"
GUEST="$CACHE/guest"
NAS="$CACHE/nas"
CONTENT_MB="${PAGETWIN_DISK_CONTENT_MB:-200}"
DISK_MB="${PAGETWIN_DISK_SIZE_MB:-320}"

log() { printf '[build-guest] %s\n' "$*" >&2; }
die() { printf '[build-guest] error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$GUEST" "$NAS"
GUEST="$(cd "$GUEST" && pwd)"
NAS="$(cd "$NAS" && pwd)"

# ---------------------------------------------------------------- packages
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_pkgs+=(busybox-static)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
command -v gzip >/dev/null 2>&1 || need_pkgs+=(gzip)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y --no-install-recommends "${need_pkgs[@]}"; then
    log "install failed; running apt-get update and retrying"
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${need_pkgs[@]}"
  fi
fi
BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] || BUSYBOX=/bin/busybox
# The initrd needs a static busybox (no libc inside it).
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked; install busybox-static"
fi

# ---------------------------------------------------------------- kernel
if [ ! -s "$GUEST/vmlinuz" ] || [ ! -s "$GUEST/initrd.gz" ] || ! grep -qx "INIT_REV=$INIT_REV" "$GUEST/guest.env" 2>/dev/null; then
  # linux-image-cloud-amd64 is a metapackage: find the versioned image it depends on.
  KPKG="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
          | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')"
  if [ -z "$KPKG" ]; then
    log "apt-cache knows no linux-image-cloud-amd64; running apt-get update"
    apt-get update >/dev/null
    KPKG="$(apt-cache depends linux-image-cloud-amd64 \
            | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')"
  fi
  [ -n "$KPKG" ] || die "cannot resolve the versioned package of linux-image-cloud-amd64"
  KVER="${KPKG#linux-image-}"
  log "kernel package: $KPKG (version $KVER)"

  KDIR="$GUEST/kernel-pkg"
  if [ ! -d "$KDIR/boot" ]; then
    rm -rf "$KDIR" "$GUEST/deb"
    mkdir -p "$GUEST/deb"
    (cd "$GUEST/deb" && apt-get download "$KPKG")
    deb="$(ls "$GUEST"/deb/*.deb | head -n1)"
    mkdir -p "$KDIR.tmp"
    dpkg -x "$deb" "$KDIR.tmp"
    mv "$KDIR.tmp" "$KDIR"
    rm -rf "$GUEST/deb"
  fi
  MODROOT=""
  for d in "$KDIR/lib/modules/$KVER" "$KDIR/usr/lib/modules/$KVER"; do
    [ -d "$d" ] && MODROOT="$d" && break
  done
  [ -n "$MODROOT" ] || die "no modules directory for $KVER in $KDIR"
  [ -f "$KDIR/boot/vmlinuz-$KVER" ] || die "no $KDIR/boot/vmlinuz-$KVER"
  KCONFIG="$KDIR/boot/config-$KVER"

  # modules.dep is in the package only after depmod; generate a minimal one if missing.
  DEPFILE="$MODROOT/modules.dep"
  if [ ! -s "$DEPFILE" ]; then
    if command -v depmod >/dev/null 2>&1; then
      depmod -b "$KDIR" "$KVER" 2>/dev/null || depmod -b "$KDIR/usr" "$KVER"
    else
      need=kmod
      log "modules.dep missing; installing kmod for depmod"
      apt-get install -y --no-install-recommends "$need" || { apt-get update; apt-get install -y --no-install-recommends "$need"; }
      depmod -b "$KDIR" "$KVER" 2>/dev/null || depmod -b "$KDIR/usr" "$KVER"
    fi
  fi
  [ -s "$DEPFILE" ] || die "no modules.dep in $MODROOT"

  # Resolve the wanted modules and their dependencies, dependencies first.
  # Names may use '-' or '_' interchangeably; built-in ones (=y) are skipped.
  WANTED="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 crc32c_generic libcrc32c mbcache jbd2 ext4"
  declare -A SEEN=()
  ORDER=()
  modpath() { # name -> path relative to MODROOT (from modules.dep), or empty
    local n="${1//-/_}" alt="${1//_/-}"
    awk -F: -v a="/$n.ko" -v b="/$alt.ko" '
      { p=$1; q=p; sub(/\.(xz|zst|gz)$/, "", q)
        if (substr(q, length(q)-length(a)+1) == a || substr(q, length(q)-length(b)+1) == b) { print p; exit } }' "$DEPFILE"
  }
  visit() { # path
    local p="$1" deps d
    [ -n "${SEEN[$p]:-}" ] && return 0
    SEEN[$p]=1
    deps="$(awk -F: -v p="$p" '$1 == p { print $2; exit }' "$DEPFILE")"
    # modules.dep lists deps so that the last one is loaded first.
    local arr=($deps) i
    for ((i=${#arr[@]}-1; i>=0; i--)); do visit "${arr[$i]}"; done
    ORDER+=("$p")
  }
  BUILTIN=()
  for m in $WANTED; do
    p="$(modpath "$m")"
    if [ -z "$p" ]; then
      BUILTIN+=("$m")
      continue
    fi
    visit "$p"
  done
  log "modules (load order): ${ORDER[*]##*/}"
  log "not modules (built-in or absent): ${BUILTIN[*]:-none}"

  # ------------------------------------------------------------ initrd
  IR="$GUEST/initrd-root"
  rm -rf "$IR"
  mkdir -p "$IR"/{bin,sbin,dev,proc,sys,mnt,run,tmp,modules}
  cp "$BUSYBOX" "$IR/bin/busybox"
  for a in sh mount umount insmod mkdir cat echo sleep dd find wc grep sed awk \
           ls mknod tr cut head tail free df sync date uname expr seq xargs true false; do
    ln -s busybox "$IR/bin/$a"
  done
  : > "$IR/modules/order"
  for p in "${ORDER[@]}"; do
    b="$(basename "$p")"
    case "$b" in
      *.ko.xz)  xz -dc "$MODROOT/$p" > "$IR/modules/${b%.xz}"; b="${b%.xz}" ;;
      *.ko.zst) zstd -qdc "$MODROOT/$p" > "$IR/modules/${b%.zst}"; b="${b%.zst}" ;;
      *.ko.gz)  gzip -dc "$MODROOT/$p" > "$IR/modules/${b%.gz}"; b="${b%.gz}" ;;
      *)        cp "$MODROOT/$p" "$IR/modules/$b" ;;
    esac
    echo "$b" >> "$IR/modules/order"
  done

  cat > "$IR/init" <<'INIT'
#!/bin/sh
# pagetwin test guest init (busybox sh, PID 1).
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
mount -t tmpfs -o size=256m tmpfs /run
OUT=/dev/ttyS0
[ -c "$OUT" ] || OUT=/dev/console
say() { echo "$*" > "$OUT"; }

# Kernel command line options.
PT_DIRTY=1; PT_DIRTY_WS=16; PT_READ=1
for w in $(cat /proc/cmdline); do
  case "$w" in
    pt_dirty=*) PT_DIRTY="${w#pt_dirty=}" ;;
    pt_dirty_ws=*) PT_DIRTY_WS="${w#pt_dirty_ws=}" ;;
    pt_read=*) PT_READ="${w#pt_read=}" ;;
  esac
done

for m in $(cat /modules/order); do
  insmod "/modules/$m" 2>/dev/null || say "pagetwin-warn insmod $m failed"
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 -o ro /dev/vda /mnt; then
  say "pagetwin-mounted /dev/vda"
else
  say "pagetwin-error cannot mount /dev/vda"
fi

if [ "$PT_READ" != 0 ]; then
  # Read every file once so its pages sit in the page cache (as many as fit).
  bytes=$(find /mnt -type f -exec cat {} + 2>/dev/null | wc -c)
  say "pagetwin-read-bytes $bytes"
fi
if [ -b /dev/vdb ]; then
  mkdir -p /mnt2
  if mount -t ext4 -o ro /dev/vdb /mnt2; then
    [ "$PT_READ" = 0 ] || say "pagetwin-read-bytes-vdb $(find /mnt2 -type f -exec cat {} + 2>/dev/null | wc -c)"
  else
    say "pagetwin-error cannot mount /dev/vdb"
  fi
fi
say "pagetwin-cached-kb $(awk '/^Cached:/ {print $2}' /proc/meminfo)"
say "pagetwin-memfree-kb $(awk '/^MemFree:/ {print $2}' /proc/meminfo)"

if [ "$PT_DIRTY" -gt 0 ] 2>/dev/null; then
  mkdir -p /run/dirty
  (
    n=0
    slots=$((PT_DIRTY_WS / PT_DIRTY)); [ "$slots" -ge 1 ] || slots=1
    while true; do
      dd if=/dev/urandom of=/run/dirty/buf bs=1M count="$PT_DIRTY" seek=$(( (n % slots) * PT_DIRTY )) conv=notrunc 2>/dev/null
      n=$((n+1))
      sleep 1
    done
  ) &
  say "pagetwin-dirty ${PT_DIRTY}MiB/s over ${PT_DIRTY_WS}MiB"
fi

say "pagetwin-ready"
n=0
while true; do
  say "pagetwin-counter $n"
  n=$((n+1))
  sleep 1
done
INIT
  chmod 755 "$IR/init"

  (cd "$IR" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
    | gzip -9 > "$GUEST/initrd.gz.tmp"
  mv "$GUEST/initrd.gz.tmp" "$GUEST/initrd.gz"
  cp "$KDIR/boot/vmlinuz-$KVER" "$GUEST/vmlinuz.tmp"
  mv "$GUEST/vmlinuz.tmp" "$GUEST/vmlinuz"
  {
    echo "INIT_REV=$INIT_REV"
    echo "KERNEL_PACKAGE=$KPKG"
    echo "KERNEL_VERSION=$KVER"
    echo "MODULES=\"$(cat "$IR/modules/order" | tr '\n' ' ' | sed 's/ $//')\""
    echo "BUILTIN_OR_ABSENT=\"${BUILTIN[*]:-}\""
    if [ -f "$KCONFIG" ]; then
      for c in CONFIG_VIRTIO CONFIG_VIRTIO_PCI CONFIG_VIRTIO_BLK CONFIG_EXT4_FS CONFIG_CRYPTO_CRC32C; do
        v="$(grep -E "^$c=" "$KCONFIG" | cut -d= -f2 || true)"
        echo "$c=${v:-n}"
      done
    fi
  } > "$GUEST/guest.env"
  rm -rf "$IR"
else
  log "kernel and initrd present in $GUEST (delete them to rebuild)"
fi

# ---------------------------------------------------------------- disk
DISK="$NAS/disk.img"
if [ ! -s "$DISK" ]; then
  ROOT="$GUEST/disk-root"
  LIST="$GUEST/disk-files.txt"
  rm -rf "$ROOT" "$LIST"
  mkdir -p "$ROOT"
  limit=$((CONTENT_MB * 1024 * 1024))
  # Real files (libraries, data), >4 KiB and <32 MiB, in a stable order, until ~CONTENT_MB.
  find /usr/lib /usr/share -xdev -type f -size +4k -size -32M -printf '%s %p\n' 2>/dev/null \
    | grep -v -E '[[:cntrl:]]' | LC_ALL=C sort -k2 \
    | awk -v limit="$limit" '{ s=$1; sub(/^[0-9]+ /, ""); if (total + s > limit) next; total += s; print } END { }' \
    > "$LIST"
  tar -cf - --no-recursion --verbatim-files-from -T "$LIST" 2>/dev/null | tar -xf - -C "$ROOT" || true
  content_bytes="$(du -sb "$ROOT" | cut -f1)"
  log "disk content: $(wc -l < "$LIST") files, $((content_bytes / 1024 / 1024)) MiB"
  rm -f "$DISK.tmp"
  mkfs.ext4 -q -F -b 4096 -L pagetwin -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$ROOT" "$DISK.tmp" "${DISK_MB}M"
  mv "$DISK.tmp" "$DISK"
  rm -rf "$ROOT"
  echo "DISK_CONTENT_BYTES=$content_bytes" > "$NAS/disk.env"
  echo "DISK_FILES=$(wc -l < "$LIST")" >> "$NAS/disk.env"
else
  log "disk image present: $DISK (delete it to rebuild)"
fi

# A second, smaller disk with other files (programs, not the first disk's libraries and data).
DISK2="$NAS/disk2.img"
if [ ! -s "$DISK2" ]; then
  ROOT="$GUEST/disk2-root"
  LIST="$GUEST/disk2-files.txt"
  rm -rf "$ROOT" "$LIST"
  mkdir -p "$ROOT"
  limit=$((${PAGETWIN_DISK2_CONTENT_MB:-40} * 1024 * 1024))
  find /usr/bin /usr/sbin /usr/libexec -xdev -type f -size +4k -size -32M -printf '%s %p\n' 2>/dev/null \
    | grep -v -E '[[:cntrl:]]' | LC_ALL=C sort -k2 \
    | awk -v limit="$limit" '{ s=$1; sub(/^[0-9]+ /, ""); if (total + s > limit) next; total += s; print }' \
    > "$LIST"
  tar -cf - --no-recursion --verbatim-files-from -T "$LIST" 2>/dev/null | tar -xf - -C "$ROOT" || true
  rm -f "$DISK2.tmp"
  mkfs.ext4 -q -F -b 4096 -L pagetwin2 -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$ROOT" "$DISK2.tmp" "${PAGETWIN_DISK2_SIZE_MB:-64}M"
  mv "$DISK2.tmp" "$DISK2"
  rm -rf "$ROOT"
  log "second disk: $(wc -l < "$LIST") files in $DISK2"
fi

# ---------------------------------------------------------------- report
echo "guest built in $GUEST"
ls -l "$GUEST/vmlinuz" "$GUEST/initrd.gz" "$DISK" "$DISK2" | sed 's/^/  /'
[ -f "$GUEST/guest.env" ] && sed 's/^/  /' "$GUEST/guest.env"
[ -f "$NAS/disk.env" ] && sed 's/^/  /' "$NAS/disk.env"
echo "boot it with: scripts/boot-guest.sh"
