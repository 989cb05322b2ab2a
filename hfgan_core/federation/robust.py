"""Screening a job's member states before they are averaged: drop the unusable ones, clip the outsized ones.

Clients are untrusted (docs/security.md), so an update is used only if it is usable and is kept within a bound
set by the *other* members of the same job:

- **Unusable -> dropped.** A member whose state has NaN or infinite values (shapes and keys are checked before,
  by `member_full_state` against the model's layout) is left out of the job; the remaining weights are
  renormalised (w_j / sum of the kept weights) and the drop's reason is recorded. A job whose every member is
  dropped has no model (its clients keep theirs).
- **Norm clip.** For every tensor key, member i's tensor norm n_i = ||x_i|| (L2, float64) is compared with
  m_i = the median over the *other* members j != i of n_j. If n_i > C * m_i (C = `CLIP_MULTIPLE`, 10), x_i is
  scaled by C * m_i / n_i. The others' norms are taken before any clipping, so the rule does not depend on the
  members' order. A member alone in its job is not clipped (it has no peers; its weight is 1 in a cluster of its
  own, which only it and its cluster's absentees load).

The bound this gives: let A be the job's average and B the weighted average of the other members (their weights
renormalised). Per tensor, A - B = w_i (x_i' - B), so

    ||A - B|| <= w_i * (C * median_{j != i} n_j + max_{j != i} n_j) <= w_i * (C + 1) * max_{j != i} n_j

One client moves its cluster's model (and the global model) away from what the others make of it by at most its
weight times (C + 1) times the largest of the others' norms, per tensor, however large its own update is. Its
weight is bounded too: it uses the sample count the coordinator admitted (at most the shard's cap).

With C = 10 honest members of one job, whose tensors have norms of the same order, are not clipped; an honest run
averages exactly as without the rule (results and digests unchanged). Clipping is reported with the job.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]
CLIP_MULTIPLE = 10.0


def non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key whose tensor has a NaN or an infinite value (None when all are finite)."""
    for key, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return key
    return None


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().to(device="cpu", dtype=torch.float64)))


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    x = t.detach().to(device="cpu", dtype=torch.float64) * factor
    return x.to(t.dtype) if t.is_floating_point() else torch.round(x).to(t.dtype)


def clip_to_peers(
    states: Mapping[int, Mapping[str, torch.Tensor]], multiple: float = CLIP_MULTIPLE
) -> tuple[dict[int, State], dict[int, list[str]]]:
    """Each member's states with every tensor whose norm exceeds `multiple` times the median of the other members'
    norms of that tensor scaled down to exactly that (see the module docstring). Returns the states (unclipped
    tensors are the inputs' own) and, per clipped member, the keys clipped."""
    ids = sorted(states)
    out: dict[int, State] = {c: dict(states[c]) for c in ids}
    clipped: dict[int, list[str]] = {}
    if len(ids) < 2:
        return out, clipped
    for key in states[ids[0]]:
        norms = {c: _norm(states[c][key]) for c in ids}
        for c in ids:
            bound = multiple * statistics.median(norms[j] for j in ids if j != c)
            if norms[c] > bound:
                out[c][key] = _scaled(states[c][key], bound / norms[c] if norms[c] > 0 else 0.0)
                clipped.setdefault(c, []).append(key)
    return out, clipped


@dataclass(frozen=True)
class Screened:
    """The members a job averages, their renormalised weights and clipped states, and what was left out, why."""

    members: tuple[int, ...]
    weights: tuple[float, ...]
    states: list[State]
    dropped: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, list[str]] = field(default_factory=dict)


def screen_members(
    members: Sequence[int],
    weights: Sequence[float],
    states: Mapping[int, State | str],
    multiple: float = CLIP_MULTIPLE,
) -> Screened:
    """`states`: member -> its full state, or the reason it has none usable (missing, wrong shape, ...). Members
    with a reason or a non-finite state are dropped; the rest are clipped to their peers and reweighted."""
    dropped: dict[int, str] = {}
    usable: dict[int, State] = {}
    for c in members:
        s = states.get(c, "missing_update: no update")
        if isinstance(s, str):
            dropped[c] = s
            continue
        key = non_finite(s)
        if key is not None:
            dropped[c] = f"non_finite: {key} has NaN or infinite values"
            continue
        usable[c] = s
    kept = [(c, float(w)) for c, w in zip(members, weights) if c in usable]
    if not kept:
        return Screened((), (), [], dropped)
    if dropped:
        total = math.fsum(w for _, w in kept)
        if not total > 0:  # every kept member had weight 0: they share the job equally
            kept = [(c, 1.0 / len(kept)) for c, _ in kept]
        else:
            kept = [(c, w / total) for c, w in kept]
    clipped_states, clipped = clip_to_peers({c: usable[c] for c, _ in kept}, multiple)
    return Screened(
        tuple(c for c, _ in kept),
        tuple(w for _, w in kept),
        [clipped_states[c] for c, _ in kept],
        dropped,
        clipped,
    )
