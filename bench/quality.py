"""The quality bench as a script: `python bench/quality.py --config s3 --out docs/evidence/s3 [...]`.

The same as `hfgan bench quality ...` (see hfgan_core/bench/cli.py for the options and hfgan_core/bench/quality.py
for what it runs): HuSCF-GAN, its ablations and the baselines on the same data, budget and seeds, written up as
report.md / report.json with plots and sample grids in the output directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfgan_core.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["quality", *sys.argv[1:]]))
