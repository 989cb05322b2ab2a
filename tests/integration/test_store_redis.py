"""The round-ledger contract against the real Redis (TTLs really expire), then what only a shared store can show:
atomicity between independent connections, the key schema, reconnects and clear errors."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from hfgan_core.state import open_store
from hfgan_core.state.base import SlotClaim, StateError
from hfgan_core.state.redis import RedisRoundStore
from tests.contract.store_contract import StoreContract


class TestRedisRoundStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str) -> None:
        self.url = redis_url

    def make(self) -> RedisRoundStore:
        return RedisRoundStore(self.url)

    def advance(self, store: RedisRoundStore, seconds: float) -> None:  # type: ignore[override]
        time.sleep(seconds)

    def cleanup(self, store: RedisRoundStore, run: str) -> None:  # type: ignore[override]
        store.delete_run(run)


@pytest.fixture
def run_id(redis_url: str):
    run = f"it-{uuid.uuid4().hex[:12]}"
    yield run
    with RedisRoundStore(redis_url) as s:
        s.delete_run(run)


def test_open_store_picks_redis_by_scheme(redis_url: str, run_id: str) -> None:
    with open_store(redis_url) as s:
        assert isinstance(s, RedisRoundStore)
        assert s.init_run(run_id, "d", "{}") is True


def test_keys_follow_the_documented_schema(redis_url: str, run_id: str) -> None:
    with RedisRoundStore(redis_url) as s:
        s.init_run(run_id, "d", "{}")
        s.transition(run_id, 0, "admitting", 1, "training")
        s.set_expected(run_id, 1, [0], ts=1.0)
        s.claim_slot(run_id, 1, "w", ttl_s=30)
        s.acquire_leader(run_id, "coordinator", "c", ttl_s=30)
        s.set_model_digest(run_id, 1, -1, "x")
        s.set_log_offset(run_id, 1, 7)
        s.record_metrics(run_id, 1, "server", {"step_s": 0.1})
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        keys = set(r.keys(f"hfgan:{{{run_id}}}:*"))
        p = f"hfgan:{{{run_id}}}"
        assert keys == {
            f"{p}:run",
            f"{p}:round",
            f"{p}:round:1:clients",
            f"{p}:slots",
            f"{p}:hb:w",
            f"{p}:workers",
            f"{p}:leader:coordinator",
            f"{p}:round:1:digests",
            f"{p}:log_offsets",
            f"{p}:round:1:metrics",
            f"{p}:round:1:metrics:server",
        }
        assert 0 < r.pttl(f"{p}:hb:w") <= 30_000 and 0 < r.pttl(f"{p}:leader:coordinator") <= 30_000
        assert r.hgetall(f"{p}:round")["phase"] == "training"
        r.close()
        assert s.delete_run(run_id) == len(keys)
        assert s.run_info(run_id) is None


def test_slot_claims_are_atomic_across_connections(redis_url: str, run_id: str) -> None:
    stores = [RedisRoundStore(redis_url) for _ in range(8)]
    stores[0].init_run(run_id, "d", "{}")
    results: list[SlotClaim | None] = [None] * 8
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].claim_slot(run_id, 5, f"w-{i}", ttl_s=30)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in stores:
        s.close()
    slots = sorted(c.slot for c in results if c is not None)
    assert slots == [0, 1, 2, 3, 4] and results.count(None) == 3


def test_one_transition_wins_a_race(redis_url: str, run_id: str) -> None:
    stores = [RedisRoundStore(redis_url) for _ in range(6)]
    stores[0].init_run(run_id, "d", "{}")
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def move(s: RedisRoundStore) -> None:
        barrier.wait()
        wins.append(s.transition(run_id, 0, "admitting", 1, "training"))

    threads = [threading.Thread(target=move, args=(s,)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in stores:
        s.close()
    assert sorted(wins) == [False] * 5 + [True]


def test_survives_a_killed_connection(redis_url: str, run_id: str) -> None:
    with RedisRoundStore(redis_url) as s:
        s.init_run(run_id, "d", "{}")
        own_id = s._r.client_id()
        admin = redis.Redis.from_url(redis_url)
        assert admin.client_kill_filter(_id=own_id) == 1
        admin.close()
        assert s.transition(run_id, 0, "admitting", 1, "training") is True  # reconnected and retried
        assert s.get_round(run_id) == (1, "training")


def test_unreachable_redis_is_a_clear_state_error() -> None:
    s = RedisRoundStore("redis://127.0.0.1:1/0", retry_timeout=0.5, socket_timeout=0.5)
    began = time.monotonic()
    with pytest.raises(StateError, match="unreachable"):
        s.get_round("r")
    assert time.monotonic() - began < 10
    s.close()


def test_bad_run_ids_are_refused(redis_url: str) -> None:
    with RedisRoundStore(redis_url) as s:
        for bad in ("", "a b", "x}y", "r*", "a" * 129):
            with pytest.raises(StateError):
                s.get_round(bad)
