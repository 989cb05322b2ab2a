#!/usr/bin/env bash
# Set up, make sure RabbitMQ and Redis run, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/ci-services.sh
ruff check hfgan_core workers tests bench
ruff format --check hfgan_core workers tests bench
# The compose stack: a Docker engine, Compose and mmdebstrap, installed with apt-get when missing (Debian's
# docker.io, docker-compose 1.29, mmdebstrap) and dockerd started when none answers (scripts/compose-setup.sh);
# `docker-compose config -q` validates compose.yaml (tests/unit/test_compose.py checks its structure). The stack in
# containers runs last (below).
bash scripts/compose-setup.sh
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
# The stack in containers (tests/compose/, marker `compose`; pyproject's addopts keep it out of the run above): the
# local images (scripts/compose-images.sh, layer-cached: 8 minutes from nothing on a loaded 2-core host, 22 s after a
# source change), then the suite (one stack, 12 minutes there; docs/deployment.md). A broken Docker fails it.
bash scripts/compose-images.sh
python -m pytest -q -m compose tests/compose
