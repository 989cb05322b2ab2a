#!/usr/bin/env bash
# Run pytest while CPU-bound processes (one per core by default) compete for the machine: the proof that a test does
# not depend on the host's load (docs/testing.md). The competitors are bounded in time and stopped when pytest ends.
#   bash scripts/test-under-load.sh -q tests/e2e/test_faults.py
# HFGAN_LOAD_PROCS: how many competitors (default: the number of cores); HFGAN_LOAD_LIMIT_S: their time bound (3600).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
n=${HFGAN_LOAD_PROCS:-$(nproc)}
limit=${HFGAN_LOAD_LIMIT_S:-3600}
pids=()
for _ in $(seq "$n"); do
  timeout "$limit" python -c 'while True: pass' &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
echo "test-under-load: $n CPU-bound competitor(s) running (pids ${pids[*]})" >&2
python -m pytest "$@"
