"""The quality bench's methods: one entry per method, and everything the bench and its report need to know of it.

A method is a `BenchMethod`: its name on the command line, its name in the report, a description, its latency
model (how its modelled seconds per iteration are computed) and how it trains:

- `SplitTraining`: through `runtime.train.train` (the distributed roles, embedded), with the run config changed by
  `configure` (an ablation turns one of HuSCF-GAN's parts off);
- `BaselineTraining`: an unsplit cGAN per model (`baselines.py`), one per domain on the pooled data (`pooled`) or one
  per client, averaged over all clients every round (`averaged`) or never.

The `role` of a method says which of the report's comparisons and claims it takes part in. Adding a method to
`hfgan bench quality` is one entry in `REGISTRY` (plus, for a new kind of training, its runner). This module imports
neither the bench (`quality.py`) nor the report, so both can import it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig

# ----------------------------------------------------------------------------------------------------------------
# Latency models


def best_uniform_cut(cfg: RunConfig) -> tuple[tuple[int, int, int, int], float, dict[str, float]]:
    """Among the 16 assignments that give every client the same cut bits, the one with the lowest modelled
    iteration latency for the run's device profiles: (bits, latency, {"0000": latency, ...}). Ties go to the
    smaller bit string."""
    from ..planning import iteration_latency, run_costs

    costs = run_costs(cfg)
    n = cfg.scenario.total_clients
    profiles = cfg.devices.client_profiles(n)
    table: dict[str, float] = {}
    for bits in itertools.product((0, 1), repeat=4):
        table["".join(map(str, bits))] = float(iteration_latency(costs, profiles, cfg.devices.server, [bits] * n))
    best = min(table, key=lambda k: (table[k], k))
    return tuple(int(c) for c in best), table[best], table  # type: ignore[return-value]


def full_model_gflops(cfg: RunConfig) -> float:
    """GFLOPs of one training iteration of the whole model for one batch (D counted D_PASSES times, as the latency
    model counts a client's D work)."""
    from ..planning import run_costs
    from ..planning.latency import D_PASSES

    costs = run_costs(cfg)
    g, d = costs.generator, costs.discriminator
    return sum(g.fwd_gflops) + sum(g.bwd_gflops) + D_PASSES * (sum(d.fwd_gflops) + sum(d.bwd_gflops))


def _on_devices(cfg: RunConfig, model_bytes: int | None, exchange: bool) -> dict[str, Any]:
    """Every client runs the whole model on its own device; with `exchange`, its model goes up and the average
    comes down over its link once per round."""
    profiles = cfg.devices.client_profiles(cfg.scenario.total_clients)
    w = full_model_gflops(cfg)
    out: dict[str, Any] = {"full_model_gflops": w, "latency_s": max(w / p.gflops for p in profiles)}
    if exchange and model_bytes:
        out["round_exchange_s"] = max(2 * model_bytes / p.data_rate for p in profiles)
    return out


def _on_server(cfg: RunConfig, model_bytes: int | None) -> dict[str, Any]:
    server = cfg.devices.server
    w = full_model_gflops(cfg)
    latency = cfg.scenario.total_clients * w / (server.computational_frequency_ghz * server.cpu_cycles_per_flop)
    return {"full_model_gflops": w, "latency_s": latency}


@dataclass(frozen=True)
class LatencyModel:
    """How a method's modelled seconds per iteration come about. `compute(cfg, model_bytes)` gives them for the
    baselines (None: the split run's own summary has them, from `planning.iteration_latency`)."""

    key: str
    formula: str
    compute: Callable[[RunConfig, int | None], dict[str, Any]] | None = None


SPLIT_LATENCY = LatencyModel(
    "split", "the paper's iteration-latency model (planning.iteration_latency) for the method's cut bits"
)
FEDGAN_LATENCY = LatencyModel(
    "fedgan",
    "max_i W / s_i: every client runs the whole model (W = full-model GFLOPs of one iteration at batch "
    "64, D counted 3 times) on its own device; no per-iteration traffic, a model exchange per round",
    lambda cfg, nbytes: _on_devices(cfg, nbytes, exchange=True),
)
LOCAL_LATENCY = LatencyModel(
    "local_only",
    "max_i W / s_i, as fedgan, with no exchange at all",
    lambda cfg, nbytes: _on_devices(cfg, nbytes, exchange=False),
)
CENTRAL_LATENCY = LatencyModel(
    "centralized", "N x W / S: the server runs the whole model for all N clients' batches at its speed S", _on_server
)
# In the order the report lists them.
LATENCY_MODELS = (SPLIT_LATENCY, FEDGAN_LATENCY, LOCAL_LATENCY, CENTRAL_LATENCY)


# ----------------------------------------------------------------------------------------------------------------
# How a method trains


@dataclass(frozen=True)
class SplitTraining:
    """Trained by `runtime.train.train` with the run config `configure(cfg)`."""

    configure: Callable[[RunConfig], RunConfig]


@dataclass(frozen=True)
class BaselineTraining:
    """An unsplit cGAN per model (baselines.py): one per domain on its clients' pooled data (`pooled`), else one per
    client; with `averaged`, every parameter and buffer is averaged over all clients every round (n_k weights).
    `per_client`: a domain's numbers are the mean over its clients' models (each client's are kept too)."""

    pooled: bool = False
    averaged: bool = False

    @property
    def per_client(self) -> bool:
        return not self.pooled and not self.averaged


def _same_cut(cfg: RunConfig) -> RunConfig:
    bits, _, _ = best_uniform_cut(cfg)
    return cfg.with_overrides("train", cuts=(bits,))


# ----------------------------------------------------------------------------------------------------------------
# The methods


@dataclass(frozen=True)
class Role:
    """Which of the report's comparisons and claims a method takes part in (the method under test has `reference`).

    question: "headline" (the report's first answers table) or "further", ordered by `rank`; `distributed`: one of
    the distributed GAN baselines of the paper's claims; `quality_claim`: an ablation that checks "<this> improves
    quality"; `latency_claim`: the uniform-cut ablation of the heterogeneous-cuts claim; `upper_bound`: the
    centralized context line; `cuts_column`: a column of the clients table showing the method's cut bits."""

    reference: bool = False
    question: str = ""
    rank: int = 0
    distributed: bool = False
    quality_claim: str = ""
    latency_claim: bool = False
    upper_bound: bool = False
    cuts_column: str = ""


@dataclass(frozen=True)
class BenchMethod:
    name: str
    label: str
    description: str
    latency: LatencyModel
    training: SplitTraining | BaselineTraining
    role: Role = Role()

    @property
    def is_split(self) -> bool:
        return isinstance(self.training, SplitTraining)

    def evaluated_models(self, cfg: RunConfig) -> int:
        """How many models the evaluation scores (one per domain, or one per client)."""
        per_client = isinstance(self.training, BaselineTraining) and self.training.per_client
        return sum(d.clients for d in cfg.scenario.domains) if per_client else len(cfg.scenario.domains)


REGISTRY: tuple[BenchMethod, ...] = (
    BenchMethod(
        "huscf",
        "HuSCF-GAN",
        "HuSCF-GAN as configured: planned heterogeneous cuts, KMeans clustering, KLD-weighted averaging",
        SPLIT_LATENCY,
        SplitTraining(lambda cfg: cfg),
        Role(reference=True, cuts_column="HuSCF-GAN cuts"),
    ),
    BenchMethod(
        "no_clustering",
        "no clustering",
        "ablation: no clustering, one model averaged with global KLD weights over all clients",
        SPLIT_LATENCY,
        SplitTraining(lambda cfg: cfg.with_overrides("train", clustering=False)),
        Role(question="headline", rank=1, quality_claim="clustering improves quality"),
    ),
    BenchMethod(
        "size_only",
        "size-only weights",
        "ablation: clustering on, weights n_k / sum n within clusters (no KLD weighting)",
        SPLIT_LATENCY,
        SplitTraining(lambda cfg: cfg.with_overrides("train", kld_weighting=False)),
        Role(question="further", rank=0, quality_claim="KLD weighting improves quality"),
    ),
    BenchMethod(
        "same_cut",
        "same cut",
        "ablation: every client at the same cut (the uniform assignment with the lowest modelled latency)",
        SPLIT_LATENCY,
        SplitTraining(_same_cut),
        Role(question="further", rank=1, latency_claim=True, cuts_column="same-cut cuts"),
    ),
    BenchMethod(
        "centralized",
        "centralized (pooled per domain)",
        "baseline (upper bound): per domain, one unsplit cGAN on the domain's pooled client data",
        CENTRAL_LATENCY,
        BaselineTraining(pooled=True),
        Role(question="further", rank=3, upper_bound=True),
    ),
    BenchMethod(
        "fedgan",
        "FedGAN-style",
        "baseline: FedGAN-style, every client trains the whole model, one global average every round",
        FEDGAN_LATENCY,
        BaselineTraining(averaged=True),
        Role(question="headline", rank=0, distributed=True),
    ),
    BenchMethod(
        "local_only",
        "local only",
        "baseline: every client trains its own model on its own data, never averaging",
        LOCAL_LATENCY,
        BaselineTraining(),
        Role(question="further", rank=2, distributed=True),
    ),
)

BY_NAME: dict[str, BenchMethod] = {m.name: m for m in REGISTRY}
METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY)
SPLIT_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.is_split)
BASELINES: tuple[str, ...] = tuple(m.name for m in REGISTRY if not m.is_split)
REFERENCE: str = next(m.name for m in REGISTRY if m.role.reference)


