"""The paper's model of the latency of one training iteration for a cut assignment.

One iteration has four stages, in order: G forward, D forward, G backward, D backward. Each stage is a first phase
(every client runs its head, or for the backward stages its tail, and sends the activation up), the blocks that the
server always runs (batched over all N clients), and a second phase (every client receives and runs its tail, or
head). A phase ends when its slowest client is done, so

    stage = max_i first_i + (server blocks) * N / S + max_i second_i.

A client whose cut bit for the phase's optional block is 0 has the server run that block for it; the server runs it
batched over the n clients with bit 0, which adds `optional_gflops * n / S` to the phase of each of them. D runs
three times per iteration (fakes for the D step, reals, fakes for the G step): every client-side D term counts
three times, the server's D terms once (as the reference computes it). Client speed s_i = cpu_mhz * 1e-3 *
flops_per_cycle GFLOP/s, client link r_i bytes/s, server speed S = computational_frequency_ghz *
cpu_cycles_per_flop GFLOP/s, server link R bytes/s. The formula, term for term, is in
reference/cut_selection/README.md; this module reproduces the reference's 200 fitness vectors.

The reference charges the server's batched run of the optional *head* block in the backward stages with the
backward FLOPs of the optional *tail* block (its block index 3 with the head count). With a "paper" cost table we
keep that, to reproduce its numbers; with a "corrected" table the head block's own backward FLOPs are used.

Every phase depends on one cut-bit column only, and the latency is a constant plus a sum of phase maxima: the
structure that the exact planner (planner.py) exploits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, DeviceProfile, ServerProfile
from ..model import HEAD, SERVER, TAIL, CutBits
from .costs import CostTable

STAGES = ("G forward", "D forward", "G backward", "D backward")
COLUMNS = ("g_head", "g_tail", "d_head", "d_tail")
D_PASSES = 3  # D runs three times per iteration


@dataclass(frozen=True, eq=False)  # holds numpy arrays: compare by identity
class Phase:
    """One phase of one stage: per-client seconds for either value of its cut bit, in three parts."""

    stage: int  # index into STAGES
    position: int  # 0: before the shared server blocks, 1: after them
    column: int  # the cut bit it depends on (index into COLUMNS)
    coef: float  # seconds the server adds per client whose bit is 0 (it runs the optional block for them)
    compute: tuple[np.ndarray, np.ndarray]  # client compute seconds with bit 0, with bit 1
    link: tuple[np.ndarray, np.ndarray]  # client-link transfer seconds
    server_link: tuple[float, float]  # server-link transfer seconds (the same for every client)

    def values(self, bit: int) -> np.ndarray:
        """Per-client seconds for this bit, without the server's optional-block term."""
        return self.compute[bit] + self.link[bit] + self.server_link[bit]


@dataclass(frozen=True, eq=False)
class LatencyTerms:
    """The latency model for one cost table and one set of clients: latency = const + sum of phase maxima."""

    n_clients: int
    server_stage_s: tuple[float, float, float, float]  # the always-server blocks, per stage, for all N clients
    phases: tuple[Phase, ...]

    @property
    def const(self) -> float:
        return float(sum(self.server_stage_s))


