"""Every `HFGAN_*` environment variable, the default URLs and the run-id pattern, read in one place.

`Settings.from_env(environ)` reads a mapping (the process environment by default) into a frozen dataclass; nothing
else in the code base reads `HFGAN_*` variables. The rules, the same for every variable:

- an empty value counts as unset;
- any `HFGAN_X` may instead be given as `HFGAN_X_FILE`, the path of a file holding the value (Docker secrets); a
  trailing newline is dropped; giving both, or a file that cannot be read, is a `ConfigError` (one line, naming the
  variable, never its value);
- numbers must parse and be positive, flags are `1`/`true`/`yes` (case-insensitive) or `0`/`false`/`no`.

`redact_url()` is how a URL is shown anywhere outside the process that uses it (logs, errors, files the run writes):
its password is replaced by `***`.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
RUN_ID_RULE = "1-128 letters, digits, '.', '_' or '-'"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_STATE_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "hfgan"
DEFAULT_DATA_DIR = "data"
FILE_SUFFIX = "_FILE"
# The `[runtime]` fields of a RunConfig that the environment may override (containers).
RUNTIME_FIELDS = (
    "broker_url",
    "state_url",
    "data_dir",
    "run_dir",
    "run_id",
    "device",
    "server_device",
    "tensorboard_dir",
)
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, the Settings field it fills, its type and what it is for."""

    name: str
    field: str
    kind: type = str
    help: str = ""


VARIABLES: tuple[Var, ...] = (
    Var("HFGAN_CONFIG", "config", help="a preset name or a TOML file (workers)"),
    Var("HFGAN_RUN_ID", "run_id", help=f"the run id ({RUN_ID_RULE})"),
    Var("HFGAN_BROKER_URL", "broker_url", help=f"broker URL (workers and `hfgan up`: {DEFAULT_BROKER_URL})"),
    Var("HFGAN_STATE_URL", "state_url", help=f"state URL (workers and `hfgan up`: {DEFAULT_STATE_URL})"),
    Var("HFGAN_DATA_DIR", "data_dir", help=f"dataset root ({DEFAULT_DATA_DIR})"),
    Var("HFGAN_RUN_DIR", "run_dir", help="run outputs and checkpoints"),
    Var("HFGAN_DEVICE", "device", help="torch device of the clients"),
    Var("HFGAN_SERVER_DEVICE", "server_device", help="torch device of the server"),
    Var("HFGAN_BROKER_NAMESPACE", "namespace", help=f"AMQP namespace of the queues ({DEFAULT_NAMESPACE})"),
    Var("HFGAN_HEARTBEAT_S", "heartbeat_s", float, "worker heartbeat interval (2)"),
    Var("HFGAN_HEARTBEAT_TTL_S", "heartbeat_ttl_s", float, "a heartbeat's lifetime (10)"),
    Var("HFGAN_LEASE_TTL_S", "lease_ttl_s", float, "the coordinator lease's lifetime (15)"),
    Var("HFGAN_CONNECT_TIMEOUT_S", "connect_timeout_s", float, "how long broker and state are retried (60)"),
    Var("HFGAN_CHUNK_TIMEOUT_S", "chunk_timeout_s", float, "incomplete chunked messages dead-lettered after (120)"),
    Var("HFGAN_HEALTH_FILE", "health_file", help="a file the worker rewrites with every heartbeat (health checks)"),
    Var("HFGAN_STANDBY_OK", "standby_ok", bool, "coordinator: wait as standby while another leads"),
    Var("HFGAN_NO_UTILITY", "no_utility", bool, "coordinator: skip the final utility metrics"),
    Var("HFGAN_NO_FALLBACK", "no_fallback", bool, "no synthetic stand-in for a missing dataset"),
    Var("HFGAN_CLASSIFIER_DIR", "classifier_dir", help="where the scoring classifiers are kept"),
    Var("HFGAN_CACHE_DIR", "cache_dir", help="per-user cache (~/.cache/hfgan)"),
    Var("HFGAN_ADMIN_URL", "admin_url", help="`hfgan broker`: management API URL or `rabbitmqctl`"),
    Var("HFGAN_PROVISION_SECRET", "provision_secret", help="secret client broker passwords are derived from"),
    Var("HFGAN_REFERENCE_DIR", "reference_dir", help="bench: the reference implementation's directory"),
    Var("HFGAN_TEST_AGGREGATOR_HOLD", "test_aggregator_hold", help="fault tests only: <round>:<seconds>"),
    Var("HFGAN_METRICS_PORT", "metrics_port", int, "workers: serve Prometheus metrics on this port (off)"),
    Var("HFGAN_METRICS_ADDR", "metrics_addr", help="workers: the metrics address (127.0.0.1)"),
    Var("HFGAN_METRICS_LINGER_S", "metrics_linger_s", float, "workers: serve the final metrics this long (0)"),
    Var("HFGAN_TENSORBOARD_DIR", "tensorboard_dir", help="TensorBoard event files of the run (off)"),
)


