"""The quality bench's scale: how a paper-scale preset is reduced to fit a time budget, and what that costs.

Without `--paper-scale` the preset is reduced by explicit factors (2 clients per domain, at most 1,000 samples per
client, 5 to 8 rounds, 2 or 3 local epochs, smaller evaluation sets), chosen from `LADDER` as the richest setting
whose cost estimate (`CostConstants`, fitted on the reference 2-core CPU, or measured here by `calibrate`) fits
`--budget-min`; `scale_factors` lists every knob as paper value, value here and factor for the report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DomainConfig, RunConfig
from .methods import method

# ----------------------------------------------------------------------------------------------------------------
# Scale


@dataclass(frozen=True)
class Scale:
    """One reduced-scale setting (the knobs the bench reduces; everything else is the preset's)."""

    clients_per_domain: int
    samples_per_client: int
    rounds: int
    local_epochs: int
    score_samples: int
    utility_samples: int
    utility_epochs: int


# From richest to poorest: the first whose estimate fits the time budget is used (explicit options override).
# Training steps come first: at 200 steps the GAN is still at the foot of its curve (the reference's S3-lite run
# scores MNIST 1.29 after 240 steps, 3.95 after 600), where the methods cannot be told apart, so the evaluation
# sets shrink before the training does. Every method gets the same evaluation, so smaller sets cost precision, not
# fairness.
LADDER = (
    Scale(2, 1000, 8, 3, 2000, 10000, 5),
    Scale(2, 1000, 8, 3, 1000, 5000, 3),
    Scale(2, 1000, 7, 3, 1000, 5000, 3),
    Scale(2, 1000, 6, 3, 1000, 5000, 3),
    Scale(2, 1000, 6, 2, 1000, 5000, 3),
    Scale(2, 1000, 5, 2, 1000, 5000, 3),
)


@dataclass(frozen=True)
class CostConstants:
    """Seconds per unit of work, for the estimate printed before a bench runs."""

    # Fitted to the measured wall times of docs/evidence/s3 and s5 on the 2-core CPU: a training step of 4 clients x
    # 64 took 1.5 to 2.1 s (split methods 1.5 to 2.8 s per step while other jobs shared the cores; bench/embedded.py
    # measures 1.9 s for a whole embedded round on a quiet machine), and the evaluation 45 to 140 s per method.
    step_s_per_sample: float = 1.9 / 256
    score_s_per_sample: float = 1.3e-3  # generation score: generate + classify one sample
    gen_s_per_sample: float = 1.2e-3  # generating one sample for the utility CNN
    cnn_s_per_sample_epoch: float = 0.3e-3  # training the utility CNN, per sample and epoch
    source: str = "reference 2-core CPU"


def paper_base_samples(cfg: RunConfig, dom: DomainConfig) -> int:
    """The per-client sample cap of a domain at the preset's scale (the reference rule unless the preset sets one)."""
    sc = cfg.scenario
    return dom.samples_per_client if dom.samples_per_client is not None else sc.reference_train_size // sc.total_clients


def reduced_scenario(paper: RunConfig, clients_per_domain: int, samples_per_client: int) -> RunConfig:
    """The preset with at most `clients_per_domain` clients per domain, each capped at `samples_per_client` samples
    (never more than the preset's own cap)."""
    # dataclasses.replace keeps a user domain's path, format and test_fraction.
    doms = tuple(
        dataclasses.replace(
            d,
            clients=min(d.clients, clients_per_domain),
            samples_per_client=min(samples_per_client, paper_base_samples(paper, d)),
        )
        for d in paper.scenario.domains
    )
    return paper.replace(scenario=dataclasses.replace(paper.scenario, domains=doms))


def with_scale(cfg: RunConfig, scale: Scale) -> RunConfig:
    return cfg.with_fields_from(
        "train", scale, ("rounds", "local_epochs", "score_samples", "utility_samples", "utility_epochs")
    )


def scale_factors(paper: RunConfig, cfg: RunConfig, steps_per_round: int) -> list[dict[str, Any]]:
    """Rows (knob, paper, here, factor = here / paper) for the report."""
    pt, t = paper.train, cfg.train
    p_clients = [d.clients for d in paper.scenario.domains]
    h_clients = [d.clients for d in cfg.scenario.domains]
    p_cap = [paper_base_samples(paper, d) for d in paper.scenario.domains]
    h_cap = [paper_base_samples(cfg, d) for d in cfg.scenario.domains]
    p_spe = pt.steps_per_epoch or max(math.ceil(c / pt.batch_size) for c in p_cap)
    h_spe = steps_per_round // t.local_epochs
    p_steps = pt.rounds * pt.local_epochs * p_spe
    h_steps = t.rounds * steps_per_round

    def row(knob: str, p: Any, h: Any) -> dict[str, Any]:
        pv = p[0] if isinstance(p, list) and len(set(p)) == 1 else p
        hv = h[0] if isinstance(h, list) and len(set(h)) == 1 else h
        factor = (hv / pv) if isinstance(pv, int | float) and isinstance(hv, int | float) and pv else None
        return {"knob": knob, "paper": pv, "here": hv, "factor": factor}

    return [
        row("clients per domain", p_clients, h_clients),
        row("clients in all", paper.scenario.total_clients, cfg.scenario.total_clients),
        row("samples per client (cap)", p_cap, h_cap),
        row("rounds", pt.rounds, t.rounds),
        row("local epochs per round", pt.local_epochs, t.local_epochs),
        row("steps per epoch", p_spe, h_spe),
        row("training steps per method", p_steps, h_steps),
        row("batch size per client", pt.batch_size, t.batch_size),
        row("generation-score samples", pt.score_samples, t.score_samples),
        row("utility samples", pt.utility_samples, t.utility_samples),
        row("utility epochs", pt.utility_epochs, t.utility_epochs),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Cost estimate


def estimate_seconds(cfg: RunConfig, steps_per_round: int, name: str, c: CostConstants) -> dict[str, float]:
    """Estimated training and evaluation seconds of one method (see CostConstants)."""
    meth = method(name)
    tr = cfg.train
    n = cfg.scenario.total_clients
    doms = cfg.scenario.domains
    # Every method trains on n x batch samples per step (centralized: the domains' pooled batches together).
    train = tr.rounds * steps_per_round * n * tr.batch_size * c.step_s_per_sample
    models = meth.evaluated_models(cfg)
    per_round = tr.rounds * models * tr.score_samples * c.score_s_per_sample
    final = models * tr.utility_samples * (c.gen_s_per_sample + tr.utility_epochs * c.cnn_s_per_sample_epoch)
    if meth.is_split:
        final += len(doms) * tr.score_samples * c.score_s_per_sample  # the run's final summary scores again
    return {"train_s": train, "eval_s": per_round + final, "total_s": train + per_round + final}


def estimate_total_minutes(cfg: RunConfig, steps_per_round: int, methods: Sequence[str], c: CostConstants) -> float:
    return sum(estimate_seconds(cfg, steps_per_round, m, c)["total_s"] for m in methods) / 60


def calibrate(cfg: RunConfig, test_set: Any, log: Callable[[str], None] = print) -> CostConstants:
    """Measure the cost constants on this machine (seconds): two training steps on the whole federation's batch,
    generating 500 samples, and one epoch of the utility CNN on 1,000 generated samples."""
    from ..evaluation.metrics import sample_generator, utility_metrics
    from ..runtime.unsplit import UnsplitGAN
    from .baselines import frozen_generator

    dev = cfg.runtime.device

    def sync() -> None:
        if str(dev).startswith("cuda"):
            torch.cuda.synchronize()

    gan = UnsplitGAN(cfg, dev)
    b = cfg.scenario.total_clients * cfg.train.batch_size
    rng = torch.Generator().manual_seed(0)
    x = torch.rand(b, *cfg.model.image_shape, generator=rng) * 2 - 1
    y = torch.randint(0, cfg.model.num_classes, (b,), generator=rng)
    z = torch.randn(b, cfg.model.z_dim, generator=rng)
    gan.train_step(x, y, z)  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(2):
        gan.train_step(x, y, z)
    sync()
    step = (time.perf_counter() - t0) / 2 / b
    gen = frozen_generator(gan)
    t0 = time.perf_counter()
    sample_generator(gen, 500, generator=torch.Generator().manual_seed(0), z_dim=cfg.model.z_dim, device=dev)
    sync()
    gen_s = (time.perf_counter() - t0) / 500
    util = utility_metrics(gen, test_set, None, 1000, 1, seed=0, device=dev, z_dim=cfg.model.z_dim)
    cnn = util["train_s"] / 1000
    log(
        f"calibration: {step * 256:.2f} s per step of 256 samples, {gen_s * 1e3:.2f} ms per generated sample, "
        f"{cnn * 1e3:.3f} ms per utility sample-epoch"
    )
    # The split methods add the transport, clustering, aggregation and checkpoints to the unsplit step measured here:
    # a fifth more on the 2-core CPU (bench/embedded.py whole round 0.86 of unsplit, plus the per-round work).
    # The score also classifies each sample (a small CNN forward): about a tenth more than generating it.
    return CostConstants(step * 1.2, gen_s * 1.1, gen_s, cnn, f"measured here ({dev})")


def format_estimate(choice: dict[str, Any]) -> str:
    lines = [
        f"cost estimate ({choice['constants']['source']}):",
        f"  {'method':<14} {'train':>8} {'eval':>8} {'total':>8}",
    ]
    for m, e in choice["estimate_s"].items():
        lines.append(f"  {m:<14} {e['train_s'] / 60:7.1f}m {e['eval_s'] / 60:7.1f}m {e['total_s'] / 60:7.1f}m")
    lines.append(f"  {'all':<14} {'':>8} {'':>8} {choice['estimate_total_min']:7.1f}m")
    return "\n".join(lines)


def format_factors(rows: list[dict[str, Any]]) -> str:
    lines = [f"  {'knob':<28} {'paper':>10} {'here':>10} {'factor':>8}"]
    for r in rows:
        f = f"{r['factor']:.3g}" if r["factor"] is not None else "-"
        lines.append(f"  {r['knob']:<28} {str(r['paper']):>10} {str(r['here']):>10} {f:>8}")
    return "\n".join(lines)


__all__ = [
    "LADDER",
    "CostConstants",
    "Scale",
    "calibrate",
    "estimate_seconds",
    "estimate_total_minutes",
    "format_estimate",
    "format_factors",
    "paper_base_samples",
    "reduced_scenario",
    "scale_factors",
    "with_scale",
]
