"""End to end: `hfgan train --config quickstart` as a user runs it, every artefact it writes, eval, and resume.

The data directory is empty, so both domains fall back to their synthetic stand-ins (with a notice). To keep CI
time down the run is the preset shortened with the CLI's own overrides to two rounds of eight steps
(`--rounds 2 --steps-per-epoch 8`); everything else (clients, shards, cuts, clustering from round 2, evaluation
sizes) is the preset's. The run is made once per module (its wall time is printed, never asserted) and the tests
read what it left. Resume is tested on a copy whose last round checkpoint is removed, as if the process had stopped
after round 1: `--resume` must redo round 2 and reach exactly the models of the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hfgan_core.cli import main
from hfgan_core.config import ENV_OVERRIDES, ConfigError, load_config
from hfgan_core.model import CutBits, architecture
from hfgan_core.runtime import checkpoint as ckpt
from hfgan_core.runtime.recorder import domain_clusters
from hfgan_core.runtime.train import check_run_dir

pytestmark = pytest.mark.slow

DOMAINS = ("MNIST", "FashionMNIST")
UTILITY_KEYS = ("accuracy", "precision", "recall", "f1", "fpr")
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Run:
    root: Path
    data: Path
    run: Path
    env: dict[str, str]
    proc: subprocess.CompletedProcess
    took: str


def hfgan(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 1200
) -> tuple[subprocess.CompletedProcess, str]:
    """Run the CLI in a fresh process; returns it and its wall and CPU time (for the log, never asserted)."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(
        [sys.executable, "-m", "hfgan_core.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, f"{time.perf_counter() - t0:.1f} s wall, {_children_cpu() - cpu0:.1f} s CPU"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# The CI variant of the preset: two short rounds (the preset itself trains longer; README, quick start).
CI_ROUNDS, CI_STEPS = 2, 8


def ci_config():
    """The configuration the module's run trains: the preset with the CLI overrides of `train_args`."""
    return load_config("quickstart").with_overrides("train", rounds=CI_ROUNDS, steps_per_epoch=CI_STEPS)


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    # One torch thread, as every other test: resume is compared bit for bit with the uninterrupted run, and with two
    # threads oneDNN's convolutions were seen to differ in the last bits from one process to the next (README,
    # "Reproducibility"), so two runs from one seed need not be identical.
    return [
        "train",
        "--config",
        "quickstart",
        "--data-dir",
        str(data),
        "--run-dir",
        str(run),
        "--rounds",
        str(CI_ROUNDS),
        "--steps-per-epoch",
        str(CI_STEPS),
        "--threads",
        "1",
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("quickstart")
    data = root / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES and not k.startswith("HFGAN_")}
    env["HFGAN_CLASSIFIER_DIR"] = str(root / "classifiers")  # shared by every run of this module
    env["OMP_NUM_THREADS"] = "1"  # `hfgan eval` too, whose scores are compared with the run's (see train_args)
    run = root / "run"
    proc, took = hfgan(train_args(data, run), env, root)
    print(f"\nhfgan train --config quickstart (utility on, classifiers fitted): {took}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Run(root, data, run, env, proc, took)


def jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


def is_score(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and 1.0 <= x <= 10.0


# --------------------------------------------------------------------------------------------------- the run


def test_completes_with_fallback_notices(quickstart):
    err = quickstart.proc.stderr
    for dom in DOMAINS:
        notice = f"NOTICE: {dom} not available under {quickstart.data / dom / 'raw'}: using the synthetic dataset"
        assert err.count(notice) == 1, err
        assert err.count(f"under {quickstart.data / dom / 'raw'}") == 1  # said once, not twice
    out = json.loads(quickstart.proc.stdout)
    assert out["run_dir"] == str(quickstart.run) and set(out["domains"]) == set(DOMAINS) and out["wall_s"] > 0
    # The data directory is left as it was: the fallback writes nothing there.
    assert list(quickstart.data.iterdir()) == []


def test_metrics_jsonl_one_object_per_round(quickstart):
    cfg = ci_config()
    records = jsonl(quickstart.run / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["wall_s"] > 0
        assert set(r["clusters"]) == {str(c) for c in range(cfg.scenario.total_clients)}
        assert set(r["generation_score"]) == set(DOMAINS)
        assert all(is_score(s) for s in r["generation_score"].values()), r["generation_score"]
        assert r["aggregated"] and r["arrived"] == [0, 1, 2, 3] and r["dropped"] == {}
        assert all(math.isfinite(v) for v in r["train"].values()) and "g_loss" in r["train"]
        assert "-1" in r["digests"]  # the global (server) model's digest
    # Round 1 aggregates as one cluster; from kld_from_round = 2 on, one cluster per domain.
    assert set(records[0]["clusters"].values()) == {0}
    assert len(set(records[1]["clusters"].values())) == len(DOMAINS)
    assert len(records[1]["digests"]) == len(DOMAINS) + 1
    csv = (quickstart.run / "metrics.csv").read_text().splitlines()
    assert len(csv) == 3 and "round" in csv[0]


def test_summary_json(quickstart):
    summary = json.loads((quickstart.run / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert set(summary["domains"]) == set(DOMAINS)
    last = jsonl(quickstart.run / "metrics.jsonl")[-1]
    cfg = ci_config()
    clusters = domain_clusters(cfg, {int(c): k for c, k in last["clusters"].items()})
    for dom, res in summary["domains"].items():
        assert is_score(res["generation_score"])
        assert res["generation_score"] == pytest.approx(last["generation_score"][dom], rel=1e-9)
        assert res["cluster"] == clusters[dom][0]
        util = res["utility"]
        for k in UTILITY_KEYS:
            assert isinstance(util[k], float) and 0.0 <= util[k] <= 100.0, (dom, k, util[k])
        # The preset's utility settings (not shortened in the CI variant).
        assert (util["n_samples"], util["epochs"]) == (cfg.train.utility_samples, cfg.train.utility_epochs)
    assert isinstance(summary["modelled_latency_s"], float) and 0 < summary["modelled_latency_s"] < 1000
    assert summary["wall_s"] > 0 and summary["measured_step_s"] > 0
    assert len(summary["round_wall_s"]) == 2
    assert isinstance(summary["bytes_sent"], int) and summary["bytes_sent"] > 10_000_000
    assert summary["messages_sent"] > 0
    assert summary["data_sources"] == {d: "synthetic" for d in DOMAINS} and len(summary["notices"]) == 2
    assert summary["cuts"] == {"0": "1111", "1": "0000", "2": "1110", "3": "1010"}  # the preset's fixed cuts


def test_sample_grids_and_plots(quickstart):
    import matplotlib.image as mpimg

    samples = sorted(p.name for p in (quickstart.run / "samples").glob("*.png"))
    # One grid per cluster and round: one cluster in round 1, one per domain in round 2.
    assert samples == ["round_001_cluster_0.png", "round_002_cluster_0.png", "round_002_cluster_1.png"]
    pngs = [quickstart.run / "samples" / s for s in samples] + sorted((quickstart.run / "plots").glob("*.png"))
    assert any(p.parent.name == "plots" for p in pngs)
    for p in pngs:
        assert p.read_bytes()[:8] == PNG
        img = mpimg.imread(p)
        assert img.ndim >= 2 and img.shape[0] >= 28 and img.shape[1] >= 28 and float(img.std()) > 0


def test_checkpoints_are_complete_and_weights_only_loadable(quickstart):
    cfg = ci_config()
    arch = architecture(cfg.model)
    assert ckpt.complete_rounds(quickstart.run) == [1, 2]
    for rnd in (1, 2):
        d = ckpt.round_dir(quickstart.run, rnd)
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["round"] == rnd and manifest["format"] == "hfgan-checkpoint"
        assert sorted(manifest["files"]) == sorted(
            ["coordinator.pt", "server.pt"] + [f"client_{c}.pt" for c in range(4)]
        )
        assert not list(d.glob("*.tmp"))  # no leftovers of the atomic writes
        for name in manifest["files"]:
            blob = torch.load(d / name, map_location="cpu", weights_only=True)
            assert blob["format"] == "hfgan-checkpoint" and blob["version"] == 1 and blob["round"] == rnd
            assert blob["config"] == cfg.to_dict(include_runtime=False)
            assert blob["state"] and all(
                isinstance(t, torch.Tensor) and torch.isfinite(t.float()).all() for t in blob["state"].values()
            )
            if name.startswith("client_"):
                c = int(name[len("client_") : -3])
                cuts = CutBits(*cfg.train.cuts[c])
                held = {f"{s.name}.{i}" for s in arch.nets for i in s.client_blocks(*cuts.for_net(s.name))}
                assert {".".join(k.split(".")[:2]) for k in blob["state"]} == held, (name, cuts)
                assert set(blob["optimizers"]) == {"G", "D"} and blob["optimizers"]["G"]
            elif name == "server.pt":
                held = {f"{s.name}.{i}" for s in arch.nets for i in s.server_blocks()}
                assert {".".join(k.split(".")[:2]) for k in blob["state"]} == held
            else:
                assert any(k.startswith("global/") for k in blob["state"])
                assert blob["extra"]["cuts"] == {str(c): str(CutBits(*cfg.train.cuts[c])) for c in range(4)}


# -------------------------------------------------------------------------------------------- eval and resume


def test_eval_writes_eval_json(quickstart, tmp_path):
    # Run from an unrelated directory: eval must find the run's own data directory, not ./data.
    proc, took = hfgan(["eval", "--run-dir", str(quickstart.run), "--no-utility"], quickstart.env, tmp_path)
    print(f"\nhfgan eval --no-utility: {took}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MNIST not available under {quickstart.data / 'MNIST' / 'raw'}" in proc.stderr
    assert "fitting" not in proc.stderr  # the cached scoring classifiers are reused
    result = json.loads((quickstart.run / "eval.json").read_text())
    assert result == json.loads(proc.stdout)
    assert result["round"] == 2 and set(result["domains"]) == set(DOMAINS)
    summary = json.loads((quickstart.run / "summary.json").read_text())
    for dom, res in result["domains"].items():
        assert "utility" not in res
        # Same model, same classifier, same seeded samples: the final score of the run.
        assert res["generation_score"] == pytest.approx(summary["domains"][dom]["generation_score"], rel=1e-6)
    assert not list(tmp_path.iterdir())


def test_finished_run_cannot_be_resumed_or_restarted(quickstart, monkeypatch, capsys):
    # In process: both fail on the run directory check, before any data is loaded.
    for var in ENV_OVERRIDES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HFGAN_CLASSIFIER_DIR", quickstart.env["HFGAN_CLASSIFIER_DIR"])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in quickstart.run.rglob("*"))
    for extra, needle in ((["--resume"], "already finished its 2 rounds"), ([], "already holds this run")):
        assert main(train_args(quickstart.data, quickstart.run, *extra)) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
    after = sorted((p.name, p.stat().st_mtime_ns) for p in quickstart.run.rglob("*"))
    assert before == after


def test_resume_after_round_1_reaches_the_same_models(quickstart):
    # A copy named like the original (same run id), stopped after round 1: round 2's checkpoint never happened.
    copy = quickstart.root / "resumed" / "run"
    shutil.copytree(quickstart.run, copy)
    shutil.rmtree(ckpt.round_dir(copy, 2))
    (copy / "eval.json").unlink(missing_ok=True)
    assert ckpt.complete_rounds(copy) == [1]
    proc, took = hfgan(train_args(quickstart.data, copy, "--resume", "--no-utility"), quickstart.env, quickstart.root)
    print(f"\nhfgan train --resume (round 2 of 2, no utility): {took}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after round 1" in proc.stderr and "fitting" not in proc.stderr
    assert ckpt.complete_rounds(copy) == [1, 2]
    original = jsonl(quickstart.run / "metrics.jsonl")
    resumed = jsonl(copy / "metrics.jsonl")
    assert [r["round"] for r in resumed] == [1, 2]
    assert resumed[0] == original[0]  # round 1's record is kept as it was
    # Same seeds, restored optimiser and RNG states: round 2 aggregates to bit-identical models.
    assert resumed[1]["digests"] == original[1]["digests"]
    assert resumed[1]["clusters"] == original[1]["clusters"]
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["round_wall_s"]) == 1
    first = json.loads((quickstart.run / "summary.json").read_text())
    for dom in DOMAINS:
        assert "utility" not in summary["domains"][dom]
        assert summary["domains"][dom]["generation_score"] == pytest.approx(
            first["domains"][dom]["generation_score"], rel=1e-6
        )
    for name in ("coordinator.pt", "server.pt", "client_1.pt"):
        a = torch.load(ckpt.round_dir(copy, 2) / name, weights_only=True)["state"]
        b = torch.load(ckpt.round_dir(quickstart.run, 2) / name, weights_only=True)["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_may_extend_the_number_of_rounds(quickstart):
    # The number of rounds is not part of a run's identity: a finished run can be extended with --resume.
    longer = ci_config().with_overrides("train", rounds=3)
    assert check_run_dir(quickstart.run, longer, resume=True) == 2
    other = ci_config().with_overrides("train", seed=5)
    with pytest.raises(ConfigError, match="different run"):
        check_run_dir(quickstart.run, other, resume=True)
