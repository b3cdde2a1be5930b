#!/usr/bin/env bash
# REST connector benchmark (issue 3): mirror N items (default 10000) from a dev json-server
# into an empty prod json-server three ways, in one run, against the same kind of prod:
#   1. direct load: the same N POSTs sent by wrk (16 connections) — the server's ceiling;
#   2. tidemark sync (scan + project, release build) into an empty prod;
#   3. a sequential list → GET → POST script (Python, keep-alive), as people write today.
# Prints items/s for each and appends a section to BENCHMARKS.md with --record.
#
#   ops/bench/rest.sh [N] [--record]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
N="${1:-10000}"
RECORD="${2:-}"
BIN="${TIDEMARK_BIN:-$root/target/release/tidemark}"
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
if [ ! -x "$BIN" ]; then
  (cd "$root" && cargo build --release -p tidemark --bin tidemark)
fi
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
start_server() { # DB PORT
  "$root/ops/peers/json-server.sh" "$1" "$2" >"$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$2/db" >/dev/null && return 0; sleep 0.1; done
  echo "json-server did not start: $root/ops/peers/json-server.sh $1 $2" >&2; exit 1
}
total() { curl -s -D - -o /dev/null "http://127.0.0.1:$1/users?_limit=1" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-total-count"{print $2}'; }
count() { curl -s "http://127.0.0.1:$1/users" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }

python3 - "$N" "$work" <<'PY'
import json, sys
n, work = int(sys.argv[1]), sys.argv[2]
users = [{"id": 100000 + 3 * i, "name": f"user-{i}", "email": f"user{i}@example.com",
          "active": i % 2 == 0, "score": i % 17, "bio": ""} for i in range(n)]
json.dump({"users": users}, open(f"{work}/dev.json", "w"))
with open(f"{work}/bodies.txt", "w") as f:
    for u in users:
        u = dict(u); del u["id"]; f.write(json.dumps(u) + "\n")
PY
empty() { echo '{"users": []}' > "$work/$1.json"; }

dev_port=$(free_port); start_server "$work/dev.json" "$dev_port"

# 1. Direct load with wrk.
empty prod_wrk; p1=$(free_port); start_server "$work/prod_wrk.json" "$p1"
cat > "$work/post.lua" <<LUA
local bodies = {}
for line in io.lines("$work/bodies.txt") do bodies[#bodies + 1] = line end
local i, done = 0, 0
request = function()
  i = i + 1
  return wrk.format("POST", "/users", {["Content-Type"] = "application/json"}, bodies[((i - 1) % #bodies) + 1])
end
response = function() done = done + 1; if done >= $N then wrk.thread:stop() end end
LUA
# wrk's thread:stop() ends sending but not the run, so the run ends when prod holds N items.
t0=$(now)
wrk -t1 -c16 -d600s --timeout 30s -s "$work/post.lua" "http://127.0.0.1:$p1" >"$work/wrk.out" &
wrk_pid=$!
until [ "$(total "$p1")" -ge "$N" ]; do sleep 0.2; done
t1=$(now)
kill "$wrk_pid" 2>/dev/null || true; wait "$wrk_pid" 2>/dev/null || true
wrk_items=$(count "$p1"); wrk_s=$(python3 -c "print(f'{$t1-$t0:.2f}')")

# 2. tidemark.
empty prod_tm; p2=$(free_port); start_server "$work/prod_tm.json" "$p2"
cat > "$work/tidemark.toml" <<TOML
state_dir = "state"
listen = "127.0.0.1:0"
[[pipeline]]
name = "bench"
max_delete = "100%"
concurrency = 16
[pipeline.source.http]
base_url = "http://127.0.0.1:$dev_port"
[[pipeline.source.http.kind]]
name = "users"
path = "/users"
name_field = "/name"
pagination = { style = "page", size = 500 }
[pipeline.target.http]
base_url = "http://127.0.0.1:$p2"
in_flight = 16
[[pipeline.target.http.kind]]
name = "users"
path = "/users"
find = "/users?name={name}"
TOML
t0=$(now)
"$BIN" --quiet --config "$work/tidemark.toml" sync >"$work/tidemark.out"
t1=$(now)
tm_items=$(count "$p2"); tm_s=$(python3 -c "print(f'{$t1-$t0:.2f}')")

# 3. Sequential list → GET → POST script.
empty prod_seq; p3=$(free_port); start_server "$work/prod_seq.json" "$p3"
t0=$(now)
python3 - "$dev_port" "$p3" <<'PY'
import http.client, json, sys
dev = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
prod = http.client.HTTPConnection("127.0.0.1", int(sys.argv[2]))
def call(c, method, path, body=None):
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse(); data = r.read()
    assert r.status < 300, (method, path, r.status)
    return json.loads(data) if data else None
page = 1
while True:
    items = call(dev, "GET", f"/users?_page={page}&_limit=500")
    if not items: break
    for s in items:
        item = call(dev, "GET", f"/users/{s['id']}")
        del item["id"]
        call(prod, "POST", "/users", item)
    page += 1
PY
t1=$(now)
seq_items=$(count "$p3"); seq_s=$(python3 -c "print(f'{$t1-$t0:.2f}')")

rate() { python3 -c "print(f'{$1/$2:.0f}')"; }
wrk_r=$(rate "$wrk_items" "$wrk_s"); tm_r=$(rate "$tm_items" "$tm_s"); seq_r=$(rate "$seq_items" "$seq_s")
vs_wrk=$(python3 -c "print(f'{100*$tm_r/$wrk_r:.0f}')"); vs_seq=$(python3 -c "print(f'{$tm_r/$seq_r:.1f}')")
table="| run | items | seconds | items/s |
|---|---|---|---|
| direct load (wrk -t1 -c16, the same POSTs) | $wrk_items | $wrk_s | $wrk_r |
| tidemark sync (scan + find-by-name + POST, concurrency 16) | $tm_items | $tm_s | $tm_r |
| sequential list → GET → POST (Python, keep-alive) | $seq_items | $seq_s | $seq_r |

tidemark: ${vs_wrk}% of the direct load (target ≥ 70%), ${vs_seq}× the sequential script (target ≥ 10×)."
echo "$table"
if [ "$RECORD" = "--record" ]; then
  {
    echo
    echo "## REST connector: 10k items into an empty prod (issue 3)"
    echo
    echo "$(date -u +%Y-%m-%d), $(nproc) cores, json-server 0.17.4 for dev and each prod, $("$BIN" --version)."
    echo "Command: \`ops/bench/rest.sh $N --record\`"
    echo
    echo "$table"
  } >> "$root/BENCHMARKS.md"
fi
