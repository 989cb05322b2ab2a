#!/usr/bin/env bash
# Set up, make sure RabbitMQ and Redis run, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/ci-services.sh
ruff check hfgan_core workers tests bench
python -m pytest -q "$@"
