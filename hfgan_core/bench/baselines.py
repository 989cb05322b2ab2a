"""The quality bench's baselines: the same conditional GAN trained unsplit, on the same data, seeds and budget.

- **centralized** (the upper bound): per domain, one `UnsplitGAN` on the union of that domain's client shards; a
  step draws `batch_size x (clients in the domain)` samples from the pool, so it sees as many samples per step as
  that domain's clients do together in the federation. One pooled model *across* domains would mix the domains
  under the same labels, so the upper bound is per-domain pooling; each domain is evaluated with its own model.
- **fedgan** (FedGAN-style federated averaging of the whole model): every client holds a full G and D (the same
  initial weights), trains locally on its own batch every step, and at the end of each round the server averages
  every parameter and BatchNorm buffer of G and D with weights n_k / sum n into one global model that every client
  loads. Each client keeps its own Adam state, as HuSCF-GAN's clients do. Each domain is evaluated with the global
  model.
- **local_only**: every client trains its own full model on its own data and never averages. Per domain the
  report shows the mean over the domain's clients of each metric (per-client numbers are kept too).

Every client draws its batches and noise exactly as the split client does (`runtime.client.client_seed`: the same
generator, a batch, then z, every step), the models start from `build_networks(model, train.seed)` like the split
run's, and a round is `local_epochs x (steps_per_epoch or max_k ceil(n_k / batch_size))` steps. The evaluation uses
the split run's settings and seeds (`EvalSettings.from_config`, `derive_seed(seed, domain, ...)`), so a baseline's
domain sees the same labels and noise as HuSCF-GAN's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..evaluation import (
    EvalSettings,
    GenerateFn,
    MetricsLog,
    derive_seed,
    domain_score,
    domain_utility,
    plot_scores,
    save_class_grid,
    write_json_atomic,
)
from ..federation.aggregate import weighted_average
from ..model import canonical_state
from ..model.split import run_blocks
from ..runtime.client import client_seed
from ..runtime.unsplit import UnsplitGAN
from .methods import BASELINES, BaselineTraining, method

UTILITY_KEYS = ("accuracy", "precision", "recall", "f1", "fpr", "n_samples", "epochs")


# ----------------------------------------------------------------------------------------------------------------
# Data and models


class PooledData:
    """The union of some clients' shards, drawn from like one client's data (a fresh shuffle every step)."""

    def __init__(self, parts: Sequence[Any]):
        self.images = torch.cat([p.images for p in parts])
        self.labels = torch.cat([p.labels for p in parts])

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(self.n, generator=generator)[: min(batch_size, self.n)]
        return self.images[idx], self.labels[idx]


@dataclass
class Member:
    """One trained model: its data, its random stream, its batch size, and the clients/domain it stands for."""

    name: str
    gan: UnsplitGAN
    data: Any
    rng: torch.Generator
    batch_size: int
    domain: str
    clients: tuple[int, ...]

    @property
    def n(self) -> int:
        return int(self.data.n)

    def step(self, z_dim: int) -> None:
        x, y = self.data.batch(self.rng, self.batch_size)
        z = torch.randn(x.shape[0], z_dim, generator=self.rng)
        self.gan.train_step(x, y, z)


def model_state(gan: UnsplitGAN) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of G and D under the canonical names ("G.<block>.<key>")."""
    return {**canonical_state("G", gan.G), **canonical_state("D", gan.D)}


def load_model_state(gan: UnsplitGAN, state: dict[str, torch.Tensor]) -> None:
    """Load a canonical state into the model in place (the optimisers keep pointing at the same parameters)."""
    for net, blocks in (("G", gan.G), ("D", gan.D)):
        for i, block in blocks.items():
            prefix = f"{net}.{i}."
            block.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


def model_bytes(gan: UnsplitGAN) -> int:
    """Bytes of the full G and D state (parameters and buffers) as stored: what one model exchange carries."""
    return sum(t.numel() * t.element_size() for t in model_state(gan).values())


