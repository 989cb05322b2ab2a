"""Step deadlines that follow the measured pace of the peers (runtime/pace.py), on an injected clock.

- `Pace`: no deadline before anything was measured; then max(floor, factor x the upper median of the recent
  response times); a fixed floor with factor 0;
- the server, driven message by message over the memory transport with a fake clock: a member that takes more than
  3x as long as its peers is dropped from the step once its peers answered, however slow they all are; a window
  whose members are all equally slow (a busy host) drops nobody, where a fixed deadline dropped them all.
"""

from __future__ import annotations

import math

import pytest

from hfgan_core.config import ConfigError, DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.protocol import RoundStart
from hfgan_core.runtime.client import ClientRole
from hfgan_core.runtime.host import Role, RoleContext, RoleHost
from hfgan_core.runtime.pace import Pace
from hfgan_core.runtime.server import ServerRole
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import SERVER, MemoryTransport, client_address


def test_pace_has_no_deadline_before_it_measured_anything_then_follows_the_median():
    p = Pace(floor_s=0.5, factor=3.0, keep=4)
    assert p.deadline() == math.inf and p.typical is None
    p.observe(1.0)
    assert p.deadline() == 3.0
    for s in (0.1, 0.1, 0.1):
        p.observe(s)
    assert p.typical == 0.1 and p.deadline() == 0.5  # the floor: never less patient than configured
    for s in (2.0, 2.0, 2.0):  # the host got busier: the last `keep` observations count
        p.observe(s)
    assert p.typical == 2.0 and p.deadline() == 6.0
    p.observe(60.0)  # one straggler among the peers does not move the median
    assert p.deadline() == 6.0
    fixed = Pace(floor_s=0.5, factor=0.0)
    assert fixed.deadline() == 0.5
    fixed.observe(10.0)
    assert fixed.deadline() == 0.5


def test_straggler_factor_is_validated():
    with pytest.raises(ConfigError, match="straggler_factor"):
        RuntimeConfig(straggler_factor=0.5).validate()
    RuntimeConfig(straggler_factor=0.0).validate()


class Harness:
    """A server and three clients over the memory transport on a fake clock; every client message is held until
    the test releases it, so the test decides when each answer reaches the server."""

    def __init__(self, straggler_factor: float, step_deadline_s: float = 0.1):
        import torch

        self.now = 0.0
        cfg = RunConfig(
            scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 3),)),
            train=TrainConfig(seed=3, batch_size=4, cuts=((0, 0, 0, 0),)),
            runtime=RuntimeConfig(step_deadline_s=step_deadline_s, straggler_factor=straggler_factor),
        ).validate()
        self.transport, store = MemoryTransport(), MemoryRoundStore()

        def ctx() -> RoleContext:
            return RoleContext(run="pace", cfg=cfg, transport=self.transport, store=store, clock=lambda: self.now)

        g = torch.Generator().manual_seed(0)
        data = [TensorClientData(torch.rand(8, 1, 28, 28, generator=g) * 2 - 1, torch.arange(8) % 10) for _ in "abc"]
        self.server = ServerRole(ctx())
        self.clients = [ClientRole(ctx(), client=i, domain=0, data=d) for i, d in enumerate(data)]
        self.held: dict[int, list] = {i: [] for i in range(3)}
        for c in self.clients:
            c.send = lambda address, msg, i=c.client: self.held[i].append((address, msg))
        for role in [self.server, *self.clients]:
            RoleHost(role, strict=True).bind()
        start = RoundStart(
            run="pace", round=1, sender="coordinator", participants=(0, 1, 2), cuts=((0, 0, 0, 0),) * 3, steps=2,
            deadline=1e18,
        )  # fmt: skip
        self.transport.publish(SERVER, start.encode())
        for i in range(3):
            self.transport.publish(client_address(i), start.encode())
        self.drain()

    def drain(self) -> None:
        while self.transport.process_one():
            pass

    def release(self, *clients: int, at: float) -> None:
        self.now = at
        for i in clients:
            for address, msg in self.held[i]:
                Role.send(self.clients[i], address, msg)
            self.held[i] = []
        self.drain()


