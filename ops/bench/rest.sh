#!/usr/bin/env bash
# REST connector benchmark (issue 3): mirror N items (default 10000) from a dev json-server
# into an empty prod json-server three ways, in one run, against the same kind of prod:
#   1. direct load: the same N POSTs sent by wrk (16 connections) — the server's ceiling;
#   2. tidemark sync (scan + project, release build) into an empty prod;
#   3. a sequential list → GET → POST script (Python, keep-alive), as people write today.
# Each of the three runs in three scenarios, one after the other in the same run:
#   file     json-server 0.17.4 on .json files (rewrites the whole file on every write;
#            the server is the ceiling for every client) — the original scenario;
#   memory   json-server 0.17.4 on .js sources (lowdb Memory adapter: writes stay in
#            memory), loopback — the clients' own cost, no file-bound ceiling;
#   latency  the memory servers behind ops/bench/latency_proxy.py, which delays every
#            byte LATENCY_MS each way (2 × LATENCY_MS per request round trip, and per new
#            connection) for every client alike; the sequential script runs on the first
#            SEQ_SAMPLE items there (it pays the round trips one by one).
# Every client gets its own fresh, empty prod server and the same items. Prints a table and,
# with --record, replaces the REST section of BENCHMARKS.md (keeping its "### Notes").
#
#   ops/bench/rest.sh [N] [--record]
#   env: REST_BENCH_SCENARIOS="file memory latency"  REST_BENCH_LATENCY_MS=10
#        REST_BENCH_SEQ_SAMPLE=1000  TIDEMARK_BIN=path/to/release/tidemark
#        REST_BENCH_PREFETCH=1 (tidemark's target kind sets prefetch_names = true: one
#        listing of prod per batch instead of a find-by-name GET before every POST)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
N="${1:-10000}"
RECORD="${2:-}"
SCENARIOS="${REST_BENCH_SCENARIOS:-file memory latency}"
LATENCY_MS="${REST_BENCH_LATENCY_MS:-10}"
SEQ_SAMPLE="${REST_BENCH_SEQ_SAMPLE:-1000}"
PREFETCH="${REST_BENCH_PREFETCH:-0}"
[ "$SEQ_SAMPLE" -gt "$N" ] && SEQ_SAMPLE="$N"
BIN="${TIDEMARK_BIN:-$root/target/release/tidemark}"
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
if [ ! -x "$BIN" ]; then
  (cd "$root" && cargo build --release -p tidemark --bin tidemark)
fi
"$root/ops/peers/json-server.sh" install
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
stop_servers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
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
# In-memory sources for json-server: a .js module exporting a function that returns the data.
echo "module.exports = () => JSON.parse(require('fs').readFileSync(__dirname + '/dev.json', 'utf8'));" > "$work/dev.js"
empty() { # NAME file|memory → prints the db path
  if [ "$2" = file ]; then echo '{"users": []}' > "$work/$1.json"; echo "$work/$1.json"
  else echo 'module.exports = () => ({ users: [] });' > "$work/$1.js"; echo "$work/$1.js"; fi
}
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
results="$work/results.tsv"
: > "$results"
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }

# 1. Direct load with wrk. CLIENT_PORT (what wrk talks to) SERVER_PORT (prod itself)
run_wrk() {
  local t0 t1 wrk_pid
  # wrk's thread:stop() ends sending but not the run, so the run ends when prod holds N items.
  t0=$(now)
  wrk -t1 -c16 -d600s --timeout 30s -s "$work/post.lua" "http://127.0.0.1:$1" >"$work/wrk.out" &
  wrk_pid=$!
  until [ "$(total "$2")" -ge "$N" ]; do sleep 0.2; done
  t1=$(now)
  kill "$wrk_pid" 2>/dev/null || true; wait "$wrk_pid" 2>/dev/null || true
  echo -e "$scenario\twrk\t$(count "$2")\t$(secs "$t0" "$t1")" >> "$results"
}

