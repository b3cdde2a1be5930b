#!/usr/bin/env bash
# How the sled state grows over re-syncs, and what `tidemark compact` gives back.
#
# Generates tree A at the given scale (default 0.1: 10k files of 1-16 KiB), syncs it once,
# then ROUNDS times rewrites 1% of the files and re-syncs, printing the size of the state
# database every 10 rounds; then compacts and prints the size before and after, and checks
# that a re-sync after the compaction finds nothing to do.
#
#   ops/bench/state_growth.sh [--dir DIR] [--scale S] [--rounds N] [--no-build]
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
helper="$root/ops/bench/dirs_tree.py"
DIR=/tmp/tidemark-state-growth
SCALE=0.1
ROUNDS=80
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift ;;
    --scale) SCALE="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/tidemark-bench-target}"
BIN="$CARGO_TARGET_DIR/release/tidemark"
if [ "$BUILD" = 1 ]; then
  (cd "$root" && cargo build --release -p tidemark --bin tidemark)
fi
[ -x "$BIN" ] || { echo "no tidemark binary at $BIN (drop --no-build)" >&2; exit 1; }

rm -rf "$DIR"
mkdir -p "$DIR/dst"
python3 "$helper" gen A "$DIR/src" --scale "$SCALE"
cat > "$DIR/tidemark.toml" <<TOML
state_dir = "$DIR/state"
listen = "127.0.0.1:0"
[[pipeline]]
name = "growth"
[pipeline.source.dir]
path = "$DIR/src"
[pipeline.target.dir]
path = "$DIR/dst"
prune = true
TOML
size() { du -sb "$DIR/state/db" | cut -f1; }
tm() { "$BIN" --config "$DIR/tidemark.toml" --quiet "$@"; }

tm sync >/dev/null
echo "round 0 (first sync): $(size) bytes"
for round in $(seq 1 "$ROUNDS"); do
  python3 "$helper" mutate "$DIR/src" 0.01 --seed "$round" 2>/dev/null
  tm sync >/dev/null
  if [ $((round % 10)) = 0 ]; then echo "round $round: $(size) bytes"; fi
done
start=$(date +%s.%N)
tm compact
echo "compact took $(echo "$(date +%s.%N) - $start" | bc) s; now $(size) bytes"
upserts=$(tm sync --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["scan"]["upserts"])')
echo "re-sync after the compaction: $upserts upserts"
[ "$upserts" = 0 ]
