"""Self-describing per-round checkpoints, loadable with `torch.load(path, weights_only=True)`.

Layout: `<run_dir>/checkpoints/round_<NNNN>/` with one file per role (`client_<k>.pt`, `server.pt`,
`coordinator.pt`) and `manifest.json` (written by the coordinator: the run config, the round, the files that make
the round complete). Every file is a plain dict of tensors, numbers, strings, lists and dicts:

    {"format": "hfgan-checkpoint", "version": 1, "role": "client", "round": 3, "config": {...},
     "state": {canonical name: tensor}, "optimizers": {name: optimizer.state_dict()}, "extra": {...}}

Writes go to a temporary file first and are renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..fsutil import atomic_write

FORMAT = "hfgan-checkpoint"
VERSION = 1


def round_dir(run_dir: str | Path, round: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{round:04d}"


def save_checkpoint(
    path: str | Path,
    *,
    role: str,
    round: int,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    optimizers: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "role": role,
        "round": int(round),
        "config": config,
        "state": {k: v.detach().cpu().clone() for k, v in state.items()},
        "optimizers": optimizers or {},
        "extra": extra or {},
    }
    return atomic_write(path, lambda f: torch.save(blob, f))


def load_checkpoint(path: str | Path, *, role: str | None = None) -> dict[str, Any]:
    """Load and validate one checkpoint file (never unpickles arbitrary objects: weights_only=True)."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise ConfigError(f"unreadable checkpoint {path}: {type(exc).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an hfgan checkpoint")
    if blob.get("version") != VERSION:
        raise ConfigError(f"{path}: checkpoint version {blob.get('version')} is not supported")
    if role is not None and blob.get("role") != role:
        raise ConfigError(f"{path}: a {blob.get('role')} checkpoint where a {role} checkpoint was expected")
    return blob


def models_from_checkpoint(blob: dict[str, Any]) -> tuple:
    """(cluster models, global model, assignment, cuts) held by a coordinator checkpoint."""
    from ..model import CutBits

    clusters: dict[int, dict] = {}
    global_model = None
    for name, t in blob["state"].items():
        head, key = name.split("/", 1)
        if head == "global":
            global_model = global_model or {}
            global_model[key] = t
        else:
            clusters.setdefault(int(head[len("cluster") :]), {})[key] = t
    extra = blob["extra"]
    return (
        clusters,
        global_model,
        {int(c): int(k) for c, k in extra["assignment"].items()},
        {int(c): CutBits.parse(b) for c, b in extra["cuts"].items()},
    )


def write_manifest(run_dir: str | Path, round: int, config: dict[str, Any], files: list[str]) -> Path:
    path = round_dir(run_dir, round) / "manifest.json"
    body = json.dumps(
        {"format": FORMAT, "version": VERSION, "round": round, "config": config, "files": files},
        indent=2,
        sort_keys=True,
    )
    return atomic_write(path, lambda f: f.write(body.encode()))


def complete_rounds(run_dir: str | Path) -> list[int]:
    """Rounds whose manifest exists and whose listed files are all present, oldest first."""
    base = Path(run_dir) / "checkpoints"
    out = []
    if not base.is_dir():
        return out
    for d in sorted(base.glob("round_*")):
        m = d / "manifest.json"
        if not m.is_file():
            continue
        try:
            manifest = json.loads(m.read_text())
            files = manifest["files"]
            rnd = int(manifest["round"])
        except (ValueError, KeyError, TypeError):
            continue
        if all((d / f).is_file() for f in files):
            out.append(rnd)
    return out


def prune(run_dir: str | Path, keep: int) -> list[int]:
    """Delete the checkpoints of rounds older than the `keep` newest complete ones (0 keeps everything). Rounds newer
    than the oldest kept one stay, complete or not (their last files may still be being written)."""
    if keep <= 0:
        return []
    complete = complete_rounds(run_dir)
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    removed = []
    for d in sorted((Path(run_dir) / "checkpoints").glob("round_*")):
        try:
            rnd = int(d.name.split("_")[1])
        except (IndexError, ValueError):
            continue
        if rnd < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(rnd)
    return removed


def optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, Any]:
    """An optimizer's state keyed by canonical parameter names (robust to re-ordering and re-building)."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(params) != len(names):
        raise ValueError("one name per optimised parameter")
    state = {}
    for idx, name in enumerate(names):
        if idx in sd["state"]:
            state[name] = sd["state"][idx]
    return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}
