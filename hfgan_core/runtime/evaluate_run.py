"""`hfgan eval --run-dir R`: evaluate a run's latest complete checkpoint (generation score and utility per domain)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, apply_env, load_config
from ..evaluation import EvalSettings, evaluate_generators, write_json_atomic
from ..model import CutBits
from . import checkpoint as ckpt
from .recorder import compose_generator, domain_clusters, ensure_classifiers, read_run_marker


def run_config(run_dir: Path) -> RunConfig:
    """The run's configuration as `hfgan train` recorded it in R/config.toml, runtime section included (so the
    evaluation reads the data directory the run was trained on); $HFGAN_* variables override as for `train`."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.toml")
    return apply_env(load_config(path))


def latest_models(
    run_dir: Path,
) -> tuple[RunConfig, int, dict[int, dict], dict | None, dict[int, int], dict[int, CutBits]]:
    rounds = ckpt.complete_rounds(run_dir)
    candidates = rounds or sorted(
        int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("round_*") if (p / "coordinator.pt").is_file()
    )
    if not candidates:
        raise ConfigError(f"no checkpoint in {run_dir}")
    rnd = candidates[-1]
    blob = ckpt.load_checkpoint(ckpt.round_dir(run_dir, rnd) / "coordinator.pt", role="coordinator")
    # The runtime section (data directory, devices) comes from the recorded config.toml; what was trained must be
    # the checkpoint's run.
    cfg = run_config(run_dir)
    if RunConfig.from_dict(blob["config"]).digest() != cfg.digest():
        raise ConfigError(f"{run_dir}/config.toml does not describe the run of its round {rnd} checkpoint")
    clusters, global_model, assignment, cuts = ckpt.models_from_checkpoint(blob)
    return cfg, rnd, clusters, global_model, assignment, cuts


def evaluate_run(
    run_dir: Path, *, utility: bool = True, data_dir: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from ..data import load_scenario_data

    if read_run_marker(run_dir) is None:
        raise ConfigError(f"{run_dir} holds no hfgan run")
    cfg, rnd, clusters, global_model, assignment, cuts = latest_models(run_dir)
    if not clusters:
        raise ConfigError(f"round {rnd} of {run_dir} has no aggregated model")
    if data_dir:
        cfg = cfg.with_overrides("runtime", data_dir=data_dir)
    # A stand-in dataset is acceptable only where the run itself trained on one (summary.json says which).
    sources = {}
    summary_path = Path(run_dir) / "summary.json"
    if summary_path.is_file():
        try:
            sources = json.loads(summary_path.read_text()).get("data_sources") or {}
        except ValueError:
            sources = {}
    allow = not sources or any(v == "synthetic" for v in sources.values())
    data = load_scenario_data(cfg, allow_synthetic_fallback=allow)
    for dom, src in data.sources.items():
        if src == "synthetic" and sources.get(dom, "synthetic") != "synthetic":
            raise ConfigError(
                f"{dom} was trained on real data but is not available in {cfg.runtime.data_dir}; "
                "pass the data directory of the run (HFGAN_DATA_DIR)"
            )
    for notice in data.notices:
        log(f"NOTICE: {notice}")
    classifiers = ensure_classifiers(cfg, data.train_sets, data.test_sets, data.sources, log=log)
    gens = {}
    for dom, (cluster, rep) in domain_clusters(cfg, assignment).items():
        gens[dom] = compose_generator(cfg, clusters[cluster], global_model, cuts[rep], cfg.runtime.device)
    results = evaluate_generators(
        gens, classifiers, data.test_sets, EvalSettings.from_config(cfg, utility=utility), log=log
    )
    out = {"round": rnd, "domains": results}
    write_json_atomic(run_dir / "eval.json", out)
    return out
