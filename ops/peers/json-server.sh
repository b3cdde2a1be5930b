#!/usr/bin/env bash
# Starts one json-server (a real REST server from npm) serving DB.json on 127.0.0.1:PORT.
# Installs the pinned version into ops/peers/node_modules on first use.
#
#   ops/peers/json-server.sh DB.json PORT
#   ops/peers/json-server.sh install        install only (ops/test.sh does this up front)
#
# Runs in the foreground (exec), so the caller's pid is the server's pid.
set -euo pipefail
VERSION="0.17.4"
here="$(cd "$(dirname "$0")" && pwd)"
if [ "${1:-}" != install ] && [ $# -ne 2 ]; then
  echo "usage: $0 DB.json PORT" >&2
  exit 2
fi
bin="$here/node_modules/.bin/json-server"
if [ ! -x "$bin" ]; then
  command -v npm >/dev/null || { echo "npm is required to install json-server (apt-get install npm)" >&2; exit 1; }
  # Concurrent first runs (parallel tests) install once.
  exec 9>"$here/.install.lock"
  flock 9
  if [ ! -x "$bin" ]; then
    npm install --prefix "$here" --no-audit --no-fund --no-save "json-server@$VERSION" >&2
  fi
  flock -u 9
fi
[ "$1" = install ] && exit 0
exec "$bin" --watch=false --quiet --host 127.0.0.1 --port "$2" "$1"
