"""Typed run configuration: frozen dataclasses, TOML loading, presets and environment overrides.

A run is described by one `RunConfig` (model, scenario, training, devices, runtime). The first four define *what*
is trained and make up the run's digest; `RuntimeConfig` says *where* (broker, state store, directories, torch
devices) and may differ between the processes of one run. Reading one from plain data (a parsed TOML document) is
in `config_parse`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .settings import RUNTIME_FIELDS, VARIABLES, ConfigError, Settings, redact_url

DATASETS = ("MNIST", "FashionMNIST", "KMNIST", "NotMNIST", "synthetic", "synthetic-colour")
# Formats of a user dataset (a domain with a `path`).
USER_FORMATS = ("idx", "npz", "imagefolder")
# Image sizes of the model family (square images).
IMAGE_SIZES = (28, 32, 64)
# Optional domain keys that are left out of the config's plain form when unset, so that configs without them
# keep their digests.
_OPTIONAL_DOMAIN_KEYS = ("path", "format", "test_fraction")
DISTRIBUTIONS = ("iid", "noniid", "highly_noniid")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
# Arithmetic of the convolution blocks (model/precision.py); float32 is the paper's.
COMPUTE_DTYPES = ("float32", "bfloat16")
COST_MODELS = ("paper", "corrected")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cgan28"
    z_dim: int = 100
    num_classes: int = 10
    image_size: int = 28
    channels: int = 1

    def validate(self) -> None:
        if self.arch != "cgan28":
            raise ConfigError(f"model.arch: unknown architecture {self.arch!r} (known: cgan28)")
        for name in ("z_dim", "num_classes", "image_size", "channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive")
        if self.image_size not in IMAGE_SIZES:
            raise ConfigError(
                f"model.image_size: {self.image_size} is not supported (the model family takes "
                f"{', '.join(map(str, IMAGE_SIZES))})"
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"model.channels: {self.channels} is not supported (1 for grayscale, 3 for colour)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class DomainConfig:
    """One data domain and how many clients hold a share of it."""

    dataset: str
    clients: int
    # Cap on the samples a client keeps (the reference rule is 60000 // total clients); a reduced-scale knob.
    samples_per_client: int | None = None
    # A user dataset: its file or directory (a relative path is relative to the data directory) and format; then
    # `dataset` is the domain's name. `test_fraction` holds out that share of the data as the test set when the
    # data has no test split.
    path: str | None = None
    format: str | None = None
    test_fraction: float | None = None

    @property
    def is_user(self) -> bool:
        return self.path is not None

    def validate(self, where: str) -> None:
        if self.path is None:
            if self.format is not None or self.test_fraction is not None:
                raise ConfigError(f"{where}: 'format' and 'test_fraction' need a 'path' (a user dataset)")
            if self.dataset not in DATASETS:
                raise ConfigError(
                    f"{where}.dataset: unknown dataset {self.dataset!r} (known: {', '.join(DATASETS)}; "
                    "or give a user dataset's 'path' and 'format')"
                )
        else:
            if self.dataset in DATASETS:
                raise ConfigError(f"{where}.dataset: {self.dataset!r} is a built-in dataset; name a user dataset apart")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.dataset):
                raise ConfigError(f"{where}.dataset: name {self.dataset!r}: use 1-64 letters, digits, '.', '_', '-'")
            if not self.path:
                raise ConfigError(f"{where}.path must not be empty")
            if self.format not in USER_FORMATS:
                raise ConfigError(f"{where}.format: {self.format!r} is not one of {', '.join(USER_FORMATS)}")
            if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
                raise ConfigError(f"{where}.test_fraction must be between 0 and 1 (exclusive)")
        if self.clients <= 0:
            raise ConfigError(f"{where}.clients must be a positive integer")
        if self.samples_per_client is not None and self.samples_per_client <= 0:
            raise ConfigError(f"{where}.samples_per_client must be positive")


@dataclass(frozen=True)
class ScenarioConfig:
    name: str = "custom"
    domains: tuple[DomainConfig, ...] = ()
    distribution: str = "iid"
    partition_seed: int = 42
    # Size of the full training set the reference divides among all clients (60000 for the MNIST family).
    reference_train_size: int = 60000
    # Synthetic dataset: samples per class in its training split (the synthetic data needs no files).
    synthetic_train_per_class: int = 600

    @property
    def total_clients(self) -> int:
        return sum(d.clients for d in self.domains)

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(d.dataset for d in self.domains)

    def client_domains(self) -> list[int]:
        """Domain index of each client, clients numbered domain by domain as in the reference."""
        out: list[int] = []
        for i, d in enumerate(self.domains):
            out.extend([i] * d.clients)
        return out

    def validate(self) -> None:
        if not self.domains:
            raise ConfigError("scenario.domains: at least one domain is required")
        names = [d.dataset for d in self.domains]
        if len(set(names)) != len(names):
            raise ConfigError("scenario.domains: a dataset may appear once")
        for i, d in enumerate(self.domains):
            d.validate(f"scenario.domains[{i}]")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"scenario.distribution: unknown {self.distribution!r} (known: {', '.join(DISTRIBUTIONS)})"
            )
        if self.reference_train_size <= 0 or self.synthetic_train_per_class <= 0:
            raise ConfigError("scenario: sizes must be positive")


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = 50
    local_epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    # KLD weighting: weights n_k * exp(-alpha * KLD_k) from round `kld_from_round` on.
    alpha: float = 1.0
    kld_from_round: int = 3
    # Number of clusters: an integer, "domains" (the number of domains in the scenario) or "auto".
    clusters: int | str = "domains"
    # Ablation switches (defaults are the paper's method).
    clustering: bool = True
    kld_weighting: bool = True
    # "plan" chooses cut bits with the planner from the device profiles; otherwise a list of 4-bit lists that is
    # cycled over the clients (client i gets cuts[i % len(cuts)]).
    cuts: str | tuple[tuple[int, int, int, int], ...] = "plan"
    cost_model: str = "paper"
    # Re-plan the cuts between rounds from the measured per-client step times (devices slower than they claimed).
    adaptive_cuts: bool = False
    # Steps per epoch: None = max_k ceil(n_k / batch_size), the paper's rule.
    steps_per_epoch: int | None = None
    wire_dtype: str = "float32"
    # "bfloat16": the convolution blocks run under autocast (bfloat16 multiplies, float32 weights, optimiser and
    # block outputs). Faster on CPUs with AVX-512 BF16 and on GPUs, but a different numerical path from the
    # paper's float32, so it is a choice of the run, not a default (docs/benchmarks.md, "bfloat16 compute").
    compute_dtype: str = "float32"
    # Evaluation sizes (docs/ARCHITECTURE.md section 3).
    score_samples: int = 5000
    utility_samples: int = 30000
    utility_epochs: int = 15
    eval_every: int = 1

    def n_clusters(self, scenario: ScenarioConfig) -> int | str:
        if not self.clustering:
            return 1
        if self.clusters == "domains":
            return len(scenario.domains)
        return self.clusters

    def validate(self) -> None:
        for name in ("rounds", "local_epochs", "batch_size", "score_samples", "utility_samples", "eval_every"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"train.{name} must be a positive integer")
        if self.utility_epochs < 0:
            raise ConfigError("train.utility_epochs must not be negative")
        if not (self.lr > 0):
            raise ConfigError("train.lr must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("train.betas must be two numbers in [0, 1)")
        if self.alpha < 0:
            raise ConfigError("train.alpha must not be negative")
        if self.kld_from_round < 1:
            raise ConfigError("train.kld_from_round must be at least 1")
        if isinstance(self.clusters, str):
            if self.clusters not in ("domains", "auto"):
                raise ConfigError("train.clusters must be a positive integer, 'domains' or 'auto'")
        elif self.clusters <= 0:
            raise ConfigError("train.clusters must be a positive integer, 'domains' or 'auto'")
        if isinstance(self.cuts, str):
            if self.cuts != "plan":
                raise ConfigError("train.cuts must be 'plan' or a list of [g_head, g_tail, d_head, d_tail] lists")
        else:
            if not self.cuts:
                raise ConfigError("train.cuts: the list of cut bits is empty")
            for c in self.cuts:
                if len(c) != 4 or any(b not in (0, 1) for b in c):
                    raise ConfigError(f"train.cuts: {list(c)} is not four bits [g_head, g_tail, d_head, d_tail]")
        if self.cost_model not in COST_MODELS:
            raise ConfigError(f"train.cost_model must be one of {', '.join(COST_MODELS)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ConfigError("train.steps_per_epoch must be positive")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"train.wire_dtype must be one of {', '.join(WIRE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"train.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}")


@dataclass(frozen=True)
class DeviceProfile:
    """A client device as the paper's profiles.yaml describes it."""

    cpu_mhz: float
    flops_per_cycle: float
    data_rate: float  # bytes per second

    @property
    def gflops(self) -> float:
        return self.cpu_mhz * 1e-3 * self.flops_per_cycle


