"""Aggregation planning of one round: which clients are averaged, with which weights, in which jobs.

Pure functions of what the coordinator knows when a round closes (no transport, no ledger), so the quorum,
cluster and weighting rules are tested directly:

- `resolve_clusters`: the cluster assignment and KLD scores the round uses (the clustering service's result from
  `kld_from_round` on, one cluster 0 before it or without clustering; clients the result does not name keep their
  previous cluster, new ones start in 0);
- `plan_round_jobs`: arrived clients that completed no step are not averaged, nor are `excluded` ones (their
  reported update was refused as missing by the aggregators again and again: the coordinator plans the round again
  without them, and they are weighted exactly as if they had never reported); the quorum (a fraction of the
  participants, at least one) must arrive and the server must have trained, else the round is skipped with the
  reason; otherwise the weights (`aggregation_weights`) and one job per cluster with an arrived member plus the
  global job (-1, every arrived client, for the server's layers).

Weights use the sample count the coordinator *admitted* for each client (`members`), never a count a client
reports with its round: a client cannot buy weight by lying about its shard (see docs/security.md). A client
without a KLD score (none of its real-data passes reached the server) is weighted like the least similar client
that has one.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from .weights import Weights, aggregation_weights

GLOBAL_JOB = -1


@dataclass(frozen=True)
class WeightRule:
    """The training options that decide weights and clusters (a `TrainConfig` has them all)."""

    alpha: float = 1.0
    kld_from_round: int = 3
    kld_weighting: bool = True
    clustering: bool = True

    @classmethod
    def from_train(cls, tr) -> WeightRule:
        return cls(tr.alpha, tr.kld_from_round, tr.kld_weighting, tr.clustering)


@dataclass(frozen=True)
class Clusters:
    """The round's cluster of every member and its KLD scores (only those the round uses)."""

    assignment: dict[int, int]
    kld_intra: dict[int, float] = field(default_factory=dict)
    kld_global: dict[int, float] = field(default_factory=dict)


def resolve_clusters(
    round: int,
    members: Sequence[int],
    previous: Mapping[int, int],
    result: Clusters | None,
    rule: WeightRule,
    need_result: bool,
) -> Clusters:
    """The assignment this round uses. `result`: the clustering service's (None if none came); `need_result`:
    whether this round uses it (KLD weights or clustering into more than one cluster from `kld_from_round` on)."""
    intra: dict[int, float] = {}
    glob: dict[int, float] = {}
    assignment = {int(c): int(k) for c, k in previous.items()}
    if result is not None and need_result:
        assignment.update(result.assignment)
        intra, glob = dict(result.kld_intra), dict(result.kld_global)
    elif round < rule.kld_from_round or not rule.clustering:
        assignment = {c: 0 for c in members}
        if result is not None:
            glob = dict(result.kld_global)
    for c in members:
        assignment.setdefault(c, 0)
    return Clusters(assignment, intra, glob)


@dataclass(frozen=True)
class JobSpec:
    """One aggregation job: the weighted members and the clients that load the result (none for the global job)."""

    cluster: int
    members: tuple[int, ...]
    weights: tuple[float, ...]
    recipients: tuple[int, ...]


@dataclass(frozen=True)
class RoundPlan:
    averaged: tuple[int, ...]  # arrived clients that completed a step
    untrained: tuple[int, ...]  # arrived, but every step was dropped: not averaged
    skip: str | None  # why the round is not aggregated (None: it is)
    weights: Weights | None = None
    jobs: dict[int, JobSpec] = field(default_factory=dict)
    orphans: tuple[int, ...] = ()  # members whose cluster has no averaged client: they keep their models
    filled_kld: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)  # what -> (clients, value)


def fill_missing_kld(arrived: Sequence[int], scores: Mapping[int, float]) -> tuple[dict[int, float], list[int], float]:
    """Scores for every arrived client: one without a score gets the largest (least similar) score of those that
    have one, 0.0 when none has (then weights are plain n_k). Returns (scores, the filled clients, the value)."""
    missing = [c for c in arrived if c not in scores]
    fill = max((scores[c] for c in arrived if c in scores), default=0.0)
    return {**scores, **{c: fill for c in missing}}, missing, fill


def plan_round_jobs(
    round: int,
    *,
    members: Mapping[int, int],
    participants: Sequence[int],
    steps_done: Mapping[int, int],
    server_steps: int | None,
    quorum: float,
    clusters: Clusters,
    rule: WeightRule,
    excluded: Collection[int] = (),
) -> RoundPlan:
    """The round's jobs.

    `members`: every admitted client -> its admitted sample count; `participants`: who was asked to train;
    `steps_done`: arrived client -> steps it completed (its report); `server_steps`: the server's completed steps
    (None without its report); `quorum`: the fraction of participants that must arrive (at least one client);
    `excluded`: arrived clients left out of every job (as if they had not arrived)."""
    arrived = sorted(c for c in steps_done if c in members and c not in excluded)
    untrained = tuple(c for c in arrived if steps_done[c] == 0)
    averaged = tuple(c for c in arrived if c not in untrained)
    need = max(1, math.ceil(quorum * len(participants)))
    if len(averaged) < need:
        return RoundPlan(averaged, untrained, "quorum not met")
    if server_steps is None or server_steps == 0:
        return RoundPlan(averaged, untrained, "no training happened")
    kld_intra, kld_global = clusters.kld_intra, clusters.kld_global
    filled: dict[str, tuple[tuple[int, ...], float]] = {}
    if rule.kld_weighting and round >= rule.kld_from_round:
        kld_intra, missing, value = fill_missing_kld(averaged, kld_intra)
        if missing:
            filled["intra-cluster"] = (tuple(missing), value)
        kld_global, missing, value = fill_missing_kld(averaged, kld_global)
        if missing:
            filled["global"] = (tuple(missing), value)
    w = aggregation_weights(
        round=round,
        clients=averaged,
        n_samples={c: members[c] for c in averaged},
        assignment=clusters.assignment,
        kld_intra=kld_intra,
        kld_global=kld_global,
        alpha=rule.alpha,
        kld_from_round=rule.kld_from_round,
        kld_weighting=rule.kld_weighting,
        clustering=rule.clustering,
    )
    # Rounds before kld_from_round (or without clustering) average everyone as the single cluster 0.
    clustered = rule.clustering and round >= rule.kld_from_round
    effective = {c: (clusters.assignment.get(c, 0) if clustered else 0) for c in members}
    jobs: dict[int, JobSpec] = {}
    for k, cw in sorted(w.clusters.items()):
        ids = tuple(sorted(cw))
        recipients = tuple(sorted(c for c in members if effective[c] == k))
        jobs[k] = JobSpec(k, ids, tuple(cw[c] for c in ids), recipients)
    gids = tuple(sorted(w.global_))
    jobs[GLOBAL_JOB] = JobSpec(GLOBAL_JOB, gids, tuple(w.global_[c] for c in gids), ())
    orphans = tuple(sorted(c for c in members if effective[c] not in w.clusters))
    return RoundPlan(averaged, untrained, None, w, jobs, orphans, filled)
