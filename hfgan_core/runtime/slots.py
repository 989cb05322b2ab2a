"""Client slots, kept by the coordinator: which client process holds which client index, renewed by heartbeats.

Clients never open the ledger (docs/security.md): a client process asks the coordinator for a slot over the
broker with a `ClientHeartbeat` (as the broker user of that slot, `client-<k>`: a client can ask only for the slot its
credentials name) and keeps it by sending one every few seconds. The coordinator answers on `events.slot.<owner>`
with a `SlotGrant`: granted, or refused with a free slot to try instead (-1: none, the process waits as a spare).
A slot whose holder has not renewed it for `ttl_s` is free: a spare (or the restarted process) takes it over.

Every operation is O(1) in the number of slots (`bench/admission.py`): the holders are kept in renewal order (an
OrderedDict, `move_to_end` on each renewal), so the least recently renewed holder, the only one that can have
expired first, is at the front; slots never handed out are counted off from 0. The table lives in the coordinator's
memory only: after a coordinator restart each holder's next heartbeat takes its slot back (a slot nobody holds is
granted to the first heartbeat for it).
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict
from dataclasses import dataclass

OWNER = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a routing-key word: `events.slot.<owner>`


@dataclass
class Holder:
    owner: str
    expires: float


class SlotTable:
    def __init__(self, n_slots: int, ttl_s: float):
        self.n = int(n_slots)
        self.ttl_s = float(ttl_s)
        self.holders: OrderedDict[int, Holder] = OrderedDict()
        self._next_unused = 0  # slots below this were handed out at least once
        self._released: list[int] = []  # slots given back explicitly (a min-heap)

    def beat(self, slot: int, owner: str, now: float) -> str:
        """`owner` renews or asks for `slot`: "renewed", "granted" (it was free or its holder expired), or
        "refused" (another owner holds it and has renewed it within ttl_s)."""
        h = self.holders.get(slot)
        if h is not None and h.owner != owner and h.expires > now:
            return "refused"
        outcome = "renewed" if h is not None and h.owner == owner else "granted"
        self.holders[slot] = Holder(owner, now + self.ttl_s)
        self.holders.move_to_end(slot)
        return outcome

    def release(self, slot: int, owner: str) -> None:
        h = self.holders.get(slot)
        if h is not None and h.owner == owner:
            del self.holders[slot]
            heapq.heappush(self._released, slot)

    def free_slot(self, now: float) -> int:
        """A slot that a request would be granted now (-1: none). Amortised O(1)."""
        while self._released:
            slot = self._released[0]
            if slot not in self.holders:
                return slot
            heapq.heappop(self._released)  # taken again since it was released
        while self._next_unused < self.n and self._next_unused in self.holders:
            self._next_unused += 1
        if self._next_unused < self.n:
            return self._next_unused
        for slot, h in self.holders.items():  # the least recently renewed: the first to expire
            return slot if h.expires <= now else -1
        return -1

    def holder(self, slot: int, now: float) -> str | None:
        h = self.holders.get(slot)
        return h.owner if h is not None and h.expires > now else None
