"""Evaluation: generation score, classification metrics, classifier files, PNG grids, metrics log, CLI."""

from __future__ import annotations

import argparse
import csv
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from torch import nn

from hfgan_core.config import ConfigError
from hfgan_core.evaluation import (
    EvalSettings,
    MetricsLog,
    ScoringClassifier,
    classification_metrics,
    classifier_record,
    confusion_matrix,
    evaluate_generators,
    fit_classifier,
    generation_score,
    load_classifier,
    plot_scores,
    read_classifier_record,
    sample_generator,
    save_class_grid,
    save_classifier,
    save_sample_grid,
    score_from_probs,
    utility_metrics,
    write_json_atomic,
)
from hfgan_core.evaluation import cli as eval_cli
from hfgan_core.evaluation.training import as_tensors, fast_layout, seeded_init

SHARED = Path("/work/shared/datasets")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# Stubs: a generator that writes its label into the image, a classifier that reads it back


def label_coded_generator(seen: list[torch.Tensor] | None = None):
    """Images whose pixels all equal label/9 mapped to [-1, 1]."""

    def generate(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        assert z.shape == (labels.shape[0], 100)
        if seen is not None:
            seen.append(labels.clone())
        v = labels.to(torch.float32) / 9.0 * 2.0 - 1.0
        return v.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).clone()

    return generate


