"""Each role as a process of its own: settings, identity, restart and resume. `workers/<role>.py` parse the flags
and call `serve(WorkerOptions)`; the loop itself is worker.py's.

Settings: flags win over the environment (HFGAN_CONFIG, HFGAN_RUN_ID, HFGAN_BROKER_URL, HFGAN_STATE_URL,
HFGAN_DATA_DIR, HFGAN_RUN_DIR, HFGAN_DEVICE), which wins over the config file's `[runtime]`. The run id is
required, or derived from the run directory's name when one is given (as `hfgan train` does).

Per role:

- coordinator: loads the scenario's test sets and scoring classifiers, then takes the run's leader lease
  (`acquire_leader(run, "coordinator")`). A coordinator that finds the lease held waits one lease TTL (the holder may
  be a crashed predecessor whose lease is running out) and then exits 2, unless `--standby-ok`: then it waits as a
  hot standby for as long as it takes. The leader renews the lease with every heartbeat and exits 1 if it ever lost
  it. It owns the run directory: a new run needs an empty one (a `logs/` folder is allowed) and gets the run marker;
  a directory that holds this run is resumed: from the ledger when it knows the run (ledger.py), else from the last
  complete checkpoint. At the end it writes summary.json (RunRecorder.finalize) and exits 0.
- server: restores `server.pt` of the last round it completed and, if a round is in training, rejoins it
  (`ServerRole.resume_round`); the window in flight at a crash is lost (clients time the step out).
- client (client_worker.py): never opens the ledger. Without `--client` it gets a slot from the coordinator over the
  broker (kept by its heartbeat over the broker; a client that finds every slot taken waits as a spare). The slot is
  its identity, data shard, domain and device profile; `{slot}` in the broker URL is replaced by it (per-client
  broker users: `amqp://client-{slot}:client-{slot}-dev@host:5672/%2F`). It restores its last checkpoint; the
  coordinator sends a rejoining client its round's start again.
- clustering, aggregator: stateless; an aggregator recomputes any job it gets from the update log.

Test hook (off unless set; for fault-injection tests only): `HFGAN_TEST_AGGREGATOR_HOLD=<round>:<seconds>` makes an
aggregator pause that long with each job of that round in hand, after recording its digest and before answering
(aggregator.py), so that a test can kill it mid-job.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, apply_env, load_config
from ..settings import Settings, check_run_id, redact_url
from . import checkpoint as ckpt
from . import ledger
from .host import RoleContext
from .worker import (
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_OK,
    StopFlag,
    WorkerExit,
    WorkerLoop,
    WorkerSettings,
    check_shared,
    classify,
    close_quietly,
    open_backends,
    open_broker,
    open_state,
    owner_id,
)

ROLES = ("coordinator", "server", "clustering", "aggregator", "client")
ALLOWED_IN_NEW_RUN_DIR = {"logs"}
log = logging.getLogger("hfgan.worker")


@dataclass(frozen=True)
class WorkerOptions:
    role: str
    config: str | None = None
    run_id: str | None = None
    broker: str | None = None
    state: str | None = None
    data_dir: str | None = None
    run_dir: str | None = None
    device: str | None = None
    client: int | None = None  # client: a fixed client index instead of a claimed slot
    index: int | None = None  # aggregator: its index (names it aggregator.<index>)
    standby_ok: bool = False  # coordinator: wait as standby while another coordinator leads
    utility: bool = True  # coordinator: the final utility metrics in summary.json
    allow_fallback: bool = True  # synthetic stand-ins for missing datasets (as `hfgan train`)
    threads: int | None = None


# ------------------------------------------------------------------------------------------------ settings
def resolve(opts: WorkerOptions, environ: Mapping[str, str] | None = None) -> tuple[RunConfig, str]:
    """The worker's config (file, then environment, then flags) and run id; ConfigError when unusable."""
    env = Settings.from_env(environ)
    source = opts.config or env.config
    if not source:
        raise ConfigError("no configuration: pass --config PRESET_OR_TOML or set HFGAN_CONFIG")
    cfg = apply_env(load_config(source), environ)
    cfg = cfg.with_overrides(
        "runtime",
        run_id=opts.run_id,
        broker_url=opts.broker,
        state_url=opts.state,
        data_dir=opts.data_dir,
        run_dir=opts.run_dir,
        device=opts.device,
        torch_threads=opts.threads,
    ).validate()
    run_id = cfg.runtime.run_id
    if not run_id:
        if not (opts.run_dir or env.run_dir):
            raise ConfigError(
                "no run id: pass --run-id (HFGAN_RUN_ID), or --run-dir (HFGAN_RUN_DIR) to name the run "
                "after its directory"
            )
        run_id = Path(cfg.runtime.run_dir).resolve().name
    check_run_id(run_id)
    return cfg.with_overrides("runtime", run_id=run_id), run_id


