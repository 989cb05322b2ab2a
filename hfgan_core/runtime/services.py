"""Each role as a process of its own: settings, identity, restart and resume. `workers/<role>.py` parse the flags
and call `serve(WorkerOptions)`, which runs the role's `serve` function as the role registry (roles.py) names it;
the loop itself is worker.py's.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import roles
from ..config import ConfigError, RunConfig, apply_env, load_config
from ..settings import Settings, check_run_id
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
    owner_id,
)

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
    cfg = cfg.with_runtime_flags(opts).validate()
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
    if opts.role not in roles.names():
        log.error("unknown role %r (known: %s)", opts.role, ", ".join(roles.names()))
        return EXIT_CONFIG
    stop = StopFlag().install()
    try:
        settings = settings or WorkerSettings.from_env()
        cfg, run_id = resolve(opts)
        if cfg.runtime.torch_threads:
            import torch

            torch.set_num_threads(cfg.runtime.torch_threads)
        return roles.get(opts.role).load("serve")(opts, cfg, run_id, settings, stop)
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
    from .client_worker import client_owner, serve_client  # clients reach the coordinator over the broker only

    return serve_client(opts, cfg, run_id, settings, stop, client_owner(owner_id()))


def _check_shared(cfg: RunConfig) -> None:
    check_shared("broker", cfg.runtime.broker_url)
    check_shared("state", cfg.runtime.state_url)


def options_from_args(role: str, args: Any) -> WorkerOptions:
    """WorkerOptions from an argparse namespace with the flags of `workers/common.py`."""
    fields = {f.name for f in dataclasses.fields(WorkerOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return WorkerOptions(role=role, **values)
