#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs every peer the tests need from the
# package registries (when missing), starts the shared ones, runs `cargo test --workspace`,
# and stops the peers again. Tests that start their own peers (json-server instances,
# Prometheus) do so through the scripts in ops/peers/.
#
#   ops/test.sh                 # everything
#   ops/test.sh --test mirror   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

log "installing test peers (skipped when already installed)"
ops/peers/json-server.sh install
ops/peers/prometheus.sh install
ops/peers/kafka.sh install
ops/peers/exfat.sh install
# rest_faults makes a self-signed certificate for its TLS peer with the openssl CLI.
if ! command -v openssl >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl >&2
fi

# TIDEMARK_KAFKA_PORT picks the broker's port (default 19092); a broker already running
# there from an earlier `ops/peers/kafka.sh start` is used as it is and left running.
port=${TIDEMARK_KAFKA_PORT:-19092}
if ops/peers/kafka.sh status "$port" >/dev/null 2>&1; then
  log "using the Kafka-protocol broker already running on port $port"
else
  log "starting the Kafka-protocol broker on port $port"
  trap 'ops/peers/kafka.sh stop "$port" >/dev/null 2>&1 || true' EXIT
fi
TIDEMARK_KAFKA_BROKERS=$(ops/peers/kafka.sh start "$port")
export TIDEMARK_KAFKA_BROKERS

log "cargo test --workspace (broker at $TIDEMARK_KAFKA_BROKERS)"
cargo test --workspace --no-fail-fast "$@"
