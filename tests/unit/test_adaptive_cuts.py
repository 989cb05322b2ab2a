"""Adaptive cuts: between rounds the coordinator re-plans from each client's measured compute per step, and a change
of cut bits travels through the system (the client receives the blocks of its new cuts, the server serves them).

The planner's own arithmetic (effective profiles, the optimum) is tested in test_planning.py; here a stand-in
re-planner records what the coordinator hands it and answers with different cuts.
"""

from __future__ import annotations

import pytest

from hfgan_core.config import (
    DevicesConfig,
    DomainConfig,
    RunConfig,
    RuntimeConfig,
    ScenarioConfig,
    TrainConfig,
)
from hfgan_core.data import TensorClientData
from hfgan_core.model import CutBits, architecture
from hfgan_core.runtime.embedded import EmbeddedRunner

NEW_CUTS = [CutBits(1, 1, 1, 1), CutBits(0, 0, 0, 0), CutBits(1, 0, 1, 0)]


@pytest.mark.slow
def test_replanned_cuts_reach_clients_and_server():
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 3),)),
        train=TrainConfig(rounds=3, local_epochs=1, steps_per_epoch=4, batch_size=16, cuts="plan", adaptive_cuts=True),
        # Identical devices (so the first plan gives every client the same cuts); client 0 is slowed eightfold by
        # emulation, which its measured compute must show.
        devices=DevicesConfig(clients=("device3",)),
        runtime=RuntimeConfig(emulate_slowdown=((0, 8.0),)),
    ).validate()
    datas = [TensorClientData.random(64, i) for i in range(3)]
    runner = EmbeddedRunner(cfg, datas, [0, 0, 0], run_id="adaptive")
    seen: list[dict[int, float]] = []

    def replanner(measured, cuts, profiles):
        seen.append(dict(measured))
        return NEW_CUTS

    runner.coordinator.replanner = replanner
    planned = None

    def on_round_end(report):
        nonlocal planned
        if report.round == 1:
            planned = dict(report.cuts)

    runner.coordinator.on_round_end = on_round_end
    result = runner.run()
    assert len(result.reports) == 3 and not runner.transport.dead_letters()

    # The coordinator handed over every client's own compute per step; the slowed client measured slower.
    assert len(seen) == 3 and set(seen[0]) == {0, 1, 2}
    assert seen[0][0] > 2 * max(seen[0][1], seen[0][2])
    # The new cuts are in force from round 2 on: in the ledger, at the clients and in what they hold.
    assert planned == {c: NEW_CUTS[c] for c in range(3)}
    assert runner.store.get_cuts("adaptive") == {c: str(NEW_CUTS[c]) for c in range(3)}
    arch = architecture(cfg.model)
    for c, client in enumerate(runner.clients):
        assert client.cuts == NEW_CUTS[c]
        for spec in arch.nets:
            assert sorted(client.holder.blocks[spec.name]) == spec.client_blocks(*NEW_CUTS[c].for_net(spec.name))
    # Rounds 2 and 3 trained with the new cuts: every client completed its steps there.
    for report in result.reports[1:]:
        assert report.arrived == [0, 1, 2] and report.aggregated
        assert all(m["steps_dropped"] == 0 for m in report.client_metrics.values())
