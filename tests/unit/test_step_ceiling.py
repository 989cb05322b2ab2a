"""bench/step_ceiling.py: the step's multiply-add count against one written out by hand from the layer shapes, the
ceilings' arithmetic, and a tiny run that finds the kernels in the profile (its timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from hfgan_core.config import ModelConfig

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "step_ceiling.py"


def _load():
    spec = importlib.util.spec_from_file_location("step_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _layer(mults: int, bias: int, first: bool = False) -> tuple[int, int]:
    """(forward, full backward) FLOPs per sample of a weight layer: 2 per multiply-add, the bias once each way; the
    first layer of a network computes no input gradient."""
    return 2 * mults + bias, (2 if first else 4) * mults + bias


def test_the_step_flops_match_a_count_by_hand_of_the_28x28_model():
    # (multiplies, bias elements) of each weight layer, per sample; transposed convolutions count their input pixels.
    g = [
        _layer(110 * 12544, 12544, first=True),  # Linear(z 100 + embedding 10 -> 256 x 7 x 7)
        _layer(256 * 128 * 4 * 4 * 7 * 7, 128 * 14 * 14),  # ConvT 256 -> 128, 7 -> 14
        _layer(128 * 128 * 3 * 3 * 14 * 14, 128 * 14 * 14),  # ConvT 128 -> 128, 14 -> 14
        _layer(128 * 64 * 4 * 4 * 14 * 14, 64 * 28 * 28),  # ConvT 128 -> 64, 14 -> 28
        _layer(64 * 1 * 3 * 3 * 28 * 28, 28 * 28),  # ConvT 64 -> 1, 28 -> 28
    ]
    d = [
        (_layer(2 * 64 * 4 * 4 * 14 * 14, 64 * 14 * 14, first=True), 2 * 64 * 4 * 4 * 14 * 14),  # Conv 2 -> 64
        (_layer(64 * 128 * 4 * 4 * 7 * 7, 128 * 7 * 7), 64 * 128 * 4 * 4 * 7 * 7),  # Conv 64 -> 128, 14 -> 7
        (_layer(128 * 128 * 3 * 3 * 7 * 7, 128 * 7 * 7), 128 * 128 * 3 * 3 * 7 * 7),  # Conv 128 -> 128
        (_layer(128 * 256 * 4 * 4 * 3 * 3, 256 * 3 * 3), 128 * 256 * 4 * 4 * 3 * 3),  # Conv 128 -> 256, 7 -> 3
        (_layer(2304, 1), 2304),  # Linear 2304 -> 1
    ]
    batch = 64
    # G: one forward, one backward. D: three forwards, two full backwards, one pass of input gradients only.
    g_step = sum(f + b for f, b in g) * batch
    d_step = sum(3 * f + 2 * b + 2 * m for (f, b), m in d) * batch
    flops = _load().step_flops(ModelConfig(), batch)
    assert flops.generator == g_step
    assert flops.discriminator == d_step
    assert math.isclose(flops.total / batch / 1e9, 0.789, abs_tol=0.001)  # 0.79 GFLOP a sample


def test_the_ceilings_follow_from_the_kernel_share_and_the_peak():
    c = _load().ceilings(step_s=1.0, kernel_share=0.8, flops=400.0, peak=1000.0)
    # Kernels take 0.8 s for work that takes 0.4 s at the peak; the rest takes 0.2 s.
    assert c["kernel_rate_of_peak"] == pytest.approx(0.5)
    assert c["ceiling_kernels_at_peak"] == pytest.approx(1.0 / 0.6)
    assert c["ceiling_rest_free"] == pytest.approx(1.0 / 0.8)
    assert c["ceiling_both"] == pytest.approx(1.0 / 0.4)


def test_a_tiny_run_finds_the_kernels_in_the_profile(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    bench = _load()
    assert bench.main(["--batch", "4", "--steps", "1", "--threads", "1", "--gemm-sizes", "128", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    # The profiler's operator names are what the share is read from: a renamed kernel would make it 0.
    assert 0.0 < row["kernel_share"] < 1.0
    assert row["gflop_per_step"] == pytest.approx(bench.step_flops(ModelConfig(), 4).total / 1e9)
    assert row["ceiling_both"] > row["ceiling_kernels_at_peak"] and row["ceiling_both"] > row["ceiling_rest_free"]
    assert "| 4 |" in capsys.readouterr().out


def test_bad_arguments_are_refused():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--batch", "0"])
    with pytest.raises(ValueError, match="positive"):
        bench.gemm_peak(1, ())
