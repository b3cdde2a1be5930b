#!/usr/bin/env bash
# Directory-sync benchmark (issue 2): tidemark against rsync and rclone, local to local.
#
# For each tree (A: 100k files of 1-16 KiB; B: 10k files of 1 KiB-1 MiB, log-uniform), in
# one run and under the same conditions, each tool syncs the source into its own empty
# target (`initial`); then 1% of the files are rewritten and each tool re-syncs
# (`incremental`); then each re-syncs with nothing changed (`no-change`). Every run is
# timed with /usr/bin/time (wall, user+sys CPU, peak RSS), the page cache is dropped
# before each run when the kernel lets us, and each target is compared with the source
# (`diff -r`) so no tool is timed for work it did not do.
#
#   ops/bench/dirs.sh [--small] [--dir DIR] [--trees "A B"] [--tools "tidemark rsync rclone"]
#                     [--inline-limit BYTES] [--no-build] [--no-verify] [--repeat N]
#                     [--fresh-fs GB] [--baseline BIN]
#
#   --tools LIST     tools to time; besides the default three, `rsync-fsync` (`rsync -a
#                    --fsync`, every written file made durable as tidemark's commits make
#                    them) is shown for reference; it is not one of the peers the
#                    "vs faster peer" column compares with (rsync and rclone)
#   --small          1/10 scale (10k and 1k files), for a quick trial
#   --dir DIR        scratch directory (default /tmp/tidemark-bench); trees are kept there
#                    between runs, targets and state are recreated on every run
#   --inline-limit   the pipeline's inline_limit for tidemark (default: tidemark's default)
#   --no-build       use the tidemark binary already built
#   --repeat N       run the whole sequence (fresh targets and state, initial, incremental
#                    with a different 1% each time, no-change) N times; the table shows
#                    medians and the range. Single runs on a shared VM disk vary by up to 2x.
#   --fresh-fs GB    run on a new ext4 filesystem of GB GiB (a sparse image on a loop
#                    device with direct I/O, mounted at DIR, removed afterwards; root
#                    only). On a disk where big trees were created and deleted before,
#                    ext4 spends much of its time looking for free inodes, and by how much
#                    changes from run to run; a new filesystem gives every run the same start.
#                    Trees are generated anew (tree A needs ~4 GiB for all tools, B ~6 GiB).
#   --baseline BIN   also time another tidemark binary (e.g. a build of the previous commit)
#                    as tool `tidemark-base`, with its own state and target, on the same
#                    trees and mutations; the two run in alternating order from one
#                    repetition to the next. Differences between two builds are smaller
#                    than the run-to-run spread on a shared VM; only a paired run shows them.
#
# tidemark is built with `cargo build --release` into $CARGO_TARGET_DIR (default
# /tmp/tidemark-bench-target, so the build does not wait on other builds' lock).
# Results: $DIR/results.tsv and the table on stdout; tool output in $DIR/logs/ (with
# --fresh-fs: $DIR.results/).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
helper="$root/ops/bench/dirs_tree.py"
SCRATCH=/tmp/tidemark-bench
SCALE=1
TREES="A B"
TOOLS="tidemark rsync rclone"
INLINE=""
BUILD=1
VERIFY=1
FRESHFS=""
REPEAT=1
BASE_BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --small) SCALE=0.1 ;;
    --dir) SCRATCH="$2"; shift ;;
    --trees) TREES="$2"; shift ;;
    --tools) TOOLS="$2"; shift ;;
    --inline-limit) INLINE="$2"; shift ;;
    --no-build) BUILD=0 ;;
    --no-verify) VERIFY=0 ;;
    --fresh-fs) FRESHFS="$2"; shift ;;
    --repeat) REPEAT="$2"; shift ;;
    --baseline) BASE_BIN="$(realpath "$2")"; shift ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Tools: install what a fresh Debian/Ubuntu machine lacks.
missing=()
command -v rsync >/dev/null || missing+=(rsync)
command -v rclone >/dev/null || missing+=(rclone)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y "${missing[@]}"
  else sudo apt-get update -qq && sudo apt-get install -y "${missing[@]}"; fi
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/tidemark-bench-target}"
BIN="$CARGO_TARGET_DIR/release/tidemark"
if [ "$BUILD" = 1 ]; then
  (cd "$root" && cargo build --release -p tidemark --bin tidemark)
fi
[ -x "$BIN" ] || { echo "no tidemark binary at $BIN (drop --no-build)" >&2; exit 1; }
if [ -n "$BASE_BIN" ]; then
  [ -x "$BASE_BIN" ] || { echo "no baseline binary at $BASE_BIN" >&2; exit 1; }
  TOOLS="tidemark-base $TOOLS"
fi

if [ -n "$FRESHFS" ]; then
  [ "$(id -u)" = 0 ] || { echo "--fresh-fs needs root (mkfs, losetup, mount)" >&2; exit 2; }
  img="${FRESH_IMAGE:-/var/tmp/tidemark-bench-fs.img}"
  # shellcheck source=ops/bench/lib.sh
  . "$root/ops/bench/lib.sh"
  fresh_fs_mount "$img" "$FRESHFS" "$SCRATCH"
  trap 'fresh_fs_unmount "$img" "$SCRATCH"' EXIT
  echo "fresh ext4 of ${FRESHFS} GiB on $(losetup -j "$img" | cut -d: -f1) (direct I/O) at $SCRATCH" >&2
fi