def _check_profiles(clients: Sequence[DeviceProfile], server: ServerProfile) -> None:
    if len(clients) == 0:
        raise ConfigError("the client list is empty")
    for i, p in enumerate(clients):
        for name in ("cpu_mhz", "flops_per_cycle", "data_rate"):
            v = getattr(p, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"client {i}: {name} must be a positive number, got {v!r}")
    for name in ("computational_frequency_ghz", "cpu_cycles_per_flop", "transmission_rate_bps"):
        v = getattr(server, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
            raise ConfigError(f"server: {name} must be a positive number, got {v!r}")


def latency_terms(costs: CostTable, clients: Sequence[DeviceProfile], server: ServerProfile) -> LatencyTerms:
    """The phases of the model for these clients (validates the profiles; raises ConfigError)."""
    _check_profiles(clients, server)
    n = len(clients)
    s = np.array([p.gflops for p in clients], dtype=np.float64)
    r = np.array([p.data_rate for p in clients], dtype=np.float64)
    big_s = server.computational_frequency_ghz * server.cpu_cycles_per_flop
    big_r = server.transmission_rate_bps
    g, d = costs.generator, costs.discriminator
    corrected = costs.cost_model == "corrected"
    zero = np.zeros(n)

    def pair(f) -> tuple[np.ndarray, np.ndarray]:
        return (f(0), f(1))

    def phase(stage: int, col: int, server_gflop: float, k: int, flops, nbytes, up: bool) -> Phase:
        # up: the client computes, then sends over its own link (rate r); down: the server sends over its link
        # (rate R), then the client computes.
        link_up = pair(lambda b: k * nbytes(b) / r) if up else (zero, zero)
        link_down = (0.0, 0.0) if up else (k * nbytes(0) / big_r, k * nbytes(1) / big_r)
        return Phase(
            stage, 0 if up else 1, col, server_gflop / big_s, pair(lambda b: k * flops(b) / s), link_up, link_down
        )

    phases = []
    for net, k, stage_f, stage_b, head_col, tail_col in ((g, 1, 0, 2, 0, 1), (d, D_PASSES, 1, 3, 2, 3)):
        head_opt_f, tail_opt_f = net.role_fwd(HEAD), net.role_fwd(TAIL)
        head_opt_b, tail_opt_b = net.role_bwd(HEAD), net.role_bwd(TAIL)
        # Forward: heads compute and send up; the server sends down to the tails, which compute.
        phases.append(phase(stage_f, head_col, head_opt_f, k, net.head_fwd, net.head_out_bytes, up=True))
        phases.append(phase(stage_f, tail_col, tail_opt_f, k, net.tail_fwd, net.tail_in_bytes, up=False))
        # Backward: tails compute and send their input gradient up; the server sends down to the heads.
        phases.append(phase(stage_b, tail_col, tail_opt_b, k, net.tail_bwd, net.tail_in_bytes, up=True))
        head_b = head_opt_b if corrected else tail_opt_b
        phases.append(phase(stage_b, head_col, head_b, k, net.head_bwd, net.head_out_bytes, up=False))
    server_stage = (
        g.role_fwd(SERVER) * n / big_s,
        d.role_fwd(SERVER) * n / big_s,
        g.role_bwd(SERVER) * n / big_s,
        d.role_bwd(SERVER) * n / big_s,
    )
    phases.sort(key=lambda p: (p.stage, p.position))
    return LatencyTerms(n, server_stage, tuple(phases))


# ----------------------------------------------------------------------------------------------------------------
# Cut assignments


def as_cut_array(cuts: Iterable[Iterable[int] | str], n_clients: int | None = None) -> np.ndarray:
    """A list of four-bit lists (or "1010" strings, or CutBits) as an (N, 4) int8 array; ConfigError if malformed."""
    rows = []
    for i, c in enumerate(cuts):
        try:
            rows.append(tuple(CutBits.parse(c)))
        except (ValueError, TypeError):
            raise ConfigError(f"cuts[{i}]: expected four bits [g_head, g_tail, d_head, d_tail], got {c!r}") from None
    if n_clients is not None and len(rows) != n_clients:
        raise ConfigError(f"cuts: {len(rows)} cut assignments for {n_clients} clients")
    return np.array(rows, dtype=np.int8).reshape(len(rows), 4)


def batch_latency(terms: LatencyTerms, bits: np.ndarray) -> np.ndarray:
    """Latency of K assignments at once: bits has shape (K, N, 4) (or (N, 4) for one); returns shape (K,)."""
    b = np.asarray(bits)
    if b.ndim == 2:
        b = b[None]
    if b.ndim != 3 or b.shape[1:] != (terms.n_clients, 4):
        raise ConfigError(f"cuts: expected shape (K, {terms.n_clients}, 4), got {b.shape}")
    ones = b == 1
    zeros_per_col = (~ones).sum(axis=1)  # (K, 4): the n of each column
    total = np.full(b.shape[0], terms.const)
    for ph in terms.phases:
        col = ones[:, :, ph.column]
        v0 = ph.values(0)[None, :] + ph.coef * zeros_per_col[:, ph.column, None]
        total = total + np.where(col, ph.values(1)[None, :], v0).max(axis=1)
    return total


def iteration_latency(
    costs: CostTable, clients: Sequence[DeviceProfile], server: ServerProfile, cuts: Iterable[Iterable[int] | str]
) -> float:
    """Modelled seconds of one training iteration for this cut assignment (one entry per client)."""
    terms = latency_terms(costs, clients, server)
    return float(batch_latency(terms, as_cut_array(cuts, len(clients)))[0])


# ----------------------------------------------------------------------------------------------------------------
# Breakdown


@dataclass(frozen=True)
class PhaseTimes:
    """One phase under an assignment: its time (the max over clients), the client attaining it, per-client times."""

    column: str
    seconds: float
    critical_client: int
    per_client: tuple[float, ...]
    # What the critical client's time is made of: "compute", "link" (its own), "server link", "server".
    parts: dict[str, float]

    @property
    def limited_by(self) -> str:
        return max(self.parts, key=lambda k: self.parts[k])


@dataclass(frozen=True)
class StageTimes:
    name: str
    seconds: float
    first: PhaseTimes
    server_s: float  # the always-server blocks for all clients
    second: PhaseTimes


@dataclass(frozen=True)
class LatencyBreakdown:
    latency_s: float
    stages: tuple[StageTimes, ...]
    cuts: tuple[CutBits, ...]

    def client_stage_seconds(self, i: int) -> tuple[float, ...]:
        """Client i's own time in each stage: its first- and second-phase times (the shared server blocks not
        included). The stage time is reached by the slowest client of each phase."""
        return tuple(st.first.per_client[i] + st.second.per_client[i] for st in self.stages)

    def critical_phases(self, i: int) -> list[str]:
        """The phases in which client i is the slowest, e.g. ["G forward/first", "D backward/second"]."""
        out = []
        for st in self.stages:
            for label, ph in (("first", st.first), ("second", st.second)):
                if ph.critical_client == i:
                    out.append(f"{st.name}/{label}")
        return out

    def bottleneck(self) -> tuple[str, int, str]:
        """The longest phase overall: (stage/phase, client, what limits it)."""
        best = max(
            ((st, label, ph) for st in self.stages for label, ph in (("first", st.first), ("second", st.second))),
            key=lambda t: t[2].seconds,
        )
        return f"{best[0].name}/{best[1]}", best[2].critical_client, best[2].limited_by


def latency_breakdown(
    costs: CostTable, clients: Sequence[DeviceProfile], server: ServerProfile, cuts: Iterable[Iterable[int] | str]
) -> LatencyBreakdown:
    """The four stage times, each phase's critical client and every client's per-phase times."""
    terms = latency_terms(costs, clients, server)
    bits = as_cut_array(cuts, len(clients))
    ones = bits == 1
    zeros = (~ones).sum(axis=0)
    by_stage: dict[int, list[PhaseTimes]] = {}
    for ph in terms.phases:
        col = ones[:, ph.column]
        server_part = np.where(col, 0.0, ph.coef * zeros[ph.column])
        per = np.where(col, ph.values(1), ph.values(0) + ph.coef * zeros[ph.column])
        i = int(np.argmax(per))
        b = int(col[i])
        parts = {
            "compute": float(ph.compute[b][i]),
            "link": float(ph.link[b][i]),
            "server link": float(ph.server_link[b]),
            "server": float(server_part[i]),
        }
        by_stage.setdefault(ph.stage, []).append(
            PhaseTimes(COLUMNS[ph.column], float(per[i]), i, tuple(float(x) for x in per), parts)
        )
    stages = []
    for k, name in enumerate(STAGES):
        first, second = by_stage[k]
        srv = terms.server_stage_s[k]
        stages.append(StageTimes(name, first.seconds + srv + second.seconds, first, srv, second))
    latency = float(batch_latency(terms, bits)[0])
    return LatencyBreakdown(latency, tuple(stages), tuple(CutBits(*map(int, row)) for row in bits))


__all__ = [
    "COLUMNS",
    "D_PASSES",
    "STAGES",
    "LatencyBreakdown",
    "LatencyTerms",
    "Phase",
    "PhaseTimes",
    "StageTimes",
    "as_cut_array",
    "batch_latency",
    "iteration_latency",
    "latency_breakdown",
    "latency_terms",
]
