#!/usr/bin/env bash
# The fast loop: unit tests and the contract suites on the memory backends, without RabbitMQ, Redis, worker processes
# or the slow tests (pytest markers `integration`, `e2e`, `slow`; see docs/testing.md). Needs .venv (scripts/setup.sh).
# Extra arguments go to pytest (e.g. `-x`, `-k cli`). The whole suite is scripts/test.sh, what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
exec python -m pytest -q -m "not integration and not e2e and not slow" "$@"