scale_name=full; [ "$SCALE" = 1 ] || scale_name=small
base="$SCRATCH/$scale_name"
# Results and tool output outlive a --fresh-fs filesystem.
out="$SCRATCH"; [ -z "$FRESHFS" ] || out="$SCRATCH.results"
mkdir -p "$base" "$out/logs"
results="$out/results.tsv"
: > "$results"
logs="$out/logs"

# Page cache: dropped before every timed run if permitted, otherwise every tool runs warm.
DROP=0
if (sync && echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null; then DROP=1; fi
drop_caches() { if [ "$DROP" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }

# Runs one timed command: TREE PHASE TOOL SRC DST CMD...
timed() {
  local tree=$1 phase=$2 tool=$3 src=$4 dst=$5; shift 5
  local log="$logs/$tree-$phase-$tool.log"
  drop_caches
  if ! /usr/bin/time -f '%e %U %S %M' -o "$log.time" "$@" >"$log" 2>&1; then
    echo "FAILED: $tool $phase on tree $tree; see $log" >&2
    tail -5 "$log" >&2
    read -r wall user sys rss < <(tail -1 "$log.time" | grep -E '^[0-9.]+ ' || echo "0 0 0 0")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tree" "$phase" "$tool" "$wall" "$user" "$sys" "$rss" "FAILED" "$rep" >>"$results"
    return
  fi
  read -r wall user sys rss < "$log.time"
  local ok=skipped
  if [ "$VERIFY" = 1 ]; then
    if diff -rq -x .tidemark-tmp "$src" "$dst" >"$log.diff" 2>&1; then ok=equal; else ok=DIFFERS; fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tree" "$phase" "$tool" "$wall" "$user" "$sys" "$rss" "$ok" "$rep" >>"$results"
  printf '  %-5s %-12s %-9s %7.2f s wall %7.2f s cpu %7.1f MB  %s\n' "$tree" "$phase" "$tool" \
    "$wall" "$(echo "$user + $sys" | bc)" "$(echo "scale=1; $rss / 1024" | bc)" "$ok" >&2
}

run_tool() { # TOOL TREE PHASE SRC
  local tool=$1 tree=$2 phase=$3 src=$4
  local dst="$base/dst-$tree-$tool"
  case "$tool" in
    tidemark) timed "$tree" "$phase" tidemark "$src" "$dst" "$BIN" --config "$base/tidemark-$tree.toml" sync ;;
    tidemark-base) timed "$tree" "$phase" tidemark-base "$src" "$dst" "$BASE_BIN" --config "$base/tidemark-base-$tree.toml" sync ;;
    rsync) timed "$tree" "$phase" rsync "$src" "$dst" rsync -a "$src/" "$dst/" ;;
    rsync-fsync) timed "$tree" "$phase" rsync-fsync "$src" "$dst" rsync -a --fsync "$src/" "$dst/" ;;
    rclone) timed "$tree" "$phase" rclone "$src" "$dst" rclone --config /dev/null sync "$src" "$dst" ;;
    *) echo "unknown tool $tool" >&2; exit 2 ;;
  esac
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uptime | sed 's/.*load/load/')" >&2
echo "page cache dropped before each run: $([ "$DROP" = 1 ] && echo yes || echo 'no (not permitted; every tool runs warm)')" >&2
for tree in $TREES; do
 for rep in $(seq 1 "$REPEAT"); do
  [ "$REPEAT" = 1 ] || echo "tree $tree, run $rep of $REPEAT" >&2
  src="$base/src-$tree"
  # Restores the tree a previous run's mutation changed.
  python3 "$helper" gen "$tree" "$src" --scale "$SCALE"
  for tool in $TOOLS; do
    rm -rf "$base/dst-$tree-$tool" "$base/state-$tree" "$base/state-base-$tree"
    mkdir -p "$base/dst-$tree-$tool"
  done
  for variant in "" base-; do
    {
      echo "# generated by ops/bench/dirs.sh"
      echo "state_dir = \"$base/state-$variant$tree\""
      echo "listen = \"127.0.0.1:0\""
      echo "[[pipeline]]"
      echo "name = \"bench\""
      echo "max_delete = \"100%\""
      [ -n "$INLINE" ] && echo "inline_limit = $INLINE"
      echo "[pipeline.source.dir]"
      echo "path = \"$src\""
      echo "[pipeline.target.dir]"
      echo "path = \"$base/dst-$tree-tidemark${variant:+-base}\""
      echo "prune = true"
    } > "$base/tidemark-$variant$tree.toml"
  done
  # With a baseline, the two builds take turns going first.
  order="$TOOLS"
  if [ -n "$BASE_BIN" ] && [ $((rep % 2)) = 0 ]; then
    order="tidemark tidemark-base"
    for tool in $TOOLS; do
      case "$tool" in tidemark|tidemark-base) ;; *) order="$order $tool" ;; esac
    done
  fi
  for tool in $order; do run_tool "$tool" "$tree" initial "$src"; done
  python3 "$helper" mutate "$src" 0.01 --seed $((41 + rep))
  for tool in $order; do run_tool "$tool" "$tree" incremental "$src"; done
  for tool in $order; do run_tool "$tool" "$tree" no-change "$src"; done
  if [ -d "$base/state-$tree" ]; then
    echo "  tidemark state dir after tree $tree: $(du -sh "$base/state-$tree" | cut -f1)" >&2
  fi
 done
done

echo
python3 "$helper" table "$results"
