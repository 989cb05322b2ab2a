#!/usr/bin/env bash
# Set up, make sure RabbitMQ and Redis run, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/ci-services.sh
ruff check hfgan_core workers tests bench
ruff format --check hfgan_core workers tests bench
# The compose stack (tests/compose/ runs it in containers; tests/unit/test_compose.py checks the file): a Docker
# engine, Compose and mmdebstrap, installed with apt-get when missing (Debian's docker.io, docker-compose 1.29,
# mmdebstrap), dockerd started when none answers, then the local images built (scripts/compose-images.sh; Docker's
# layer cache makes this quick after the first build on a machine).
bash scripts/compose-setup.sh
docker-compose -f compose.yaml config -q || { echo "test.sh: compose.yaml is invalid" >&2; exit 1; }
bash scripts/compose-images.sh
python -m pytest -q "$@"
