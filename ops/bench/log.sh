#!/usr/bin/env bash
# Event log throughput: SledLog and KafkaLog side by side with raw file appends (one fsync
# per batch) and a plain rdkafka producer/consumer on the same broker. 1 KiB events.
#
#   ops/bench/log.sh [EVENTS] [BATCH]      (defaults 20000 and 1000)
#
# Uses the broker in TIDEMARK_KAFKA_BROKERS, or starts one with ops/peers/kafka.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-20000}
batch=${2:-1000}
brokers=${TIDEMARK_KAFKA_BROKERS:-$(ops/peers/kafka.sh start)}
cargo build --release -p tidemark --example log_bench >&2
# Honour CARGO_TARGET_DIR (a private target dir keeps the bench off others' cargo lock).
exec "${CARGO_TARGET_DIR:-target}/release/examples/log_bench" "$brokers" "$events" "$batch"
