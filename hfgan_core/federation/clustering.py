"""End-of-round clustering of clients: KMeans on the activation summaries, then intra-cluster and global KLD scores.

This is the pure computation behind the clustering service (docs/ARCHITECTURE.md section 3): it takes one summary per
client (`activation_summary` of D's E2 output on the client's real batch) and returns the assignment and the scores the
weights need. No transport, no state.

Decisions:
- Features are the summaries flattened (6272-d here), in float64, rows in increasing client id; KMeans labels are
  canonical, so the cluster of the lowest client id is 0, and so on (stable across rounds and runs).
- `k` larger than the number of clients is capped at N; it is also capped at the number of distinct summaries
  (identical summaries cannot be told apart). The effective k is `ClusterOutcome.k`; `requested_k` keeps what was
  asked.
- `k = "auto"` uses `choose_k` (silhouette over k = 2 .. min(k_max, N - 1); 1 when there is no clear structure).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .kld import kld_by_group
from .kmeans import DEFAULT_MIN_SILHOUETTE, choose_k, kmeans, n_distinct

DEFAULT_K_MAX = 10


@dataclass(frozen=True)
class ClusterOutcome:
    """assignment: client -> cluster id (canonical); kld_intra / kld_global: client -> score; k: clusters used;
    requested_k: the k asked for (an int or "auto"); features: [N, d] float64 rows in increasing client id (kept
    for logging and tests; None when not requested)."""

    assignment: dict[int, int]
    kld_intra: dict[int, float]
    kld_global: dict[int, float]
    k: int
    requested_k: int | str
    features: np.ndarray | None = field(default=None, compare=False, repr=False)

    def members(self) -> dict[int, list[int]]:
        """cluster id -> its client ids (increasing)."""
        out: dict[int, list[int]] = {}
        for client, cluster in sorted(self.assignment.items()):
            out.setdefault(cluster, []).append(client)
        return dict(sorted(out.items()))


def cluster_clients(
    summaries: Mapping[int, torch.Tensor],
    k: int | Literal["auto"],
    seed: int,
    *,
    k_max: int = DEFAULT_K_MAX,
    min_silhouette: float = DEFAULT_MIN_SILHOUETTE,
    n_init: int = 10,
    keep_features: bool = True,
) -> ClusterOutcome:
    """Cluster clients by their summaries ({client id: [C, H, W]}) and score them (see the module docstring)."""
    if not summaries:
        raise ValueError("cluster_clients needs at least one client summary")
    ids = sorted(int(c) for c in summaries)
    shapes = {tuple(summaries[c].shape) for c in ids}
    if len(shapes) != 1:
        raise ValueError(f"client summaries must all have the same shape, got {sorted(shapes)}")
    features = np.stack([summaries[c].detach().to(torch.float32).cpu().reshape(-1).numpy() for c in ids])
    features = features.astype(np.float64)
    if not np.all(np.isfinite(features)):
        bad = [c for c, row in zip(ids, features, strict=True) if not np.all(np.isfinite(row))]
        raise ValueError(f"summaries of clients {bad} contain NaN or infinite values")
    n = len(ids)
    if k == "auto":
        k_used = choose_k(features, k_max, seed, min_silhouette=min_silhouette, n_init=n_init)
    elif isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise ValueError(f"k must be a positive integer or 'auto', got {k!r}")
    else:
        k_used = min(int(k), n, n_distinct(features))
    result = kmeans(features, k_used, seed, n_init=n_init)
    assignment = {c: int(label) for c, label in zip(ids, result.labels.tolist(), strict=True)}
    by_id = {c: summaries[c] for c in ids}
    return ClusterOutcome(
        assignment=assignment,
        kld_intra=kld_by_group(by_id, assignment),
        kld_global=kld_by_group(by_id),
        k=result.k,
        requested_k=k if k == "auto" else int(k),
        features=features if keep_features else None,
    )
