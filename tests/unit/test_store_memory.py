"""The round-ledger contract on the in-memory store, with a fake clock (TTLs expire without sleeping)."""

from __future__ import annotations

from hfgan_core.state import MemoryRoundStore, open_store
from tests.contract.store_contract import StoreContract


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class TestMemoryRoundStore(StoreContract):
    def make(self) -> MemoryRoundStore:
        return MemoryRoundStore(clock=FakeClock())

    def advance(self, store: MemoryRoundStore, seconds: float) -> None:  # type: ignore[override]
        store._clock.now += seconds


def test_open_store_picks_memory_by_scheme() -> None:
    s = open_store("memory://")
    assert isinstance(s, MemoryRoundStore)
    assert s.init_run("r", "d", "{}") is True