@dataclass(frozen=True)
class ServerProfile:
    computational_frequency_ghz: float = 42.0
    cpu_cycles_per_flop: float = 16.0  # used as a multiplier, as the reference does
    transmission_rate_bps: float = 1e9


# The seven device types of the paper's profiles.yaml.
PAPER_DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "device1": DeviceProfile(480, 1, 50_000_000),
    "device2": DeviceProfile(6000, 8, 150_000_000),
    "device3": DeviceProfile(15600, 8, 1_000_000_000),
    "device4": DeviceProfile(5720, 8, 300_000_000),
    "device5": DeviceProfile(4000, 4, 50_000_000),
    "device6": DeviceProfile(9000, 4, 100_000_000),
    "device7": DeviceProfile(12000, 10, 800_000_000),
}


@dataclass(frozen=True)
class DevicesConfig:
    """Device profiles: `clients` names entries of `profiles`, cycled over the clients."""

    server: ServerProfile = ServerProfile()
    profiles: tuple[tuple[str, DeviceProfile], ...] = tuple(PAPER_DEVICE_PROFILES.items())
    clients: tuple[str, ...] = tuple(PAPER_DEVICE_PROFILES)

    def profile_table(self) -> dict[str, DeviceProfile]:
        return dict(self.profiles)

    def client_profiles(self, n_clients: int) -> list[DeviceProfile]:
        table = self.profile_table()
        return [table[self.clients[i % len(self.clients)]] for i in range(n_clients)]

    def client_profile_names(self, n_clients: int) -> list[str]:
        return [self.clients[i % len(self.clients)] for i in range(n_clients)]

    def validate(self) -> None:
        table = self.profile_table()
        if not self.clients:
            raise ConfigError("devices.clients: at least one profile name is required")
        for name in self.clients:
            if name not in table:
                raise ConfigError(f"devices.clients: unknown profile {name!r} (known: {', '.join(table)})")
        for name, p in self.profiles:
            if not (p.cpu_mhz > 0 and p.flops_per_cycle > 0 and p.data_rate > 0):
                raise ConfigError(f"devices.profiles.{name}: speeds and rates must be positive")
        s = self.server
        if not (s.computational_frequency_ghz > 0 and s.cpu_cycles_per_flop > 0 and s.transmission_rate_bps > 0):
            raise ConfigError("devices.server: speeds and rates must be positive")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where a run executes. Not part of the run digest: processes of one run may differ here."""

    broker_url: str = "memory://"
    state_url: str = "memory://"
    data_dir: str = "data"
    run_dir: str = "runs/latest"
    run_id: str | None = None
    device: str = "cpu"  # torch device of clients, aggregators and evaluation
    server_device: str | None = None  # torch device of the split server (defaults to `device`)
    # Stragglers (docs/ARCHITECTURE.md section 5): a step window at the server, a deadline and a quorum per round.
    step_deadline_s: float = 30.0
    # A step's deadline follows the peers' measured pace: max(step_deadline_s, straggler_factor x the median recent
    # response time), so a busy host does not make every client late (runtime/pace.py). 0: step_deadline_s alone.
    straggler_factor: float = 3.0
    round_deadline_s: float = 600.0
    quorum: float = 0.5
    # Emulate the device profiles' compute and link delays (reproducible heterogeneity on one machine).
    emulate_devices: bool = False
    emulate_slowdown: tuple[tuple[int, float], ...] = ()  # (client index, factor) pairs
    torch_threads: int | None = None
    # Hold conv/BatchNorm weights channels-last (faster on CPU; not bit-identical to the default layout).
    channels_last: bool = False
    # Complete per-round checkpoints kept in the run directory (older ones are deleted); 0 keeps them all.
    keep_checkpoints: int = 3
    # Per-round scalars and sample grids for TensorBoard (tensorboard.py), written by whoever records the run.
    tensorboard_dir: str | None = None

    @property
    def resolved_server_device(self) -> str:
        return self.server_device or self.device

    def validate(self) -> None:
        if self.step_deadline_s <= 0 or self.round_deadline_s <= 0:
            raise ConfigError("runtime: deadlines must be positive")
        if not (self.straggler_factor == 0 or self.straggler_factor > 1):
            raise ConfigError("runtime.straggler_factor must be 0 (a fixed step deadline) or above 1")
        if self.keep_checkpoints < 0:
            raise ConfigError("runtime.keep_checkpoints must be 0 (keep all) or positive")
        if not (0 < self.quorum <= 1):
            raise ConfigError("runtime.quorum must be in (0, 1]")
        for dev in (self.device, self.resolved_server_device):
            if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:") or dev == "mps"):
                raise ConfigError(f"runtime: unknown torch device {dev!r} (cpu, cuda, cuda:N)")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    train: TrainConfig = TrainConfig()
    devices: DevicesConfig = DevicesConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def validate(self) -> RunConfig:
        self.model.validate()
        self.scenario.validate()
        self.train.validate()
        self.devices.validate()
        self.runtime.validate()
        k = self.train.n_clusters(self.scenario)
        if isinstance(k, int) and k > self.scenario.total_clients:
            raise ConfigError(f"train.clusters: {k} clusters for {self.scenario.total_clients} clients")
        return self

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)

    def with_overrides(self, section: str, **values: Any) -> RunConfig:
        """A copy with some fields of one section replaced (None values are ignored)."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})

    def with_fields_from(self, section: str, source: Any, names: tuple[str, ...]) -> RunConfig:
        """A copy with the named fields of one section taken from `source`'s attributes of the same names (None
        values are ignored): how the benches apply their settings to a preset."""
        return self.with_overrides(section, **{name: getattr(source, name) for name in names})

    def with_runtime_flags(self, flags: Any) -> RunConfig:
        """The runtime flags that `hfgan train`, `hfgan up` and every worker share, read from an argparse namespace
        or a `WorkerOptions` (attributes run_id, broker, state, data_dir, run_dir, device, threads; None keeps the
        file's or the environment's value)."""
        return self.with_overrides(
            "runtime",
            run_id=flags.run_id,
            broker_url=flags.broker,
            state_url=flags.state,
            data_dir=flags.data_dir,
            run_dir=flags.run_dir,
            device=flags.device,
            torch_threads=flags.threads,
        )

    def redacted(self) -> RunConfig:
        """A copy whose URLs carry no password (settings.redact_url): what the files a run writes hold."""
        rt = self.runtime
        return self.with_overrides("runtime", broker_url=redact_url(rt.broker_url), state_url=redact_url(rt.state_url))

    def to_dict(self, include_runtime: bool = True) -> dict[str, Any]:
        """Plain data that `RunConfig.from_dict` reads back to an equal config."""
        d = _to_plain(self)
        d["devices"]["profiles"] = {name: prof for name, prof in d["devices"]["profiles"]}
        for dom in d["scenario"]["domains"]:
            for key in _OPTIONAL_DOMAIN_KEYS:
                if dom.get(key) is None:
                    dom.pop(key, None)
        if not include_runtime:
            d.pop("runtime")
        return d

    # Fields that say how long to train and how much to evaluate, not what is trained: a run keeps its identity
    # when they change (so `--resume --rounds N` can extend a run).
    SCHEDULE_FIELDS = ("rounds", "eval_every", "score_samples", "utility_samples", "utility_epochs")

    def digest(self) -> str:
        """sha256 of what defines the training (model, scenario, train, devices), not where it runs nor for how
        many rounds."""
        d = self.to_dict(include_runtime=False)
        for key in self.SCHEDULE_FIELDS:
            d["train"].pop(key)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RunConfig:
        # Imported here: config_parse builds the dataclasses of this module.
        from .config_parse import run_config_from_dict

        return run_config_from_dict(data)


