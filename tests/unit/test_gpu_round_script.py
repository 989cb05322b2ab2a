"""bench/gpu_round.py, the script prepared for a session that is lent a GPU, runs and reports every row: checked on
the CPU at a tiny size, so it does not rot while no GPU is lent (its timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_round.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_round", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_gpu_round_script_reports_each_precision_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "gpu_round.json"
    gpu_round = _load()
    assert gpu_round.main(["--device", "cpu", "--clients", "2", "--steps", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["precision"] for r in doc["rows"]] == ["float32", "tf32", "bfloat16"]
    for row in doc["rows"]:
        assert row["unsplit"]["round_s"] > 0 and row["embedded"]["steps_s"] > 0
        assert row["embedded"]["round_s"] >= row["embedded"]["steps_s"]
        assert row["embedded"]["bytes_sent"] > 0  # the split really went through the encoded messages
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if "whole round" in line] == [
        "float32",
        "tf32",
        "bfloat16",
    ]


def test_the_gpu_round_script_refuses_unknown_precisions_and_a_missing_gpu(capsys):
    gpu_round = _load()
    with pytest.raises(SystemExit):
        gpu_round.main(["--device", "cpu", "--precisions", "float64"])
    assert "unknown precision(s) float64" in capsys.readouterr().err
    if not gpu_round.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_round.main(["--device", "cuda"])
        assert "torch sees no CUDA device" in capsys.readouterr().err