def federated_average(gans: Sequence[UnsplitGAN], n_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """Average the whole model over `gans` with weights n_k / sum n and load the result into every one of them.

    Uses the aggregator's `weighted_average` (float64 accumulation, integer buffers rounded), as HuSCF-GAN's
    aggregation does; returns the global state.
    """
    total = sum(int(n) for n in n_samples)
    weights = [int(n) / total for n in n_samples]
    avg = weighted_average([model_state(g) for g in gans], weights)
    for g in gans:
        load_model_state(g, avg)
    return avg


def frozen_generator(gan: UnsplitGAN) -> GenerateFn:
    """A `generate(labels, z)` over a copy of the model's G in eval mode (training can go on independently)."""
    blocks = {i: copy.deepcopy(b).eval() for i, b in gan.G.items()}
    device = gan.device

    @torch.no_grad()
    def generate(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return run_blocks(blocks, range(len(blocks)), z.to(device), labels.to(device))

    return generate


def steps_per_round(cfg: RunConfig, sizes: Sequence[int]) -> int:
    """The coordinator's rule: local_epochs x (steps_per_epoch or max_k ceil(n_k / batch_size))."""
    tr = cfg.train
    per_epoch = tr.steps_per_epoch or max(math.ceil(int(n) / tr.batch_size) for n in sizes)
    return tr.local_epochs * per_epoch


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (the same seeds as evaluate_generators, so every method's domain sees the same labels and noise)


def score(gen: GenerateFn, domain: str, classifier: nn.Module, settings: EvalSettings) -> float:
    return domain_score(gen, domain, classifier, settings)


def utility(gen: GenerateFn, domain: str, test_set: Any, settings: EvalSettings) -> dict[str, Any]:
    util = domain_utility(gen, domain, test_set, settings)
    return {k: util[k] for k in UTILITY_KEYS if k in util}


def _mean_utility(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {k: sum(float(u[k]) for u in items) / len(items) for k in items[0]}


# ----------------------------------------------------------------------------------------------------------------
# The runner


@dataclass
class BaselineContext:
    """What every baseline needs: the run config (with runtime.device), the scenario's data, the scoring
    classifiers, the test sets, and where to write."""

    cfg: RunConfig
    data: Any  # hfgan_core.data.ScenarioData
    classifiers: dict[str, nn.Module]
    run_dir: Path
    samples_dir: Path
    log: Callable[[str], None] = print

    @property
    def device(self) -> str:
        return self.cfg.runtime.device

    @property
    def domains(self) -> list[str]:
        return list(self.cfg.scenario.domain_names)

    def eval_settings(self, utility: bool) -> EvalSettings:
        return EvalSettings.from_config(self.cfg, utility=utility)


def training_of(name: str) -> BaselineTraining:
    training = method(name).training if name in BASELINES else None
    if not isinstance(training, BaselineTraining):
        raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    return training


def build_members(ctx: BaselineContext, name: str) -> list[Member]:
    """The models a baseline trains (same initial weights for all of them, from train.seed)."""
    cfg, data = ctx.cfg, ctx.data
    bs = cfg.train.batch_size
    seed = cfg.train.seed
    if training_of(name).pooled:
        out = []
        for d, dom in enumerate(cfg.scenario.domains):
            parts = [c for c, s in zip(data.clients, data.shards) if s.domain == d]
            rng = torch.Generator().manual_seed(derive_seed(seed, name, dom.dataset))
            out.append(
                Member(
                    f"pooled {dom.dataset}",
                    UnsplitGAN(cfg, ctx.device, seed=seed),
                    PooledData(parts),
                    rng,
                    bs * len(parts),
                    dom.dataset,
                    tuple(s.client for s in data.shards if s.domain == d),
                )
            )
        return out
    return [
        Member(
            f"client {s.client}",
            UnsplitGAN(cfg, ctx.device, seed=seed),
            c,
            torch.Generator().manual_seed(client_seed(seed, s.client)),
            bs,
            s.dataset,
            (s.client,),
        )
        for c, s in zip(data.clients, data.shards)
    ]


@dataclass
class BaselineRun:
    """A finished baseline: its result (the bench's common shape) and the trained members (tests inspect them)."""

    result: dict[str, Any]
    members: list[Member]


def run_baseline(ctx: BaselineContext, method: str) -> BaselineRun:
    """Train and evaluate one baseline; writes `<run_dir>/summary.json`, `metrics.jsonl`, `plots/` and a sample grid
    per domain under `samples_dir` (`<method>_<domain>.png`). Returns the result and the members."""
    cfg = ctx.cfg
    tr = cfg.train
    training = training_of(method)
    members = build_members(ctx, method)
    steps = steps_per_round(cfg, [c.n for c in ctx.data.clients])
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(ctx.run_dir)
    if metrics.records:  # a leftover of an interrupted run: start the log afresh
        metrics.drop_after(0)
    history: dict[str, list[tuple[int, float]]] = {d: [] for d in ctx.domains}
    per_client_history: dict[str, list[tuple[int, float]]] = {}
    train_s = eval_s = 0.0
    averaged_bytes = 0
    mbytes = model_bytes(members[0].gan)
    for r in range(1, tr.rounds + 1):
        t0 = time.perf_counter()
        for _ in range(steps):
            for m in members:
                m.step(cfg.model.z_dim)
        if training.averaged:
            federated_average([m.gan for m in members], [m.n for m in members])
            averaged_bytes += 2 * mbytes * len(members)  # every client uploads its model and downloads the average
        round_train = time.perf_counter() - t0
        train_s += round_train
        t1 = time.perf_counter()
        scores = _round_scores(ctx, training, members, ctx.eval_settings(utility=False))
        round_eval = time.perf_counter() - t1
        eval_s += round_eval
        for d, s in scores["domains"].items():
            history[d].append((r, s))
        for name, s in scores.get("members", {}).items():
            per_client_history.setdefault(name, []).append((r, s))
        metrics.append(
            {
                "round": r,
                "wall_s": round(round_train, 3),
                "eval_s": round(round_eval, 3),
                "steps": steps,
                "generation_score": scores["domains"],
                **({"member_scores": scores["members"]} if scores.get("members") else {}),
            }
        )
        ctx.log(
            f"[{method}] round {r}/{tr.rounds}: "
            + ", ".join(f"{d} {s:.2f}" for d, s in scores["domains"].items())
            + f" | train {round_train:.1f} s, eval {round_eval:.1f} s"
        )

    plot_scores(history, ctx.run_dir / "plots" / "generation_score.png", title=f"{method}: generation score")
    t1 = time.perf_counter()
    domains_out = {
        d: _final_domain(ctx, method, training, members, d, history, per_client_history) for d in ctx.domains
    }
    eval_s += time.perf_counter() - t1
    summary = {
        "method": method,
        "rounds": tr.rounds,
        "steps_per_round": steps,
        "domains": domains_out,
        "wall_train_s": round(train_s, 3),
        "wall_eval_s": round(eval_s, 3),
        "wall_s": round(train_s + eval_s, 3),
        "bytes_sent": int(averaged_bytes),
        "model_bytes": int(mbytes),
        "models": [
            {"name": m.name, "domain": m.domain, "clients": list(m.clients), "n": m.n, "batch_size": m.batch_size}
            for m in members
        ],
    }
    write_json_atomic(ctx.run_dir / "summary.json", summary)
    return BaselineRun(summary, members)


def _final_domain(
    ctx: BaselineContext,
    method: str,
    training: BaselineTraining,
    members: list[Member],
    d: str,
    history: dict[str, list[tuple[int, float]]],
    per_client_history: dict[str, list[tuple[int, float]]],
) -> dict[str, Any]:
    """A domain's final evaluation (utility of each of its models, their mean) and its sample grids."""
    cfg, tr = ctx.cfg, ctx.cfg.train
    mine = _domain_members(training, members, d)
    utils = []
    per_client: dict[str, Any] = {}
    for m in mine:
        u = utility(frozen_generator(m.gan), d, ctx.data.test_sets[d], ctx.eval_settings(utility=True))
        utils.append(u)
        if training.per_client:
            per_client[str(m.clients[0])] = {
                "generation_score": per_client_history[m.name][-1][1],
                "history": per_client_history[m.name],
                "utility": u,
            }
    entry: dict[str, Any] = {
        "generation_score": history[d][-1][1],
        "history": history[d],
        "utility": _mean_utility(utils),
    }
    if per_client:
        entry["per_client"] = per_client
    for i, m in enumerate(mine):
        suffix = "" if i == 0 else f"_client{m.clients[0]}"
        save_class_grid(
            frozen_generator(m.gan),
            ctx.samples_dir / f"{method}_{d}{suffix}.png",
            seed=tr.seed,
            z_dim=cfg.model.z_dim,
            num_classes=cfg.model.num_classes,
            device=ctx.device,
        )
    ctx.log(
        f"[{method}] {d}: utility accuracy {entry['utility']['accuracy']:.2f}% "
        f"(mean over {len(utils)} model{'s' if len(utils) > 1 else ''})"
    )
    return entry


def _domain_members(training: BaselineTraining, members: list[Member], domain: str) -> list[Member]:
    if training.averaged:
        return [members[0]]  # every client holds the same global model after the round's averaging
    return [m for m in members if m.domain == domain]


def _round_scores(
    ctx: BaselineContext, training: BaselineTraining, members: list[Member], settings: EvalSettings
) -> dict[str, Any]:
    out: dict[str, Any] = {"domains": {}}
    if training.per_client:
        out["members"] = {}
        for d in ctx.domains:
            vals = []
            for m in _domain_members(training, members, d):
                s = score(frozen_generator(m.gan), d, ctx.classifiers[d], settings)
                out["members"][m.name] = s
                vals.append(s)
            out["domains"][d] = sum(vals) / len(vals)
        return out
    for d in ctx.domains:
        m = _domain_members(training, members, d)[0]
        out["domains"][d] = score(frozen_generator(m.gan), d, ctx.classifiers[d], settings)
    return out


__all__ = [
    "BASELINES",
    "training_of",
    "BaselineContext",
    "BaselineRun",
    "Member",
    "PooledData",
    "build_members",
    "federated_average",
    "frozen_generator",
    "load_model_state",
    "model_bytes",
    "model_state",
    "run_baseline",
    "score",
    "steps_per_round",
    "utility",
]