# ----------------------------------------------------------------------------------------------------------------
# Plain-data conversion


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_plain(x) for x in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Loading


def preset_names() -> list[str]:
    files = resources.files("hfgan_core") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def load_config(name_or_path: str | os.PathLike[str]) -> RunConfig:
    """A preset name (see `preset_names()`) or the path of a TOML file; raises ConfigError with one line."""
    text: str
    source = str(name_or_path)
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc.strerror}") from None
    else:
        preset = resources.files("hfgan_core") / "presets" / f"{source}.toml"
        if not preset.is_file():
            raise ConfigError(f"unknown preset {source!r} (known: {', '.join(preset_names())})")
        text = preset.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML in {source}: {exc}") from None
    return RunConfig.from_dict(data).validate()


# The environment variables that override `[runtime]` (settings.py reads them).
ENV_OVERRIDES = {v.name: v.field for v in VARIABLES if v.field in RUNTIME_FIELDS}


def apply_env(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> RunConfig:
    """Environment variables override the runtime section (for containers); see settings.py."""
    values = Settings.from_env(environ).runtime_overrides()
    return cfg.with_overrides("runtime", **values) if values else cfg


def dump_toml(cfg: RunConfig) -> str:
    """A TOML rendering of a config that `load_config` reads back to an equal config."""
    lines: list[str] = []
    d = cfg.to_dict()

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, float):
            return repr(v)
        return str(v)

    def table(name: str, body: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        for k, v in body.items():
            if v is None or isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                continue
            lines.append(f"{k} = {val(v)}")
        lines.append("")

    table("model", d["model"])
    table("scenario", d["scenario"])
    for dom in d["scenario"]["domains"]:
        lines.append("[[scenario.domains]]")
        lines.extend(f"{k} = {val(v)}" for k, v in dom.items() if v is not None)
        lines.append("")
    table("train", d["train"])
    dev = d["devices"]
    lines.append("[devices]")
    lines.append(f"clients = {val(dev['clients'])}")
    lines.append("")
    table("devices.server", dev["server"])
    for name, prof in dev["profiles"].items():
        table(f"devices.profiles.{name}", prof)
    table("runtime", {k: v for k, v in d["runtime"].items()})
    return "\n".join(lines)


__all__ = [
    "ConfigError",
    "ModelConfig",
    "DomainConfig",
    "ScenarioConfig",
    "TrainConfig",
    "DeviceProfile",
    "ServerProfile",
    "DevicesConfig",
    "RuntimeConfig",
    "RunConfig",
    "PAPER_DEVICE_PROFILES",
    "load_config",
    "preset_names",
    "apply_env",
    "dump_toml",
]
