"""The classifier Fréchet distance: how far generated images are from real ones in a domain's scoring-classifier
feature space.

FID's formula, d^2 = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), over Gaussian fits of the 128 penultimate
activations of the domain's own scoring classifier (not of Inception, whose weights cannot be obtained here; so
the numbers are not comparable with published FIDs, only with each other for the same classifier). Real statistics
come from the domain's whole real test split; generated ones from the same samples the generation score uses.
Lower is better; 0 means the two Gaussian fits coincide. With a few thousand samples the estimate is biased
upwards (as FID's is), so compare values computed with the same sample count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NAME = "classifier Fréchet distance"


@dataclass(frozen=True)
class FeatureStats:
    """Mean [F] and covariance [F, F] (float64) of feature vectors, and how many vectors they came from."""

    mean: np.ndarray
    cov: np.ndarray
    n: int


def feature_stats(features: torch.Tensor) -> FeatureStats:
    """Mean and (unbiased) covariance of [N, F] features; N must be at least 2."""
    x = features.detach().to("cpu", torch.float64).numpy()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least two feature vectors [N, F], got {list(x.shape)}")
    return FeatureStats(x.mean(axis=0), np.cov(x, rowvar=False), int(x.shape[0]))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussian fits a and b.

    Tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2) (the same eigenvalues as S_a S_b): stable for the singular covariances that dead ReLU
    features give, where a general matrix square root is not.
    """
    diff = a.mean - b.mean
    root = _psd_sqrt(a.cov)
    inner = root @ b.cov @ root
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    value = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * tr_covmean)
    return max(value, 0.0)  # rounding can leave a tiny negative value for identical fits


def has_features(classifier: nn.Module) -> bool:
    return callable(getattr(classifier, "features", None)) and hasattr(classifier, "fc2")


@torch.no_grad()
def real_feature_stats(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> FeatureStats:
    """Feature statistics of real images [N, C, H, W] in [-1, 1] under a scoring classifier."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        parts = [
            classifier.features(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)
        ]
    finally:
        classifier.train(was_training)
    return feature_stats(torch.cat(parts))


__all__ = ["NAME", "FeatureStats", "feature_stats", "frechet_distance", "has_features", "real_feature_stats"]
