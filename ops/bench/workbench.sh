#!/usr/bin/env bash
# The workbench for a cold incremental re-sync: two builds (or one build in two settings,
# through wrapper scripts) and `rsync -a --delete`, round by round, on the same mutation.
# A tree on a fresh ext4 loop device (direct I/O, so the host's cache stays out of it);
# before each round 1% of the files are rewritten, and before each timed run the page
# cache is dropped. Needs root (loop device, drop_caches). Milliseconds from `date +%s%N`.
#
#   ops/bench/workbench.sh setup [--dir DIR] [--tree A|B] [--bin BIN]
#   ops/bench/workbench.sh rounds N BIN_A BIN_B [--dir DIR]
#   ops/bench/workbench.sh teardown [--dir DIR]
#
# `setup` makes the tree and syncs it once into each of two targets (states a and b) and
# rsync's; `rounds` rotates the order of A (state a), B (state b) and rsync each round and
# prints the medians at the end.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
helper="$root/ops/bench/dirs_tree.py"
cmd="${1:-}"
[ -n "$cmd" ] && shift
DIR=/tmp/tidemark-workbench
TREE=B
BIN="${CARGO_TARGET_DIR:-/tmp/tidemark-bench-target}/release/tidemark"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift ;;
    --tree) TREE="$2"; shift ;;
    --bin) BIN="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done
M="$DIR/m"
IMG="$DIR.img"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
ms() {
  local s
  s=$(date +%s%N)
  "$@" >/dev/null 2>&1 || echo "FAILED: $*" >&2
  echo $(( ($(date +%s%N) - s) / 1000000 ))
}
median() { sort -n | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

# shellcheck source=ops/bench/lib.sh
. "$root/ops/bench/lib.sh"

case "$cmd" in
  setup)
    [ -x "$BIN" ] || { echo "no tidemark binary at $BIN (build it, or pass --bin)" >&2; exit 1; }
    mkdir -p "$DIR"
    fresh_fs_mount "$IMG" 16 "$M"
    python3 "$helper" gen "$TREE" "$M/src"
    for v in a b; do
      mkdir -p "$M/dst-$v"
      cat > "$M/t-$v.toml" <<TOML
state_dir = "$M/state-$v"
listen = "127.0.0.1:0"
[[pipeline]]
name = "bench"
max_delete = "100%"
[pipeline.source.dir]
path = "$M/src"
[pipeline.target.dir]
path = "$M/dst-$v"
prune = true
TOML
      "$BIN" --config "$M/t-$v.toml" --quiet sync >/dev/null
    done
    mkdir -p "$M/rsync"
    rsync -a --delete "$M/src/" "$M/rsync/"
    echo "workbench ready at $M"
    ;;
  rounds)
    [ "${#args[@]}" = 3 ] || { echo "usage: $0 rounds N BIN_A BIN_B [--dir DIR]" >&2; exit 2; }
    n="${args[0]}"; a="${args[1]}"; b="${args[2]}"
    [ -d "$M/src" ] || { echo "no workbench at $M: run '$0 setup' first" >&2; exit 1; }
    : > "$DIR.a"; : > "$DIR.b"; : > "$DIR.rsync"
    run_a() { drop; ta=$(ms "$a" --config "$M/t-a.toml" sync); }
    run_b() { drop; tb=$(ms "$b" --config "$M/t-b.toml" sync); }
    run_r() { drop; tr=$(ms rsync -a --delete "$M/src/" "$M/rsync/"); }
    for r in $(seq 1 "$n"); do
      python3 "$helper" mutate "$M/src" 0.01 --seed "$RANDOM" >/dev/null 2>&1
      sync
      case $((r % 3)) in
        1) run_a; run_b; run_r ;;
        2) run_b; run_r; run_a ;;
        0) run_r; run_a; run_b ;;
      esac
      echo "round $r: A $ta ms, B $tb ms, rsync $tr ms"
      echo "$ta" >> "$DIR.a"; echo "$tb" >> "$DIR.b"; echo "$tr" >> "$DIR.rsync"
    done
    echo "medians: A $(median < "$DIR.a") ms, B $(median < "$DIR.b") ms, rsync $(median < "$DIR.rsync") ms"
    ;;
  teardown)
    fresh_fs_unmount "$IMG" "$M"
    rm -f "$DIR.a" "$DIR.b" "$DIR.rsync"
    ;;
  *)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