def _drops(h: Harness) -> dict[int, int]:
    return {c: n for c, n in h.server.late.items() if n}


def test_a_member_three_times_slower_than_its_peers_is_dropped_however_slow_the_host():
    h = Harness(straggler_factor=3.0)
    h.release(0, 1, 2, at=0.0)  # the three activations: the window opens with every client
    w = h.server.window
    assert w is not None and w.members == [0, 1, 2] and w.phase == "d_fwd"
    # A busy host: clients 0 and 1 take 5 s to answer (50x the configured 0.1 s); client 2 does not answer yet.
    h.release(0, 1, at=5.0)
    h.server.tick(14.9)  # 3 x 5 s: not yet late
    assert h.server.window is w and _drops(h) == {}
    h.server.tick(15.1)
    assert _drops(h) == {2: 1}  # dropped from the step, the others go on
    assert h.server.window is w and w.members == [0, 1] and w.phase == "d_bwd"


def test_a_window_of_equally_slow_members_drops_nobody_where_a_fixed_deadline_drops_all():
    for factor, expected in ((3.0, {}), (0.0, {0: 1, 1: 1, 2: 1})):
        h = Harness(straggler_factor=factor)
        h.release(0, 1, 2, at=0.0)
        h.server.tick(4.0)  # nobody has answered after 4 s (40x the configured deadline)
        h.release(0, 1, 2, at=4.5)
        assert _drops(h) == expected, factor
        if factor:  # the paced server went on with every member
            assert h.server.window is not None and h.server.window.members == [0, 1, 2]


def test_a_load_spike_that_slows_every_member_makes_none_of_them_late():
    h = Harness(straggler_factor=3.0)
    t = 0.0
    h.release(0, 1, 2, at=t)
    for _ in range(5):  # step 1: every phase answered by everyone after 1 s
        t += 1.0
        h.release(0, 1, 2, at=t)
    assert h.server.windows_run == 1 and _drops(h) == {}
    h.release(0, 1, 2, at=t)  # the step-2 activations: the second window
    w = h.server.window
    assert w is not None and w.steps == {0: 1, 1: 1, 2: 1}
    # Now the host gets ten times slower for everyone: 3.5 s pass (the measured deadline is 3 x 1 s) and nobody has
    # answered. Nobody is late: most members missing means the host, not a member, is slow.
    h.server.tick(t + 3.5)
    assert _drops(h) == {} and h.server.window is w
    h.release(0, 1, at=t + 8.0)  # two answer after 8 s; the third has not answered 9 s in: it is dropped
    h.server.tick(t + 9.1)
    assert _drops(h) == {2: 1}


def test_a_participant_that_never_sends_holds_the_first_window_only_as_long_as_its_peers_pace():
    # Nothing measured yet (the run's first window): before, the server waited for client 2 until the round
    # deadline, so a client that joined and stayed silent stopped every round from training. Now the missing one is
    # waited for 3x as long as the others took to send theirs after the round start (at least step_deadline_s).
    h = Harness(straggler_factor=3.0)  # the round started at t = 0
    h.release(0, 1, at=0.5)  # clients 0 and 1 send their activations 0.5 s into the round; client 2 never does
    h.server.tick(1.4)
    assert h.server.window is None
    h.server.tick(1.6)  # 3 x 0.5 s after the round start
    w = h.server.window
    assert w is not None and w.members == [0, 1] and h.server.lagging == {2} and _drops(h) == {2: 1}
    # A busy host makes the peers slow too: the patience scales with them.
    h = Harness(straggler_factor=3.0)
    h.release(0, 1, at=5.0)
    h.server.tick(14.9)
    assert h.server.window is None
    h.server.tick(15.1)
    assert h.server.window is not None and h.server.window.members == [0, 1]
