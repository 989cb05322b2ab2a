"""A server that restarts mid-round, and clients whose new step supersedes one the server still holds (server.py).

Driven message by message over the memory transport on a fake clock (the harness of test_pace.py): every client
message is held until the test releases it, so the test decides what reaches the server and when.

- the restarted server tells every participant that has not finished the round that its step in flight is lost
  (`steps_lost`): a client past its step's first reply goes on with its next step at once, where it waited out its
  step timeout (5 x the step deadline) before; a client still waiting for its first reply sends its activation
  again (it may still be in the server's queue, or lost), and the server serves that step once;
- a client's new activation supersedes whatever the server still holds of that client (a pending activation, or
  its place in the open window), so a client that gave up a step is never refused its next one as a "duplicate";
  the other members of the window go on;
- a client that had finished the round and runs it again (restarted) is served again, not refused as out of its
  round; a `steps_lost` for a round the client is not training in is rejected as stale;
- once every client reported the round, the coordinator tells a server that has not finished it to close it (its
  clients gave up steps it never learned about), rather than both waiting for the round deadline.
"""

from __future__ import annotations

import pytest

from hfgan_core.protocol import GHeadOut, RoundClose, RoundDone, RoundStart, StepsLost
from hfgan_core.runtime.host import Reject, RoleHost
from hfgan_core.runtime.server import ServerRole
from hfgan_core.transport import SERVER, client_address
from tests.unit.test_fault_guards import RUN, _coordinator
from tests.unit.test_pace import Harness

START = RoundStart(
    run="pace", round=1, sender="coordinator", participants=(0, 1, 2), cuts=((0, 0, 0, 0),) * 3, steps=2,
    deadline=1e18,
)  # fmt: skip


def _restart_server(h: Harness, finished: set[int]) -> ServerRole:
    """Replace the harness's server by a new process's: its consumer goes, a new role binds and rejoins the round
    as `services.resume_server` makes it (from the coordinator's record of the round start)."""
    h.transport.cancel(SERVER)
    server = ServerRole(h.server.ctx)
    RoleHost(server, strict=True).bind()
    server.resume_round(START, finished)
    h.server = server
    return server


def _held_kinds(h: Harness, c: int) -> list[tuple[str, int]]:
    """What client c sent to the server that the test holds back (its join to the coordinator left out)."""
    return [(msg.KIND, msg.step) for address, msg in h.held[c] if address == SERVER]


def test_a_restarted_server_tells_the_unfinished_clients_at_once_and_the_round_goes_on():
    h = Harness(straggler_factor=3.0)
    h.release(0, 1, 2, at=0.0)  # the first window opens; every client computes its D head and holds the result
    assert h.server.window is not None and h.server.window.members == [0, 1, 2]
    for c in range(3):
        assert _held_kinds(h, c) == [("d_head_out", 0)]
        h.held[c] = []  # the server dies before any of them reaches it
    server = _restart_server(h, finished={1})  # client 1 reported the round done (as far as the ledger knows)
    h.drain()
    # Clients 0 and 2 learn at once that step 0 is lost and send step 1; client 1 is told nothing.
    for c in (0, 2):
        assert h.clients[c].steps_dropped == 1 and h.clients[c].step == 1
        assert _held_kinds(h, c) == [("g_head_out", 1)]
    assert h.clients[1].steps_dropped == 0 and h.held[1] == []
    h.release(0, 2, at=1.0)
    w = server.window
    assert w is not None and w.members == [0, 2] and w.steps == {0: 1, 2: 1}  # nobody waits for finished client 1


def test_a_new_activation_supersedes_the_clients_place_in_the_window_and_the_others_go_on():
    h = Harness(straggler_factor=3.0)
    h.release(0, 1, 2, at=0.0)
    w = h.server.window
    assert w is not None and w.members == [0, 1, 2] and w.phase == "d_fwd"
    h.held[2] = []  # client 2's D-head outputs are lost (its host died), and it comes back at step 1
    h.release(0, 1, at=0.5)
    assert w.phase == "d_fwd" and set(w.inbox) == {0, 1}  # the window waits for client 2
    h.clients[2].tick(1e9)  # the client's own step timeout: it gives step 0 up and sends step 1
    assert _held_kinds(h, 2) == [("g_head_out", 1)]
    h.release(2, at=0.6)
    # Before, the server refused it ("duplicate: client 2 already has a step in flight") and the client waited out
    # one more step timeout; now the window goes on at once without client 2, whose step 1 waits for the next one.
    assert h.server.window is w and w.members == [0, 1] and w.phase == "d_bwd" and w.steps == {0: 0, 1: 0}
    assert h.server.pending[2].step == 1 and h.server.late[2] == 0
    for t in (1.0, 1.5, 2.0, 2.5):  # the other four phases of step 0
        h.release(0, 1, at=t)
    assert 2 not in h.server.done_clients  # its abandoned step 0 does not count as done
    h.release(0, 1, at=3.0)  # their step-1 activations: the next window has all three
    w = h.server.window
    assert w is not None and w.members == [0, 1, 2] and w.steps == {0: 1, 1: 1, 2: 1}


