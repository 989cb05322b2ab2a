"""KMeans (k-means++ initialisation, Lloyd iterations, restarts) and a silhouette-based choice of k, in numpy.

Used by the clustering service on the clients' activation summaries (a few to a few hundred points of 6272
dimensions). The project avoids scikit-learn; this module reproduces the parts of its KMeans that matter here
(greedy k-means++, `n_init` restarts keeping the lowest inertia, relative tolerance) and adds what a federated
system needs on top:

- **Determinism.** Everything draws from `np.random.default_rng(seed)`; distances are computed one centre at a time
  with numpy's (deterministic) reductions instead of a BLAS matrix product, and ties go to the lowest index. The
  same features and seed give the same labels, bit for bit, on every run.
- **Canonical labels.** Cluster ids are renumbered so that they appear in order of the lowest point index in each
  cluster: point 0 is always in cluster 0, the first point not in cluster 0 is in cluster 1, and so on. KMeans'
  own numbering is arbitrary (it depends on which restart won); the canonical one keeps cluster ids stable across
  rounds and runs whenever the partition itself is stable.
- **Degenerate inputs.** k == 1 gives the mean; k == N gives one point per cluster; duplicate points are fine as
  long as k does not exceed the number of *distinct* points, which raises a ValueError (k-means++ cannot place
  more distinct centres than there are distinct points; callers such as `cluster_clients` cap k first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Average silhouette below which `choose_k` reports "no cluster structure" (k = 1). Kaufman & Rousseeuw
# (Finding Groups in Data, 1990) read an average silhouette <= 0.25 as "no substantial structure has been found";
# we use that bound. Measured on E2 summaries of this model (D's E1/E2 run on the union batch, as the server does):
# 10 IID MNIST clients reach a best silhouette of 0.07-0.17 (batch noise only; lower once D has trained a little),
# while MNIST vs FashionMNIST clients reach 0.20-0.40 with an untrained D (so `auto` may answer 1 before D has
# learnt anything: that is why KLD weighting starts at round 3) and 0.48-0.60 after 200 centralised steps. Isotropic
# noise in 6272 dimensions stays below 0.01. Strong label skew inside one domain (7 of 10 labels excluded) can reach
# ~0.28: that is real distribution structure, and the paper's clustering would act on it too.
DEFAULT_MIN_SILHOUETTE = 0.25


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of `kmeans`: canonical labels [N] (int64), centres [k, d] (float64, row j = cluster j), the
    inertia (sum of squared distances to the assigned centres), and the Lloyd iterations of the kept restart."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])


def _as_features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty [N, d] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values")
    return x


def n_distinct(features: np.ndarray) -> int:
    """Number of distinct rows (points) of a feature matrix."""
    return int(np.unique(_as_features(features), axis=0).shape[0])


def _sq_dist_to(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared distances of every row of x to one point c (deterministic reduction, no BLAS)."""
    diff = x - c
    return np.einsum("ij,ij->i", diff, diff, optimize=False)


def _sq_dists(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], centers.shape[0]), dtype=np.float64)
    for j in range(centers.shape[0]):
        out[:, j] = _sq_dist_to(x, centers[j])
    return out


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii; the greedy variant scikit-learn uses): each new centre is the best
    of 2 + log(k) candidates drawn with probability proportional to the squared distance to the nearest centre."""
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]), dtype=np.float64)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = _sq_dist_to(x, centers[0])
    potential = float(closest.sum())
    for c in range(1, k):
        if potential <= 0.0:  # all points coincide with chosen centres: cannot happen when k <= distinct points
            raise ValueError(f"k={k} exceeds the number of distinct points")
        cumulative = np.cumsum(closest)
        draws = rng.random(n_trials) * cumulative[-1]
        # side="right" never lands on a point at distance 0 (an existing centre): cumulative[i] > draw >= cum[i-1].
        candidates = np.minimum(np.searchsorted(cumulative, draws, side="right"), n - 1)
        best, best_closest, best_potential = -1, closest, math.inf
        for cand in candidates:
            new_closest = np.minimum(closest, _sq_dist_to(x, x[cand]))
            pot = float(new_closest.sum())
            if pot < best_potential:
                best, best_closest, best_potential = int(cand), new_closest, pot
        centers[c] = x[best]
        closest, potential = best_closest, best_potential
    return centers


def _update_centers(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """M-step. An empty cluster is moved onto the point farthest from its own centre (among points whose cluster
    keeps at least one other member), the usual remedy; deterministic (ties -> lowest index)."""
    k = centers.shape[0]
    counts = np.bincount(labels, minlength=k)
    new = np.empty_like(centers)
    for j in range(k):
        if counts[j] > 0:
            new[j] = x[labels == j].mean(axis=0)
    empty = [j for j in range(k) if counts[j] == 0]
    if empty:
        far = d2[np.arange(x.shape[0]), labels].copy()
        labels = labels.copy()
        for j in empty:
            movable = counts[labels] > 1
            cand = np.where(movable, far, -1.0)
            i = int(np.argmax(cand))
            new[j] = x[i]
            counts[labels[i]] -= 1
            labels[i] = j
            counts[j] = 1
            far[i] = -1.0
    return new


def _lloyd(x: np.ndarray, centers: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray, float, int]:
    d2 = _sq_dists(x, centers)
    labels = np.argmin(d2, axis=1)
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        new_centers = _update_centers(x, labels, centers, d2)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        d2 = _sq_dists(x, centers)
        new_labels = np.argmin(d2, axis=1)
        strict = np.array_equal(new_labels, labels)
        labels = new_labels
        if strict or (shift <= tol and np.bincount(labels, minlength=centers.shape[0]).min() > 0):
            break
    inertia = float(d2[np.arange(x.shape[0]), labels].sum())
    return labels, centers, inertia, n_iter


def canonical_labels(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Renumber labels in order of first appearance (cluster 0 holds point 0). Returns the new labels and, for each
    new id, the old id it came from."""
    labels = np.asarray(labels)
    order: list[int] = []
    for lab in labels.tolist():
        if lab not in order:
            order.append(int(lab))
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping[int(v)] for v in labels.tolist()], dtype=np.int64), order