class LabelReader(nn.Module):
    """Predicts the label coded by `label_coded_generator` with (numerically) total certainty."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.round((x.mean(dim=(1, 2, 3)) + 1.0) / 2.0 * 9.0)
        return -1e4 * (torch.arange(10.0).view(1, 10) - k.view(-1, 1)).abs()


class ConstantClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.3, 2.0, -1.0, 0.0, 1.5, 0.1, -0.4, 0.9, 0.2, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def band_generator(noise: float = 0.3):
    """Class k: a bright horizontal band at rows 2k+3 .. 2k+5, plus z-driven noise (an easy, learnable domain)."""

    def generate(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b = labels.shape[0]
        img = torch.full((b, 1, 28, 28), -1.0)
        rows = torch.arange(28).view(1, 28)
        start = (2 * labels + 3).view(-1, 1)
        band = (rows >= start) & (rows < start + 3)
        img[:, 0] = torch.where(band.view(b, 28, 1), 1.0, -1.0).expand(b, 28, 28)
        jitter = z[:, :28].view(b, 1, 28, 1) * noise
        return (img + jitter).clamp(-1, 1)

    return generate


def band_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = sample_generator(band_generator(), n, generator=torch.Generator().manual_seed(seed))
    assert out is not None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Generation score


def test_perfect_generator_scores_the_exponentiated_label_entropy_close_to_ten():
    seen: list[torch.Tensor] = []
    score = generation_score(
        label_coded_generator(seen),
        LabelReader(),
        n_samples=5000,
        batch_size=512,
        generator=torch.Generator().manual_seed(1),
    )
    labels = torch.cat(seen)
    assert labels.numel() == 5000
    # With one-hot p(y|x), KL(p(y|x) || p(y)) = -log p(y_x) and the score is exp(H(empirical label frequencies)).
    freq = torch.bincount(labels, minlength=10).double() / labels.numel()
    expected = math.exp(float(-(freq * freq.log()).sum()))
    assert score == pytest.approx(expected, rel=1e-9)
    assert 9.95 < score <= 10.0


def test_identical_predictions_score_one():
    score = generation_score(
        label_coded_generator(),
        ConstantClassifier(),
        n_samples=700,
        batch_size=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert score == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_kl_examples():
    # p1 = (1/2, 1/2), p2 = (1, 0): p(y) = (3/4, 1/4); KL1 = 1/2 log(4/3), KL2 = log(4/3); score = (4/3)^(3/4).
    assert score_from_probs([[0.5, 0.5], [1.0, 0.0]]) == pytest.approx((4 / 3) ** 0.75, rel=1e-12)
    # Two confident, different predictions: each KL = log 2.
    assert score_from_probs([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(2.0, rel=1e-12)
    assert score_from_probs([[0.2, 0.8]] * 5) == pytest.approx(1.0, abs=1e-12)


def test_score_matches_the_reference_formula_on_random_predictions():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(10, 0.3), size=400).astype(np.float32)
    p_y = p.mean(axis=0)
    reference = float(np.exp(np.mean([entropy(row, p_y) for row in p])))  # the reference's computation
    assert score_from_probs(p) == pytest.approx(reference, rel=1e-5)


def test_generation_score_uses_the_classifier_softmax_and_exact_sample_count():
    seen: list[torch.Tensor] = []
    gen = label_coded_generator(seen)
    clf = seeded_init(ScoringClassifier, 0)
    clf.train()
    a = generation_score(gen, clf, n_samples=333, batch_size=100, generator=torch.Generator().manual_seed(5))
    assert sum(x.numel() for x in seen) == 333 and [x.numel() for x in seen] == [100, 100, 100, 33]
    assert clf.training  # mode restored
    # Same samples, scored by hand from the classifier's probabilities.
    x, _ = sample_generator(gen, 333, batch_size=100, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        probs = torch.softmax(clf.eval()(x).double(), dim=1)
    assert a == pytest.approx(score_from_probs(probs.numpy()), rel=1e-9)
    b = generation_score(gen, clf, n_samples=333, batch_size=7, generator=torch.Generator().manual_seed(5))
    assert a == pytest.approx(b, rel=1e-6)  # batching does not change the samples


# ----------------------------------------------------------------------------------------------------------------
# Classification metrics


def test_metrics_against_a_hand_computed_confusion_matrix_with_a_class_never_predicted():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 0, 0, 1, 0]
    cm, labels = confusion_matrix(y_true, y_pred)
    assert labels.tolist() == [0, 1, 2]
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [2, 1, 0]]
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(100 * 3 / 8)
    assert m["precision"] == pytest.approx(100 * (2 / 5 + 1 / 3 + 0) / 3)  # class 2: 0/0 -> 0
    assert m["recall"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)
    assert m["f1"] == pytest.approx(100 * (0.5 + 0.4 + 0) / 3)
    # FPR per class: FP / (FP + TN) = 3/5, 2/6, 0/5.
    assert m["fpr"] == pytest.approx(100 * (3 / 5 + 2 / 6 + 0) / 3)


def test_metrics_with_a_class_only_predicted_follow_sklearn_label_union():
    m = classification_metrics(np.array([0, 1]), np.array([0, 3]))
    # labels {0, 1, 3}: precision (1, 0/0 -> 0, 0/1), recall (1, 0/1, 0/0 -> 0), FPR (0/1, 0/1, 1/2)
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["precision"] == pytest.approx(100 / 3)
    assert m["recall"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 / 3)
    assert m["fpr"] == pytest.approx(100 * 0.5 / 3)
    # Fixed labels make an absent class count (as sklearn's labels=...).
    assert classification_metrics([0, 1], [0, 1], labels=range(4))["recall"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        confusion_matrix([0, 5], [0, 1], labels=[0, 1])


@pytest.mark.slow
def test_utility_metrics_learn_a_separable_generated_domain():
    x_test, y_test = band_set(500, seed=99)
    gen = band_generator()
    m = utility_metrics(gen, x_test, y_test, n_samples=640, epochs=2, seed=0)
    assert set(m) >= {"accuracy", "precision", "recall", "f1", "fpr", "generate_s", "train_s"}
    assert m["accuracy"] > 95 and m["f1"] > 95 and m["fpr"] < 1
    m2 = utility_metrics(gen, (x_test, y_test), None, n_samples=640, epochs=2, seed=0)
    assert m2["accuracy"] == m["accuracy"] and m2["f1"] == m["f1"]  # seeded


def test_utility_of_a_label_ignoring_generator_is_chance():
    x_test, y_test = band_set(500, seed=98)
    gen = band_generator()

    def broken(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gen(torch.zeros_like(labels), z)  # every image shows class 0, whatever the label

    m = utility_metrics(broken, x_test, y_test, n_samples=320, epochs=1, seed=0)
    assert m["accuracy"] < 30


def test_evaluate_generators_per_domain():
    settings = EvalSettings(score_samples=300, utility_samples=320, utility_epochs=1, seed=4)
    res = evaluate_generators(
        {"MNIST": label_coded_generator(), "FashionMNIST": band_generator()},
        {"MNIST": LabelReader(), "FashionMNIST": ConstantClassifier()},
        {"MNIST": band_set(100, 1), "FashionMNIST": band_set(200, 2)},
        settings,
    )
    assert set(res) == {"MNIST", "FashionMNIST"}
    assert res["MNIST"]["generation_score"] > 9.5
    assert res["FashionMNIST"]["generation_score"] == pytest.approx(1.0, abs=1e-9)
    assert res["FashionMNIST"]["utility"]["accuracy"] > 80
    again = evaluate_generators(
        {"MNIST": label_coded_generator()}, {"MNIST": LabelReader()}, None, settings.replace(utility=False)
    )
    assert again["MNIST"]["generation_score"] == res["MNIST"]["generation_score"]  # independent of other domains
    assert "utility" not in again["MNIST"]
    with pytest.raises(ConfigError):
        evaluate_generators({"KMNIST": band_generator()}, {}, None, settings)


# ----------------------------------------------------------------------------------------------------------------
# PNG, plots, JSON, metrics log


def read_png(data: bytes) -> tuple[int, int, np.ndarray]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload)
        chunks.append((kind, payload))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()
    return w, h, rows[:, 1:]


def test_sample_grid_png_is_valid_and_holds_the_pixels(tmp_path):
    imgs = torch.stack([torch.full((1, 28, 28), v) for v in (-1.0, 1.0, 0.0)])
    imgs[1, 0, 5, 7] = -1.0
    path = save_sample_grid(imgs, tmp_path / "grid.png", nrow=2)
    w, h, px = read_png(path.read_bytes())
    assert (w, h) == (2 * 30 + 2, 2 * 30 + 2)
    assert (px[2:30, 2:30] == 0).all()  # -1 -> 0
    tile1 = px[2:30, 32:60]
    assert tile1[5, 7] == 0 and (tile1 == 255).sum() == 28 * 28 - 1  # 1 -> 255
    assert (px[32:60, 2:30] == 128).all()  # 0 -> floor(127.5 + 0.5)
    assert (px[32:60, 32:60] == 0).all() and (px[0:2, :] == 0).all()  # empty slot and padding
    assert not list(tmp_path.glob(".*tmp"))


def test_class_grid_has_one_row_per_class(tmp_path):
    path = save_class_grid(label_coded_generator(), tmp_path / "c.png", per_class=3)
    w, h, px = read_png(path.read_bytes())
    assert (w, h) == (3 * 30 + 2, 10 * 30 + 2)
    for r in range(10):
        expected = math.floor((r / 9.0) * 255 + 0.5)
        assert abs(int(px[2 + 30 * r + 10, 2 + 30 * 2 + 10]) - expected) <= 1


@pytest.mark.slow
def test_plot_scores_writes_a_png(tmp_path):
    path = plot_scores(
        {"MNIST": [(1, 2.0), (2, 3.5), (3, float("nan"))], "FashionMNIST": [(1, 1.5)]}, tmp_path / "scores.png"
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_write_json_atomic(tmp_path):
    p = write_json_atomic(
        tmp_path / "summary.json", {"a": np.float32(1.5), "t": torch.tensor([1, 2]), "bad": float("inf"), "p": tmp_path}
    )
    assert json.loads(p.read_text()) == {"a": 1.5, "t": [1, 2], "bad": None, "p": str(tmp_path)}
    assert [x.name for x in tmp_path.iterdir()] == ["summary.json"]


def test_metrics_log_jsonl_and_csv(tmp_path):
    log = MetricsLog(tmp_path)
    log.append({"round": 1, "wall_s": 1.25, "clusters": [[0, 1], [2]], "generation_score": {"MNIST": 2.5}})
    log.append({"round": 2, "wall_s": 1.5, "clusters": [[0, 1], [2]], "generation_score": {"MNIST": 3.0}})
    log.append(
        {
            "round": 3,
            "wall_s": 1.0,
            "generation_score": {"MNIST": 3.5, "FashionMNIST": 2.0},
            "loss": {"d": torch.tensor(0.5)},
        }
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    assert json.loads(lines[2])["loss"] == {"d": 0.5}
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["generation_score.MNIST"] == "2.5" and rows[0]["generation_score.FashionMNIST"] == ""
    assert rows[2]["generation_score.FashionMNIST"] == "2.0" and rows[2]["loss.d"] == "0.5"
    assert json.loads(rows[1]["clusters"]) == [[0, 1], [2]]

    # A crash mid-write leaves a torn line: reopening cuts it off and appending continues cleanly.
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"round": 4, "wall')
    assert [r["round"] for r in MetricsLog.read(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    log2 = MetricsLog(tmp_path)
    assert [r["round"] for r in log2.records] == [1, 2, 3]
    log2.append({"round": 4, "wall_s": 2.0})
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert log2.drop_after(2) == 2
    assert [r["round"] for r in MetricsLog.read(tmp_path / "metrics.jsonl")] == [1, 2]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1", "2"]


# ----------------------------------------------------------------------------------------------------------------
# Classifier files


def _record(dataset: str = "MNIST") -> tuple[nn.Module, dict]:
    model = fast_layout(seeded_init(ScoringClassifier, 7), "cpu")  # the layout training leaves behind
    return model, classifier_record(model, dataset, test_accuracy=97.5, data_digest="sha256:abc", epochs=1)


def test_classifier_file_round_trip(tmp_path):
    model, rec = _record()
    path = save_classifier(rec, tmp_path / "classifiers" / "MNIST.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "hfgan-classifier" and raw["version"] == 1 and raw["dataset"] == "MNIST"
    assert raw["arch"] == "scoring-cnn-v1" and raw["test_accuracy"] == 97.5 and raw["data_digest"] == "sha256:abc"
    assert all(v.is_contiguous() for v in raw["state_dict"].values())
    loaded = load_classifier(path, "MNIST")
    assert not loaded.training
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        # Same weights; the loaded model may use a faster memory layout, hence float-rounding tolerance.
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def _assert_one_line_refusal(path: Path, dataset: str = "MNIST", match: str = "") -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_classifier(path, dataset)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


class _Foreign:
    pass


def test_classifier_files_refused(tmp_path):
    _, rec = _record("MNIST")
    good = save_classifier(rec, tmp_path / "MNIST.pt")
    _assert_one_line_refusal(good, "FashionMNIST", match="fitted on 'MNIST'")
    _assert_one_line_refusal(tmp_path / "missing.pt", match="not found")
    torch.save({"format": "something-else", "state_dict": {}}, tmp_path / "other.pt")
    _assert_one_line_refusal(tmp_path / "other.pt", match="not an hfgan classifier")
    torch.save(_Foreign(), tmp_path / "pickle.pt")  # arbitrary pickled object: weights_only refuses it
    _assert_one_line_refusal(tmp_path / "pickle.pt", match="not a loadable")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    _assert_one_line_refusal(tmp_path / "garbage.pt", match="not a loadable")
    save_classifier({**rec, "version": 2}, tmp_path / "v2.pt")
    _assert_one_line_refusal(tmp_path / "v2.pt", match="version")
    broken = dict(rec, state_dict={k: v for k, v in rec["state_dict"].items() if k != "fc2.bias"})
    save_classifier(broken, tmp_path / "broken.pt")
    _assert_one_line_refusal(tmp_path / "broken.pt", match="do not fit")
    assert read_classifier_record(good, None)["dataset"] == "MNIST"


# ----------------------------------------------------------------------------------------------------------------
# Real data: fitting a scoring classifier, and the CLI


@pytest.fixture(scope="module")
def mnist_subset():
    if not (SHARED / "MNIST" / "raw").is_dir():
        pytest.fail(f"{SHARED}/MNIST is missing (the shared verified datasets are required)")
    train, test = eval_cli.load_domain_splits("MNIST", SHARED)
    x_train, y_train = as_tensors(train)
    keep = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:5000]
    return (x_train[keep], y_train[keep]), test


@pytest.mark.slow
def test_fit_scoring_classifier_on_5k_mnist_one_epoch(mnist_subset):
    train, test = mnist_subset
    model, acc = fit_classifier(train, test, epochs=1, seed=0)
    assert acc > 90.0
    assert isinstance(model, ScoringClassifier) and not model.training


@pytest.mark.slow
def test_cli_fit_classifiers(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="hfgan")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "eval",
            "fit-classifiers",
            "--data-dir",
            str(SHARED),
            "--datasets",
            "MNIST",
            "--epochs",
            "1",
            "--limit",
            "1500",
            "--out",
            str(tmp_path / "cls"),
            "--quiet",
        ]
    )
    assert eval_cli.run(args) == 0
    assert "MNIST" in capsys.readouterr().out
    rec = read_classifier_record(tmp_path / "cls" / "MNIST.pt", "MNIST")
    assert rec["train_samples"] == 1500 and rec["epochs"] == 1 and rec["data_digest"].startswith("sha256:")
    assert rec["test_accuracy"] > 70  # 24 Adam steps; chance is 10%
    load_classifier(tmp_path / "cls" / "MNIST.pt", "MNIST")

    bad = parser.parse_args(["eval", "fit-classifiers", "--datasets", "CIFAR", "--data-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown dataset"):
        eval_cli.run(bad)
    missing = parser.parse_args(["eval", "fit-classifiers", "--datasets", "MNIST", "--data-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="not found"):
        eval_cli.run(missing)
    gpu = parser.parse_args(["eval", "fit-classifiers", "--device", "tpu", "--data-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown torch device"):
        eval_cli.run(gpu)
    with pytest.raises(ConfigError, match="subcommand"):
        eval_cli.run(parser.parse_args(["eval"]))
