"""KLD scores: how far each client's activation distribution is from the others', as the reference computes it.

For summaries S_k [C, H, W] (C channels; 128x7x7 for this model):

    P_k = softmax of each channel over its H*W spatial positions          [C, H*W]
    Q_k = mean of P_j over the *other* clients j of the group             [C, H*W]
    score_k = F.kl_div(log(P_k + 1e-9), Q_k + 1e-9, reduction="batchmean")
            = sum over channels and positions of (Q_k + 1e-9) * (log(Q_k + 1e-9) - log(P_k + 1e-9)) / C

i.e. KL(Q_k || P_k) per channel, averaged over channels, with the reference's epsilons exactly where it puts them
(docs/ARCHITECTURE.md section 3; youssefga28/HuSCF-GAN, compute_kld_scores). The group is a cluster for the
intra-cluster score and all clients for the global score.

Decisions:
- **Precision:** float32 torch, like the reference (summaries are cast to float32, Q_k is formed as
  (sum of all P - P_k) / (n - 1) as there). The scores come back as Python floats.
- **A group of one** has no "others" (the reference would divide 0 by 0 and get NaN); its score is defined as 0.
  The weights never use it: a single-member cluster gets weight 1 whatever its score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

EPSILON = 1e-9


def _stack(summaries: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(summaries) == 0:
        raise ValueError("KLD scores need at least one summary")
    shapes = {tuple(s.shape) for s in summaries}
    if len(shapes) != 1:
        raise ValueError(f"summaries must all have the same shape, got {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) < 2:
        raise ValueError(f"a summary must be [C, H, W] (or [C, positions]), got shape {shape}")
    stacked = torch.stack([s.detach().to(torch.float32).cpu() for s in summaries])
    if not torch.isfinite(stacked).all():
        raise ValueError("summaries contain NaN or infinite values")
    return stacked.flatten(start_dim=2)  # [n, C, H*W]


def kld_scores(summaries: Sequence[torch.Tensor]) -> list[float]:
    """Score of each summary against the mean distribution of the others in the list (same order)."""
    stacked = _stack(summaries)
    n = stacked.shape[0]
    if n == 1:
        return [0.0]
    probs = F.softmax(stacked, dim=2)
    total = probs.sum(dim=0)
    scores = []
    for i in range(n):
        p = probs[i]
        q = (total - p) / (n - 1)
        scores.append(float(F.kl_div((p + EPSILON).log(), q + EPSILON, reduction="batchmean").item()))
    return scores


def kld_by_group(summaries: Mapping[int, torch.Tensor], groups: Mapping[int, int] | None = None) -> dict[int, float]:
    """Scores per client id. With `groups` (client -> cluster) each client is scored against the other members of
    its cluster (intra score); without, against all other clients (global score). Clients are taken in increasing
    id order inside a group, which fixes the float32 summation order."""
    ids = sorted(summaries)
    if groups is None:
        members = {0: ids}
    else:
        missing = [c for c in ids if c not in groups]
        if missing:
            raise ValueError(f"no cluster assignment for clients {missing}")
        members = {}
        for c in ids:
            members.setdefault(int(groups[c]), []).append(c)
    out: dict[int, float] = {}
    for group in members.values():
        for c, score in zip(group, kld_scores([summaries[c] for c in group]), strict=True):
            out[c] = score
    return dict(sorted(out.items()))
