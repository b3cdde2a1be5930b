#!/usr/bin/env bash
# Crash soak: runs the SIGKILL harness of tests/reliability.rs for a given duration (the
# test command runs a short version of the same harness) and prints its figures: kills,
# source changes, events, writes, items, and the duplicates/losses/gaps it checked for.
#
#   ops/soak.sh 600      # ten minutes
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:?usage: ops/soak.sh SECONDS}
TIDEMARK_SOAK_SECONDS=$seconds cargo test -p tidemark --test reliability \
  issue_6_random_sigkills -- --nocapture 2>&1 | grep -E '^soak figures|test result|panicked'
