"""`hfgan train`: check the inputs, load the data, run every role in this process, write the run directory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError, RunConfig
from ..model import CutBits
from ..model.precision import bfloat16_notice
from ..settings import check_run_id, redact_url
from . import checkpoint as ckpt
from .embedded import EmbeddedResult, EmbeddedRunner, Progress
from .recorder import RunRecorder, ensure_classifiers, same_run_marker, write_run_marker

if TYPE_CHECKING:
    from ..data import ScenarioData


def check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> int:
    """The round to resume from (0 for a new run); ConfigError if the directory holds something else."""
    marker = same_run_marker(run_dir, cfg)
    if marker is not None:
        if not resume:
            raise ConfigError(
                f"run directory {run_dir} already holds this run; pass --resume to continue it or "
                "choose another --run-dir"
            )
        rounds = ckpt.complete_rounds(run_dir)
        return rounds[-1] if rounds else 0
    if resume:
        raise ConfigError(f"nothing to resume in {run_dir} (no run there)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} is not empty and holds no hfgan run; choose another --run-dir")
    return 0


def modelled_latency(cfg: RunConfig, cuts: dict[int, CutBits]) -> float | None:
    from ..planning import iteration_latency, run_costs

    if not cuts:
        return None
    clients = sorted(cuts)
    profiles = cfg.devices.client_profiles(cfg.scenario.total_clients)
    return float(
        iteration_latency(
            run_costs(cfg), [profiles[c] for c in clients], cfg.devices.server, [tuple(cuts[c]) for c in clients]
        )
    )


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    allow_synthetic_fallback: bool = True,
    utility: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    aggregators: int = 1,
    classifier_epochs: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training run as `cfg` describes; returns summary.json's content."""
    from ..data import load_scenario_data

    rt = cfg.runtime
    if rt.torch_threads:
        torch.set_num_threads(rt.torch_threads)
    run_dir = Path(rt.run_dir)
    run_id = rt.run_id or run_dir.resolve().name
    check_run_id(run_id, " (--run-id)")
    # No log here: each substitution notice is logged once, below, with its NOTICE prefix. The model takes the
    # data's image shape and classes (a user dataset's), so the run's recorded config says what was trained.
    data = load_scenario_data(cfg, allow_synthetic_fallback=allow_synthetic_fallback, adopt_model_shape=True)
    if data.model != cfg.model:
        log(
            f"model: {data.model.image_size}x{data.model.image_size}x{data.model.channels}, "
            f"{data.model.num_classes} classes (from the data)"
        )
        cfg = cfg.replace(model=data.model)
    resume_round = check_run_dir(run_dir, cfg, resume)
    if resume and resume_round >= cfg.train.rounds:
        raise ConfigError(f"run {run_id} already finished its {cfg.train.rounds} rounds")
    for notice in data.notices:
        log(f"NOTICE: {notice}")
    if cfg.train.compute_dtype == "bfloat16":
        log(f"NOTICE: {bfloat16_notice(rt.device)}")
    classifiers = ensure_classifiers(
        cfg, data.train_sets, data.test_sets, data.sources, log=log, epochs=classifier_epochs
    )
    # Inputs are good: from here on the run directory is ours.
    if not resume:
        write_run_marker(run_dir, cfg, run_id)
    sizes = ", ".join(f"{c.n}" for c in data.clients)
    log(
        f"run {run_id}: {cfg.scenario.total_clients} clients ({sizes} samples), {cfg.train.rounds} rounds x "
        f"{cfg.train.local_epochs} local epochs, broker {redact_url(rt.broker_url)}, state {redact_url(rt.state_url)}"
        + (f", resuming after round {resume_round}" if resume_round else "")
    )
    recorder = RunRecorder(
        cfg, run_dir, test_sets=data.test_sets, classifiers=classifiers, log=log, resume_from=resume_round
    )
    domains = [s.domain for s in data.shards]
    runner = EmbeddedRunner(
        cfg,
        data.clients,
        domains,
        run_id=run_id,
        run_dir=run_dir,
        on_round_end=recorder.on_round_end,
        progress=Progress(cfg.train.rounds, enabled=progress),
        aggregators=aggregators,
        resume_round=resume_round or None,
        log=logging.getLogger("hfgan"),
    )
    recorder.traffic = lambda: sum(sum(r.bytes_sent.values()) for r in runner.roles)
    result: EmbeddedResult = runner.run()
    cuts = runner.coordinator.cuts
    latency = modelled_latency(cfg, cuts)
    extra = _summary_extra(run_id, cuts, result, data)
    if utility:
        log("final evaluation: generation score and utility metrics per domain ...")
    summary = recorder.finalize(modelled_latency_s=latency, bytes_sent=result.bytes_sent, utility=utility, extra=extra)
    return summary


def _summary_extra(run_id: str, cuts: dict[int, CutBits], result: EmbeddedResult, data: ScenarioData) -> dict[str, Any]:
    """What summary.json records besides the recorder's own metrics: the run's cuts, timings, traffic and data."""
    step_times = [r.server_metrics.get("window_s") for r in result.reports if r.server_metrics.get("window_s")]
    extra = {
        "run_id": run_id,
        "cuts": {str(c): str(b) for c, b in sorted(cuts.items())},
        "measured_step_s": sum(step_times) / len(step_times) if step_times else None,
        "round_wall_s": [round(r.wall_s, 3) for r in result.reports],
        "messages_sent": result.messages_sent,
        # Bytes each role sent, by message kind (the quality bench separates device-link traffic from the rest).
        "bytes_by_role": {name: dict(role.bytes_sent) for name, role in sorted(result.roles.items())},
        "data_sources": data.sources,
        "data_digests": data.digests,
        "notices": data.notices,
    }
    return extra
