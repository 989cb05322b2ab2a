"""What a run leaves in its run directory, and the per-round evaluation that feeds it.

    R/config.toml        the run's configuration          R/metrics.jsonl  one JSON object per round (+ metrics.csv)
    R/summary.json       final per-domain scores          R/samples/       a sample grid per cluster and round
    R/plots/             generation score per round       R/checkpoints/   per-round checkpoints (checkpoint.py)

Each domain is evaluated with the model of its cluster (the cluster holding most of its clients): the layers a
representative client of that cluster holds come from the cluster's average, the rest from the global model the
server loads — exactly the generator that client would use after the round.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, RunConfig, dump_toml
from ..evaluation import (
    EvalSettings,
    MetricsLog,
    evaluate_generators,
    plot_scores,
    save_class_grid,
    write_json_atomic,
)
from ..evaluation.classifiers import (
    classifier_path,
    data_digest,
    fit_classifiers,
    load_classifier,
    read_classifier_record,
)
from ..model import CutBits, architecture, build_networks
from ..model.split import run_blocks
from ..settings import Settings
from .coordinator import RoundReport

RUN_MARKER = "hfgan-run.json"


def compose_generator(
    cfg: RunConfig,
    cluster_model: dict[str, torch.Tensor],
    global_model: dict[str, torch.Tensor] | None,
    cuts: CutBits,
    device: str = "cpu",
):
    """A `generate(labels, z)` callable (eval mode, no grad) for a client with `cuts` after the round."""
    arch = architecture(cfg.model)
    spec = arch.generator
    blocks = {i: b.to(device) for i, b in enumerate(build_networks(cfg.model, 0)["G"])}
    own = set(spec.client_blocks(cuts.g_head, cuts.g_tail))
    for i, block in blocks.items():
        source = cluster_model if (i in own or global_model is None) else global_model
        prefix = f"G.{i}."
        block.load_state_dict({k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}, strict=True)
        block.eval()

    @torch.no_grad()
    def generate(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return run_blocks(blocks, range(len(blocks)), z.to(device), labels.to(device))

    return generate


def domain_clusters(cfg: RunConfig, assignment: dict[int, int]) -> dict[str, tuple[int, int]]:
    """For each domain: (its cluster = the cluster of most of its clients, a representative client in it)."""
    out: dict[str, tuple[int, int]] = {}
    domains = cfg.scenario.client_domains()
    for d, dom in enumerate(cfg.scenario.domains):
        clients = [c for c, dd in enumerate(domains) if dd == d]
        counts = Counter(assignment.get(c, 0) for c in clients)
        cluster = min(counts, key=lambda k: (-counts[k], k))
        out[dom.dataset] = (cluster, min(c for c in clients if assignment.get(c, 0) == cluster))
    return out


class RunRecorder:
    """Evaluates each round and writes the run directory. Used by the coordinator's `on_round_end` hook."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        test_sets: dict[str, Any],
        classifiers: dict[str, torch.nn.Module],
        log: Callable[[str], None] = print,
        resume_from: int = 0,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.test_sets = test_sets
        self.classifiers = classifiers
        self.log = log
        self.metrics = MetricsLog(self.run_dir)
        if resume_from:
            self.metrics.drop_after(resume_from)
        self.scores: dict[str, list[tuple[int, float]]] = {}
        for rec in self.metrics.records:
            for dom, s in (rec.get("generation_score") or {}).items():
                self.scores.setdefault(dom, []).append((int(rec["round"]), float(s)))
        self.last_models: (
            tuple[
                dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None, dict[int, int], dict[int, CutBits]
            ]
            | None
        ) = None
        self.t0 = time.perf_counter()
        self.settings = EvalSettings.from_config(cfg, utility=False)
        # Each domain's real-test-set features under its scoring classifier (the Fréchet distance's reference).
        self.real_stats: dict[str, Any] = {}
        # Bytes sent by every role so far, when the runtime can tell (for TensorBoard); set by the runtime.
        self.traffic: Callable[[], int] | None = None
        self.tensorboard = None
        if cfg.runtime.tensorboard_dir:
            from .tensorboard import TensorBoardLog

            self.tensorboard = TensorBoardLog(cfg.runtime.tensorboard_dir)

    def generators(self, report_models, global_model, assignment, cuts) -> dict[str, Any]:
        gens = {}
        for dom, (cluster, rep) in domain_clusters(self.cfg, assignment).items():
            if cluster in report_models:
                gens[dom] = compose_generator(
                    self.cfg, report_models[cluster], global_model, cuts[rep], self.cfg.runtime.device
                )
        return gens

    def on_round_end(self, report: RoundReport) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "arrived": report.arrived,
            "dropped": {str(c): r for c, r in report.dropped.items()},
            "late": {str(c): n for c, n in report.late.items() if n},
            "aggregated": report.aggregated,
            "digests": {str(k): v for k, v in report.digests.items()},
        }
        losses: dict[str, list[float]] = {}
        for m in report.client_metrics.values():
            for k in ("d_loss_real", "d_loss_fake", "g_loss", "step_s"):
                if k in m:
                    losses.setdefault(k, []).append(m[k])
        entry["train"] = {k: sum(v) / len(v) for k, v in losses.items()}
        entry.update(self._per_domain(report))
        if report.kld_intra:
            entry["kld_intra"] = {str(c): v for c, v in report.kld_intra.items()}
        if report.aggregated and report.cluster_models:
            self.last_models = (report.cluster_models, report.global_model, dict(report.assignment), dict(report.cuts))
            r, every = report.round, self.cfg.train.eval_every
            if r % every == 0 or r == self.cfg.train.rounds:
                gens = self.generators(report.cluster_models, report.global_model, report.assignment, report.cuts)
                results = evaluate_generators(
                    gens, self.classifiers, self.test_sets, self.settings, real_stats=self.real_stats
                )
                entry["generation_score"] = {d: res["generation_score"] for d, res in results.items()}
                fds = {
                    d: res["classifier_frechet_distance"]
                    for d, res in results.items()
                    if "classifier_frechet_distance" in res
                }
                if fds:
                    entry["classifier_frechet_distance"] = fds
                for d, res in results.items():
                    self.scores.setdefault(d, []).append((r, res["generation_score"]))
                self._samples(report)
                plot_scores(self.scores, self.run_dir / "plots" / "generation_score.png")
        record = {
            "round": report.round,
            "wall_s": round(report.wall_s, 3),
            "clusters": {str(c): k for c, k in sorted(report.assignment.items())},
            **entry,
        }
        self.metrics.append(record)
        if self.tensorboard is not None:
            self._to_tensorboard(record, report)
        scores = record.get("generation_score")
        if scores:
            fds = record.get("classifier_frechet_distance", {})
            self.log(
                f"round {report.round}: "
                + ", ".join(f"{d} score {s:.2f}" + (f" FD {fds[d]:.1f}" if d in fds else "") for d, s in scores.items())
                + f" | clusters {_fmt_clusters(report.assignment)} | {report.wall_s:.1f} s"
            )
        return {k: record[k] for k in ("generation_score",) if k in record}

    def _per_domain(self, report: RoundReport) -> dict[str, Any]:
        """Mean losses per domain and each client's mean step time (the dashboard's curves and table)."""
        names, domains = self.cfg.scenario.domain_names, self.cfg.scenario.client_domains()
        by_domain: dict[str, dict[str, list[float]]] = {}
        for c, m in sorted(report.client_metrics.items()):
            if 0 <= c < len(domains):
                for k in ("d_loss_real", "d_loss_fake", "g_loss"):
                    if k in m:
                        by_domain.setdefault(names[domains[c]], {}).setdefault(k, []).append(m[k])
        return {
            "train_by_domain": {d: {k: sum(v) / len(v) for k, v in ks.items()} for d, ks in by_domain.items()},
            "step_s": {str(c): m["step_s"] for c, m in sorted(report.client_metrics.items()) if "step_s" in m},
        }

    def _to_tensorboard(self, record: dict[str, Any], report: RoundReport) -> None:
        from .train import modelled_latency

        samples = {}
        if "generation_score" in record:  # the rounds whose sample grids were drawn
            for k in report.cluster_models:
                path = self.run_dir / "samples" / f"round_{report.round:03d}_cluster_{k}.png"
                if path.is_file():
                    samples[k] = path
        self.tensorboard.round(
            record,
            samples,
            latency_s=modelled_latency(self.cfg, report.cuts),
            bytes_sent=self.traffic() if self.traffic is not None else None,
        )

    def _samples(self, report: RoundReport) -> None:
        reps: dict[int, int] = {}
        for c, k in sorted(report.assignment.items()):
            reps.setdefault(k, c)
        for k, model in sorted(report.cluster_models.items()):
            if k not in reps:
                continue
            gen = compose_generator(self.cfg, model, report.global_model, report.cuts[reps[k]], self.cfg.runtime.device)
            save_class_grid(
                gen,
                self.run_dir / "samples" / f"round_{report.round:03d}_cluster_{k}.png",
                seed=self.cfg.train.seed,
                z_dim=self.cfg.model.z_dim,
            )

    def finalize(
        self,
        *,
        modelled_latency_s: float | None,
        bytes_sent: int,
        utility: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """summary.json: per domain the final generation score and (if `utility`) the utility metrics."""
        domains: dict[str, Any] = {}
        if self.last_models is not None:
            models, global_model, assignment, cuts = self.last_models
            gens = self.generators(models, global_model, assignment, cuts)
            settings = EvalSettings.from_config(self.cfg, utility=utility)
            results = evaluate_generators(
                gens, self.classifiers, self.test_sets, settings, log=self.log, real_stats=self.real_stats
            )
            for d, res in results.items():
                domains[d] = {
                    "generation_score": res["generation_score"],
                    **{k: res[k] for k in ("classifier_frechet_distance",) if k in res},
                    "cluster": domain_clusters(self.cfg, assignment)[d][0],
                }
                if "utility" in res:
                    domains[d]["utility"] = {
                        k: res["utility"][k]
                        for k in ("accuracy", "precision", "recall", "f1", "fpr", "n_samples", "epochs")
                        if k in res["utility"]
                    }
        summary = {
            "rounds": len(self.metrics.records),
            "domains": domains,
            "modelled_latency_s": modelled_latency_s,
            "wall_s": round(time.perf_counter() - self.t0, 3),
            "bytes_sent": int(bytes_sent),
            **(extra or {}),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.tensorboard is not None:
            self.tensorboard.final(summary["rounds"], domains)
            self.tensorboard.close()
        return summary


def _fmt_clusters(assignment: dict[int, int]) -> str:
    groups: dict[int, list[int]] = {}
    for c, k in sorted(assignment.items()):
        groups.setdefault(k, []).append(c)
    return " ".join("{" + ",".join(map(str, v)) + "}" for _, v in sorted(groups.items()))


def classifier_dir(data_dir: str | Path) -> Path:
    """`<data_dir>/classifiers`, or a per-user cache when the data directory is read-only (a shared data set)."""
    env = Settings.from_env()
    override = env.classifier_dir
    if override:
        return Path(override)
    preferred = classifier_path(data_dir, "x").parent
    probe = preferred if preferred.exists() else Path(data_dir)
    # The mode bits, not os.access: root may write anywhere, but a directory marked read-only is not ours to fill.
    if not probe.exists() or probe.stat().st_mode & stat.S_IWUSR:
        return preferred
    cache = Path(env.cache_dir or Path.home() / ".cache" / "hfgan")
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    return cache / "classifiers" / digest


def ensure_classifiers(
    cfg: RunConfig,
    train_sets: dict[str, Any],
    test_sets: dict[str, Any],
    sources: dict[str, str],
    log: Callable[[str], None] = print,
    epochs: int | None = None,
) -> dict[str, torch.nn.Module]:
    """Load each domain's scoring classifier, fitting (and caching) it when missing or fitted on other data."""
    out: dict[str, torch.nn.Module] = {}
    for dom in cfg.scenario.domains:
        name = dom.dataset
        stored_as, path = classifier_file(cfg, name, sources)
        train = train_sets[name]
        digest = data_digest(train.images, train.labels)
        fresh = False
        if path.is_file():
            try:
                fresh = read_classifier_record(path, stored_as).get("data_digest") == digest
            except Exception:
                fresh = False
        if not fresh:
            log(f"fitting the {stored_as} scoring classifier (cached in {path}) ...")
            kwargs = {"epochs": epochs} if epochs else {}
            # The scoring classifier is the measuring instrument, not part of the run: it is fitted with the fixed
            # default seed, as `hfgan eval fit-classifiers` does, so runs with different training seeds are scored
            # by the same classifier.
            fit_classifiers({stored_as: (train, test_sets[name])}, path.parent, log=log, **kwargs)
        out[name] = load_classifier(path, stored_as, device=cfg.runtime.device)
    return out


def classifier_file(cfg: RunConfig, dataset: str, sources: dict[str, str]) -> tuple[str, Path]:
    """(name stored as, path) of a domain's cached scoring classifier."""
    # A synthetic stand-in is a different data set per domain (its own variant): one cached classifier each, named
    # like its data set, so that two stand-ins in one scenario do not overwrite each other's file.
    synthetic = sources.get(dataset) == "synthetic" and dataset != "synthetic"
    stored_as = f"synthetic-for-{dataset}" if synthetic else dataset
    return stored_as, classifier_dir(cfg.runtime.data_dir) / f"{stored_as}.pt"


def classifier_facts(cfg: RunConfig, sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What identifies each domain's scoring classifier (test accuracy, seed, epochs, file digest), for reports."""
    facts: dict[str, dict[str, Any]] = {}
    for name in cfg.scenario.domain_names:
        stored_as, path = classifier_file(cfg, name, sources)
        record = read_classifier_record(path, stored_as)
        facts[name] = {
            "test_accuracy": float(record["test_accuracy"]),
            "seed": record.get("seed"),
            "epochs": record.get("epochs"),
            "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    return facts


def write_run_marker(run_dir: Path, cfg: RunConfig, run_id: str) -> None:
    """Identify the run a directory holds (a different run must not reuse it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_MARKER, {"run_id": run_id, "digest": cfg.digest(), "created": time.time()})
    (run_dir / "config.toml").write_text(dump_toml(cfg.redacted()))


def same_run_marker(run_dir: Path, cfg: RunConfig, hint: str = "choose another --run-dir") -> dict[str, Any] | None:
    """The directory's run marker if it holds this run, None if it holds none; ConfigError for a different run."""
    marker = read_run_marker(run_dir)
    if marker is not None and marker.get("digest") != cfg.digest():
        raise ConfigError(
            f"run directory {run_dir} already holds a different run (config digest "
            f"{str(marker.get('digest'))[:12]}); {hint}"
        )
    return marker


def read_run_marker(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / RUN_MARKER
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None
