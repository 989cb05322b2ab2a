"""`hfgan bench quality`: HuSCF-GAN against its ablations and baselines on the same data, budget and seeds.

Methods (every one with the same data partition, seeds, rounds, local epochs, steps per epoch, batch size and Adam
settings, and the same evaluation settings and seeds):

    huscf          train() with the scenario config: planned cuts, clustering, KLD weighting (the paper's method)
    no_clustering  one KLD-weighted model (train.clustering = false: global KLD weights over all clients)
    size_only      clustering with n_k weights only (train.kld_weighting = false)
    same_cut       every client at the same cut: the uniform assignment with the lowest modelled latency
    centralized    per domain, one unsplit cGAN on the domain's pooled data (the upper bound; baselines.py)
    fedgan         every client trains the whole model, averaged over all clients every round (FedGAN-style)
    local_only     every client trains its own model on its own data, never averaging

The split methods run through `runtime.train.train` into `<out>/runs/<method>/` (metrics.jsonl, summary.json,
plots, per-round samples; the checkpoints are removed afterwards unless asked to keep them); the baselines write
the same shape there. Each method's result is saved as `<out>/runs/<method>/bench_result.json` when it finishes, so
re-running the same command skips finished methods; `--force` redoes them. `report.py` writes report.md/json.

Scale. Without `--paper-scale` the preset is reduced by explicit factors (2 clients per domain, at most 1,000
samples per client, 5 to 8 rounds, 2 or 3 local epochs, smaller evaluation sets), chosen from `LADDER` as the richest
setting whose cost estimate fits `--budget-min` (60 minutes by default) on the reference 2-core CPU; every factor
is printed and stored in the report. `--paper-scale` uses the preset unchanged (for a machine with a GPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, DomainConfig, RunConfig, apply_env, load_config
from ..evaluation import MetricsLog, save_class_grid, write_json_atomic

METHODS = ("huscf", "no_clustering", "size_only", "same_cut", "centralized", "fedgan", "local_only")
SPLIT_METHODS = ("huscf", "no_clustering", "size_only", "same_cut")
BENCH_VERSION = 1
RESULT_FILE = "bench_result.json"
BENCH_FILE = "bench.json"

METHOD_DESCRIPTIONS = {
    "huscf": "HuSCF-GAN as configured: planned heterogeneous cuts, KMeans clustering, KLD-weighted averaging",
    "no_clustering": "ablation: no clustering, one model averaged with global KLD weights over all clients",
    "size_only": "ablation: clustering on, weights n_k / sum n within clusters (no KLD weighting)",
    "same_cut": "ablation: every client at the same cut (the uniform assignment with the lowest modelled latency)",
    "centralized": "baseline (upper bound): per domain, one unsplit cGAN on the domain's pooled client data",
    "fedgan": "baseline: FedGAN-style, every client trains the whole model, one global average every round",
    "local_only": "baseline: every client trains its own model on its own data, never averaging",
}


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


@dataclass(frozen=True)
class BenchSettings:
    """Everything `hfgan bench quality` takes (None: the scale's or the preset's value)."""

    config: str
    out: str
    data_dir: str | None = None
    methods: tuple[str, ...] = METHODS
    paper_scale: bool = False
    clients_per_domain: int | None = None
    samples_per_client: int | None = None
    rounds: int | None = None
    local_epochs: int | None = None
    steps_per_epoch: int | None = None
    score_samples: int | None = None
    utility_samples: int | None = None
    utility_epochs: int | None = None
    budget_min: float = 60.0
    device: str | None = None
    seed: int | None = None
    threads: int | None = None
    force: bool = False
    allow_synthetic: bool = False
    keep_checkpoints: bool = False
    classifier_epochs: int | None = None
    calibrate: bool = False
    estimate_only: bool = False
    progress: bool = True
    command: str = ""

    def validate(self) -> BenchSettings:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
        if not self.methods:
            raise ConfigError("--methods: no method given")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("--methods: a method is listed twice")
        for name in (
            "clients_per_domain",
            "samples_per_client",
            "rounds",
            "local_epochs",
            "steps_per_epoch",
            "score_samples",
            "utility_samples",
            "threads",
            "classifier_epochs",
        ):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.utility_epochs is not None and self.utility_epochs < 0:
            raise ConfigError("--utility-epochs must not be negative")
        if not self.budget_min > 0:
            raise ConfigError("--budget-min must be positive")
        return self


def paper_base_samples(cfg: RunConfig, dom: DomainConfig) -> int:
    """The per-client sample cap of a domain at the preset's scale (the reference rule unless the preset sets one)."""
    sc = cfg.scenario
    return dom.samples_per_client if dom.samples_per_client is not None else sc.reference_train_size // sc.total_clients


