"""The classifier Fréchet distance: the formula against closed forms, its features against the classifier's own
forward pass, and its place in `evaluate_generators`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfgan_core.data.synthetic import synthetic_colour_split, synthetic_split
from hfgan_core.evaluation import EvalSettings, ScoringClassifier, evaluate_generators, generation_score
from hfgan_core.evaluation.frechet import FeatureStats, feature_stats, frechet_distance, real_feature_stats
from hfgan_core.evaluation.training import seeded_init


def test_identical_fits_are_at_distance_zero():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    s = feature_stats(x)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-6)


def test_closed_form_for_diagonal_covariances():
    a = FeatureStats(np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 9.0]), 100)
    b = FeatureStats(np.array([1.0, 1.0, 0.0]), np.diag([4.0, 1.0, 1.0]), 100)
    # |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 for commuting (diagonal) covariances.
    expected = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_singular_covariances_still_give_a_finite_distance():
    a = FeatureStats(np.zeros(4), np.diag([1.0, 0.0, 0.0, 2.0]), 10)
    b = FeatureStats(np.ones(4), np.diag([0.0, 3.0, 0.0, 2.0]), 10)
    d = frechet_distance(a, b)
    assert np.isfinite(d) and d > 4.0  # at least the mean term


def test_feature_stats_needs_two_vectors():
    with pytest.raises(ValueError, match="at least two"):
        feature_stats(torch.zeros(1, 4))


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_features_give_the_forward_pass_and_separate_data_from_noise(channels, size):
    clf = seeded_init(lambda: ScoringClassifier(10, channels, size), 0).eval()
    data = synthetic_split(30) if channels == 1 else synthetic_colour_split(30)
    real = data.images
    with torch.no_grad():
        assert torch.equal(clf.fc2(clf.features(real[:16])), clf(real[:16]))
    ref = real_feature_stats(clf, real[:150])
    same_kind = real_feature_stats(clf, real[150:])
    noise = real_feature_stats(
        clf, torch.rand(150, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    )
    assert frechet_distance(ref, same_kind) < frechet_distance(ref, noise)


def test_score_with_features_is_the_score_without():
    clf = seeded_init(lambda: ScoringClassifier(), 0).eval()
    data = synthetic_split(20)

    def generate(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return data.images[torch.arange(len(labels)) % len(data)] + 0.01 * z[:, :1, None, None]

    feats: list[torch.Tensor] = []
    kwargs = dict(n_samples=300, batch_size=128)
    a = generation_score(generate, clf, generator=torch.Generator().manual_seed(5), **kwargs)
    b = generation_score(generate, clf, generator=torch.Generator().manual_seed(5), features=feats, **kwargs)
    assert a == b and torch.cat(feats).shape == (300, 128)


def test_evaluate_generators_reports_the_distance_when_given_the_test_set():
    clf = seeded_init(lambda: ScoringClassifier(), 0).eval()
    test = synthetic_split(20, train=False)

    def real_like(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return test.images[
            torch.randperm(len(test), generator=torch.Generator().manual_seed(int(z[0, 0] * 1e6) % 1000))[: len(labels)]
        ]

    def noise(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z[:, :1, None, None].expand(-1, 1, 28, 28) * torch.ones(1, 1, 28, 28))

    settings = EvalSettings(score_samples=150, utility=False)
    cache: dict = {}
    res = evaluate_generators(
        {"a": real_like, "b": noise}, {"a": clf, "b": clf}, {"a": test, "b": test}, settings, real_stats=cache
    )
    assert set(cache) == {"a", "b"}
    assert res["a"]["classifier_frechet_distance"] < res["b"]["classifier_frechet_distance"]
    without = evaluate_generators({"a": real_like}, {"a": clf}, None, settings)
    assert "classifier_frechet_distance" not in without["a"]
    assert without["a"]["generation_score"] == res["a"]["generation_score"]
