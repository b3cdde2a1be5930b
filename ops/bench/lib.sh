# Shared by the benchmark scripts (sourced, not run): a fresh ext4 filesystem on a loop
# device, so every run starts from the same empty disk and the host's page cache stays
# out of the timings. Needs root.

# fresh_fs_mount IMAGE GIB MOUNTPOINT: a new ext4 of GIB GiB in the file IMAGE, on a loop
# device with direct I/O, mounted at MOUNTPOINT (whatever was there before is undone).
fresh_fs_mount() {
  local img=$1 gib=$2 mnt=$3
  fresh_fs_unmount "$img" "$mnt"
  truncate -s "${gib}G" "$img"
  # Inode tables and journal initialised now: left lazy, ext4lazyinit zeroes them in the
  # background for minutes after the mount and slows whichever tool runs first.
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img"
  mkdir -p "$mnt"
  mount "$(losetup --find --show --direct-io=on "$img")" "$mnt"
}

# fresh_fs_unmount IMAGE MOUNTPOINT: undoes fresh_fs_mount; nothing to do if it is not there.
fresh_fs_unmount() {
  local img=$1 mnt=$2
  umount "$mnt" 2>/dev/null || true
  losetup -j "$img" | cut -d: -f1 | xargs -r -n1 losetup -d
  rm -f "$img"
}
