"""`hfgan up`: the compose topology as local processes, for one run.

    hfgan up --config PRESET_OR_TOML [--clients N] [--aggregators M] [--broker amqp://...] [--state redis://...]
             [--run-dir R] [--run-id ID] [every option of `hfgan train`]

Starts the worker of every registered role (roles.py: `python -m workers.<role>` for the coordinator, the server,
the clustering service, M aggregators and N clients, and one process of any other registered role), with the
environment compose.yaml gives them (HFGAN_CONFIG, HFGAN_RUN_ID, HFGAN_BROKER_URL, HFGAN_STATE_URL,
HFGAN_DATA_DIR, HFGAN_RUN_DIR), hosts on 127.0.0.1. The configuration, options applied, is written
to `R/logs/up-config.toml` and every worker reads that file. Each worker logs to `R/logs/<role>.log`. Progress comes
from the ledger (a line per phase of each round, arrivals as they come). The coordinator writes the run directory,
as `hfgan train` does; once it exits the other workers get SIGTERM. Ctrl-C stops every worker (SIGTERM, then
SIGKILL after a grace period) and resumes later with `--resume`.

`--standby` adds a standby coordinator (`--standby-ok`): it takes over the lease if the leader dies, and `up` goes
on while one coordinator lives. Workers get one torch thread each (OMP_NUM_THREADS=1) unless `--threads` says
otherwise: several processes with OpenMP's spinning thread pools on a few cores are many times slower.

Exit code: the coordinator's (0 when the run finished; with a standby, 0 when either finished it), 130 after
Ctrl-C; a worker that exits with 2 (bad configuration) or 3 (broker or state unreachable) stops the whole run with
that code. Each failure shows the tail of the failing worker's log. `--aggregators 0` starts none: aggregation
jobs then wait in their queue until an aggregator is started by hand (`python -m workers.aggregator` with the same
environment).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import roles
from ..config import ConfigError, RunConfig, dump_toml
from ..settings import DEFAULT_BROKER_URL, DEFAULT_STATE_URL, Settings, check_run_id, redact_url

GRACE_S = 15.0


def add_parser(sub: Any, run_options) -> argparse.ArgumentParser:
    """The `up` subcommand; `run_options` adds the options `hfgan train` shares."""
    p = sub.add_parser("up", help="run every role as a local process through RabbitMQ and Redis")
    run_options(p)
    for action in p._actions:  # the shared options' help describes `train`'s in-process defaults
        if action.dest == "broker":
            shown = DEFAULT_BROKER_URL.replace("%", "%%")  # argparse %-formats help texts
            action.help = f"broker URL ($HFGAN_BROKER_URL, default {shown}; {{slot}}: a client's slot)"
        elif action.dest == "state":
            action.help = f"state URL ($HFGAN_STATE_URL, default {DEFAULT_STATE_URL})"
    p.add_argument(
        "--clients",
        type=int,
        help="client processes (default: the scenario's clients; more are spares that take over a dead client's slot)",
    )
    p.add_argument("--aggregators", type=int, default=1, help="aggregator processes (0: jobs wait in the queue)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic dataset for every domain")
    p.add_argument(
        "--no-fallback", action="store_true", help="fail instead of using synthetic data for a missing dataset"
    )
    p.add_argument("--no-utility", action="store_true", help="skip the final utility metrics")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--namespace", help="AMQP namespace of the run's queues ($HFGAN_BROKER_NAMESPACE, hfgan)")
    p.add_argument(
        "--role-users",
        action="store_true",
        help="log in as the role users of broker_config "
        "(development passwords; clients as client-<slot>) instead of the broker URL's user",
    )
    p.add_argument("--standby", action="store_true", help="also start a standby coordinator")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve each worker's Prometheus metrics on 127.0.0.1 from this port on (one port per worker, in start "
        "order; the list in R/logs/metrics-targets.json, Prometheus file_sd format)",
    )
    return p


@dataclass
class Proc:
    name: str
    role: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    code: int | None = None
    reported: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def role_url(base: str, user: str, password: str) -> str:
    p = urllib.parse.urlsplit(base)
    host = p.hostname or "127.0.0.1"
    netloc = f"{urllib.parse.quote(user, safe='{}')}:{urllib.parse.quote(password, safe='{}')}@{host}"
    if p.port:
        netloc += f":{p.port}"
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


class Up:
    def __init__(self, cfg: RunConfig, args: argparse.Namespace, err: IO[str] = sys.stderr):
        self.cfg = cfg
        self.args = args
        self.err = err
        rt = cfg.runtime
        self.run_dir = Path(rt.run_dir).resolve()
        self.run_id = rt.run_id or self.run_dir.name
        self.log_dir = self.run_dir / "logs"
        self.procs: list[Proc] = []
        self.stop_signal: str | None = None
        self.t0 = time.monotonic()

    def say(self, line: str) -> None:
        print(f"up: {line}", file=self.err, flush=True)

    # ---------------------------------------------------------------------------------------------- checks
    def check(self) -> None:
        from ..state import open_store
        from .recorder import read_run_marker
        from .services import ALLOWED_IN_NEW_RUN_DIR

        check_run_id(self.run_id, " (--run-id)")
        n = self.cfg.scenario.total_clients
        clients = self.args.clients if self.args.clients is not None else n
        if clients < n:
            raise ConfigError(f"--clients {clients}: the scenario has {n} clients and admission waits for all of them")
        if self.args.aggregators < 0:
            raise ConfigError("--aggregators must not be negative")
        if self.args.metrics_port is not None and not 0 < self.args.metrics_port < 65536 - 8 - clients:
            raise ConfigError(f"--metrics-port {self.args.metrics_port}: not a port with room for every worker")
        self.n_clients = clients
        for what, url in (("--broker", self.cfg.runtime.broker_url), ("--state", self.cfg.runtime.state_url)):
            if url.startswith("memory:"):
                raise ConfigError(
                    f"{what} {redact_url(url)}: worker processes need amqp:// and redis:// (hfgan train runs "
                    "everything in one process)"
                )
        marker = read_run_marker(self.run_dir)
        if marker is not None:
            if marker.get("digest") != self.cfg.digest():
                raise ConfigError(
                    f"run directory {self.run_dir} already holds a different run; choose another --run-dir"
                )
            if not self.args.resume:
                raise ConfigError(
                    f"run directory {self.run_dir} already holds this run; pass --resume to continue "
                    "it or choose another --run-dir"
                )
        elif self.args.resume:
            raise ConfigError(f"nothing to resume in {self.run_dir} (no run there)")
        elif self.run_dir.exists() and any(p.name not in ALLOWED_IN_NEW_RUN_DIR for p in self.run_dir.iterdir()):
            raise ConfigError(
                f"run directory {self.run_dir} is not empty and holds no hfgan run; choose another --run-dir"
            )
        store = open_store(self.cfg.runtime.state_url, retry_timeout=5.0)
        try:
            info = store.run_info(self.run_id)
        finally:
            store.close()
        if info is not None and not self.args.resume:
            raise ConfigError(
                f"run {self.run_id!r} already exists in the state store {redact_url(self.cfg.runtime.state_url)}; "
                "choose another --run-id"
            )
        self.store_url = self.cfg.runtime.state_url

    # ---------------------------------------------------------------------------------------------- start
    def environment(self) -> dict[str, str]:
        rt = self.cfg.runtime
        env = dict(os.environ)
        env.update(
            {
                "HFGAN_CONFIG": str(self.config_path),
                "HFGAN_RUN_ID": self.run_id,
                "HFGAN_BROKER_URL": rt.broker_url,
                "HFGAN_STATE_URL": rt.state_url,
                "HFGAN_DATA_DIR": str(Path(rt.data_dir).resolve()),
                "HFGAN_RUN_DIR": str(self.run_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # One intra-op thread per worker unless told otherwise: several processes on few cores with OpenMP's
        # spinning thread pools are many times slower than single-threaded ones.
        threads = str(rt.torch_threads or 1)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        if self.args.namespace:
            env["HFGAN_BROKER_NAMESPACE"] = self.args.namespace
        for flag, var in (("no_utility", "HFGAN_NO_UTILITY"), ("no_fallback", "HFGAN_NO_FALLBACK")):
            env[var] = "1" if getattr(self.args, flag, False) else ""
        return env

    def _broker_for(self, role: str) -> str | None:
        """With --role-users: the role's broker user and its development password (`<user>-dev`); `{slot}` is a
        client's slot, filled in by the client once it has one."""
        user = roles.get(role).broker_user
        if not self.args.role_users or user is None:
            return None
        user = user.replace("{n}", "{slot}")
        return role_url(self.cfg.runtime.broker_url, user, f"{user}-dev")

    def processes(self, spec: roles.RoleSpec) -> list[tuple[str, list[str]]]:
        """(name, flags) of each process of a role (its registry entry's `instances`)."""
        if spec.instances == "coordinator":
            standby = [(f"{spec.name}.standby", ["--standby-ok"])] if self.args.standby else []
            return [(spec.name, []), *standby]
        if spec.instances == "aggregators":
            return [(f"{spec.name}.{i}", ["--index", str(i)]) for i in range(self.args.aggregators)]
        if spec.instances == "clients":
            return [(f"{spec.name}.{i}", []) for i in range(self.n_clients)]
        return [(spec.name, [])]

    def spawn(self, name: str, role: str, flags: list[str], env: dict[str, str]) -> Proc:
        path = self.log_dir / f"{name}.log"
        fh = open(path, "ab")  # noqa: SIM115 - closed in finish()
        env = dict(env)
        url = self._broker_for(role)
        if url:
            env["HFGAN_BROKER_URL"] = url
        # A session of its own: the terminal's Ctrl-C reaches `up` only, which stops the workers in order.
        env.pop("HFGAN_METRICS_PORT", None)  # one port per worker, or none: never one shared by all
        if self.args.metrics_port:
            env["HFGAN_METRICS_PORT"] = str(self.args.metrics_port + len(self.procs))
            self._metrics_target(name, role, int(env["HFGAN_METRICS_PORT"]))
        popen = subprocess.Popen(
            [sys.executable, "-m", roles.get(role).worker_module, *flags],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = Proc(name, role, popen, path, fh)
        self.procs.append(proc)
        return proc

    def _metrics_target(self, name: str, role: str, port: int) -> None:
        """Add a worker's metrics endpoint to R/logs/metrics-targets.json (what a Prometheus file_sd reads)."""
        path = self.log_dir / "metrics-targets.json"
        targets = json.loads(path.read_text()) if path.is_file() else []
        targets = [t for t in targets if t["labels"].get("worker") != name]
        targets.append({"targets": [f"127.0.0.1:{port}"], "labels": {"worker": name, "role": role, "run": self.run_id}})
        path.write_text(json.dumps(targets, indent=1))

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.log_dir / "up-config.toml"
        cfg = self.cfg.with_overrides("runtime", run_id=self.run_id, run_dir=str(self.run_dir))
        self.config_path.write_text(dump_toml(cfg.redacted()))  # the workers get the URLs from their environment
        env = self.environment()
        started = []
        for spec in roles.specs():
            procs = [self.spawn(name, spec.name, flags, env) for name, flags in self.processes(spec)]
            if spec.instances == "coordinator":
                self.coordinators = procs  # the run goes on while one of them lives
            started.append(f"{len(procs)} {spec.name}")
        self.coordinator = self.coordinators[0]
        self.say(f"run {self.run_id}: started {len(self.procs)} workers ({', '.join(started)}); logs in {self.log_dir}")

    # ---------------------------------------------------------------------------------------------- watch
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name

    def watch(self) -> int:
        from ..state import open_store

        store = open_store(self.store_url)
        progress = Progress(self, store)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                if self.stop_signal:
                    self.say(f"{self.stop_signal}: stopping every worker (resume with --resume)")
                    self.stop_all(first=self.coordinators)
                    return 130
                for p in self.procs:
                    if p.code is None:
                        p.code = p.popen.poll()
                # With a standby, the run goes on while one coordinator lives (it takes over the lease).
                if all(c.code is not None for c in self.coordinators):
                    break
                fatal = self._check_workers()
                if fatal is not None:
                    self.stop_all(first=self.coordinators)
                    return fatal
                if not self.args.quiet:
                    try:
                        progress.poll()
                    except Exception as exc:  # progress is cosmetic: a ledger hiccup must not stop the run
                        self.say(f"progress unavailable: {exc}")
                time.sleep(0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            store.close()
        ok = [c for c in self.coordinators if c.code == 0]
        failed = [c for c in self.coordinators if c.code != 0]
        code = 0 if ok else failed[-1].code
        self.stop_all()
        for c in failed:
            self.say(f"{c.name} exited with code {c.code}; the end of {c.log_path}:")
            print(tail(c.log_path), file=self.err, flush=True)
        return code

    def _check_workers(self) -> int | None:
        for p in self.procs:
            if p.code is None or p.reported or p in self.coordinators:
                continue
            p.reported = True
            if p.code == 0:
                continue
            self.say(f"{p.name} exited with code {p.code}; the end of {p.log_path}:")
            print(tail(p.log_path, 10), file=self.err, flush=True)
            if p.code in (2, 3):
                return p.code
        return None

    def stop_all(self, first: list[Proc] | None = None) -> None:
        """SIGTERM (`first` before the rest), then SIGKILL what is left after the grace period."""
        first = first or []
        order = first + [p for p in self.procs if p not in first]
        for p in order:
            if p.popen.poll() is None:
                try:
                    p.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if p is (first[-1] if first else None):
                for f in first:
                    try:
                        f.popen.wait(timeout=GRACE_S)
                    except subprocess.TimeoutExpired:
                        pass
        deadline = time.monotonic() + GRACE_S
        for p in order:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{p.name} did not stop within {GRACE_S:.0f} s; killing it")
                p.popen.kill()
                p.popen.wait()
            p.code = p.popen.returncode
            p.log_file.close()


class Progress:
    """Lines from the ledger: each phase of each round, and arrivals while a round trains."""

    def __init__(self, up: Up, store: Any):
        self.up = up
        self.store = store
        self.last: tuple | None = None
        self.started: dict[int, float] = {}

    def poll(self) -> None:
        run = self.up.run_id
        info = self.store.run_info(run)
        if info is None:
            return
        r, phase = self.store.get_round(run)
        rounds = self.up.cfg.train.rounds
        counts = ""
        if phase in ("training", "aggregating") and r:
            recs = self.store.round_clients(run, r)
            arrived = sum(1 for x in recs.values() if x.state in ("arrived", "late"))
            dropped = sum(1 for x in recs.values() if x.state == "dropped")
            counts = f": {arrived}/{len(recs)} arrived" + (f", {dropped} dropped" if dropped else "")
        key = (r, phase, counts, info.get("status"))
        if key == self.last:
            return
        if self.last is not None and r > self.last[0] and self.last[1] != "done" and self.last[0] in self.started:
            prev = self.last[0]  # the round ended between two polls
            self.up.say(f"round {prev}/{rounds} done in {time.monotonic() - self.started[prev]:.1f} s")
        self.last = key
        if phase == "training":
            self.started.setdefault(r, time.monotonic())
        if phase == "done" and r in self.started:
            self.up.say(f"round {r}/{rounds} done in {time.monotonic() - self.started[r]:.1f} s")
        elif phase == "admitting":
            members = len(json.loads(self.store.get_docs(run, 0).get("members") or "{}"))
            self.up.say(f"admitting: {members}/{self.up.cfg.scenario.total_clients} clients joined")
        else:
            self.up.say(f"round {r}/{rounds} {phase}{counts}")
        if info.get("status") == "finished":
            self.up.say("all rounds done; the coordinator writes the summary")


def run(args: argparse.Namespace, load_run_config) -> int:
    """`hfgan up` (load_run_config: cli.load_run_config, which applies the options to the config)."""
    env = Settings.from_env()
    args.broker = args.broker or env.broker_url_or_default
    args.state = args.state or env.state_url_or_default
    cfg = load_run_config(args)
    up = Up(cfg, args)
    up.check()
    up.start()
    code = up.watch()
    if code == 0:
        summary_path = up.run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        print(
            json.dumps(
                {
                    "run_dir": str(up.run_dir),
                    "run_id": up.run_id,
                    "domains": summary.get("domains"),
                    "wall_s": round(time.monotonic() - up.t0, 3),
                },
                indent=2,
            )
        )
    return code