def method(name: str) -> BenchMethod:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown bench method {name!r} (known: {', '.join(METHODS)})") from None


def label(name: str) -> str:
    """The method's name in the report (the name itself for one that is not registered)."""
    return BY_NAME[name].label if name in BY_NAME else name


def questioned(group: str) -> list[str]:
    """The methods compared with the reference in the report's `group` of questions, in the report's order."""
    return [m.name for m in sorted((m for m in REGISTRY if m.role.question == group), key=lambda m: m.role.rank)]


def with_role(**flags: Any) -> list[str]:
    """The methods whose role has every given flag (in registry order)."""
    return [m.name for m in REGISTRY if all(getattr(m.role, k) == v for k, v in flags.items())]


def baseline_latency(cfg: RunConfig, name: str, model_bytes: int | None = None) -> dict[str, Any]:
    """Modelled seconds per iteration of a baseline, from the same cost table and profiles as the split methods."""
    model = method(name).latency
    if model.compute is None:
        raise ValueError(f"{name} is a split method: its latency comes from its run")
    return {"formula": model.formula, **model.compute(cfg, model_bytes)}


__all__ = [
    "BASELINES",
    "BY_NAME",
    "LATENCY_MODELS",
    "METHODS",
    "REFERENCE",
    "REGISTRY",
    "SPLIT_LATENCY",
    "SPLIT_METHODS",
    "BaselineTraining",
    "BenchMethod",
    "LatencyModel",
    "Role",
    "SplitTraining",
    "baseline_latency",
    "best_uniform_cut",
    "full_model_gflops",
    "label",
    "method",
    "questioned",
    "with_role",
]
