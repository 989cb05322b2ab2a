"""RoleHost: decode, dedupe, dispatch, ack or dead-letter; and a real role rejecting what it must not use.

The split server runs behind a RoleHost on the memory transport (real bytes through the real codec): wrong shapes,
another run's messages, unexpected kinds and duplicates are dead-lettered (or dropped) with their reason, and the
server goes on serving good messages afterwards.
"""

from __future__ import annotations

import time

import pytest
import torch

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.model import architecture
from hfgan_core.protocol import DHeadOut, DMidOut, GHeadOut, GMidOut, Join, RoundEvent, RoundStart, decode
from hfgan_core.runtime.host import Reject, Role, RoleContext, RoleHost
from hfgan_core.runtime.server import ServerRole
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import SERVER, Delivery, MemoryTransport, client_address

RUN = "host-test"
B = 4
CUTS = ((0, 0, 0, 0), (1, 1, 1, 1))


def _cfg() -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 2),)),
        train=TrainConfig(rounds=1, local_epochs=1, steps_per_epoch=1, batch_size=B, cuts=CUTS),
        runtime=RuntimeConfig(),
    ).validate()


def _ctx(transport: MemoryTransport, run: str = RUN) -> RoleContext:
    return RoleContext(run=run, cfg=_cfg(), transport=transport, store=MemoryRoundStore())


class _Inbox:
    """A consumer that records (and acks) what reaches one client's queue."""

    def __init__(self) -> None:
        self.messages = []

    def __call__(self, delivery: Delivery) -> None:
        self.messages.append(decode(delivery.body))
        delivery.ack()


@pytest.fixture()
def server():
    torch.manual_seed(0)
    transport = MemoryTransport()
    role = ServerRole(_ctx(transport))
    host = RoleHost(role, strict=False)
    transport.declare()
    host.bind()
    inbox = _Inbox()
    transport.consume(client_address(0), inbox)
    return transport, role, host, inbox


def _start(transport: MemoryTransport, participants=(0,), run: str = RUN) -> RoundStart:
    msg = RoundStart(
        run=run,
        round=1,
        sender="coordinator",
        participants=participants,
        cuts=CUTS,
        steps=1,
        deadline=time.time() + 600,
    )
    transport.publish(SERVER, msg.encode())
    return msg


def _g_head(act: torch.Tensor, run: str = RUN, client: int = 0, sender: str | None = None) -> GHeadOut:
    return GHeadOut(run=run, round=1, step=0, sender=sender or client_address(client), client=client, act=act)


def _reasons(transport: MemoryTransport) -> list[str]:
    return [d.reason for d in transport.dead_letters()]


def test_server_dead_letters_a_wrong_shape_and_keeps_working(server):
    transport, role, host, inbox = server
    g, d = architecture(role.ctx.cfg.model).generator, architecture(role.ctx.cfg.model).discriminator
    _start(transport)
    # Client 0 keeps no optional block (cuts 0000): its G head output is B1's, 256x7x7. E1's shape is wrong here.
    assert g.head_output_shape(0) == (256, 7, 7) and g.head_output_shape(1) == (128, 14, 14)
    transport.publish(SERVER, _g_head(torch.randn(B, 128, 14, 14)).encode())
    transport.process()
    dead = transport.dead_letters()
    assert len(dead) == 1 and dead[0].address == SERVER
    assert dead[0].reason.startswith("bad_shape"), dead[0].reason
    assert "[4, 128, 14, 14]" in dead[0].reason and "[4, 256, 7, 7]" in dead[0].reason
    assert host.rejected == {"bad_shape": 1}
    assert role.pending == {} and role.window is None and inbox.messages == []

    # A batch larger than the configured batch size is a bad shape as well.
    transport.publish(SERVER, _g_head(torch.randn(B + 1, 256, 7, 7)).encode())
    transport.process()
    assert _reasons(transport)[-1].startswith("bad_shape") and "batch of 5" in _reasons(transport)[-1]

    # The good message is served: the window opens and the G middle output goes back to client 0.
    transport.publish(SERVER, _g_head(torch.randn(B, 256, 7, 7)).encode())
    transport.process()
    assert len(transport.dead_letters()) == 2
    assert len(inbox.messages) == 1 and isinstance(inbox.messages[0], GMidOut)
    out = inbox.messages[0]
    assert out.client == 0 and out.step == 0 and tuple(out.act.shape) == (B, *g.tail_input_shape(0))
    assert role.window is not None and role.window.phase == "d_fwd"

    # Next phase: D head outputs of the wrong shape are rejected, the right ones answered with D middle outputs.
    shape = (B, *d.head_output_shape(0))
    bad = DHeadOut(
        run=RUN,
        round=1,
        step=0,
        sender=client_address(0),
        client=0,
        phase="d",
        fake=torch.randn(shape),
        real=torch.randn(B, *d.head_output_shape(1)),
    )
    transport.publish(SERVER, bad.encode())
    transport.process()
    assert _reasons(transport)[-1].startswith("bad_shape") and "d_head_out.real" in _reasons(transport)[-1]
    good = DHeadOut(
        run=RUN,
        round=1,
        step=0,
        sender=client_address(0),
        client=0,
        phase="d",
        fake=torch.randn(shape),
        real=torch.randn(shape),
    )
    transport.publish(SERVER, good.encode())
    transport.process()
    assert len(transport.dead_letters()) == 3
    assert isinstance(inbox.messages[-1], DMidOut) and inbox.messages[-1].real is not None
    assert role.window.phase == "d_bwd"
    assert host.rejected == {"bad_shape": 3}


