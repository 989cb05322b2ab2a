"""Every logged model update is either aggregated or settled in the ledger with a reason (never silently unused).

Two ways an update goes unused, each over the memory transport with real deadlines:
- a client logs its update and "dies" before its round report reaches the coordinator: the round closes at its
  deadline without it, and the update is recorded as discarded ("no round report ...");
- a round that misses its quorum is not aggregated: the updates of those who arrived (and the server's) are
  recorded as discarded ("quorum not met").
"""

from __future__ import annotations

import pytest

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.protocol import ClientUpdate, ServerUpdate, decode
from hfgan_core.runtime import ledger
from hfgan_core.runtime.embedded import EmbeddedRunner

CUTS = ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0))


def run(quorum: float, silent_client: int, silent_rounds: set[int]):
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 3),)),
        train=TrainConfig(rounds=2, local_epochs=1, steps_per_epoch=2, batch_size=16, cuts=CUTS),
        runtime=RuntimeConfig(step_deadline_s=1.0, round_deadline_s=4.0, quorum=quorum),
    ).validate()
    runner = EmbeddedRunner(cfg, [TensorClientData.random(48, i) for i in range(3)], [0, 0, 0], run_id=f"acct-{quorum}")
    client = runner.clients[silent_client]
    send = client.send

    def send_unless_report(address, msg):
        if msg.KIND == "round_done" and msg.round in silent_rounds:
            return  # the client dies between logging its update and reporting it
        send(address, msg)

    client.send = send_unless_report
    result = runner.run()
    published = {}
    for rec in runner.transport.read_log():
        msg = decode(rec.body, kinds=(ClientUpdate, ServerUpdate))
        published[msg.msg_id] = msg
    return runner, result, published


def settled(runner, rounds):
    aggregated, discarded = set(), {}
    for r in rounds:
        docs = ledger.RoundDocs.read(runner.store, runner.run_id, r)
        for job in docs.jobs.values():
            aggregated |= set(job["update_ids"].values())
        discarded.update(docs.discarded)
    return aggregated, discarded


@pytest.mark.slow
def test_an_update_without_its_report_is_discarded_with_a_reason():
    runner, result, published = run(quorum=0.5, silent_client=2, silent_rounds={1})
    assert [r.aggregated for r in result.reports] == [True, True]
    assert result.reports[0].arrived == [0, 1] and result.reports[0].dropped == {2: "missed the round deadline"}
    assert result.reports[1].arrived == [0, 1, 2]  # it rejoined
    aggregated, discarded = settled(runner, (1, 2))
    assert set(published) == aggregated | set(discarded)
    lost = [m for m, u in published.items() if isinstance(u, ClientUpdate) and u.client == 2 and u.round == 1]
    assert len(lost) == 1 and lost[0] not in aggregated
    assert "no round report" in discarded[lost[0]]


@pytest.mark.slow
def test_a_round_without_quorum_discards_its_updates_with_a_reason():
    runner, result, published = run(quorum=1.0, silent_client=1, silent_rounds={1})
    assert [r.aggregated for r in result.reports] == [False, True]
    aggregated, discarded = settled(runner, (1, 2))
    assert set(published) == aggregated | set(discarded)
    round1 = {m for m, u in published.items() if u.round == 1}
    # Round 1: the two clients that reported and the server, discarded as not aggregated; client 1's update, whose
    # report never came, too.
    assert round1 <= set(discarded) and not round1 & aggregated
    reasons = {discarded[m] for m in round1}
    assert any("quorum not met" in r for r in reasons)
