"""The coordinator as a worker process: its run directory, its leader lease, where a new leader takes the run up,
and the run's end (summary.json). `serve_coordinator` is the coordinator's `serve` in the role registry (roles.py);
services.py's module docstring describes what each role's process does.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..settings import redact_url
from . import checkpoint as ckpt
from .services import ALLOWED_IN_NEW_RUN_DIR, _check_shared, _context, _round_info
from .worker import (
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_OK,
    StopFlag,
    WorkerExit,
    WorkerLoop,
    WorkerSettings,
    close_quietly,
    open_broker,
    open_state,
    owner_id,
)

log = logging.getLogger("hfgan.worker")


def check_coordinator_run_dir(run_dir: Path, cfg: RunConfig, known_in_ledger: bool) -> str:
    """ "new" (an empty directory, or one holding only logs/), "resume" (this run); ConfigError otherwise."""
    from .recorder import same_run_marker

    marker = same_run_marker(run_dir, cfg, "choose another run directory")
    if marker is not None:
        if marker.get("run_id") not in (None, cfg.runtime.run_id):
            raise ConfigError(f"run directory {run_dir} holds run {marker.get('run_id')!r}, not {cfg.runtime.run_id!r}")
        return "resume"
    if known_in_ledger:
        raise ConfigError(
            f"run {cfg.runtime.run_id!r} already exists in the state store but {run_dir} does not hold "
            "it; choose another run id, or point --run-dir at the run's directory"
        )
    if run_dir.exists() and any(p.name not in ALLOWED_IN_NEW_RUN_DIR for p in run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} is not empty and holds no hfgan run; choose another one")
    return "new"


class Lease:
    """The coordinator's leader lease in the ledger."""

    ROLE = "coordinator"

    def __init__(self, store, run: str, owner: str, settings: WorkerSettings):
        self.store, self.run, self.owner, self.settings = store, run, owner, settings
        self.held = False

    def acquire(self, stop: StopFlag, standby_ok: bool) -> bool:
        """Take the lease, waiting as standby as allowed; False if stopped first, WorkerExit if not allowed."""
        s = self.settings
        give_up = time.monotonic() + s.lease_ttl_s + s.heartbeat_s
        announced = False
        while not stop.requested:
            if self.store.acquire_leader(self.run, self.ROLE, self.owner, s.lease_ttl_s):
                self.held = True
                return True
            if not announced:
                log.info(
                    "coordinator: another coordinator leads run %s; %s",
                    self.run,
                    "waiting as its standby"
                    if standby_ok
                    else f"waiting up to {s.lease_ttl_s + s.heartbeat_s:.0f} s for its lease to expire",
                )
                announced = True
            if not standby_ok and time.monotonic() > give_up:
                raise WorkerExit(
                    EXIT_CONFIG, f"another coordinator leads run {self.run} (pass --standby-ok to wait as its standby)"
                )
            self.store.heartbeat(self.run, f"coordinator.standby.{self.owner}", s.heartbeat_ttl_s, "standby")
            stop.sleep(min(s.heartbeat_s, 1.0))
        return False

    def renew(self) -> None:
        if not self.store.acquire_leader(self.run, self.ROLE, self.owner, self.settings.lease_ttl_s):
            self.held = False
            raise WorkerExit(EXIT_INTERNAL, f"lost the coordinator lease of run {self.run} to another coordinator")

    def release(self) -> None:
        if self.held:
            self.store.release_leader(self.run, self.ROLE, self.owner)
            self.held = False


_LOGGED_EVENTS = (
    "admitting",
    "admitted",
    "started",
    "closing",
    "aggregating",
    "done",
    "finished",
    "resumed",
    "skipped",
    "replanned",
)


def _say(line: str) -> None:
    log.info("coordinator: %s", line)


def _log_event(event: str, detail: dict[str, Any]) -> None:
    if event in _LOGGED_EVENTS:
        rest = " ".join(f"{k}={v}" for k, v in detail.items() if k != "round")
        log.info("coordinator: round %s %s %s", detail.get("round"), event, rest)


@dataclass
class _Resume:
    """Where a leading coordinator takes the run up: the ledger's view, the run directory's, the checkpoint."""

    info: dict[str, Any] | None
    mode: str  # "new" or "resume" (check_coordinator_run_dir)
    resume_from: int
    blob: dict[str, Any] | None