def test_wrong_run_is_rejected(server):
    transport, role, host, inbox = server
    _start(transport, run="another-run")
    transport.process()
    assert role.round == 0 and not role.in_round
    _start(transport)
    transport.process()
    transport.publish(SERVER, _g_head(torch.randn(B, 256, 7, 7), run="another-run").encode())
    transport.process()
    reasons = _reasons(transport)
    assert len(reasons) == 2 and all(r.startswith("wrong_run") for r in reasons)
    assert "another-run" in reasons[0] and RUN in reasons[0]
    assert role.in_round and role.pending == {} and inbox.messages == []
    assert host.rejected == {"wrong_run": 2}


def test_undecodable_and_unexpected_kinds_are_dead_lettered(server):
    transport, role, host, inbox = server
    transport.publish(SERVER, b"\x93not msgpack of a message")
    transport.publish(
        SERVER,
        Join(run=RUN, round=0, sender="client.0", client=0, domain=0, n_samples=10, profile={"cpu_mhz": 1.0}).encode(),
    )
    transport.publish(SERVER, _g_head(torch.randn(B, 256, 7, 7)).encode())  # before any round
    transport.process()
    reasons = _reasons(transport)
    assert reasons[0].startswith("malformed") and reasons[1].startswith("unexpected_kind")
    assert reasons[2].startswith("stale")
    _start(transport)
    transport.process()
    # A client may only speak for itself (the host's authorization, roles.py; tests/unit/test_roles.py has the rest).
    transport.publish(SERVER, _g_head(torch.randn(B, 256, 7, 7), sender="client.1").encode())
    transport.process()
    assert _reasons(transport)[-1].startswith("forged_client")
    assert dict(host.rejected) == {"malformed": 1, "unexpected_kind": 1, "stale": 1, "forged_client": 1}


def test_duplicate_delivery_is_handled_once(server):
    transport, role, host, inbox = server
    start = _start(transport)
    transport.publish(SERVER, start.encode())  # the same msg_id again (a redelivery)
    transport.process()
    # Handled twice, the second round_start would be dead-lettered as stale.
    assert transport.dead_letters() == [] and role.round == 1 and role.in_round
    head = _g_head(torch.randn(B, 256, 7, 7))
    for _ in range(2):
        transport.publish(SERVER, head.encode())
    transport.process()
    assert transport.dead_letters() == []
    assert len(inbox.messages) == 1 and role.windows_run == 0 and role.window is not None


# ------------------------------------------------------------------------------------------ the host on its own


