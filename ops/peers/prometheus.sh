#!/usr/bin/env bash
# Prometheus and promtool for the ops tests (tests/ops_rules.rs, tests/ops_prometheus.rs):
# Debian's `prometheus` package, which ships both.
#
#   ops/peers/prometheus.sh install                      apt-get install prometheus unless
#                                                        promtool and prometheus are on PATH
#   ops/peers/prometheus.sh start CONFIG [PORT] [DIR]    start a server with CONFIG on
#                                                        127.0.0.1:PORT (default 19090),
#                                                        TSDB under DIR; prints its URL once
#                                                        it is ready
#   ops/peers/prometheus.sh stop [PORT] [DIR]            stop it
#   ops/peers/prometheus.sh check                        run promtool check + test on the
#                                                        repository's rules and config
set -euo pipefail

cmd=${1:-}
here=$(cd "$(dirname "$0")/../.." && pwd)

install() {
    if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        sudo="sudo"
    fi
    echo "prometheus.sh: installing Debian's prometheus package (promtool and the server)..." >&2
    # The package's postinst tries to start the service; in containers without systemd
    # that is refused, which is harmless here.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2
    command -v promtool >/dev/null && command -v prometheus >/dev/null
}

ready() {
    # Bash's /dev/tcp: no curl needed.
    exec 3<>"/dev/tcp/127.0.0.1/$1" 2>/dev/null || return 1
    printf 'GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    local status
    read -r _ status _ <&3 || status=""
    exec 3>&-
    [ "$status" = 200 ]
}

case "$cmd" in
install)
    install
    ;;
start)
    config=${2:?usage: prometheus.sh start CONFIG [PORT] [DIR]}
    port=${3:-19090}
    dir=${4:-${TMPDIR:-/tmp}/tidemark-prometheus-$port}
    install
    mkdir -p "$dir/data"
    if [ -f "$dir/prometheus.pid" ] && kill -0 "$(cat "$dir/prometheus.pid")" 2>/dev/null; then
        echo "prometheus.sh: already running (pid $(cat "$dir/prometheus.pid"))" >&2
    else
        nohup prometheus \
            --config.file="$config" \
            --storage.tsdb.path="$dir/data" \
            --web.listen-address="127.0.0.1:$port" \
            --log.level=warn \
            >"$dir/prometheus.log" 2>&1 &
        echo $! >"$dir/prometheus.pid"
    fi
    for _ in $(seq 1 200); do
        if ready "$port"; then
            echo "http://127.0.0.1:$port"
            exit 0
        fi
        if ! kill -0 "$(cat "$dir/prometheus.pid")" 2>/dev/null; then
            echo "prometheus.sh: prometheus exited; its log:" >&2
            cat "$dir/prometheus.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "prometheus.sh: prometheus did not become ready in 20 s; see $dir/prometheus.log" >&2
    exit 1
    ;;
stop)
    port=${2:-19090}
    dir=${3:-${TMPDIR:-/tmp}/tidemark-prometheus-$port}
    if [ -f "$dir/prometheus.pid" ]; then
        kill "$(cat "$dir/prometheus.pid")" 2>/dev/null || true
        rm -f "$dir/prometheus.pid"
    fi
    ;;
check)
    install
    promtool check rules "$here/ops/prometheus/alerts.yml"
    promtool test rules "$here/ops/prometheus/alerts_test.yml"
    promtool check config "$here/ops/prometheus/prometheus.yml"
    ;;
*)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