def _where_to_resume(store, run_id: str, cfg: RunConfig, run_dir: Path) -> _Resume | None:
    """The run's state for a new leader (None: the run already finished); writes a new run's marker."""
    from ..evaluation import MetricsLog
    from .recorder import write_run_marker

    info = store.run_info(run_id)
    mode = check_coordinator_run_dir(run_dir, cfg, info is not None)
    if info is not None and info.get("digest") != cfg.digest():
        raise ConfigError(f"run {run_id!r} exists in the state store with a different configuration")
    if info is not None and info.get("status") == "finished":
        log.info("coordinator: run %s already finished", run_id)
        return None
    if mode == "new":
        write_run_marker(run_dir, cfg, run_id)
    r, phase = store.get_round(run_id) if info is not None else (0, "admitting")
    resume_from = (r if phase == "done" else max(r - 1, 0)) if info is not None else 0
    blob = None
    if mode == "resume" and info is None:
        done = ckpt.complete_rounds(run_dir)
        resume_from = done[-1] if done else 0
    if resume_from:
        path = ckpt.round_dir(run_dir, resume_from) / "coordinator.pt"
        if path.is_file():
            blob = ckpt.load_checkpoint(path, role="coordinator")
    if info is not None or mode == "resume":
        MetricsLog(run_dir).drop_after(resume_from)  # records of a round that is being redone
    return _Resume(info, mode, resume_from, blob)


def _coordinator_role(cfg: RunConfig, run_id: str, transport, store, recorder, resume: _Resume, slot_ttl_s: float):
    from .coordinator import CoordinatorRole
    from .embedded import make_planner

    if resume.blob is not None and resume.blob["extra"].get("aggregated", True):
        # The models the final evaluation uses until a round ends in this process.
        recorder.last_models = ckpt.models_from_checkpoint(resume.blob)
    planner, replanner = make_planner(cfg) if cfg.train.cuts == "plan" else (None, None)
    role = CoordinatorRole(
        _context(cfg, run_id, transport, store),
        run_dir=Path(cfg.runtime.run_dir),
        on_round_end=recorder.on_round_end,
        on_event=_log_event,
        planner=planner,
        replanner=replanner,
        slot_ttl_s=slot_ttl_s,
    )
    if resume.info is not None:
        # A run stopped on purpose gets its round deadline again; after a crash the deadline continues.
        role.resume_from_ledger(resume.blob, restart_deadline=resume.info.get("status") == "stopped")
    elif resume.blob is not None:
        role.restore(resume.blob)  # the ledger lost the run: carry on from the checkpoint, as `train --resume`
        log.info("coordinator: resuming run %s from the checkpoint of round %d", run_id, resume.resume_from)
    return role


def serve_coordinator(opts, cfg, run_id, settings, stop) -> int:
    """The coordinator as a worker process (services.py's module docstring)."""
    from ..data import load_scenario_data
    from .recorder import RunRecorder, ensure_classifiers

    rt = cfg.runtime
    _check_shared(cfg)
    store = open_state(rt.state_url, settings)
    transport = None
    lease = Lease(store, run_id, owner_id(), settings)
    try:
        # The slow part first (a standby is then ready the moment it takes over).
        data = load_scenario_data(cfg, allow_synthetic_fallback=opts.allow_fallback)
        for notice in data.notices:
            log.warning("coordinator: NOTICE: %s", notice)
        classifiers = ensure_classifiers(cfg, data.train_sets, data.test_sets, data.sources, log=_say)
        if not lease.acquire(stop, opts.standby_ok):
            return EXIT_OK
        log.info("coordinator: leading run %s as %s", run_id, lease.owner)
        # The broker only now: a standby holds no idle connection (and no consumer) while it waits.
        transport = open_broker(rt.broker_url, settings, "coordinator")
        resume = _where_to_resume(store, run_id, cfg, Path(rt.run_dir))
        if resume is None:
            return EXIT_OK
        recorder = RunRecorder(
            cfg,
            Path(rt.run_dir),
            test_sets=data.test_sets,
            classifiers=classifiers,
            log=_say,
            resume_from=resume.resume_from,
        )
        role = _coordinator_role(cfg, run_id, transport, store, recorder, resume, settings.heartbeat_ttl_s)
        recorder.traffic = lambda: ledger_traffic(store, run_id)[0] + sum(role.bytes_sent.values())
        sizes = ", ".join(str(len(s.indices)) for s in data.shards)
        log.info(
            "coordinator: run %s: %d clients (%s samples), %d rounds, broker %s, state %s",
            *(run_id, cfg.scenario.total_clients, sizes, cfg.train.rounds),
            *(redact_url(rt.broker_url), redact_url(rt.state_url)),
        )
        info = lambda: f"leader {lease.owner} {_round_info(role)}"  # noqa: E731
        reason = WorkerLoop(role, settings, stop, info=info, on_beat=lease.renew, watch_run_status=False).run()
        if reason != "finished":
            if role.phase != "finished":
                store.set_status(run_id, "stopped")
            log.info("coordinator: stopped in round %d (%s)", role.round, role.phase)
            return EXIT_OK
        _await_client_farewells(role, transport, settings, stop)
        lease.release()
        close_quietly(transport)
        transport = None
        _finish(cfg, store, run_id, recorder, role, data, utility=opts.utility)
        return EXIT_OK
    finally:
        try:
            lease.release()
        except Exception as exc:  # the lease expires by itself
            log.debug("release_leader: %s", exc)
        close_quietly(transport, store)


