#!/usr/bin/env bash
# The Kafka-protocol broker the Kafka backend's tests and benchmarks run against: tansu
# (an Apache Kafka compatible broker from crates.io) with its SQLite storage engine, so
# topics and committed offsets survive a broker restart.
#
#   ops/peers/kafka.sh install                 build tansu unless ~/.cargo/bin/tansu exists
#   ops/peers/kafka.sh start   [PORT] [DIR]    start a broker on 127.0.0.1:PORT (default 19092)
#                                              keeping data under DIR; prints the bootstrap
#                                              address once the broker answers
#   ops/peers/kafka.sh stop    [PORT] [DIR]    stop it
#   ops/peers/kafka.sh restart [PORT] [DIR]    stop, then start on the same data
#   ops/peers/kafka.sh status  [PORT] [DIR]    exit 0 if a broker started here is running
#
# Tests read the address from TIDEMARK_KAFKA_BROKERS:
#   export TIDEMARK_KAFKA_BROKERS=$(ops/peers/kafka.sh start)
set -euo pipefail

cmd=${1:-}
port=${2:-19092}
dir=${3:-${TMPDIR:-/tmp}/tidemark-kafka-$port}
tansu=${TANSU:-$HOME/.cargo/bin/tansu}

install() {
    if [ -x "$tansu" ]; then
        return 0
    fi
    if ! command -v cc >/dev/null; then
        echo "kafka.sh: a C compiler is needed to build tansu: apt-get install -y build-essential" >&2
        exit 1
    fi
    echo "kafka.sh: building tansu (about 10 minutes)..." >&2
    cargo install tansu --locked --features libsql >&2
}

answers() {
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

pid_alive() {
    [ -f "$dir/broker.pid" ] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null
}

start() {
    install
    mkdir -p "$dir"
    if pid_alive; then
        echo "127.0.0.1:$port"
        return 0
    fi
    if answers; then
        echo "kafka.sh: 127.0.0.1:$port is taken by another process; choose another port" >&2
        exit 1
    fi
    # setsid: the broker outlives the shell (and the test) that started it. The SQLite
    # URL is relative to the data directory (tansu reads `sqlite:///abs` as relative).
    (
        cd "$dir"
        exec setsid "$tansu" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine "sqlite://tansu.db" \
            >>broker.log 2>&1 </dev/null
    ) &
    echo $! >"$dir/broker.pid"
    for _ in $(seq 1 200); do
        if answers; then
            echo "127.0.0.1:$port"
            return 0
        fi
        if ! pid_alive; then
            echo "kafka.sh: the broker exited; its log:" >&2
            tail -20 "$dir/broker.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "kafka.sh: the broker did not answer on 127.0.0.1:$port within 20 s; see $dir/broker.log" >&2
    exit 1
}

stop() {
    if pid_alive; then
        local pid
        pid=$(cat "$dir/broker.pid")
        kill "$pid"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/broker.pid"
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) pid_alive ;;
    *)
        sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
