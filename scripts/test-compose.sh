#!/usr/bin/env bash
# The compose stack in containers: make sure Docker, Compose and mmdebstrap are there and dockerd runs, build the
# local images (layer-cached), then run tests/compose/ (marker `compose`). Arguments go to pytest.
#
#   bash scripts/test-compose.sh                 # the whole suite (docs/deployment.md says what it checks)
#   HFGAN_COMPOSE_IMAGES=hub bash scripts/test-compose.sh   # with Docker Hub's images instead (docker compose build)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/compose-setup.sh
if [ "${HFGAN_COMPOSE_IMAGES:-local}" = hub ]; then
  docker-compose -f compose.yaml build
else
  bash scripts/compose-images.sh
fi
python -m pytest -q -m compose tests/compose "$@"