# 2. tidemark. DEV_CLIENT_PORT PROD_CLIENT_PORT PROD_SERVER_PORT
run_tidemark() {
  local t0 t1 dir="$work/tm-$scenario"
  mkdir -p "$dir"
  cat > "$dir/tidemark.toml" <<TOML
state_dir = "state"
listen = "127.0.0.1:0"
[[pipeline]]
name = "bench"
max_delete = "100%"
concurrency = 16
[pipeline.source.http]
base_url = "http://127.0.0.1:$1"
[[pipeline.source.http.kind]]
name = "users"
path = "/users"
name_field = "/name"
pagination = { style = "page", size = 500 }
[pipeline.target.http]
base_url = "http://127.0.0.1:$2"
in_flight = 16
[[pipeline.target.http.kind]]
name = "users"
path = "/users"
find = "/users?name={name}"
pagination = { style = "page", size = 500 }
prefetch_names = $([ "$PREFETCH" = 1 ] && echo true || echo false)
TOML
  t0=$(now)
  "$BIN" --quiet --config "$dir/tidemark.toml" sync >"$dir/tidemark.out"
  t1=$(now)
  echo -e "$scenario\ttidemark\t$(count "$3")\t$(secs "$t0" "$t1")" >> "$results"
}

# 3. Sequential list → GET → POST script. DEV_CLIENT_PORT PROD_CLIENT_PORT PROD_SERVER_PORT LIMIT
run_seq() {
  local t0 t1
  t0=$(now)
  python3 - "$1" "$2" "$4" <<'PY'
import http.client, json, sys
dev = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
prod = http.client.HTTPConnection("127.0.0.1", int(sys.argv[2]))
limit, done = int(sys.argv[3]), 0
def call(c, method, path, body=None):
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse(); data = r.read()
    assert r.status < 300, (method, path, r.status)
    return json.loads(data) if data else None
page = 1
while done < limit:
    items = call(dev, "GET", f"/users?_page={page}&_limit=500")
    if not items: break
    for s in items[:limit - done]:
        item = call(dev, "GET", f"/users/{s['id']}")
        del item["id"]
        call(prod, "POST", "/users", item)
        done += 1
    page += 1
PY
  t1=$(now)
  echo -e "$scenario\tsequential\t$(count "$3")\t$(secs "$t0" "$t1")" >> "$results"
}

load_start="$(uptime)"
for scenario in $SCENARIOS; do
  echo "== $scenario" >&2
  case "$scenario" in
    file)
      dev_port=$(free_port); start_server "$work/dev.json" "$dev_port"
      p1=$(free_port); start_server "$(empty prod_wrk file)" "$p1"; run_wrk "$p1" "$p1"
      p2=$(free_port); start_server "$(empty prod_tm file)" "$p2"; run_tidemark "$dev_port" "$p2" "$p2"
      p3=$(free_port); start_server "$(empty prod_seq file)" "$p3"; run_seq "$dev_port" "$p3" "$p3" "$N"
      ;;
    memory)
      dev_port=$(free_port); start_server "$work/dev.js" "$dev_port"
      p1=$(free_port); start_server "$(empty mem_wrk memory)" "$p1"; run_wrk "$p1" "$p1"
      p2=$(free_port); start_server "$(empty mem_tm memory)" "$p2"; run_tidemark "$dev_port" "$p2" "$p2"
      p3=$(free_port); start_server "$(empty mem_seq memory)" "$p3"; run_seq "$dev_port" "$p3" "$p3" "$N"
      ;;
    latency)
      dev_port=$(free_port); start_server "$work/dev.js" "$dev_port"
      p1=$(free_port); start_server "$(empty lat_wrk memory)" "$p1"
      p2=$(free_port); start_server "$(empty lat_tm memory)" "$p2"
      p3=$(free_port); start_server "$(empty lat_seq memory)" "$p3"
      x0=$(free_port); x1=$(free_port); x2=$(free_port); x3=$(free_port)
      python3 "$root/ops/bench/latency_proxy.py" --delay-ms "$LATENCY_MS" --parent $$ \
        --map "$x0:$dev_port" --map "$x1:$p1" --map "$x2:$p2" --map "$x3:$p3" \
        >"$work/proxy.out" 2>"$work/proxy.err" &
      pids+=($!)
      for _ in $(seq 1 100); do grep -q ready "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
      grep -q ready "$work/proxy.out" || { echo "latency proxy did not start" >&2; cat "$work/proxy.err" >&2; exit 1; }
      run_wrk "$x1" "$p1"
      run_tidemark "$x0" "$x2" "$p2"
      run_seq "$x0" "$x3" "$p3" "$SEQ_SAMPLE"
      ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  stop_servers