def _await_client_farewells(role, transport, settings, stop) -> None:
    """Clients send their final traffic numbers in the heartbeat they send as they exit, after the run's end reached
    them; the coordinator keeps reading them (bounded by the heartbeat TTL, past which a silent client counts as
    gone) so that the ledger's traffic, and summary.json's bytes, hold every client's last messages."""
    until = time.monotonic() + settings.heartbeat_ttl_s
    while set(role.members) - role.clients_exited and time.monotonic() < until and not stop.requested:
        transport.process(timeout=settings.poll_s)
    missing = sorted(set(role.members) - role.clients_exited)
    if missing:
        log.info("coordinator: no farewell from client(s) %s; their last traffic report stands", missing)


def _finish(cfg: RunConfig, store, run_id: str, recorder, role, data, *, utility: bool) -> None:
    from .train import modelled_latency

    latency = modelled_latency(cfg, role.cuts)
    summary = finalize_run(cfg, store, run_id, recorder, role, data, utility=utility, latency=latency)
    scores = ", ".join(f"{d}: score {v.get('generation_score', math.nan):.3f}" for d, v in summary["domains"].items())
    log.info(
        "coordinator: run %s finished; summary in %s (%s)", run_id, Path(cfg.runtime.run_dir) / "summary.json", scores
    )


def finalize_run(
    cfg: RunConfig, store, run_id: str, recorder, role, data, *, utility: bool, latency: float | None
) -> dict[str, Any]:
    """summary.json as `hfgan train` writes it, with what the ledger knows of the whole run."""
    rounds = range(1, role.round + 1)
    window_s = []
    for r in rounds:
        server = store.get_metrics(run_id, r).get("server", {})
        if server.get("window_s"):
            window_s.append(server["window_s"])
    bytes_sent, messages = ledger_traffic(store, run_id)
    bytes_sent += sum(role.bytes_sent.values())  # the coordinator's own, reported at its exit otherwise
    extra = {
        "run_id": run_id,
        "cuts": {str(c): str(b) for c, b in sorted(role.cuts.items())},
        "measured_step_s": sum(window_s) / len(window_s) if window_s else None,
        "round_wall_s": [rec.get("wall_s") for rec in recorder.metrics.records],
        "messages_sent": messages + sum(role.messages_sent.values()),
        "data_sources": data.sources,
        "data_digests": data.digests,
        "notices": data.notices,
        "runtime": "workers",
    }
    if utility:
        log.info("coordinator: final evaluation: generation score and utility metrics per domain ...")
    return recorder.finalize(modelled_latency_s=latency, bytes_sent=bytes_sent, utility=utility, extra=extra)


def ledger_traffic(store, run_id: str) -> tuple[int, int]:
    """(bytes, messages) the workers reported sending so far (`traffic.<role>`, worker.py)."""
    traffic = store.get_metrics(run_id, 0)
    bytes_sent = sum(int(m.get("bytes_sent", 0)) for who, m in traffic.items() if who.startswith("traffic."))
    messages = sum(int(m.get("messages_sent", 0)) for who, m in traffic.items() if who.startswith("traffic."))
    return bytes_sent, messages
