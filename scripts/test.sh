#!/usr/bin/env bash
# Set up, make sure RabbitMQ and Redis run, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/ci-services.sh
ruff check hfgan_core workers tests bench
ruff format --check hfgan_core workers tests bench
# The compose stack, validated without a Docker engine: `docker-compose config -q` checks compose.yaml against the
# Compose schema (Debian's docker-compose 1.29, installed here when missing, without the Docker engine it recommends;
# tests/unit/test_compose.py needs it too).
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test.sh: installing docker-compose (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1; } \
    || true
fi
command -v docker-compose >/dev/null 2>&1 \
  || { echo "test.sh: docker-compose is missing (apt-get install docker-compose) and compose.yaml is unchecked" >&2; exit 1; }
docker-compose -f compose.yaml config -q || { echo "test.sh: compose.yaml is invalid" >&2; exit 1; }
# The dashboard's test loads the page in a real browser: Debian's chromium, headless (tests/browser.py).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test.sh: installing chromium (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } \
    || true
fi
command -v chromium >/dev/null 2>&1 \
  || { echo "test.sh: chromium is missing (apt-get install chromium); the dashboard test needs it" >&2; exit 1; }
python -m pytest -q "$@"
