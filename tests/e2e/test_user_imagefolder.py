"""End to end: a 32x32 RGB user dataset in ImageFolder layout (synthetic colour glyphs written as PNG files by the
test) trained through the quick start's path, `hfgan train --config TOML` in a fresh process.

The model is chosen from the data (32x32, 3 channels, 10 classes), every round records the generation score and the
classifier Fréchet distance, the summary ties the run to its data by a content digest, and the sample grids are RGB
PNGs. Small on purpose (two clients, two rounds of four steps): this checks the path, not the GAN's quality.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hfgan_core.config import ENV_OVERRIDES, DomainConfig
from hfgan_core.data.domain import content_digest
from hfgan_core.data.synthetic import synthetic_colour_split
from hfgan_core.data.user import load_user_dataset
from tests.userdata import write_png_folder

pytestmark = pytest.mark.slow

CONFIG = """
[scenario]
name = "user-colour"
distribution = "iid"

[[scenario.domains]]
dataset = "glyphs"
clients = 2
path = "glyphs"
format = "imagefolder"

[train]
rounds = 2
local_epochs = 1
batch_size = 32
steps_per_epoch = 4
kld_from_round = 2
clusters = "domains"
cuts = [[0, 0, 0, 0], [1, 1, 1, 1]]
score_samples = 200
utility_samples = 500
utility_epochs = 1
"""


def png_header(path: Path) -> tuple[int, int, int]:
    """(width, height, colour type) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h, _depth, colour = struct.unpack(">IIBB", data[16:26])
    return w, h, colour


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-colour")
    data = root / "data"
    write_png_folder(data / "glyphs" / "train", synthetic_colour_split(20, True))
    write_png_folder(data / "glyphs" / "test", synthetic_colour_split(5, False))
    (root / "user.toml").write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES and not k.startswith("HFGAN_")}
    env["OMP_NUM_THREADS"] = "1"
    argv = ["train", "--config", str(root / "user.toml"), "--data-dir", str(data), "--run-dir", str(root / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "hfgan_core.cli", *argv, "--threads", "1", "--quiet"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, data, root / "run", proc


def test_model_is_chosen_from_the_data(run):
    _, _, run_dir, proc = run
    assert "model: 32x32x3, 10 classes (from the data)" in proc.stderr
    recorded = tomllib.loads((run_dir / "config.toml").read_text())
    assert (recorded["model"]["image_size"], recorded["model"]["channels"]) == (32, 3)
    assert recorded["scenario"]["domains"][0]["format"] == "imagefolder"


def test_every_round_has_score_and_frechet_distance(run):
    records = [json.loads(x) for x in (run[2] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        score = r["generation_score"]["glyphs"]
        fd = r["classifier_frechet_distance"]["glyphs"]
        assert 1.0 <= score <= 10.0 and math.isfinite(fd) and fd > 0.0


def test_summary_scores_utility_and_data_digest(run):
    _, data, run_dir, _ = run
    summary = json.loads((run_dir / "summary.json").read_text())
    dom = summary["domains"]["glyphs"]
    assert 1.0 <= dom["generation_score"] <= 10.0
    assert math.isfinite(dom["classifier_frechet_distance"])
    assert 0.0 <= dom["utility"]["accuracy"] <= 100.0 and dom["utility"]["n_samples"] == 500
    train, test = load_user_dataset(DomainConfig("glyphs", 2, path="glyphs", format="imagefolder"), data)
    assert summary["data_digests"] == {"glyphs": content_digest(train, test)}
    assert summary["data_sources"]["glyphs"] == str(data / "glyphs")


def test_sample_grids_are_rgb(run):
    grids = sorted((run[2] / "samples").glob("round_*_cluster_*.png"))
    assert grids, "no sample grids"
    for g in grids:
        w, h, colour = png_header(g)
        assert colour == 2 and w > 32 * 8 and h > 32 * 8  # truecolour, at least 8 tiles of 32 pixels each way