class _Recorder(Role):
    """A role that records what it handles; event "reject" raises Reject, "boom" an internal error. It is named as
    a registered role (round events go to every role)."""

    name = "server"
    accepts = (RoundEvent,)

    def __init__(self, ctx: RoleContext):
        super().__init__(ctx)
        self.handled: list[RoundEvent] = []

    def addresses(self) -> list[str]:
        return ["coordinator"]

    def on_message(self, msg: RoundEvent) -> None:
        if msg.event == "reject":
            raise Reject("nope: not in this state")
        if msg.event == "boom":
            raise RuntimeError("boom")
        self.handled.append(msg)


def _event(event: str, run: str = RUN) -> RoundEvent:
    return RoundEvent(run=run, round=1, sender="coordinator", event=event)


def _deliver(host: RoleHost, body: bytes) -> tuple[Delivery, list]:
    settled: list = []
    delivery = Delivery(body, "coordinator", _settle=lambda how, reason: settled.append((how, reason)))
    host.on_delivery(delivery)
    return delivery, settled


def test_same_msg_id_is_acked_every_time_and_handled_once():
    host = RoleHost(_Recorder(_ctx(MemoryTransport())))
    msg = _event("started")
    first, s1 = _deliver(host, msg.encode())
    again, s2 = _deliver(host, msg.encode())
    assert s1 == [("ack", None)] and s2 == [("ack", None)]
    assert first.settled == again.settled == "ack"
    assert [m.msg_id for m in host.role.handled] == [msg.msg_id]
    # Same content under a new msg_id is a new message.
    _deliver(host, _event("started").encode())
    assert len(host.role.handled) == 2


def test_dedupe_window_is_bounded():
    host = RoleHost(_Recorder(_ctx(MemoryTransport())), dedupe_window=2)
    first = _event("a")
    for m in (first, _event("b"), _event("c")):
        _deliver(host, m.encode())
    _deliver(host, first.encode())  # forgotten after two newer ids: handled again
    assert [m.event for m in host.role.handled] == ["a", "b", "c", "a"]


def test_reject_and_wrong_run_dead_letter_with_reason():
    host = RoleHost(_Recorder(_ctx(MemoryTransport())))
    d, settled = _deliver(host, _event("reject").encode())
    assert settled == [("reject", "nope: not in this state")]
    d, settled = _deliver(host, _event("x", run="other").encode())
    assert settled[0][0] == "reject" and settled[0][1].startswith("wrong_run")
    d, settled = _deliver(
        host, RoundStart(run=RUN, round=1, sender="c", participants=(), cuts=(), steps=1, deadline=1.0).encode()
    )
    assert settled[0][1].startswith("unexpected_kind")
    assert host.role.handled == [] and dict(host.rejected) == {"nope": 1, "wrong_run": 1, "unexpected_kind": 1}
    # A rejected message is not remembered as handled: a fixed redelivery of it is still refused on its merits.
    msg = _event("reject")
    _deliver(host, msg.encode())
    _, settled = _deliver(host, msg.encode())
    assert settled[0][0] == "reject"


def test_internal_error_policy():
    lenient = RoleHost(_Recorder(_ctx(MemoryTransport())), strict=False)
    _, settled = _deliver(lenient, _event("boom").encode())
    assert settled == [("reject", "internal: RuntimeError: boom")]
    _deliver(lenient, _event("fine").encode())  # the worker keeps running
    assert [m.event for m in lenient.role.handled] == ["fine"]

    strict = RoleHost(_Recorder(_ctx(MemoryTransport())), strict=True)
    settled = []
    delivery = Delivery(_event("boom").encode(), "coordinator", _settle=lambda how, r: settled.append((how, r)))
    with pytest.raises(RuntimeError, match="boom"):
        strict.on_delivery(delivery)
    assert delivery.settled == "reject" and settled[0][1].startswith("internal")


def test_host_binds_through_the_transport():
    transport = MemoryTransport()
    host = RoleHost(_Recorder(_ctx(transport)))
    host.bind()
    ok, other_run = _event("ok"), _event("x", run="other")
    for m in (ok, other_run, ok):
        transport.publish("coordinator", m.encode())
    assert transport.process() == 3
    assert [m.event for m in host.role.handled] == ["ok"]
    dead = transport.dead_letters()
    assert len(dead) == 1 and dead[0].body == other_run.encode() and dead[0].reason.startswith("wrong_run")
    assert transport.pending() == 0
