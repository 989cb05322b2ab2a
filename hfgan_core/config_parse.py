"""Reading a `RunConfig` from plain data (a parsed TOML document): unknown keys and wrongly typed values are
ConfigErrors naming the key; one function per section."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import (
    PAPER_DEVICE_PROFILES,
    DeviceProfile,
    DevicesConfig,
    DomainConfig,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    ScenarioConfig,
    ServerProfile,
    TrainConfig,
)
from .settings import ConfigError


def _section(cls: type, data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dict(data)


def _build(cls: type, data: Any, where: str) -> Any:
    kwargs = _section(cls, data, where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by _section
        raise ConfigError(f"{where}: {exc}") from None


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and kind is not bool and (kind is int or kind is float or kind == (int, float)):
        raise ConfigError(f"{where}: expected a number, got a boolean")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__}")
    return value


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from plain data (a parsed TOML document); ConfigError naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a table at the top level")
    top = _section(RunConfig, data, "config")

    model = _build(ModelConfig, top.get("model"), "model")
    scenario = _scenario(top.get("scenario"))
    train = _train(top.get("train"))
    devices = _devices(top.get("devices"))
    runtime = _runtime(top.get("runtime"))

    return RunConfig(model=model, scenario=scenario, train=train, devices=devices, runtime=runtime)


def _scenario(data: Any) -> ScenarioConfig:
    """The [scenario] table, with its list of domains."""
    sc = _section(ScenarioConfig, data, "scenario")
    domains = []
    raw_domains = sc.pop("domains", [])
    if not isinstance(raw_domains, list):
        raise ConfigError("scenario.domains: expected a list of tables")
    for i, d in enumerate(raw_domains):
        dd = _section(DomainConfig, d, f"scenario.domains[{i}]")
        if "dataset" not in dd or "clients" not in dd:
            raise ConfigError(f"scenario.domains[{i}]: 'dataset' and 'clients' are required")
        _typed(dd["clients"], int, f"scenario.domains[{i}].clients")
        if dd.get("samples_per_client") is not None:
            _typed(dd["samples_per_client"], int, f"scenario.domains[{i}].samples_per_client")
        for key in ("path", "format"):
            if dd.get(key) is not None:
                _typed(dd[key], str, f"scenario.domains[{i}].{key}")
        if dd.get("test_fraction") is not None:
            dd["test_fraction"] = float(
                _typed(dd["test_fraction"], (int, float), f"scenario.domains[{i}].test_fraction")
            )
        domains.append(DomainConfig(**dd))
    scenario = ScenarioConfig(domains=tuple(domains), **sc)
    return scenario


def _train(data: Any) -> TrainConfig:
    """The [train] table: numbers typed, betas and cuts as tuples."""
    tr = _section(TrainConfig, data, "train")
    for key in (
        "rounds",
        "local_epochs",
        "batch_size",
        "seed",
        "kld_from_round",
        "score_samples",
        "utility_samples",
        "utility_epochs",
        "eval_every",
    ):
        if key in tr:
            _typed(tr[key], int, f"train.{key}")
    for key in ("lr", "alpha"):
        if key in tr:
            tr[key] = float(_typed(tr[key], (int, float), f"train.{key}"))
    if "betas" in tr:
        if not isinstance(tr["betas"], list | tuple) or len(tr["betas"]) != 2:
            raise ConfigError("train.betas must be a list of two numbers")
        tr["betas"] = tuple(float(_typed(b, (int, float), "train.betas")) for b in tr["betas"])
    if "cuts" in tr and not isinstance(tr["cuts"], str):
        if not isinstance(tr["cuts"], list | tuple):
            raise ConfigError("train.cuts must be 'plan' or a list of [g_head, g_tail, d_head, d_tail] lists")
        cuts = []
        for c in tr["cuts"]:
            if not isinstance(c, list | tuple) or len(c) != 4:
                raise ConfigError(f"train.cuts: {c!r} is not four bits [g_head, g_tail, d_head, d_tail]")
            cuts.append(tuple(int(b) for b in c))
        tr["cuts"] = tuple(cuts)
    for key in ("clustering", "kld_weighting", "adaptive_cuts"):
        if key in tr:
            _typed(tr[key], bool, f"train.{key}")
    train = TrainConfig(**tr)
    return train


def _devices(data: Any) -> DevicesConfig:
    """The [devices] table: the server, profiles (added to the paper's) and the clients' profile names."""
    dv = _section(DevicesConfig, data, "devices")
    devices_kwargs: dict[str, Any] = {}
    if "server" in dv:
        devices_kwargs["server"] = _build(ServerProfile, dv["server"], "devices.server")
    if "profiles" in dv:
        raw = dv["profiles"]
        if not isinstance(raw, dict):
            raise ConfigError("devices.profiles: expected a table of name = {cpu_mhz, flops_per_cycle, data_rate}")
        table = dict(PAPER_DEVICE_PROFILES)
        for name, p in raw.items():
            pp = _section(DeviceProfile, p, f"devices.profiles.{name}")
            missing = [k for k in ("cpu_mhz", "flops_per_cycle", "data_rate") if k not in pp]
            if missing:
                raise ConfigError(f"devices.profiles.{name}: missing {', '.join(missing)}")
            for k, v in pp.items():
                _typed(v, (int, float), f"devices.profiles.{name}.{k}")
            table[name] = DeviceProfile(**pp)
        devices_kwargs["profiles"] = tuple(table.items())
    if "clients" in dv:
        if not isinstance(dv["clients"], list) or not all(isinstance(x, str) for x in dv["clients"]):
            raise ConfigError("devices.clients: expected a list of profile names")
        devices_kwargs["clients"] = tuple(dv["clients"])
    devices = DevicesConfig(**devices_kwargs)
    return devices


def _runtime(data: Any) -> RuntimeConfig:
    """The [runtime] table."""
    rt = _section(RuntimeConfig, data, "runtime")
    if "emulate_slowdown" in rt:
        rt["emulate_slowdown"] = tuple((int(a), float(b)) for a, b in rt["emulate_slowdown"])
    runtime = RuntimeConfig(**rt)
    return runtime
