#!/usr/bin/env bash
# An exFAT filesystem for the directory target's tests: a filesystem that folds the case of
# names, holds no symbolic links, refuses names with `* : ? " < > | \`, shows every mode as
# 777 and keeps times to the second. exfat-fuse serves it (this kernel may have no exfat
# module), from an image file attached to a loop device.
#
#   ops/peers/exfat.sh install         install exfat-fuse and exfatprogs when missing
#   ops/peers/exfat.sh mount DIR [MB]  make DIR.exfat.img (MB MiB, default 64), attach it to
#                                      a loop device and mount it at DIR; prints DIR
#   ops/peers/exfat.sh umount DIR      unmount DIR, detach its loop device, remove the image
#
# Needs root (loop devices) and /dev/fuse.
set -euo pipefail

cmd=${1:-}

install() {
    if command -v mount.exfat-fuse >/dev/null && command -v mkfs.exfat >/dev/null; then
        return 0
    fi
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    # Concurrent first runs (parallel tests) install once.
    exec 9>"${TMPDIR:-/tmp}/tidemark-exfat-install.lock"
    flock 9
    if ! command -v mount.exfat-fuse >/dev/null || ! command -v mkfs.exfat >/dev/null; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            exfat-fuse exfatprogs >&2 \
            || { $sudo apt-get update -q >&2 && $sudo env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends exfat-fuse exfatprogs >&2; }
    fi
    flock -u 9
}

mount_at() {
    local dir=$1 mb=${2:-64}
    local img="$dir.exfat.img"
    install
    mkdir -p "$dir"
    truncate -s "${mb}M" "$img"
    mkfs.exfat "$img" >/dev/null
    local dev
    dev=$(losetup -f --show "$img")
    echo "$dev" >"$dir.exfat.loop"
    if ! mount.exfat-fuse -o allow_other "$dev" "$dir" >&2; then
        losetup -d "$dev"
        rm -f "$img" "$dir.exfat.loop"
        echo "exfat.sh: cannot mount $dev at $dir with exfat-fuse (is /dev/fuse there?)" >&2
        exit 1
    fi
    echo "$dir"
}

umount_at() {
    local dir=$1
    if mountpoint -q "$dir"; then
        umount "$dir"
    fi
    if [ -f "$dir.exfat.loop" ]; then
        local dev
        dev=$(cat "$dir.exfat.loop")
        # The FUSE daemon lets go of the device as it exits, shortly after the unmount.
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            losetup -d "$dev" 2>/dev/null && break
            sleep 0.2
        done
        rm -f "$dir.exfat.loop"
    fi
    rm -f "$dir.exfat.img"
}

case "$cmd" in
    install) install ;;
    mount) [ $# -ge 2 ] || { echo "usage: $0 mount DIR [MB]" >&2; exit 2; }; mount_at "$2" "${3:-64}" ;;
    umount) [ $# -eq 2 ] || { echo "usage: $0 umount DIR" >&2; exit 2; }; umount_at "$2" ;;
    *) echo "usage: $0 install | mount DIR [MB] | umount DIR" >&2; exit 2 ;;
esac
