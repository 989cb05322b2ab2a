"""Aggregation weights for one round: per cluster (client-held layers) and global (server-held layers).

docs/ARCHITECTURE.md section 3, following the reference's federated_averaging:

- Rounds before `kld_from_round` (rounds 1 and 2 by default): one cluster, id 0, holding every arrived client,
  weights n_k / sum n; the global weights are the same.
- From `kld_from_round` on: within each cluster n_k exp(-alpha KLD_k^intra), normalised over the cluster's arrived
  members (a single-member cluster gets exactly 1, as in the reference); globally n_k exp(-alpha KLD_k^global)
  normalised over all arrived clients.
- Ablations: `kld_weighting=False` uses n_k / sum n within clusters and globally; `clustering=False` uses one
  cluster (id 0) whose weights are the global ones.

Only the clients that arrived take part: weights are renormalised over them, and a cluster with no arrived member
has no entry (its clients keep their current model). The normalisation is a softmax of log n_k - alpha KLD_k (the
same numbers as the formula, but it cannot underflow to 0/0 when every KLD in a cluster is large).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Weights:
    """clusters: cluster id -> {client id -> weight}, each inner map summing to 1; global_: client id -> weight over
    all arrived clients, summing to 1. Client ids are in increasing order inside every map."""

    clusters: dict[int, dict[int, float]]
    global_: dict[int, float]

    @property
    def assignment(self) -> dict[int, int]:
        """client -> the cluster it is averaged in this round (arrived clients only)."""
        return {c: cluster for cluster, members in self.clusters.items() for c in members}

    @property
    def clients(self) -> list[int]:
        return list(self.global_)


def _proportional(clients: list[int], n_samples: Mapping[int, int]) -> dict[int, float]:
    """n_k / sum n (exactly that expression, so a single member gets exactly 1)."""
    total = sum(int(n_samples[c]) for c in clients)
    return {c: int(n_samples[c]) / total for c in clients}


def _kld_weighted(
    clients: list[int], n_samples: Mapping[int, int], kld: Mapping[int, float], alpha: float, what: str
) -> dict[int, float]:
    """n_k exp(-alpha KLD_k) normalised over `clients`, computed as a softmax of log n_k - alpha KLD_k."""
    missing = [c for c in clients if c not in kld]
    if missing:
        raise ValueError(f"no {what} KLD score for arrived clients {missing}")
    bad = [c for c in clients if not math.isfinite(float(kld[c]))]
    if bad:
        raise ValueError(f"{what} KLD scores of clients {bad} are not finite")
    if len(clients) == 1:
        return {clients[0]: 1.0}
    logs = {c: math.log(int(n_samples[c])) - alpha * float(kld[c]) for c in clients}
    top = max(logs.values())
    raw = {c: math.exp(v - top) for c, v in logs.items()}
    total = math.fsum(raw.values())
    return {c: raw[c] / total for c in clients}


def aggregation_weights(
    round: int,
    clients: Iterable[int],
    n_samples: Mapping[int, int],
    assignment: Mapping[int, int],
    kld_intra: Mapping[int, float],
    kld_global: Mapping[int, float],
    alpha: float = 1.0,
    kld_from_round: int = 3,
    kld_weighting: bool = True,
    clustering: bool = True,
) -> Weights:
    """Weights of one round over the clients that arrived (see the module docstring for the rules).

    `round` counts from 1. `n_samples` must give a positive size for every arrived client; from `kld_from_round`
    on, `assignment` (and the KLD maps that the mode uses) must cover every arrived client. Entries for clients
    that did not arrive are ignored.
    """
    arrived = sorted({int(c) for c in clients})
    if not arrived:
        raise ValueError("aggregation weights need at least one arrived client")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite non-negative number, got {alpha!r}")
    missing = [c for c in arrived if c not in n_samples]
    if missing:
        raise ValueError(f"no sample count for arrived clients {missing}")
    bad = [c for c in arrived if int(n_samples[c]) <= 0]
    if bad:
        raise ValueError(f"sample counts must be positive; clients {bad} report {[n_samples[c] for c in bad]}")

    if round < kld_from_round:
        w = _proportional(arrived, n_samples)
        return Weights(clusters={0: dict(w)}, global_=w)

    if kld_weighting:
        global_w = _kld_weighted(arrived, n_samples, kld_global, alpha, "global")
    else:
        global_w = _proportional(arrived, n_samples)
    if not clustering:
        return Weights(clusters={0: dict(global_w)}, global_=global_w)

    unassigned = [c for c in arrived if c not in assignment]
    if unassigned:
        raise ValueError(f"no cluster assignment for arrived clients {unassigned}")
    members: dict[int, list[int]] = {}
    for c in arrived:
        members.setdefault(int(assignment[c]), []).append(c)
    clusters = {
        cluster: _kld_weighted(group, n_samples, kld_intra, alpha, "intra-cluster")
        if kld_weighting
        else _proportional(group, n_samples)
        for cluster, group in sorted(members.items())
    }
    return Weights(clusters=clusters, global_=global_w)
