"""Evaluating the generators of a run: per-domain generation score, classifier Fréchet distance and utility
metrics, and sample grids.

The runtime (per round) and `hfgan eval --run-dir` (after a run) build one `generate(labels, z)` callable per domain
from the layers of that domain's cluster, put it in eval mode, and call `evaluate_generators`. Randomness is
derived from `EvalSettings.seed` and the domain's name only, so a domain's samples are the same in every round
(common random numbers make round-to-round changes less noisy) and do not depend on which other domains exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, RunConfig, TrainConfig
from .frechet import NAME as FD_NAME
from .frechet import FeatureStats, feature_stats, frechet_distance, has_features, real_feature_stats
from .metrics import DEFAULT_GEN_BATCH, GenerateFn, generation_score, sample_generator, utility_metrics
from .outputs import save_sample_grid
from .training import Stopwatch, as_tensors


@dataclass(frozen=True)
class EvalSettings:
    """Sizes and seeds of an evaluation (docs/ARCHITECTURE.md section 3 defaults)."""

    score_samples: int = 5000
    utility_samples: int = 30000
    utility_epochs: int = 15
    utility: bool = True
    seed: int = 0
    device: str = "cpu"
    gen_batch_size: int = DEFAULT_GEN_BATCH
    num_classes: int = 10
    z_dim: int = 100

    @staticmethod
    def from_config(cfg: RunConfig | TrainConfig, **overrides: Any) -> EvalSettings:
        """Settings from a run's config (train.score_samples, utility_samples, utility_epochs, seed; runtime.device;
        model.num_classes, z_dim); keyword arguments override."""
        train = cfg.train if isinstance(cfg, RunConfig) else cfg
        values: dict[str, Any] = {
            "score_samples": train.score_samples,
            "utility_samples": train.utility_samples,
            "utility_epochs": train.utility_epochs,
            "seed": train.seed,
        }
        if isinstance(cfg, RunConfig):
            values.update(device=cfg.runtime.device, num_classes=cfg.model.num_classes, z_dim=cfg.model.z_dim)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return EvalSettings(**values)

    def replace(self, **changes: Any) -> EvalSettings:
        return dataclasses.replace(self, **changes)


def derive_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed from a base seed and names (stable across processes, unlike hash())."""
    blob = ":".join([str(int(seed)), *parts]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def evaluate_generators(
    generators: Mapping[str, GenerateFn],
    classifiers: Mapping[str, nn.Module],
    test_sets: Mapping[str, Any] | None,
    cfg: EvalSettings | RunConfig | TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
    real_stats: dict[str, FeatureStats] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per domain: {"generation_score": float, "score_s": seconds, "classifier_frechet_distance": float (when the
    domain's test set is given), "utility": {accuracy, precision, recall, f1, fpr, ...} (when cfg.utility)}.

    `real_stats` caches each domain's real-test-set feature statistics between calls (filled on first use).

    `classifiers[domain]` is the domain's scoring classifier (`load_classifier`; moved to `settings.device`),
    `test_sets[domain]` its real test split (ImageSet-like or (images, labels); only needed for utility). Each
    `generate` receives labels and z on `settings.device`.
    """
    settings = cfg if isinstance(cfg, EvalSettings) else EvalSettings.from_config(cfg)
    results: dict[str, dict[str, Any]] = {}
    for domain, generate in generators.items():
        if domain not in classifiers:
            raise ConfigError(f"no scoring classifier for domain {domain!r}")
        classifier = classifiers[domain].to(settings.device)
        want_fd = test_sets is not None and domain in test_sets and has_features(classifier)
        feats: list[torch.Tensor] | None = [] if want_fd else None
        with Stopwatch() as sw:
            score = domain_score(generate, domain, classifier, settings, features=feats)
        entry: dict[str, Any] = {"generation_score": score, "score_s": sw.seconds}
        if log is not None:
            log(f"{domain}: generation score {score:.3f} ({settings.score_samples} samples, {sw.seconds:.1f} s)")
        if feats is not None and test_sets is not None:
            cache = real_stats if real_stats is not None else {}
            if domain not in cache:
                cache[domain] = real_feature_stats(classifier, as_tensors(test_sets[domain], "test set")[0])
            fd = frechet_distance(cache[domain], feature_stats(torch.cat(feats)))
            entry["classifier_frechet_distance"] = fd
            if log is not None:
                log(f"{domain}: {FD_NAME} {fd:.3f}")
        if settings.utility:
            if test_sets is None or domain not in test_sets:
                raise ConfigError(f"no test set for domain {domain!r} (needed for the utility metrics)")
            util = domain_utility(generate, domain, test_sets[domain], settings)
            entry["utility"] = util
            if log is not None:
                log(
                    f"{domain}: utility accuracy {util['accuracy']:.2f}% F1 {util['f1']:.2f}% FPR {util['fpr']:.2f}% "
                    f"({util['generate_s'] + util['train_s']:.1f} s)"
                )
        results[domain] = entry
    return results


def domain_score(
    generate: GenerateFn,
    domain: str,
    classifier: nn.Module,
    settings: EvalSettings,
    features: list[torch.Tensor] | None = None,
) -> float:
    """The generation score of one domain, from the labels and noise its seed gives: every method and every round
    is scored on the same draws."""
    return generation_score(
        generate,
        classifier,
        settings.score_samples,
        settings.gen_batch_size,
        generator=torch.Generator().manual_seed(derive_seed(settings.seed, domain, "score")),
        num_classes=settings.num_classes,
        z_dim=settings.z_dim,
        device=settings.device,
        features=features,
    )


def domain_utility(generate: GenerateFn, domain: str, test_set: Any, settings: EvalSettings) -> dict[str, Any]:
    """The utility metrics of one domain (a classifier trained on generated samples, tested on real ones)."""
    return utility_metrics(
        generate,
        test_set,
        None,
        settings.utility_samples,
        settings.utility_epochs,
        seed=derive_seed(settings.seed, domain, "utility"),
        device=settings.device,
        gen_batch_size=settings.gen_batch_size,
        num_classes=settings.num_classes,
        z_dim=settings.z_dim,
    )


@torch.no_grad()
def class_grid_samples(
    generate: GenerateFn,
    *,
    per_class: int = 8,
    num_classes: int = 10,
    z_dim: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """`per_class` samples of each class, class-major: with nrow=per_class, row r of the grid shows class r."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    out = sample_generator(
        generate,
        labels.numel(),
        generator=torch.Generator().manual_seed(seed),
        batch_size=labels.numel(),
        num_classes=num_classes,
        z_dim=z_dim,
        device=device,
        labels=labels,
    )
    assert out is not None
    return out[0]


def save_class_grid(
    generate: GenerateFn,
    path: str | os.PathLike[str],
    *,
    per_class: int = 8,
    num_classes: int = 10,
    z_dim: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Path:
    """A PNG with one row per class (fixed seed: the same z every round, so rounds can be compared)."""
    images = class_grid_samples(
        generate, per_class=per_class, num_classes=num_classes, z_dim=z_dim, seed=seed, device=device
    )
    return save_sample_grid(images, path, nrow=per_class)