def test_a_new_activation_replaces_a_pending_one_and_a_finished_client_is_served_again():
    h = Harness(straggler_factor=3.0)
    h.release(0, at=0.0)  # client 0's step 0 waits for the others' activations
    act = h.server.pending[0].act

    def g_head(client: int, step: int) -> GHeadOut:
        return GHeadOut(run="pace", round=1, step=step, sender=client_address(client), client=client, act=act)

    h.server.on_message(g_head(0, 1))  # client 0 gave step 0 up and sent step 1
    assert h.server.window is None and h.server.pending[0].step == 1
    # A client the restarted server takes for finished (done with its last step before the crash, by the server's
    # account) that restarted too and runs the round again from its first step: served, no longer "finished".
    server = _restart_server(h, finished={1})
    assert 1 in server.done_clients
    server.on_message(g_head(1, 0))
    assert 1 not in server.done_clients and server.pending[1].step == 0


def test_a_step_still_waiting_for_its_first_reply_is_sent_again_and_served_once():
    h = Harness(straggler_factor=3.0)
    h.release(0, 1, at=0.0)  # clients 0 and 1's activations reach the server, which waits for client 2's
    assert h.server.window is None and set(h.server.pending) == {0, 1}
    assert _held_kinds(h, 2) == [("g_head_out", 0)]  # client 2's is still "in the queue"
    server = _restart_server(h, finished=set())  # the pending activations die with the server
    h.drain()
    # Nobody knows whether its activation was lost: each sends it again and keeps its step.
    assert [_held_kinds(h, c) for c in range(3)] == [
        [("g_head_out", 0)],
        [("g_head_out", 0)],
        [("g_head_out", 0), ("g_head_out", 0)],
    ]
    assert all(c.steps_dropped == 0 and c.step == 0 for c in h.clients)
    h.release(0, 1, 2, at=1.0)  # client 2's queued activation and its copy: one pending step
    w = server.window
    assert w is not None and w.members == [0, 1, 2] and w.steps == {0: 0, 1: 0, 2: 0}
    copy = GHeadOut(run="pace", round=1, step=0, sender=client_address(2), client=2, act=w.t["g_in"][2].detach())
    with pytest.raises(Reject, match="^duplicate"):  # a copy that arrives once its step is in the window
        server.on_message(copy)
    assert w.members == [0, 1, 2]
    for t in (2.0, 3.0, 4.0, 4.5, 5.0):  # the five phases of step 0, each answered by all three
        h.release(0, 1, 2, at=t)
    assert server.windows_run == 1 and not server.late


def test_steps_lost_outside_the_clients_training_is_rejected_as_stale():
    h = Harness(straggler_factor=3.0)
    client = h.clients[0]  # in round 1, waiting for the reply to its step-0 activation
    with pytest.raises(Reject, match="^stale"):
        client.on_message(StepsLost(run="pace", round=2, sender="server", client=0, reason="the server restarted"))
    assert client.steps_dropped == 0 and client.step == 0 and _held_kinds(h, 0) == [("g_head_out", 0)]


def test_the_coordinator_closes_the_servers_round_once_every_client_reported():
    # Clients that gave up their last step (their server restarted) finish the round without the server knowing;
    # the coordinator tells the server to close the round instead of leaving both to wait for the round deadline.
    role = _coordinator(clients=2)
    sent: list[tuple[str, object]] = []
    role.send = lambda address, msg: sent.append((address, msg))

    def report(c: int) -> RoundDone:
        return RoundDone(
            run=RUN, round=1, sender=client_address(c), client=c, n_samples=16, steps_done=0, update_digest="u",
            metrics={},
        )  # fmt: skip

    role.on_message(report(0))
    assert not [m for _, m in sent if isinstance(m, RoundClose)]  # client 1 may still send the server steps
    role.on_message(report(1))
    closes = [(a, m) for a, m in sent if isinstance(m, RoundClose)]
    assert [(a, m.round, m.reason) for a, m in closes] == [(SERVER, 1, "every client reported the round")]
    role.tick(role.ctx.clock())  # once per round
    assert len([m for _, m in sent if isinstance(m, RoundClose)]) == 1 and role.phase == "training"