def setup_logging(role: str, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s")
    for noisy in ("pika", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve(opts: WorkerOptions, settings: WorkerSettings | None = None) -> int:
    """Run one role as this process until it is done; returns the exit code (worker.EXIT_*)."""
    if opts.role not in ROLES:
        log.error("unknown role %r (known: %s)", opts.role, ", ".join(ROLES))
        return EXIT_CONFIG
    stop = StopFlag().install()
    try:
        settings = settings or WorkerSettings.from_env()
        cfg, run_id = resolve(opts)
        if cfg.runtime.torch_threads:
            import torch

            torch.set_num_threads(cfg.runtime.torch_threads)
        return _SERVE[opts.role](opts, cfg, run_id, settings, stop)
    except Exception as exc:
        code = classify(exc)
        if code == EXIT_INTERNAL and not isinstance(exc, WorkerExit):
            log.exception("%s: internal error", opts.role)
        log.error(
            "%s: exiting with code %d: %s",
            opts.role,
            code,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return code
    finally:
        stop.restore()


def _context(cfg: RunConfig, run_id: str, transport, store) -> RoleContext:
    return RoleContext(run=run_id, cfg=cfg, transport=transport, store=store, log=logging.getLogger("hfgan"))


def _round_info(role) -> str:
    return f"round {getattr(role, 'round', 0)} {getattr(role, 'phase', '')}".strip()


# ------------------------------------------------------------------------------------------ simple roles
def _serve_clustering(opts, cfg, run_id, settings, stop) -> int:
    from .clustering import ClusteringRole

    transport, store = open_backends(cfg.runtime.broker_url, cfg.runtime.state_url, settings, "clustering")
    try:
        role = ClusteringRole(_context(cfg, run_id, transport, store))
        loop = WorkerLoop(role, settings, stop, info=lambda: f"{role.results} result(s)")
        log.info("clustering: %s", loop.run())
        return EXIT_OK
    finally:
        close_quietly(transport, store)


def _serve_aggregator(opts, cfg, run_id, settings, stop) -> int:
    from .aggregator import AggregatorRole

    name = f"aggregator.{opts.index}" if opts.index is not None else f"aggregator.{owner_id()}"
    transport, store = open_backends(cfg.runtime.broker_url, cfg.runtime.state_url, settings, name)
    try:
        role = AggregatorRole(_context(cfg, run_id, transport, store), opts.index or 0)
        role.name = name
        role.hold = _test_hold(Settings.from_env().test_aggregator_hold or "")
        loop = WorkerLoop(role, settings, stop, info=lambda: f"{role.jobs_done} job(s)")
        log.info("%s: %s", name, loop.run())
        return EXIT_OK
    finally:
        close_quietly(transport, store)


def _test_hold(value: str) -> tuple[int, float] | None:
    """`<round>:<seconds>` of HFGAN_TEST_AGGREGATOR_HOLD (module docstring), or None when unset."""
    if not value:
        return None
    try:
        r, seconds = value.split(":")
        hold = (int(r), float(seconds))
    except ValueError:
        raise ConfigError(f"HFGAN_TEST_AGGREGATOR_HOLD={value!r}: expected <round>:<seconds>") from None
    log.warning("aggregator: test hook: jobs of round %d are held %.1f s before they are answered", *hold)
    return hold


# ------------------------------------------------------------------------------------------------- server
def latest_checkpoint(run_dir: str | Path, name: str, max_round: int) -> tuple[int, Path] | None:
    """(round, path) of the newest `checkpoints/round_N/<name>` with N <= max_round."""
    base = Path(run_dir) / "checkpoints"
    best = None
    if base.is_dir():
        for d in base.glob("round_*"):
            try:
                n = int(d.name.split("_", 1)[1])
            except ValueError:
                continue
            if n <= max_round and (d / name).is_file() and (best is None or n > best[0]):
                best = (n, d / name)
    return best


def resume_server(role, store, run: str, run_dir: str | Path) -> None:
    """Put a (re)started server back where the run is (module docstring)."""
    r, phase = store.get_round(run)
    if r == 0:
        return
    latest = latest_checkpoint(run_dir, "server.pt", r - 1 if phase == "training" else r)
    if latest is not None:
        role.restore(ckpt.load_checkpoint(latest[1], role="server"))
        log.info("server: restored %s (round %d)", latest[1], latest[0])
    elif r > 1:
        log.warning(
            "server: no checkpoint of an earlier round in %s; the server's layers restart from their initial values",
            run_dir,
        )
    if phase == "training":
        docs = ledger.RoundDocs.read(store, run, r)
        if docs.start is not None:
            start = ledger.round_start_from_doc(run, r, docs.start)
            role.round = min(role.round, r - 1)
            role.resume_round(start, set(docs.done))
            log.info("server: rejoined round %d (%d client(s) already done)", r, len(docs.done))


def _serve_server(opts, cfg, run_id, settings, stop) -> int:
    from .server import ServerRole

    transport, store = open_backends(cfg.runtime.broker_url, cfg.runtime.state_url, settings, "server")
    try:
        role = ServerRole(
            _context(cfg, run_id, transport, store),
            device=cfg.runtime.resolved_server_device,
            run_dir=cfg.runtime.run_dir,
        )
        resume_server(role, store, run_id, cfg.runtime.run_dir)

        def info() -> str:
            return f"round {role.round} {'training' if role.in_round else 'idle'} windows {role.windows_run}"

        loop = WorkerLoop(role, settings, stop, info=info)
        log.info("server: %s", loop.run())
        return EXIT_OK
    finally:
        close_quietly(transport, store)


# ------------------------------------------------------------------------------------------------- client
def _serve_client(opts, cfg, run_id, settings, stop) -> int:
    from .client_worker import serve_client  # clients reach the coordinator over the broker only, never Redis

    return serve_client(opts, cfg, run_id, settings, stop, owner_id())


def _check_shared(cfg: RunConfig) -> None:
    check_shared("broker", cfg.runtime.broker_url)
    check_shared("state", cfg.runtime.state_url)


# -------------------------------------------------------------------------------------------- coordinator
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


def _serve_coordinator(opts, cfg, run_id, settings, stop) -> int:
    from ..data import load_scenario_data
    from ..evaluation import MetricsLog
    from .coordinator import CoordinatorRole, RoundReport
    from .embedded import make_planner
    from .recorder import RunRecorder, ensure_classifiers, write_run_marker
    from .train import modelled_latency

    rt = cfg.runtime
    run_dir = Path(rt.run_dir)
    _check_shared(cfg)
    store = open_state(rt.state_url, settings)
    transport = None
    lease = Lease(store, run_id, owner_id(), settings)
    try:

        def say(line: str) -> None:
            log.info("coordinator: %s", line)

        # The slow part first (a standby is then ready the moment it takes over).
        data = load_scenario_data(cfg, allow_synthetic_fallback=opts.allow_fallback)
        for notice in data.notices:
            log.warning("coordinator: NOTICE: %s", notice)
        classifiers = ensure_classifiers(cfg, data.train_sets, data.test_sets, data.sources, log=say)
        if not lease.acquire(stop, opts.standby_ok):
            return EXIT_OK
        log.info("coordinator: leading run %s as %s", run_id, lease.owner)
        # The broker only now: a standby holds no idle connection (and no consumer) while it waits.
        transport = open_broker(rt.broker_url, settings, "coordinator")

        info = store.run_info(run_id)
        mode = check_coordinator_run_dir(run_dir, cfg, info is not None)
        if info is not None and info.get("digest") != cfg.digest():
            raise ConfigError(f"run {run_id!r} exists in the state store with a different configuration")
        if info is not None and info.get("status") == "finished":
            log.info("coordinator: run %s already finished", run_id)
            return EXIT_OK
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
        recorder = RunRecorder(
            cfg, run_dir, test_sets=data.test_sets, classifiers=classifiers, log=say, resume_from=resume_from
        )
        if blob is not None and blob["extra"].get("aggregated", True):
            # The models the final evaluation uses until a round ends in this process.
            recorder.last_models = ckpt.models_from_checkpoint(blob)
        planner, replanner = make_planner(cfg) if cfg.train.cuts == "plan" else (None, None)

        def on_round_end(report: RoundReport):
            return recorder.on_round_end(report)

        def on_event(event: str, detail: dict[str, Any]) -> None:
            if event in (
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
            ):
                log.info(
                    "coordinator: round %s %s %s",
                    detail.get("round"),
                    event,
                    " ".join(f"{k}={v}" for k, v in detail.items() if k != "round"),
                )

        ctx = _context(cfg, run_id, transport, store)
        role = CoordinatorRole(
            ctx,
            run_dir=run_dir,
            on_round_end=on_round_end,
            on_event=on_event,
            planner=planner,
            replanner=replanner,
            slot_ttl_s=settings.heartbeat_ttl_s,
        )
        if info is not None:
            # A run stopped on purpose gets its round deadline again; after a crash the deadline continues.
            role.resume_from_ledger(blob, restart_deadline=info.get("status") == "stopped")
        elif blob is not None:
            role.restore(blob)  # the ledger lost the run: carry on from the checkpoint, as `train --resume`
            log.info("coordinator: resuming run %s from the checkpoint of round %d", run_id, resume_from)
        sizes = ", ".join(str(len(s.indices)) for s in data.shards)
        log.info(
            "coordinator: run %s: %d clients (%s samples), %d rounds, broker %s, state %s",
            run_id,
            cfg.scenario.total_clients,
            sizes,
            cfg.train.rounds,
            redact_url(rt.broker_url),
            redact_url(rt.state_url),
        )

        loop = WorkerLoop(
            role,
            settings,
            stop,
            info=lambda: f"leader {lease.owner} {_round_info(role)}",
            on_beat=lease.renew,
            watch_run_status=False,
        )
        reason = loop.run()
        if reason != "finished":
            if role.phase != "finished":
                store.set_status(run_id, "stopped")
            log.info("coordinator: stopped in round %d (%s)", role.round, role.phase)
            return EXIT_OK
        lease.release()
        close_quietly(transport)
        transport = None
        summary = finalize_run(
            cfg, store, run_id, recorder, role, data, utility=opts.utility, latency=modelled_latency(cfg, role.cuts)
        )
        log.info(
            "coordinator: run %s finished; summary in %s (%s)",
            run_id,
            run_dir / "summary.json",
            ", ".join(f"{d}: score {v.get('generation_score', math.nan):.3f}" for d, v in summary["domains"].items()),
        )
        return EXIT_OK
    finally:
        try:
            lease.release()
        except Exception as exc:  # the lease expires by itself
            log.debug("release_leader: %s", exc)
        close_quietly(transport, store)


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
    traffic = store.get_metrics(run_id, 0)
    bytes_sent = sum(int(m.get("bytes_sent", 0)) for who, m in traffic.items() if who.startswith("traffic."))
    messages = sum(int(m.get("messages_sent", 0)) for who, m in traffic.items() if who.startswith("traffic."))
    bytes_sent += sum(role.bytes_sent.values())  # the coordinator's own, reported at its exit otherwise
    extra = {
        "run_id": run_id,
        "cuts": {str(c): str(b) for c, b in sorted(role.cuts.items())},
        "measured_step_s": sum(window_s) / len(window_s) if window_s else None,
        "round_wall_s": [rec.get("wall_s") for rec in recorder.metrics.records],
        "messages_sent": messages + sum(role.messages_sent.values()),
        "data_sources": data.sources,
        "notices": data.notices,
        "runtime": "workers",
    }
    if utility:
        log.info("coordinator: final evaluation: generation score and utility metrics per domain ...")
    return recorder.finalize(modelled_latency_s=latency, bytes_sent=bytes_sent, utility=utility, extra=extra)


_SERVE = {
    "coordinator": _serve_coordinator,
    "server": _serve_server,
    "clustering": _serve_clustering,
    "aggregator": _serve_aggregator,
    "client": _serve_client,
}


def options_from_args(role: str, args: Any) -> WorkerOptions:
    """WorkerOptions from an argparse namespace with the flags of `workers/common.py`."""
    fields = {f.name for f in dataclasses.fields(WorkerOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return WorkerOptions(role=role, **values)
