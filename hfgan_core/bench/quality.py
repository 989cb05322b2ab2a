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

The methods are the entries of `methods.REGISTRY` (adding one is one entry there). The split methods run through
`runtime.train.train` into `<out>/runs/<method>/` (metrics.jsonl, summary.json,
plots, per-round samples; the checkpoints are removed afterwards unless asked to keep them); the baselines write
the same shape there. Each method's result is saved as `<out>/runs/<method>/bench_result.json` when it finishes, so
re-running the same command skips finished methods; `--force` redoes them. `report.py` writes report.md/json.

Scale. Without `--paper-scale` the preset is reduced by explicit factors (2 clients per domain, at most 1,000
samples per client, 5 to 8 rounds, 2 or 3 local epochs, smaller evaluation sets), chosen from `LADDER` as the richest
setting whose cost estimate fits `--budget-min` (60 minutes by default) on the reference 2-core CPU; every factor
is printed and stored in the report (scale.py). `--paper-scale` uses the preset unchanged (for a machine with a GPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import roles
from ..config import ConfigError, RunConfig, apply_env, load_config
from ..evaluation import MetricsLog, save_class_grid, write_json_atomic
from .methods import (
    METHODS,
    SPLIT_LATENCY,
    SPLIT_METHODS,
    SplitTraining,
    baseline_latency,
    best_uniform_cut,
    full_model_gflops,
    method,
)
from .scale import (
    LADDER,
    CostConstants,
    Scale,
    calibrate,
    estimate_seconds,
    estimate_total_minutes,
    format_estimate,
    format_factors,
    paper_base_samples,
    reduced_scenario,
    scale_factors,
    with_scale,
)

BENCH_VERSION = 1
RESULT_FILE = "bench_result.json"
BENCH_FILE = "bench.json"


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


_TRAIN_SETTINGS = (
    "rounds", "local_epochs", "steps_per_epoch", "score_samples", "utility_samples", "utility_epochs", "seed"
)  # fmt: skip


def with_explicit(cfg: RunConfig, s: BenchSettings) -> RunConfig:
    return cfg.with_fields_from("train", s, _TRAIN_SETTINGS)


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


def device_link_bytes(bytes_by_role: dict[str, dict[str, int]]) -> int:
    """Bytes over the devices' links: everything the clients send plus what the other roles send to them (split
    replies, model assignments, round control), as the role registry's authorization table lists them. The
    coordinator's round control also goes to the server; it is counted whole, a few hundred bytes per round."""
    to_client: dict[str, set[str]] = {}
    for kind, by_sender in roles.table().items():
        for sender, receivers in by_sender.items():
            if "client" in receivers:
                to_client.setdefault(sender, set()).add(kind)
    total = 0
    for name, kinds in bytes_by_role.items():
        role = name.split(".")[0]
        if role == "client":
            total += sum(int(v) for v in kinds.values())
        else:
            total += sum(int(v) for k, v in kinds.items() if k in to_client.get(role, ()))
    return total


def split_method_config(cfg: RunConfig, name: str) -> RunConfig:
    training = method(name).training
    if not isinstance(training, SplitTraining):
        raise ValueError(f"not a split method: {name}")
    return training.configure(cfg)


def run_split_method(
    cfg: RunConfig, method: str, out: Path, settings: BenchSettings, log: Callable[[str], None]
) -> dict[str, Any]:
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
    samples = _split_samples(mcfg, method, run_dir, out)
    if not settings.keep_checkpoints:
        # Checkpoints are tens of MB per round: evidence directories keep the metrics, summaries and images.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return _split_result(mcfg, method, summary, records, total, samples)


def _split_samples(mcfg: RunConfig, method: str, run_dir: Path, out: Path) -> dict[str, str]:
    """A class grid per domain from the cluster model that serves it, after the last round."""
    from ..runtime.evaluate_run import latest_models
    from ..runtime.recorder import compose_generator, domain_clusters

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
    return samples


def _split_result(
    mcfg: RunConfig,
    method: str,
    summary: dict[str, Any],
    records: list[dict[str, Any]],
    total: float,
    samples: dict[str, str],
) -> dict[str, Any]:
    """A split run's summary and metrics in the bench's common result shape."""
    history: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for d, s in (rec.get("generation_score") or {}).items():
            history.setdefault(d, []).append((int(rec["round"]), float(s)))
    train_s = float(sum(summary.get("round_wall_s") or []))
    rounds = int(summary.get("rounds") or mcfg.train.rounds)
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
        "latency_formula": SPLIT_LATENCY.formula,
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


def run_bench(
    settings: BenchSettings, base_cfg: RunConfig | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or continue) a quality bench; returns the report's JSON content (or the plan with `estimate_only`)."""
    from ..runtime.recorder import classifier_facts
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
    results = run_methods(settings, cfg, data, spr, choice, digest, log)
    report = write_report(
        out,
        cfg=cfg,
        paper=paper,
        data=data,
        results=results,
        factors=factors,
        choice=choice,
        settings=settings,
        machine={**machine_info(cfg.runtime.device), "scoring_classifiers": classifier_facts(cfg, data.sources)},
        digest=digest,
    )
    log(f"report: {out / 'report.md'}")
    return report


def run_methods(
    settings: BenchSettings,
    cfg: RunConfig,
    data: Any,
    spr: int,
    choice: dict[str, Any],
    digest: str,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Run the settings' methods (skipping finished ones); every finished method's result, in registry order."""
    from ..runtime.recorder import ensure_classifiers

    out = Path(settings.out)
    classifiers = ensure_classifiers(
        cfg, data.train_sets, data.test_sets, data.sources, log=log, epochs=settings.classifier_epochs
    )
    results: dict[str, dict[str, Any]] = {}
    for name in settings.methods:
        done = None if settings.force else finished_result(out, name, digest)
        if done is not None:
            log(f"[{name}] finished earlier: skipping (--force redoes it)")
            results[name] = done
            continue
        run_dir = out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt, or --force
        for old in (out / "samples").glob(f"{name}_*.png"):
            old.unlink()
        log(f"[{name}] {method(name).description}")
        t0 = time.perf_counter()
        if method(name).is_split:
            res = run_split_method(cfg, name, out, settings, log)
        else:
            res = run_baseline_method(cfg, name, out, data, classifiers, log)
        res["steps_per_round"] = spr
        res["digest"] = digest
        res["method"] = name
        res["estimate_s"] = choice["estimate_s"][name]
        res["bench_wall_s"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(run_dir / RESULT_FILE, res)
        results[name] = read_json(run_dir / RESULT_FILE) or res  # as plain JSON, the same as a skipped method's
        log(f"[{name}] done in {res['bench_wall_s'] / 60:.1f} min")
    # Methods finished by earlier invocations with other --methods belong in the report too.
    for name in METHODS:
        if name not in results:
            done = finished_result(out, name, digest)
            if done is not None:
                results[name] = done
    return {m: results[m] for m in METHODS if m in results}


__all__ = [
    "BENCH_VERSION",
    "LADDER",
    "METHODS",
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
    "paper_base_samples",
    "reduced_scenario",
    "run_bench",
    "run_methods",
    "scale_factors",
    "split_method_config",
    "with_scale",
]
