"""The exact cut planner: the assignment of cut bits that minimises the modelled iteration latency.

The latency model (latency.py) is a constant plus eight phase maxima, and each phase depends on a single cut-bit
column. Each column has exactly two phases (its forward phase and its backward phase), so the four columns can be
optimised independently. For one column, with A the set of clients whose bit is 0 and n = |A|:

    cost(A) = max(alpha*n + max_{i in A} a_i, max_{i not in A} b_i)
            + max(beta*n + max_{i in A} c_i, max_{i not in A} d_i)

(a_i, c_i: the client's two phase times with bit 0, b_i, d_i: with bit 1, alpha, beta >= 0: the server's per-client
cost of the optional block; a max over an empty set is 0 and every time is positive).

Exactness. Let A* be optimal and (sb, sd) = (max of b, max of d) over its complement. Every client outside
A' = {i : b_i > sb or d_i > sd} satisfies both thresholds, and A' is a subset of A*: A' has no larger n and no larger
maxima over A, and its complement's maxima are still at most sb and sd, so cost(A') <= cost(A*). Hence it suffices
to try, for every threshold pair, the set "the k clients with the largest b, together with the m clients with the
largest d" and to bound its cost by using the next b and next d in those orders in place of the complement's maxima.
Every such bound is at least the true cost of a real assignment, and at (k, m) matching A' it is at most cost(A*),
so the smallest bound over the (N+1)^2 pairs is the optimum. With prefix maxima and prefix counts each pair costs
O(1): O(N^2) time per column (numpy, in blocks of rows to bound memory), plus O(N log N) for the two sorts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import DeviceProfile, ServerProfile
from ..model import CutBits
from .costs import CostTable
from .latency import COLUMNS, LatencyTerms, batch_latency, latency_terms

_MAX_CELLS = 1 << 22  # entries of one (rows x (N+1)) block of the threshold grid (~32 MiB per float64 array)


@dataclass(frozen=True)
class Plan:
    """The planner's answer: one CutBits per client, the modelled latency, and how long planning took."""

    cuts: tuple[CutBits, ...]
    latency_s: float
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {"cuts": [list(c) for c in self.cuts], "latency_s": self.latency_s, "seconds": self.seconds}


def optimise_column(
    alpha: float, a: np.ndarray, b: np.ndarray, beta: float, c: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, float]:
    """The exact minimiser of the one-column cost (see the module docstring): a boolean mask of the clients that get
    bit 0, and the minimal cost."""
    a, b, c, d = (np.asarray(x, dtype=np.float64) for x in (a, b, c, d))
    n = a.shape[0]
    order_b = np.argsort(-b, kind="stable")
    order_d = np.argsort(-d, kind="stable")
    rank_b = np.empty(n, dtype=np.int64)
    rank_b[order_b] = np.arange(n)

    # Row k: the k clients with the largest b are in A. Column m: so are the m clients with the largest d.
    pre_b_a = np.concatenate(([0.0], np.maximum.accumulate(a[order_b])))  # max a over the top-k by b
    pre_b_c = np.concatenate(([0.0], np.maximum.accumulate(c[order_b])))
    pre_d_a = np.concatenate(([0.0], np.maximum.accumulate(a[order_d])))  # max a over the top-m by d
    pre_d_c = np.concatenate(([0.0], np.maximum.accumulate(c[order_d])))
    next_b = np.concatenate((b[order_b], [0.0]))  # bound on max b outside A for row k
    next_d = np.concatenate((d[order_d], [0.0]))
    rank_b_in_d = rank_b[order_d]  # position in the b order of the p-th client in the d order

    best = (np.inf, 0, 0)
    ks_all = np.arange(n + 1)
    rows = max(1, _MAX_CELLS // (n + 1))
    for start in range(0, n + 1, rows):
        ks = ks_all[start : start + rows]
        # A client at d-position p is new to the set of row k iff it is not among the top-k by b.
        new = rank_b_in_d[None, :] >= ks[:, None]  # (rows, N)
        count = ks[:, None] + np.concatenate(
            (np.zeros((len(ks), 1), dtype=np.int64), np.cumsum(new, axis=1)), axis=1
        )  # (rows, N+1): n of (k, m)
        first = np.maximum(alpha * count + np.maximum(pre_b_a[ks][:, None], pre_d_a[None, :]), next_b[ks][:, None])
        second = np.maximum(beta * count + np.maximum(pre_b_c[ks][:, None], pre_d_c[None, :]), next_d[None, :])
        bound = first + second
        flat = int(np.argmin(bound))
        value = float(bound.flat[flat])
        if value < best[0]:
            best = (value, int(ks[flat // (n + 1)]), flat % (n + 1))
    _, k, m = best
    mask = np.zeros(n, dtype=bool)
    mask[order_b[:k]] = True
    mask[order_d[:m]] = True
    return mask, column_cost(mask, alpha, a, b, beta, c, d)


def column_cost(
    mask: np.ndarray, alpha: float, a: np.ndarray, b: np.ndarray, beta: float, c: np.ndarray, d: np.ndarray
) -> float:
    """The one-column cost of the set `mask` (True = bit 0), with max over an empty set = 0."""
    n = int(mask.sum())

    def mx(x: np.ndarray) -> float:
        return float(x.max()) if x.size else 0.0

    inside, outside = mask, ~mask
    first = max(alpha * n + mx(a[inside]), mx(b[outside]))
    second = max(beta * n + mx(c[inside]), mx(d[outside]))
    return first + second


def column_problem(
    terms: LatencyTerms, column: int
) -> tuple[float, np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """(alpha, a, b, beta, c, d) of one column: its two phases' server coefficients and per-client times."""
    phases = [p for p in terms.phases if p.column == column]
    if len(phases) != 2:  # pragma: no cover - guaranteed by latency_terms
        raise AssertionError(f"column {COLUMNS[column]} has {len(phases)} phases")
    p, q = phases
    return p.coef, p.values(0), p.values(1), q.coef, q.values(0), q.values(1)


def plan_cuts_terms(terms: LatencyTerms) -> tuple[np.ndarray, float]:
    """The optimal (N, 4) bit array for prepared latency terms, and its latency."""
    bits = np.ones((terms.n_clients, 4), dtype=np.int8)
    for col in range(4):
        mask, _ = optimise_column(*column_problem(terms, col))
        bits[mask, col] = 0
    return bits, float(batch_latency(terms, bits)[0])


def plan_cuts(costs: CostTable, clients: Sequence[DeviceProfile], server: ServerProfile) -> Plan:
    """The cut assignment that minimises the modelled iteration latency (exact); raises ConfigError for bad
    profiles."""
    t0 = time.perf_counter()
    terms = latency_terms(costs, clients, server)
    bits, latency = plan_cuts_terms(terms)
    seconds = time.perf_counter() - t0
    return Plan(tuple(CutBits(*map(int, row)) for row in bits), latency, seconds)


__all__ = ["Plan", "column_cost", "column_problem", "optimise_column", "plan_cuts", "plan_cuts_terms"]