done
load_end="$(uptime)"

report="$(python3 - "$results" "$N" "$LATENCY_MS" "$SEQ_SAMPLE" "$PREFETCH" <<'PY'
import sys
path, n, lat, sample = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
prefetch = sys.argv[5] == "1"
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
label = {
    "file": "file (json-server on .json, loopback)",
    "memory": "memory (json-server on .js, loopback)",
    "latency": f"latency (memory + {lat} ms each way, {2 * float(lat):g} ms per round trip)",
}
client = {
    "wrk": "direct load (wrk -t1 -c16, the same POSTs)",
    "tidemark": "tidemark sync (scan + one listing per batch + POST, prefetch_names, concurrency 16)"
    if prefetch else "tidemark sync (scan + find-by-name + POST, concurrency 16)",
    "sequential": "sequential list → GET → POST (Python, keep-alive)",
}
out = ["| scenario | run | items | seconds | items/s |", "|---|---|---|---|---|"]
rates = {}
for sc, cl, items, s in rows:
    r = int(items) / float(s)
    rates.setdefault(sc, {})[cl] = r
    name = client[cl]
    if sc == "latency" and cl == "sequential" and sample < n:
        name += f", first {sample} items"
    out.append(f"| {label[sc]} | {name} | {items} | {s} | {r:.0f} |")
out.append("")
for sc, r in rates.items():
    if not all(k in r for k in client):
        continue
    vs_wrk, vs_seq = 100 * r["tidemark"] / r["wrk"], r["tidemark"] / r["sequential"]
    met = lambda ok: "met" if ok else "missed"
    out.append(f"- {sc}: tidemark {vs_wrk:.0f}% of the direct load (target ≥ 70%: "
               f"{met(vs_wrk >= 70)}), {vs_seq:.1f}× the sequential script "
               f"(target ≥ 10×: {met(vs_seq >= 10)}).")
print("\n".join(out))
PY
)"
echo "$report"
echo "load: start $load_start; end $load_end"
if [ "$RECORD" = "--record" ]; then
  section="## REST connector: 10k items into an empty prod (issue 3)

$(date -u +%Y-%m-%d), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), json-server 0.17.4 for dev and each prod, $("$BIN" --version).
Load (\`uptime\`) at the start: \`${load_start# }\`; at the end: \`${load_end# }\`.
Command: \`$([ "$PREFETCH" = 1 ] && echo "REST_BENCH_PREFETCH=1 ")$([ "$SCENARIOS" != "file memory latency" ] && echo "REST_BENCH_SCENARIOS=\"$SCENARIOS\" ")ops/bench/rest.sh $N --record\`

$report"
  python3 - "$root/BENCHMARKS.md" "$section" <<'PY'
import sys
path, section = sys.argv[1], sys.argv[2]
lines = open(path).read().split("\n")
start = next((i for i, l in enumerate(lines) if l.startswith("## REST connector")), None)
if start is None:
    lines += [""] + section.split("\n")
else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    old = lines[start:end]
    notes = next((i for i, l in enumerate(old) if l.startswith("### Notes")), None)
    kept = old[notes:] if notes is not None else []
    lines[start:end] = section.split("\n") + [""] + kept
open(path, "w").write("\n".join(lines))
PY
fi
