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
- client: without `--client` it claims the lowest free slot of the run (`claim_slot`, kept by its heartbeat; a
  client that finds every slot taken waits as a spare). The slot is its identity, data shard, domain and device
  profile; `{slot}` in the broker URL is replaced by it (per-client broker users:
  `amqp://client-{slot}:client-{slot}-dev@host:5672/%2F`). It restores its last checkpoint and, if its round is in
  training and it has not reported it, runs the round again.
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
    open_broker,
    open_state,
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
def claim_client_slot(
    store, run: str, n_slots: int, owner: str, settings: WorkerSettings, stop: StopFlag
) -> int | None:
    """The slot this process holds (waiting as a spare while all are taken); None if stopped first."""
    waited = False
    while not stop.requested:
        claim = store.claim_slot(run, n_slots, owner, settings.heartbeat_ttl_s)
        if claim is not None:
            return claim.slot
        if not waited:
            log.info("client: all %d slots of run %s are taken; waiting as a spare", n_slots, run)
            waited = True
        store.heartbeat(run, f"spare.{owner}", settings.heartbeat_ttl_s, "waiting for a client slot")
        stop.sleep(settings.heartbeat_s)
    return None


def _serve_client(opts, cfg, run_id, settings, stop) -> int:
    from ..data import load_client_data
    from .client import ClientRole
    from .emulation import emulator_for

    n = cfg.scenario.total_clients
    owner = owner_id()
    slot = opts.client
    if slot is not None and not 0 <= slot < n:
        raise ConfigError(f"--client {slot}: the run has clients 0..{n - 1}")
    _check_shared(cfg)
    store = open_state(cfg.runtime.state_url, settings)
    transport = None
    claimed = False
    try:
        if slot is None:
            # The slot comes first: it decides the broker user ({slot} in the URL) and the data shard.
            slot = claim_client_slot(store, run_id, n, owner, settings, stop)
            if slot is None:
                return EXIT_OK
            claimed = True
            log.info("client: claimed slot %d of run %s as %s", slot, run_id, owner)
        name = f"client.{slot}"
        data, notices = load_client_data(cfg, slot, allow_synthetic_fallback=opts.allow_fallback)
        for notice in notices:
            log.warning("%s: NOTICE: %s", name, notice)
        transport = open_broker(cfg.runtime.broker_url.replace("{slot}", str(slot)), settings, name)
        profile = cfg.devices.client_profiles(n)[slot]
        role = ClientRole(
            _context(cfg, run_id, transport, store),
            client=slot,
            domain=cfg.scenario.client_domains()[slot],
            data=data,
            profile=profile,
            device=cfg.runtime.device,
            run_dir=cfg.runtime.run_dir,
            delay=emulator_for(cfg, slot, profile),
        )
        resume = _ClientResume(role, store, run_id, cfg.runtime.run_dir)
        resume.before_bind()
        names = (name, owner) if claimed else (name,)

        def keep_slot() -> None:
            # A process frozen for longer than the heartbeat TTL may have lost its slot to a spare.
            claim = store.claim_slot(run_id, n, owner, settings.heartbeat_ttl_s)
            if claim is None or claim.slot != slot:
                if claim is not None:
                    store.release_slot(run_id, claim.slot, owner)
                raise WorkerExit(EXIT_INTERNAL, f"lost client slot {slot} of run {run_id} to another process")

        if claimed:
            keep_slot()

        def info() -> str:
            return f"slot {slot} owner {owner} round {role.round} {role.phase} step {max(role.step, 0)}"

        loop = WorkerLoop(
            role,
            settings,
            stop,
            beat_names=names,
            info=info,
            after_bind=resume.after_bind,
            on_beat=keep_slot if claimed else None,
        )
        if role.delay is not None:
            role.delay.sleep = loop.sliced_sleep  # an emulated slow segment must not let the heartbeat lapse
        reason = loop.run()
        log.info("%s: %s (%d step(s) timed out)", name, reason, role.steps_timed_out)
        return EXIT_OK
    finally:
        if claimed:
            try:
                store.release_slot(run_id, slot, owner)
            except Exception as exc:  # the slot frees itself when the heartbeat expires
                log.debug("release_slot: %s", exc)
        close_quietly(transport, store)


class _ClientResume:
    """A (re)started client: restore its last checkpoint before it joins; once bound and joined, rejoin a round
    in training that it has not reported (its steps are run again from the first)."""

    def __init__(self, role, store, run: str, run_dir: str):
        self.role, self.store, self.run, self.run_dir = role, store, run, run_dir

    def before_bind(self) -> None:
        latest = latest_checkpoint(self.run_dir, self.role.checkpoint_name(), 1 << 30)
        r, _ = self.store.get_round(self.run)
        # r == 0 with a checkpoint: the ledger lost the run and the coordinator carries on from the checkpoints.
        if latest is not None and (latest[0] <= r or r == 0):
            self.role.restore(ckpt.load_checkpoint(latest[1], role="client"))
            log.info("%s: restored %s (round %d)", self.role.name, latest[1], latest[0])

    def after_bind(self) -> None:
        r, phase = self.store.get_round(self.run)
        role = self.role
        if phase != "training" or r != role.round + 1 or role.in_round:
            return
        docs = ledger.RoundDocs.read(self.store, self.run, r)
        if docs.start is None or role.client not in docs.start["participants"] or role.client in docs.done:
            return
        log.info("%s: rejoining round %d from its first step", role.name, r)
        role.resume_round(ledger.round_start_from_doc(self.run, r, docs.start))


def _check_shared(cfg: RunConfig) -> None:
    check_shared("broker", cfg.runtime.broker_url)
    check_shared("state", cfg.runtime.state_url)


def options_from_args(role: str, args: Any) -> WorkerOptions:
    """WorkerOptions from an argparse namespace with the flags of `workers/common.py`."""
    fields = {f.name for f in dataclasses.fields(WorkerOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return WorkerOptions(role=role, **values)
