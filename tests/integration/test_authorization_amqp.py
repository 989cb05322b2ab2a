"""The authorization table over the real RabbitMQ: a client logged in as its own broker user (`hfgantest-client-1`,
whose `user_id` the broker validates) sends the server what the audit sent it (a server model, a run end, a round
start, a message speaking as the server, a step for another client). The server's host dead-letters each with its
reason (`x-hfgan-reason`), never handles it, and goes on handling the client's legitimate message."""

from __future__ import annotations

import time

from hfgan_core.protocol import REGISTRY, WireError, decode
from hfgan_core.runtime.host import RoleContext, RoleHost
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport.amqp import AmqpTransport
from tests.integration.test_amqp_permissions import NS, as_client, creds  # noqa: F401 - the module's fixture
from tests.unit.test_roles import RUN, Probe, _cfg, sample


def test_a_clients_forged_messages_are_dead_lettered_with_their_reason(creds, amqp_url: str) -> None:  # noqa: F811
    forged = {
        "server_model": sample(REGISTRY["server_model"], "client.1"),
        "run_end": sample(REGISTRY["run_end"], "client.1"),
        "round_start": sample(REGISTRY["round_start"], "client.1"),
        "as_server": sample(REGISTRY["g_head_out"], "server"),
        "other_client": sample(REGISTRY["g_head_out"], "client.1", client=0),
    }
    legit = sample(REGISTRY["g_head_out"], "client.1", client=1)
    with AmqpTransport(amqp_url, namespace=NS) as server_t, as_client(creds, 1, amqp_url) as client:
        probe = Probe(RoleContext(run=RUN, cfg=_cfg(), transport=server_t, store=MemoryRoundStore()), "server")
        host = RoleHost(probe)
        host.bind()
        for msg in (*forged.values(), legit):
            client.publish("server", msg.encode())
        deadline = time.monotonic() + 60  # a bound for a broken broker, not a speed check
        while len(probe.handled) + sum(host.rejected.values()) < len(forged) + 1 and time.monotonic() < deadline:
            server_t.process(timeout=0.2)
        assert [m.msg_id for m in probe.handled] == [legit.msg_id]
        assert host.rejected == {"unauthorized": 3, "forged_sender": 1, "forged_client": 1}
        ids = {m.msg_id: name for name, m in forged.items()}
        got: dict[str, str] = {}
        for d in server_t.dead_letters(limit=100_000):  # the rejects were confirmed: they are in the queue
            try:
                msg_id = decode(d.body).msg_id
            except WireError:  # other tests' undecodable dead letters share the queue
                continue
            if msg_id in ids:
                got[ids[msg_id]] = d.reason
        assert set(got) == set(ids.values()), sorted(got)
        assert got["server_model"].startswith("unauthorized: a client may not send server_model to the server")
        assert got["run_end"].startswith("unauthorized:") and got["round_start"].startswith("unauthorized:")
        assert got["as_server"].startswith("forged_sender: broker user 'hfgantest-client-1'")
        assert got["other_client"].startswith("forged_client:")
