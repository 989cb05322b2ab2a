"""Deadlines that follow the measured pace of the peers.

A straggler is a participant that is much slower than the others, not one that is slower than a fixed number of
seconds on whatever host happens to run the workers: on a busy machine every client computes slowly, and a fixed
deadline would call all of them late. A `Pace` keeps the most recent response times it observed (how long a client
took to answer a phase, how long a reply took to come back) and gives the deadline

    max(floor, factor x median of the recent response times)

`floor` is the configured `runtime.step_deadline_s` (the least patience); `factor` is `runtime.straggler_factor`
(0: the fixed floor alone, the behaviour of a plain step deadline). The (upper) median is taken over the last `keep`
observations, so a straggler among several peers does not move it, and a change of the host's load is followed
within a window or two. Before the first observation there is no deadline (infinite): nobody can be slower than
peers that have not answered yet; the round deadline still bounds every wait.
"""

from __future__ import annotations

import math
from collections import deque


class Pace:
    """Recent response times and the deadline they imply (see the module docstring)."""

    def __init__(self, floor_s: float, factor: float, keep: int = 16):
        if floor_s <= 0:
            raise ValueError("the floor of a deadline must be positive")
        if factor < 0:
            raise ValueError("the straggler factor must not be negative")
        self.floor_s = float(floor_s)
        self.factor = float(factor)
        self._recent: deque[float] = deque(maxlen=keep)

    def observe(self, seconds: float) -> None:
        if seconds >= 0:
            self._recent.append(float(seconds))

    def __len__(self) -> int:
        return len(self._recent)

    @property
    def typical(self) -> float | None:
        """The (upper) median of the recent response times; None before the first one."""
        if not self._recent:
            return None
        ordered = sorted(self._recent)
        return ordered[len(ordered) // 2]

    def deadline(self) -> float:
        if self.factor <= 0:
            return self.floor_s
        typical = self.typical
        if typical is None:
            return math.inf
        return max(self.floor_s, self.factor * typical)


__all__ = ["Pace"]