def reduced_scenario(paper: RunConfig, clients_per_domain: int, samples_per_client: int) -> RunConfig:
    """The preset with at most `clients_per_domain` clients per domain, each capped at `samples_per_client` samples
    (never more than the preset's own cap)."""
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
    return cfg.with_overrides(
        "train",
        rounds=scale.rounds,
        local_epochs=scale.local_epochs,
        score_samples=scale.score_samples,
        utility_samples=scale.utility_samples,
        utility_epochs=scale.utility_epochs,
    )


def with_explicit(cfg: RunConfig, s: BenchSettings) -> RunConfig:
    return cfg.with_overrides(
        "train",
        rounds=s.rounds,
        local_epochs=s.local_epochs,
        steps_per_epoch=s.steps_per_epoch,
        score_samples=s.score_samples,
        utility_samples=s.utility_samples,
        utility_epochs=s.utility_epochs,
        seed=s.seed,
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
# Cuts and modelled latency


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


LATENCY_FORMULAS = {
    "split": "the paper's iteration-latency model (planning.iteration_latency) for the method's cut bits",
    "fedgan": "max_i W / s_i: every client runs the whole model (W = full-model GFLOPs of one iteration at batch "
    "64, D counted 3 times) on its own device; no per-iteration traffic, a model exchange per round",
    "local_only": "max_i W / s_i, as fedgan, with no exchange at all",
    "centralized": "N x W / S: the server runs the whole model for all N clients' batches at its speed S",
}


def baseline_latency(cfg: RunConfig, method: str, model_bytes: int | None = None) -> dict[str, Any]:
    """Modelled seconds per iteration of a baseline, from the same cost table and profiles as the split methods."""
    n = cfg.scenario.total_clients
    profiles = cfg.devices.client_profiles(n)
    server = cfg.devices.server
    w = full_model_gflops(cfg)
    out: dict[str, Any] = {"formula": LATENCY_FORMULAS[method], "full_model_gflops": w}
    if method in ("fedgan", "local_only"):
        out["latency_s"] = max(w / p.gflops for p in profiles)
        if method == "fedgan" and model_bytes:
            # Upload of the client's model and download of the average over the client's link, once per round.
            out["round_exchange_s"] = max(2 * model_bytes / p.data_rate for p in profiles)
    elif method == "centralized":
        out["latency_s"] = n * w / (server.computational_frequency_ghz * server.cpu_cycles_per_flop)
    else:
        raise ValueError(method)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Cost estimate


def estimate_seconds(cfg: RunConfig, steps_per_round: int, method: str, c: CostConstants) -> dict[str, float]:
    """Estimated training and evaluation seconds of one method (see CostConstants)."""
    tr = cfg.train
    n = cfg.scenario.total_clients
    doms = cfg.scenario.domains
    # Every method trains on n x batch samples per step (centralized: the domains' pooled batches together).
    train = tr.rounds * steps_per_round * n * tr.batch_size * c.step_s_per_sample
    models = sum(d.clients for d in doms) if method == "local_only" else len(doms)
    per_round = tr.rounds * models * tr.score_samples * c.score_s_per_sample
    final = models * tr.utility_samples * (c.gen_s_per_sample + tr.utility_epochs * c.cnn_s_per_sample_epoch)
    if method in SPLIT_METHODS:
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
    x = torch.rand(b, 1, 28, 28, generator=rng) * 2 - 1
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


# ----------------------------------------------------------------------------------------------------------------
# Results on disk


def bench_digest(cfg: RunConfig) -> str:
    """What makes two benches comparable: the whole reduced (or paper-scale) run config without its runtime section,
    rounds and evaluation sizes included (RunConfig.digest leaves those out)."""
    blob = json.dumps(
        {"bench": "quality", "version": BENCH_VERSION, "config": cfg.to_dict(include_runtime=False)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_result(out: Path, method: str, digest: str) -> dict[str, Any] | None:
    res = read_json(out / "runs" / method / RESULT_FILE)
    if res is not None and res.get("digest") == digest and res.get("method") == method:
        return res
    return None


def prepare_out_dir(out: Path, digest: str, force: bool) -> None:
    """Claim `out` for this bench: new, or holding this bench. A bench with other settings is an error unless
    `force` (then its runs and report are removed)."""
    marker = read_json(out / BENCH_FILE)
    if marker is None:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} is not empty and holds no quality bench; choose another --out")
        return
    if marker.get("digest") != digest:
        if not force:
            other = str(marker.get("digest"))[:12]
            raise ConfigError(
                f"{out} holds a quality bench with other settings (digest {other}); pass --force to "
                "replace it or choose another --out"
            )
        for name in ("runs", "samples", "plots"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("report.md", "report.json"):
            (out / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Split methods (through train())

# Messages that travel from the server side to a device: split replies, model assignments, round control.
TO_DEVICE_KINDS = {
    "server": ("g_mid_out", "d_mid_out", "d_mid_grad", "g_mid_grad", "step_dropped"),
    "aggregator": ("model_assignment",),
    "coordinator": ("round_start", "round_close", "run_end"),
}


def device_link_bytes(bytes_by_role: dict[str, dict[str, int]]) -> int:
    """Bytes over the devices' links: everything the clients send plus what the server side sends to them (the
    coordinator's round control also goes to the server; it is counted whole, a few hundred bytes per round)."""
    total = 0
    for name, kinds in bytes_by_role.items():
        role = name.split(".")[0]
        if role == "client":
            total += sum(int(v) for v in kinds.values())
        else:
            total += sum(int(v) for k, v in kinds.items() if k in TO_DEVICE_KINDS.get(role, ()))
    return total


def split_method_config(cfg: RunConfig, method: str) -> RunConfig:
    if method == "huscf":
        return cfg
    if method == "no_clustering":
        return cfg.with_overrides("train", clustering=False)
    if method == "size_only":
        return cfg.with_overrides("train", kld_weighting=False)
    if method == "same_cut":
        bits, _, _ = best_uniform_cut(cfg)
        return cfg.with_overrides("train", cuts=(bits,))
    raise ValueError(f"not a split method: {method}")


def run_split_method(
    cfg: RunConfig, method: str, out: Path, settings: BenchSettings, log: Callable[[str], None]
) -> dict[str, Any]:
    from ..runtime.evaluate_run import latest_models
    from ..runtime.recorder import compose_generator, domain_clusters
    from ..runtime.train import train

    run_dir = out / "runs" / method
    mcfg = split_method_config(cfg, method)
    mcfg = mcfg.with_overrides(
        "runtime",
        run_dir=str(run_dir),
        run_id=f"bench-{cfg.scenario.name}-{method}",
        broker_url="memory://",
        state_url="memory://",
    ).validate()
    t0 = time.perf_counter()
    summary = train(
        mcfg,
        utility=True,
        allow_synthetic_fallback=settings.allow_synthetic,
        progress=settings.progress,
        log=lambda s: log(f"[{method}] {s}"),
        classifier_epochs=settings.classifier_epochs,
    )
    total = time.perf_counter() - t0
    records = MetricsLog.read(run_dir / "metrics.jsonl")
    history: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for d, s in (rec.get("generation_score") or {}).items():
            history.setdefault(d, []).append((int(rec["round"]), float(s)))
    train_s = float(sum(summary.get("round_wall_s") or []))
    rounds = int(summary.get("rounds") or mcfg.train.rounds)
    samples: dict[str, str] = {}
    _, _, clusters, global_model, assignment, cuts = latest_models(run_dir)
    for d, (cluster, rep) in domain_clusters(mcfg, assignment).items():
        gen = compose_generator(mcfg, clusters[cluster], global_model, cuts[rep], mcfg.runtime.device)
        path = out / "samples" / f"{method}_{d}.png"
        save_class_grid(
            gen,
            path,
            seed=mcfg.train.seed,
            z_dim=mcfg.model.z_dim,
            num_classes=mcfg.model.num_classes,
            device=mcfg.runtime.device,
        )
        samples[d] = str(path.relative_to(out))
    if not settings.keep_checkpoints:
        # Checkpoints are tens of MB per round: evidence directories keep the metrics, summaries and images.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    by_role = summary.get("bytes_by_role")
    device_bytes = device_link_bytes(by_role) if by_role else int(summary["bytes_sent"])
    domains = {}
    for d, entry in summary["domains"].items():
        domains[d] = {
            "generation_score": entry["generation_score"],
            "classifier_frechet_distance": entry.get("classifier_frechet_distance"),
            "history": history.get(d, []),
            "utility": entry.get("utility", {}),
            "cluster": entry.get("cluster"),
        }
    return {
        "method": method,
        "kind": "split",
        "rounds": rounds,
        "steps_per_round": None,  # filled by the caller (the same rule for every method)
        "domains": domains,
        "wall_train_s": round(train_s, 3),
        "wall_eval_s": round(total - train_s, 3),
        "wall_s": round(total, 3),
        "bytes_sent": device_bytes,
        "bytes_per_round": device_bytes / max(1, rounds),
        "bytes_all_roles": int(summary["bytes_sent"]),
        "bytes_by_role": by_role,
        "modelled_latency_s": summary.get("modelled_latency_s"),
        "latency_formula": LATENCY_FORMULAS["split"],
        "cuts": summary.get("cuts", {}),
        "clusters": [{"round": int(r["round"]), "clusters": r.get("clusters", {})} for r in records],
        "measured_step_s": summary.get("measured_step_s"),
        "messages_sent": summary.get("messages_sent"),
        "samples": samples,
        "train_config": {
            k: v
            for k, v in mcfg.to_dict()["train"].items()
            if k in ("clustering", "kld_weighting", "cuts", "clusters", "alpha", "kld_from_round")
        },
    }


def run_baseline_method(
    cfg: RunConfig, method: str, out: Path, data: Any, classifiers: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    from .baselines import BaselineContext, run_baseline

    run_dir = out / "runs" / method
    ctx = BaselineContext(cfg, data, classifiers, run_dir, out / "samples", log=log)
    res = run_baseline(ctx, method).result
    lat = baseline_latency(cfg, method, res["model_bytes"])
    samples = {d: f"samples/{method}_{d}.png" for d in cfg.scenario.domain_names}
    return {
        "kind": "baseline",
        **res,
        "bytes_per_round": res["bytes_sent"] / max(1, res["rounds"]),
        "modelled_latency_s": lat["latency_s"],
        "latency_formula": lat["formula"],
        "latency": lat,
        "samples": samples,
    }


# ----------------------------------------------------------------------------------------------------------------
# The bench


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def plan_config(
    settings: BenchSettings, base_cfg: RunConfig | None, log: Callable[[str], None]
) -> tuple[RunConfig, RunConfig, Any, int, dict[str, Any]]:
    """(paper config, bench config, scenario data, steps per round, scale choice) for these settings."""
    from ..data import load_scenario_data
    from .baselines import steps_per_round

    paper = base_cfg if base_cfg is not None else apply_env(load_config(settings.config))
    paper = paper.with_overrides(
        "runtime", data_dir=settings.data_dir, device=settings.device, server_device=settings.device
    )
    if settings.paper_scale:
        cfg = paper
        if settings.clients_per_domain or settings.samples_per_client:
            cfg = reduced_scenario(paper, settings.clients_per_domain or 10**9, settings.samples_per_client or 10**9)
    else:
        cfg = reduced_scenario(
            paper,
            settings.clients_per_domain or LADDER[0].clients_per_domain,
            settings.samples_per_client or LADDER[0].samples_per_client,
        )
    cfg = cfg.validate()
    data = load_scenario_data(cfg, allow_synthetic_fallback=settings.allow_synthetic, log=log)
    consts = CostConstants()
    choice: dict[str, Any] = {"paper_scale": settings.paper_scale, "budget_min": settings.budget_min}
    # The built-in constants describe the reference CPU; on a GPU they would be far off, so measure there.
    if settings.calibrate or str(cfg.runtime.device).startswith("cuda"):
        consts = calibrate(cfg, data.test_sets[cfg.scenario.domain_names[0]], log=log)
    if settings.paper_scale:
        cfg = with_explicit(cfg, settings).validate()
        choice["ladder"] = None
    else:
        chosen = None
        for i, scale in enumerate(LADDER):
            cand = with_explicit(with_scale(cfg, scale), settings).validate()
            spr = steps_per_round(cand, [c.n for c in data.clients])
            if estimate_total_minutes(cand, spr, settings.methods, consts) <= settings.budget_min:
                chosen = (i, cand)
                break
        if chosen is None:
            i = len(LADDER) - 1
            chosen = (i, with_explicit(with_scale(cfg, LADDER[i]), settings).validate())
            log(f"NOTICE: even the smallest reduced scale is estimated above the {settings.budget_min:g} min budget")
        choice["ladder"] = chosen[0]
        choice["scale"] = dataclasses.asdict(LADDER[chosen[0]])
        cfg = chosen[1]
    spr = steps_per_round(cfg, [c.n for c in data.clients])
    choice["constants"] = dataclasses.asdict(consts)
    choice["estimate_s"] = {m: estimate_seconds(cfg, spr, m, consts) for m in settings.methods}
    choice["estimate_total_min"] = estimate_total_minutes(cfg, spr, settings.methods, consts)
    return paper, cfg, data, spr, choice


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


def run_bench(
    settings: BenchSettings, base_cfg: RunConfig | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or continue) a quality bench; returns the report's JSON content (or the plan with `estimate_only`)."""
    from ..runtime.recorder import classifier_facts, ensure_classifiers
    from .report import write_report

    settings = settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    paper, cfg, data, spr, choice = plan_config(settings, base_cfg, log)
    factors = scale_factors(paper, cfg, spr)
    digest = bench_digest(cfg)
    out = Path(settings.out)
    scale_name = "paper scale" if settings.paper_scale else "reduced scale"
    log(
        f"quality bench: scenario {cfg.scenario.name} at {scale_name}, methods {', '.join(settings.methods)}, "
        f"{spr} steps per round, out {out}"
    )
    log("scale factors:\n" + format_factors(factors))
    log(format_estimate(choice))
    for notice in data.notices:
        log(f"NOTICE: {notice}")
    plan = {
        "config": cfg.to_dict(),
        "digest": digest,
        "scale_factors": factors,
        "scale_choice": choice,
        "steps_per_round": spr,
    }
    if settings.estimate_only:
        return plan
    prepare_out_dir(out, digest, settings.force)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / BENCH_FILE,
        {
            "bench": "quality",
            "version": BENCH_VERSION,
            "digest": digest,
            "scenario": cfg.scenario.name,
            "paper_scale": settings.paper_scale,
            "command": settings.command,
            "config": cfg.to_dict(),
        },
    )
    classifiers = ensure_classifiers(
        cfg, data.train_sets, data.test_sets, data.sources, log=log, epochs=settings.classifier_epochs
    )
    results: dict[str, dict[str, Any]] = {}
    for method in settings.methods:
        done = None if settings.force else finished_result(out, method, digest)
        if done is not None:
            log(f"[{method}] finished earlier: skipping (--force redoes it)")
            results[method] = done
            continue
        run_dir = out / "runs" / method
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt, or --force
        for old in (out / "samples").glob(f"{method}_*.png"):
            old.unlink()
        log(f"[{method}] {METHOD_DESCRIPTIONS[method]}")
        t0 = time.perf_counter()
        if method in SPLIT_METHODS:
            res = run_split_method(cfg, method, out, settings, log)
        else:
            res = run_baseline_method(cfg, method, out, data, classifiers, log)
        res["steps_per_round"] = spr
        res["digest"] = digest
        res["method"] = method
        res["estimate_s"] = choice["estimate_s"][method]
        res["bench_wall_s"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(run_dir / RESULT_FILE, res)
        results[method] = read_json(run_dir / RESULT_FILE) or res  # as plain JSON, the same as a skipped method's
        log(f"[{method}] done in {res['bench_wall_s'] / 60:.1f} min")
    # Methods finished by earlier invocations with other --methods belong in the report too.
    for method in METHODS:
        if method not in results:
            done = finished_result(out, method, digest)
            if done is not None:
                results[method] = done
    ordered = {m: results[m] for m in METHODS if m in results}
    report = write_report(
        out,
        cfg=cfg,
        paper=paper,
        data=data,
        results=ordered,
        factors=factors,
        choice=choice,
        settings=settings,
        machine={**machine_info(cfg.runtime.device), "scoring_classifiers": classifier_facts(cfg, data.sources)},
        digest=digest,
    )
    log(f"report: {out / 'report.md'}")
    return report


__all__ = [
    "BENCH_VERSION",
    "LADDER",
    "LATENCY_FORMULAS",
    "METHODS",
    "METHOD_DESCRIPTIONS",
    "SPLIT_METHODS",
    "BenchSettings",
    "CostConstants",
    "Scale",
    "baseline_latency",
    "bench_digest",
    "best_uniform_cut",
    "estimate_seconds",
    "estimate_total_minutes",
    "full_model_gflops",
    "reduced_scenario",
    "run_bench",
    "scale_factors",
    "split_method_config",
]