def kmeans(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> KMeansResult:
    """Cluster the rows of `features` [N, d] into k clusters.

    `n_init` restarts (k-means++ then Lloyd) draw from one `np.random.default_rng(seed)`; the restart with the lowest
    inertia is kept (ties: the earliest). Lloyd stops when the labels no longer change, when the squared centre
    shift falls to `tol` times the mean per-feature variance (scikit-learn's relative tolerance), or after
    `max_iter` iterations. Labels are canonical (see the module docstring). Raises ValueError when k < 1, k > N or
    k exceeds the number of distinct points.
    """
    x = _as_features(features)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n:
        raise ValueError(f"k must be an integer in [1, {n}] for {n} points, got {k!r}")
    k = int(k)
    if n_init < 1 or max_iter < 1 or tol < 0:
        raise ValueError("n_init and max_iter must be >= 1 and tol >= 0")
    distinct = n_distinct(x)
    if k > distinct:
        raise ValueError(f"k={k} exceeds the number of distinct points ({distinct} of {n})")
    tol_abs = float(tol * np.var(x, axis=0).mean())
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float, int] | None = None
    for _ in range(n_init):
        init = _kmeans_plus_plus(x, k, rng)
        run = _lloyd(x, init, max_iter, tol_abs)
        if best is None or run[2] < best[2]:
            best = run
    assert best is not None
    labels, centers, inertia, n_iter = best
    canon, order = canonical_labels(labels)
    # A cluster left empty after max_iter iterations (practically never) would be dropped here; keep centres of the
    # clusters that hold points, in canonical order.
    return KMeansResult(labels=canon, centers=centers[order].copy(), inertia=inertia, n_iter=n_iter)


def pairwise_distances(features: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix [N, N] (row by row, deterministic)."""
    x = _as_features(features)
    out = np.empty((x.shape[0], x.shape[0]), dtype=np.float64)
    for i in range(x.shape[0]):
        out[i] = np.sqrt(_sq_dist_to(x, x[i]))
    return out


def silhouette_score(features: np.ndarray, labels: np.ndarray, distances: np.ndarray | None = None) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) with Euclidean distances.

    s(i) = (b - a) / max(a, b), a = mean distance to the other members of i's cluster, b = the lowest mean distance
    to the members of another cluster; s(i) = 0 for a point alone in its cluster (and when a = b = 0), as in
    scikit-learn. Needs 2 <= number of clusters <= N - 1.
    """
    x = _as_features(features)
    labels = np.asarray(labels)
    n = x.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    ids = np.unique(labels)
    if not 2 <= len(ids) <= n - 1:
        raise ValueError(f"silhouette needs between 2 and N-1={n - 1} clusters, got {len(ids)}")
    dist = pairwise_distances(x) if distances is None else distances
    members = {int(c): labels == c for c in ids}
    sizes = {c: int(m.sum()) for c, m in members.items()}
    total = 0.0
    for i in range(n):
        own = int(labels[i])
        if sizes[own] == 1:
            continue
        a = float(dist[i, members[own]].sum()) / (sizes[own] - 1)
        b = min(float(dist[i, m].mean()) for c, m in members.items() if c != own)
        denom = max(a, b)
        if denom > 0:
            total += (b - a) / denom
    return total / n


def choose_k(
    features: np.ndarray,
    k_max: int,
    seed: int = 0,
    *,
    min_silhouette: float = DEFAULT_MIN_SILHOUETTE,
    n_init: int = 10,
) -> int:
    """Pick the number of clusters for `clusters = "auto"`.

    Tries k = 2 .. min(k_max, N - 1, distinct points) with `kmeans(features, k, seed)` and keeps the k with the
    highest mean silhouette (ties: the smaller k). Returns 1 when N < 3 (a silhouette needs 2 <= k <= N - 1), when
    no k can be tried, or when the best silhouette is below `min_silhouette` (no real cluster structure: one
    cluster is the honest answer, see DEFAULT_MIN_SILHOUETTE).
    """
    x = _as_features(features)
    n = x.shape[0]
    upper = min(int(k_max), n - 1)
    if n < 3 or upper < 2:
        return 1
    upper = min(upper, n_distinct(x))
    dist = pairwise_distances(x)
    best_k, best_s = 1, -math.inf
    for k in range(2, upper + 1):
        result = kmeans(x, k, seed, n_init=n_init)
        if not 2 <= result.k <= n - 1:
            continue
        s = silhouette_score(x, result.labels, dist)
        if s > best_s:
            best_k, best_s = k, s
    return best_k if best_s >= min_silhouette else 1