def env_value(environ: Mapping[str, str], name: str) -> str | None:
    """The value of `name`, or of the file `name_FILE` points to; None when neither is set (module docstring)."""
    direct = environ.get(name) or None
    path = environ.get(name + FILE_SUFFIX) or None
    if path is None:
        return direct
    if direct is not None:
        raise ConfigError(f"both {name} and {name}{FILE_SUFFIX} are set; set one of them")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{name}{FILE_SUFFIX}: cannot read {path}: {reason}") from None
    return text.rstrip("\r\n") or None


def _typed(var: Var, text: str) -> object:
    if var.kind is bool:
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ConfigError(f"{var.name}: expected 1/true/yes or 0/false/no, not {text!r}")
    if var.kind is int:
        if not text.strip().isdigit() or not 0 < int(text) < 65536:
            raise ConfigError(f"{var.name}={text!r} is not a port number (1-65535)")
        return int(text)
    if var.kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{var.name}={text!r} is not a number") from None
        if not value > 0:
            raise ConfigError(f"{var.name} must be positive")
        return value
    return text


@dataclass(frozen=True)
class Settings:
    """What the environment says; None (False for flags) where it says nothing."""

    config: str | None = None
    run_id: str | None = None
    broker_url: str | None = None
    state_url: str | None = None
    data_dir: str | None = None
    run_dir: str | None = None
    device: str | None = None
    server_device: str | None = None
    namespace: str | None = None
    heartbeat_s: float | None = None
    heartbeat_ttl_s: float | None = None
    lease_ttl_s: float | None = None
    connect_timeout_s: float | None = None
    chunk_timeout_s: float | None = None
    health_file: str | None = None
    standby_ok: bool = False
    no_utility: bool = False
    no_fallback: bool = False
    classifier_dir: str | None = None
    cache_dir: str | None = None
    admin_url: str | None = None
    provision_secret: str | None = None
    reference_dir: str | None = None
    test_aggregator_hold: str | None = None
    metrics_port: int | None = None
    metrics_addr: str | None = None
    metrics_linger_s: float | None = None
    tensorboard_dir: str | None = None

    def __repr__(self) -> str:  # URLs and secrets never reach a log through a repr
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_url") and isinstance(value, str):
                value = redact_url(value)
            elif f.name == "provision_secret" and value is not None:
                value = "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values = {}
        for var in VARIABLES:
            text = env_value(env, var.name)
            if text is not None:
                values[var.field] = _typed(var, text)
        return cls(**values)

    def runtime_overrides(self) -> dict[str, str]:
        """The `[runtime]` fields of a RunConfig that the environment overrides (containers)."""
        return {n: getattr(self, n) for n in RUNTIME_FIELDS if getattr(self, n) is not None}

    @property
    def broker_url_or_default(self) -> str:
        return self.broker_url or DEFAULT_BROKER_URL

    @property
    def state_url_or_default(self) -> str:
        return self.state_url or DEFAULT_STATE_URL

    @property
    def data_dir_or_default(self) -> str:
        return self.data_dir or DEFAULT_DATA_DIR


def check_run_id(run_id: str, hint: str = "") -> str:
    """`run_id` when it matches RUN_ID_PATTERN, else ConfigError."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise ConfigError(f"run id {run_id!r}: use {RUN_ID_RULE}{hint}")
    return run_id


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by `***`: how URLs appear in logs, errors and written files."""
    if not isinstance(url, str) or "@" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None and parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        name = user.split(":", 1)[0]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))
    # Not parseable as a URL (or no password in the netloc): hide anything between `//user:` and `@`.
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)
