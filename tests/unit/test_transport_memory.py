"""The transport contract on the in-memory transport (the embedded runtime's)."""

from __future__ import annotations

from hfgan_core.transport import MemoryTransport, open_transport
from tests.contract.transport_contract import TransportContract, collect, drain


class TestMemoryTransport(TransportContract):
    def make(self) -> MemoryTransport:
        return MemoryTransport()


def test_open_transport_picks_memory_by_scheme() -> None:
    t = open_transport("memory://")
    assert isinstance(t, MemoryTransport)
    handler, got = collect()
    t.consume("server", handler)
    t.publish("server", b"via open_transport")
    drain(t, got, 1)
    assert got[0].body == b"via open_transport"
