"""A worker's liveness as a file, for container health checks (`python -m workers.health`).

The worker loop rewrites the file with every heartbeat it wrote to the ledger (`WorkerLoop.beat`, when
`HFGAN_HEALTH_FILE` is set), so the file is fresh only while the loop runs and the ledger accepts its beats: a worker
that hangs, spins inside a handler, or lost Redis stops refreshing it. The probe compares the time written in the
file with the clock (the file's own timestamp, not its modification time, so copying or touching it proves
nothing). The file lives in the container's own filesystem, never in a shared volume, where another replica's
beats would make a dead worker look alive.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_beat(path: str | os.PathLike[str], now: float | None = None) -> None:
    """Record a heartbeat at `now` (atomically: a probe never reads half a file)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{time.time() if now is None else now:.3f} {os.getpid()}\n")
    os.replace(tmp, target)


def beat_problem(path: str | os.PathLike[str], max_age_s: float, now: float | None = None) -> str | None:
    """None when the last recorded beat is at most `max_age_s` old, else why the worker is not healthy."""
    now = time.time() if now is None else now
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return f"no heartbeat yet ({path} missing)"
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    try:
        beat = float(text.split()[0])
    except (IndexError, ValueError):
        return f"{path} holds no heartbeat time"
    age = now - beat
    if age > max_age_s:
        return f"last heartbeat {age:.1f} s ago (limit {max_age_s:g} s)"
    if age < -max_age_s:
        return f"last heartbeat {-age:.1f} s in the future: clock or file is wrong"
    return None
