"""Device-profile files for the planner: JSON or TOML, a shipped preset, or a run config.

A profiles document (JSON or TOML):

    {"server": {"computational_frequency_ghz": 42, "cpu_cycles_per_flop": 16, "transmission_rate_bps": 1e9},
     "profiles": {"phone": {"cpu_mhz": 2000, "flops_per_cycle": 4, "data_rate": 2e7}},
     "clients": ["device3", "phone", {"cpu_mhz": 480, "flops_per_cycle": 1, "data_rate": 5e7, "name": "mcu"}]}

- `clients` (required, non-empty): one entry per client, either a profile name or a table with `cpu_mhz`,
  `flops_per_cycle`, `data_rate` (bytes/s) and an optional display `name`.
- `profiles` (optional): named profiles; the paper's seven device types `device1`..`device7`
  (config.PAPER_DEVICE_PROFILES) are always known, and an entry here of the same name replaces one of them.
- `server` (optional): the paper's server when absent; when present, all three fields are required.
- `description` (optional): free text.

Speeds and rates must be positive numbers. A source may also be the name of a shipped preset (a JSON file in
hfgan_core/presets holding such a document, e.g. `paper_devices` or `paper_ga20`), or a run config (a file with
`[scenario]`/`[devices]` tables, or the name of a run preset): then the clients are `devices.clients` cycled over
the scenario's clients and the run's batch size and cost model become the defaults.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import PAPER_DEVICE_PROFILES, ConfigError, DeviceProfile, RunConfig, ServerProfile, preset_names

_DEVICE_FIELDS = ("cpu_mhz", "flops_per_cycle", "data_rate")
_SERVER_FIELDS = ("computational_frequency_ghz", "cpu_cycles_per_flop", "transmission_rate_bps")
_TOP_KEYS = ("server", "profiles", "clients", "description")


@dataclass(frozen=True)
class ProfileSet:
    """Clients and server to plan for; `names` labels each client for display."""

    server: ServerProfile
    clients: tuple[DeviceProfile, ...]
    names: tuple[str, ...]
    batch_size: int | None = None  # set when the source was a run config
    cost_model: str | None = None

    def cycled(self, n: int) -> ProfileSet:
        """The client list cycled (or cut) to n clients."""
        if n <= 0:
            raise ConfigError("the number of clients must be positive")
        k = len(self.clients)
        return ProfileSet(
            self.server,
            tuple(self.clients[i % k] for i in range(n)),
            tuple(self.names[i % k] for i in range(n)),
            self.batch_size,
            self.cost_model,
        )


def profile_presets() -> list[str]:
    """Names of the shipped profile presets (hfgan_core/presets/*.json)."""
    files = resources.files("hfgan_core") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where}: must be positive, got {value!r}")
    return value


def _fields(data: Any, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(required + optional)})")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    return data


def _device(data: Any, where: str) -> DeviceProfile:
    d = _fields(data, _DEVICE_FIELDS, ("name",), where)
    return DeviceProfile(*(_number(d[k], f"{where}.{k}") for k in _DEVICE_FIELDS))


def parse_profiles(data: Any) -> ProfileSet:
    """A ProfileSet from a parsed profiles document or run config; raises ConfigError with one line."""
    if not isinstance(data, dict):
        raise ConfigError("profiles: expected a table at the top level")
    if "clients" not in data and ("scenario" in data or "devices" in data):
        return _from_run_config(RunConfig.from_dict(data).validate())
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"profiles: unknown key(s) {', '.join(unknown)} (known: {', '.join(_TOP_KEYS)})")
    server = ServerProfile()
    if "server" in data:
        s = _fields(data["server"], _SERVER_FIELDS, (), "server")
        server = ServerProfile(*(_number(s[k], f"server.{k}") for k in _SERVER_FIELDS))
    table = dict(PAPER_DEVICE_PROFILES)
    raw_table = data.get("profiles", {})
    if not isinstance(raw_table, dict):
        raise ConfigError("profiles.profiles: expected a table of name = {cpu_mhz, flops_per_cycle, data_rate}")
    for name, p in raw_table.items():
        table[name] = _device(p, f"profiles.{name}")
    raw_clients = data.get("clients")
    if raw_clients is None:
        raise ConfigError("profiles: missing clients (a list of profile names or tables)")
    if not isinstance(raw_clients, list) or not raw_clients:
        raise ConfigError("profiles: clients must be a non-empty list")
    clients, names = [], []
    for i, c in enumerate(raw_clients):
        if isinstance(c, str):
            if c not in table:
                raise ConfigError(f"clients[{i}]: unknown profile {c!r} (known: {', '.join(table)})")
            clients.append(table[c])
            names.append(c)
        else:
            p = _device(c, f"clients[{i}]")
            clients.append(p)
            label = c.get("name")
            if label is None:
                label = f"{p.cpu_mhz:g}MHz*{p.flops_per_cycle:g} {p.data_rate:.3g}B/s"
            names.append(str(label))
    return ProfileSet(server, tuple(clients), tuple(names))


def _from_run_config(cfg: RunConfig) -> ProfileSet:
    n = cfg.scenario.total_clients
    return ProfileSet(
        cfg.devices.server,
        tuple(cfg.devices.client_profiles(n)),
        tuple(cfg.devices.client_profile_names(n)),
        cfg.train.batch_size,
        cfg.train.cost_model,
    )


def _parse_text(text: str, source: str, suffix: str) -> Any:
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"malformed TOML in {source}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if suffix == ".json":
            raise ConfigError(f"malformed JSON in {source}: {exc}") from None
    try:  # neither suffix: JSON first, then TOML
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{source}: neither valid JSON nor valid TOML") from None


def load_profiles(source: str) -> ProfileSet:
    """A ProfileSet from a file path, a profile preset name, or a run preset name."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {source}: {exc}") from None
        return parse_profiles(_parse_text(text, source, path.suffix.lower()))
    if path.exists():
        raise ConfigError(f"{source} is not a file")
    presets = profile_presets()
    name = source[:-5] if source.endswith(".json") else source
    if name in presets and "/" not in source:
        preset = resources.files("hfgan_core") / "presets" / f"{name}.json"
        return parse_profiles(_parse_text(preset.read_text(), f"preset {name}", ".json"))
    if source in preset_names():
        text = (resources.files("hfgan_core") / "presets" / f"{source}.toml").read_text()
        return parse_profiles(_parse_text(text, f"preset {source}", ".toml"))
    raise ConfigError(f"profiles file not found: {source} (profile presets: {', '.join(presets) or 'none'})")


__all__ = ["ProfileSet", "load_profiles", "parse_profiles", "profile_presets"]
