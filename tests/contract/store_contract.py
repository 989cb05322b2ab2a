"""What every RoundStore must do (hfgan_core/state/base.py), in memory or in Redis.

Subclasses implement `make()` and `advance(store, seconds)` (let that much time pass for TTLs: a fake clock in
memory, a real sleep against Redis) and may override `cleanup(store, run)`. Every test uses fresh run ids.
"""

from __future__ import annotations

import uuid

import pytest

from hfgan_core.state.base import ClientRecord, RoundStore, SlotClaim, StateError


class StoreContract:
    ttl = 0.3  # seconds: short, because the Redis suite really waits for expiries

    def make(self) -> RoundStore:
        raise NotImplementedError

    def advance(self, store: RoundStore, seconds: float) -> None:
        raise NotImplementedError

    def cleanup(self, store: RoundStore, run: str) -> None:
        """Remove a test run's state (nothing to do in memory)."""

    @pytest.fixture
    def store(self):
        s = self.make()
        self._runs: list[str] = []
        yield s
        for run in self._runs:
            self.cleanup(s, run)
        s.close()

    def new_run(self, store: RoundStore, init: bool = True) -> str:
        run = f"t-{uuid.uuid4().hex[:12]}"
        self._runs.append(run)
        if init:
            assert store.init_run(run, "digest-1", '{"rounds": 2}') is True
        return run

    # ----------------------------------------------------------------------------------------------------- run
    def test_init_run_creates_once_and_checks_the_digest(self, store: RoundStore) -> None:
        run = self.new_run(store, init=False)
        assert store.run_info(run) is None
        assert store.init_run(run, "digest-1", '{"a": 1}') is True
        assert store.init_run(run, "digest-1", '{"a": 1}') is False
        with pytest.raises(StateError):
            store.init_run(run, "digest-2", '{"a": 2}')
        info = store.run_info(run)
        assert info is not None
        assert (info["digest"], info["config"], info["status"]) == ("digest-1", '{"a": 1}', "created")
        assert float(info["created"]) > 0
        assert store.get_round(run) == (0, "admitting")

    def test_status(self, store: RoundStore) -> None:
        run = self.new_run(store)
        store.set_status(run, "running")
        assert store.run_info(run)["status"] == "running"  # type: ignore[index]
        with pytest.raises(StateError):
            store.set_status(run, "exploded")
        with pytest.raises(StateError):
            store.set_status(self.new_run(store, init=False), "running")

    def test_runs_are_independent(self, store: RoundStore) -> None:
        a, b = self.new_run(store), self.new_run(store)
        assert store.transition(a, 0, "admitting", 1, "training")
        store.set_cuts(a, {0: "1111"})
        assert store.get_round(b) == (0, "admitting")
        assert store.get_cuts(b) == {}

    # --------------------------------------------------------------------------------------------- transitions
    def test_transition_is_compare_and_set(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.transition(run, 0, "admitting", 1, "training") is True
        assert store.get_round(run) == (1, "training")
        assert store.transition(run, 0, "admitting", 1, "training") is False  # the other coordinator lost
        assert store.transition(run, 1, "aggregating", 1, "done") is False  # wrong phase
        assert store.transition(run, 2, "training", 2, "aggregating") is False  # wrong round
        assert store.get_round(run) == (1, "training")
        assert store.transition(run, 1, "training", 1, "aggregating") is True
        assert store.transition(run, 1, "aggregating", 1, "done") is True
        assert store.transition(run, 1, "done", 2, "training") is True
        assert store.get_round(run) == (2, "training")
        with pytest.raises(StateError):
            store.transition(run, 2, "training", 2, "partying")

    # ------------------------------------------------------------------------------------------------- clients
    def test_client_marks_per_round(self, store: RoundStore) -> None:
        run = self.new_run(store)
        store.set_expected(run, 1, [0, 1, 2], ts=10.0)
        store.mark_client(run, 1, 1, "arrived", "", ts=11.5)
        store.mark_client(run, 1, 2, "dropped", "missed the round deadline", ts=12.25)
        store.set_expected(run, 1, [0, 1, 2, 3], ts=13.0)  # does not undo what happened
        assert store.round_clients(run, 1) == {
            0: ClientRecord("expected", "", 10.0),
            1: ClientRecord("arrived", "", 11.5),
            2: ClientRecord("dropped", "missed the round deadline", 12.25),
            3: ClientRecord("expected", "", 13.0),
        }
        store.mark_client(run, 1, 0, "late", "activation after the window", ts=14.0)
        assert store.round_clients(run, 1)[0] == ClientRecord("late", "activation after the window", 14.0)
        assert store.round_clients(run, 2) == {}
        with pytest.raises(StateError):
            store.mark_client(run, 1, 0, "vanished", "", ts=1.0)

    # ----------------------------------------------------------------------------------------- slots and beats
    def test_slots_lowest_free_first(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.claim_slot(run, 2, "w-a", ttl_s=60) == SlotClaim(0, "w-a")
        assert store.claim_slot(run, 2, "w-b", ttl_s=60) == SlotClaim(1, "w-b")
        assert store.claim_slot(run, 2, "w-c", ttl_s=60) is None
        assert store.claim_slot(run, 2, "w-a", ttl_s=60) == SlotClaim(0, "w-a")  # idempotent for its owner
        store.release_slot(run, 0, "w-b")  # not the owner: no effect
        assert store.claim_slot(run, 2, "w-c", ttl_s=60) is None
        store.release_slot(run, 0, "w-a")
        assert store.claim_slot(run, 2, "w-c", ttl_s=60) == SlotClaim(0, "w-c")

    def test_slot_of_a_dead_owner_is_free_again(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.claim_slot(run, 2, "w-a", ttl_s=self.ttl) == SlotClaim(0, "w-a")
        assert store.claim_slot(run, 2, "w-b", ttl_s=60) == SlotClaim(1, "w-b")
        assert store.claim_slot(run, 2, "w-c", ttl_s=60) is None
        self.advance(store, self.ttl * 2)  # w-a stops beating
        assert store.claim_slot(run, 2, "w-c", ttl_s=60) == SlotClaim(0, "w-c")

    def test_heartbeat_keeps_the_slot(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.claim_slot(run, 1, "w-a", ttl_s=self.ttl) == SlotClaim(0, "w-a")
        for _ in range(3):
            self.advance(store, self.ttl / 2)
            store.heartbeat(run, "w-a", ttl_s=self.ttl, info="client 0")
        assert store.claim_slot(run, 1, "w-b", ttl_s=60) is None

    def test_heartbeat_ttl(self, store: RoundStore) -> None:
        run = self.new_run(store)
        store.heartbeat(run, "server-1", ttl_s=self.ttl, info="server round 3")
        store.heartbeat(run, "agg-1", ttl_s=60, info="aggregator")
        assert store.alive(run) == {"server-1": "server round 3", "agg-1": "aggregator"}
        self.advance(store, self.ttl * 2)
        assert store.alive(run) == {"agg-1": "aggregator"}
        store.heartbeat(run, "server-1", ttl_s=60, info="back")
        assert store.alive(run) == {"server-1": "back", "agg-1": "aggregator"}

    # -------------------------------------------------------------------------------------------------- leader
    def test_leader_lease(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.acquire_leader(run, "coordinator", "c-1", ttl_s=self.ttl) is True
        assert store.acquire_leader(run, "coordinator", "c-2", ttl_s=self.ttl) is False
        assert store.acquire_leader(run, "coordinator", "c-1", ttl_s=self.ttl) is True  # renewal
        assert store.acquire_leader(run, "other-role", "c-2", ttl_s=60) is True
        self.advance(store, self.ttl * 2)  # c-1 stopped renewing
        assert store.acquire_leader(run, "coordinator", "c-2", ttl_s=60) is True
        assert store.acquire_leader(run, "coordinator", "c-1", ttl_s=60) is False
        store.release_leader(run, "coordinator", "c-1")  # not the owner: no effect
        assert store.acquire_leader(run, "coordinator", "c-1", ttl_s=60) is False
        store.release_leader(run, "coordinator", "c-2")
        assert store.acquire_leader(run, "coordinator", "c-1", ttl_s=60) is True

    # --------------------------------------------------------------------------------------------------- facts
    def test_cuts_are_replaced_as_a_whole(self, store: RoundStore) -> None:
        run = self.new_run(store)
        store.set_cuts(run, {0: "1010", 1: "0001", 2: "1111"})
        assert store.get_cuts(run) == {0: "1010", 1: "0001", 2: "1111"}
        store.set_cuts(run, {0: "0000"})
        assert store.get_cuts(run) == {0: "0000"}

    def test_clusters_and_kld_scores(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.get_clusters(run, 3) == ({}, {}, {})
        intra = {0: 0.1 + 0.2, 1: 1e-12, 2: 0.0}
        glob = {0: 1.5, 1: 2.0 / 3.0, 2: 7.25}
        store.set_clusters(run, 3, {0: 0, 1: 1, 2: 0}, intra, glob)
        assert store.get_clusters(run, 3) == ({0: 0, 1: 1, 2: 0}, intra, glob)  # floats round-trip exactly
        store.set_clusters(run, 3, {0: 1}, {0: 0.5}, {0: 0.25})
        assert store.get_clusters(run, 3) == ({0: 1}, {0: 0.5}, {0: 0.25})
        assert store.get_clusters(run, 4) == ({}, {}, {})

    def test_weights_per_cluster(self, store: RoundStore) -> None:
        run = self.new_run(store)
        store.set_weights(run, 3, 0, {0: 0.25, 2: 0.75})
        store.set_weights(run, 3, 1, {1: 1.0})
        store.set_weights(run, 3, -1, {0: 0.2, 1: 0.3, 2: 0.5})
        assert store.get_weights(run, 3) == {0: {0: 0.25, 2: 0.75}, 1: {1: 1.0}, -1: {0: 0.2, 1: 0.3, 2: 0.5}}
        assert store.get_weights(run, 2) == {}

    def test_model_digests_are_set_once(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.set_model_digest(run, 1, 0, "sha256:aa") is True
        assert store.set_model_digest(run, 1, 0, "sha256:aa") is False
        assert store.set_model_digest(run, 1, 0, "sha256:bb") is False  # the first record stands
        assert store.set_model_digest(run, 1, -1, "sha256:cc") is True
        assert store.get_model_digests(run, 1) == {0: "sha256:aa", -1: "sha256:cc"}
        assert store.get_model_digests(run, 2) == {}

    def test_log_offsets_first_wins(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.get_log_offset(run, 1) is None
        store.set_log_offset(run, 1, 120)
        store.set_log_offset(run, 1, 180)
        store.set_log_offset(run, 2, 0)
        assert (store.get_log_offset(run, 1), store.get_log_offset(run, 2)) == (120, 0)

    def test_checkpoints(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.get_checkpoints(run) == {}
        store.set_checkpoint(run, 1, "runs/r/ckpt/round-001.pt")
        store.set_checkpoint(run, 2, "runs/r/ckpt/round-002.pt")
        assert store.get_checkpoints(run) == {1: "runs/r/ckpt/round-001.pt", 2: "runs/r/ckpt/round-002.pt"}

    def test_metrics_merge_per_reporter(self, store: RoundStore) -> None:
        run = self.new_run(store)
        store.record_metrics(run, 1, "client-0", {"loss_d": 0.5, "loss_g": 1.25})
        store.record_metrics(run, 1, "client-0", {"loss_g": 1.0, "step_s": 0.03})
        store.record_metrics(run, 1, "server", {"step_s": 0.01})
        assert store.get_metrics(run, 1) == {
            "client-0": {"loss_d": 0.5, "loss_g": 1.0, "step_s": 0.03},
            "server": {"step_s": 0.01},
        }
        assert store.get_metrics(run, 2) == {}

    def test_round_documents(self, store: RoundStore) -> None:
        run = self.new_run(store)
        assert store.get_docs(run, 1) == {}
        store.put_doc(run, 1, "job.0", '{"cluster": 0, "members": [0, 2]}')
        store.put_doc(run, 1, "job.-1", '{"cluster": -1}')
        store.put_doc(run, 1, "job.0", '{"cluster": 0, "members": [0]}')  # a later write replaces
        store.put_doc(run, 2, "job.0", "{}")
        assert store.get_docs(run, 1) == {"job.0": '{"cluster": 0, "members": [0]}', "job.-1": '{"cluster": -1}'}
        assert store.get_docs(run, 2) == {"job.0": "{}"}
        store.delete_doc(run, 1, "job.0")  # a job planned again without it
        store.delete_doc(run, 1, "job.7")  # absent: nothing happens
        assert store.get_docs(run, 1) == {"job.-1": '{"cluster": -1}'}
        assert store.get_docs(run, 2) == {"job.0": "{}"}
