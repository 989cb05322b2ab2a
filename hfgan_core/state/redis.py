"""The round ledger in Redis: the shared `RoundStore` of a distributed run (redis-py).

Key schema. `R` stands for `hfgan:{<run>}`: the run id in braces is a Redis Cluster hash tag, so every key of a run
lives in one hash slot and the Lua scripts below stay valid on a cluster. Run ids are `[A-Za-z0-9._-]{1,128}`.

| key                                   | type   | content                                                        |
|---------------------------------------|--------|----------------------------------------------------------------|
| `R:run`                               | hash   | `digest`, `config` (JSON), `status`, `created`, `init_token`   |
| `R:round`                             | hash   | `round`, `phase`, `updated`, `token` (of the last transition)  |
| `R:round:<n>:clients`                 | hash   | client -> JSON `{"state", "reason", "ts"}` (expected / arrived |
|                                       |        | / late / dropped, why, when)                                   |
| `R:slots`                             | hash   | slot -> owner; a slot is held while `R:hb:<owner>` exists       |
| `R:hb:<worker>`                       | string | the worker's info line, expires after its heartbeat TTL (PX)    |
| `R:workers`                           | set    | workers that ever beat (the index `alive()` prunes)             |
| `R:leader:<role>`                     | string | the lease owner, expires after the lease TTL (PX)               |
| `R:cuts`                              | hash   | client -> cut bits ("1010")                                     |
| `R:round:<n>:clusters`                | hash   | client -> cluster                                               |
| `R:round:<n>:kld_intra` / `kld_global`| hash   | client -> KLD score (float, repr)                               |
| `R:round:<n>:weights`                 | hash   | cluster -> JSON `{client: weight}`                              |
| `R:round:<n>:digests`                 | hash   | cluster (-1: the server's global model) -> model digest, set once |
| `R:log_offsets`                       | hash   | round -> first update-log offset of the round, set once         |
| `R:checkpoints`                       | hash   | round -> checkpoint location                                    |
| `R:round:<n>:metrics`                 | set    | who reported metrics this round                                 |
| `R:round:<n>:metrics:<who>`           | hash   | metric name -> value (float, repr)                              |
| `R:round:<n>:docs`                    | hash   | name -> JSON document (e.g. `job.<cluster>`, for replay)        |

Atomicity: run creation with its digest check, phase transitions (compare-and-set), slot claims (lowest slot whose
owner's heartbeat has expired), leader leases (take if free or expired, renew if owner, release if owner) and the
pruning of dead workers are Lua scripts; multi-key replacements (cuts, clusters, metrics) are MULTI/EXEC;
digests and log offsets are HSETNX (the first write wins).

Transient connection errors are retried with capped exponential backoff (tenacity) for `retry_timeout` seconds,
then a StateError says Redis is unreachable. Retried scripts are idempotent: `init_run` and `transition` carry a
per-call token, so a retry after a lost reply still reports the call's own success. TTLs use Redis's clock, so
heartbeats and leases expire the same way for every worker, whatever their local clocks say.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from ..settings import RUN_ID_PATTERN, redact_url
from .base import CLIENT_STATES, PHASES, RUN_STATUSES, ClientRecord, RoundStore, SlotClaim, StateError

T = TypeVar("T")
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def _transient(exc: BaseException) -> bool:
    """Worth retrying: a connection or timeout error, but not refused credentials (a ConnectionError in redis-py)."""
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, redis.AuthenticationError)


_INIT_RUN = """
local cur = redis.call('HGET', KEYS[1], 'digest')
if cur then
  if cur ~= ARGV[1] then return -1 end
  if redis.call('HGET', KEYS[1], 'init_token') == ARGV[4] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'config', ARGV[2], 'status', 'created', 'created', ARGV[3],
           'init_token', ARGV[4])
redis.call('HSET', KEYS[2], 'round', '0', 'phase', 'admitting', 'updated', ARGV[3])
return 1
"""

_SET_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
"""

_TRANSITION = """
local cur = redis.call('HMGET', KEYS[1], 'round', 'phase', 'token')
local r = cur[1] or '0'
local p = cur[2] or 'admitting'
if r == ARGV[1] and p == ARGV[2] then
  redis.call('HSET', KEYS[1], 'round', ARGV[3], 'phase', ARGV[4], 'token', ARGV[5], 'updated', ARGV[6])
  return 1
end
if cur[3] == ARGV[5] and r == ARGV[3] and p == ARGV[4] then return 1 end
return 0
"""

# KEYS: slots hash, workers set. ARGV: n_slots, owner, ttl_ms, heartbeat key prefix.
_CLAIM_SLOT = """
local free = -1
for s = 0, tonumber(ARGV[1]) - 1 do
  local o = redis.call('HGET', KEYS[1], tostring(s))
  if o and redis.call('EXISTS', ARGV[4] .. o) == 0 then
    redis.call('HDEL', KEYS[1], tostring(s))
    o = false
  end
  if o == ARGV[2] then return s end
  if (not o) and free < 0 then free = s end
end
if free < 0 then return -1 end
redis.call('HSET', KEYS[1], tostring(free), ARGV[2])
redis.call('SET', ARGV[4] .. ARGV[2], 'slot ' .. free, 'PX', tonumber(ARGV[3]))
redis.call('SADD', KEYS[2], ARGV[2])
return free
"""

_RELEASE_SLOT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS: workers set. ARGV: heartbeat key prefix. Returns [worker, info, ...] and prunes the dead atomically, so a
# worker that beats concurrently is never dropped from the index.
_ALIVE = """
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. w)
  if info then
    table.insert(out, w)
    table.insert(out, info)
  else
    redis.call('SREM', KEYS[1], w)
  end
end
return out
"""

_ACQUIRE_LEADER = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""

_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise StateError(f"a TTL must be positive, not {ttl_s}")
    return max(1, int(round(ttl_s * 1000)))


class RedisRoundStore(RoundStore):
    """`RedisRoundStore("redis://host:6379/0")`; options: `retry_timeout` (30 s) for transient errors,
    `socket_timeout` (5 s)."""

    def __init__(self, url: str, *, retry_timeout: float = 30.0, socket_timeout: float = 5.0):
        self.url = url
        self.retry_timeout = float(retry_timeout)
        try:
            # redis-py's own retries are off: ours (below) are the only ones, capped and logged in one place.
            self._r = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                health_check_interval=30,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise StateError(f"bad Redis URL {redact_url(url)!r}: {exc}") from exc
        self._scripts = {
            name: self._r.register_script(src)
            for name, src in (
                ("init_run", _INIT_RUN),
                ("set_status", _SET_STATUS),
                ("transition", _TRANSITION),
                ("claim_slot", _CLAIM_SLOT),
                ("release_slot", _RELEASE_SLOT),
                ("alive", _ALIVE),
                ("acquire_leader", _ACQUIRE_LEADER),
                ("release_if_owner", _RELEASE_IF_OWNER),
            )
        }

    # ---------------------------------------------------------------------------------------------- plumbing
    @staticmethod
    def key(run: str, *parts: object) -> str:
        if not isinstance(run, str) or not RUN_ID_PATTERN.fullmatch(run):
            raise StateError(f"bad run id {run!r} (letters, digits, '.', '_' and '-', at most 128)")
        return ":".join([f"hfgan:{{{run}}}", *map(str, parts)])

    def _call(self, fn: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(self.retry_timeout),
            reraise=False,
        )
        try:
            return retrying(fn)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise StateError(f"Redis unreachable at {self._where()} for {self.retry_timeout:.0f} s: {cause}") from cause
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            # Credentials are configuration: retrying cannot fix them (exit code 2, never the password itself).
            user = self._r.connection_pool.connection_kwargs.get("username") or "default"
            raise StateError(f"Redis refused the credentials of user {user!r} at {self._where()}: {exc}") from None
        except redis.RedisError as exc:
            raise StateError(f"Redis error: {exc}") from exc

    def _where(self) -> str:
        kw = self._r.connection_pool.connection_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"

    def _script(self, name: str, keys: list[str], args: list[object]) -> Any:
        return self._call(lambda: self._scripts[name](keys=keys, args=args))

    def ping(self) -> None:
        """Raise StateError unless Redis answers."""
        self._call(self._r.ping)

    def delete_run(self, run: str) -> int:
        """Delete every key of a run (tests, `hfgan` housekeeping); returns how many were deleted."""
        pattern = self.key(run, "*").replace("{", "\\{").replace("}", "\\}")

        def run_() -> int:
            keys = list(self._r.scan_iter(match=pattern, count=500))
            return int(self._r.delete(*keys)) if keys else 0

        return self._call(run_)

    # ------------------------------------------------------------------------------------------------- run
    def init_run(self, run: str, config_digest: str, config_json: str) -> bool:
        token = uuid.uuid4().hex
        res = self._script(
            "init_run",
            [self.key(run, "run"), self.key(run, "round")],
            [config_digest, config_json, repr(time.time()), token],
        )
        if int(res) < 0:
            raise StateError(f"run {run!r} already exists with a different configuration")
        return int(res) == 1

    def run_info(self, run: str) -> dict[str, str] | None:
        info = self._call(lambda: self._r.hgetall(self.key(run, "run")))
        if not info:
            return None
        return {k: info.get(k, "") for k in ("digest", "config", "status", "created")}

    def set_status(self, run: str, status: str) -> None:
        if status not in RUN_STATUSES:
            raise StateError(f"unknown run status {status!r}")
        if not int(self._script("set_status", [self.key(run, "run")], [status])):
            raise StateError(f"unknown run {run!r}")

    # ------------------------------------------------------------------------------------------ round/phase
    def get_round(self, run: str) -> tuple[int, str]:
        r, p = self._call(lambda: self._r.hmget(self.key(run, "round"), ["round", "phase"]))
        return (int(r) if r is not None else 0), (p or "admitting")

    def transition(self, run: str, round: int, from_phase: str, to_round: int, to_phase: str) -> bool:
        if from_phase not in PHASES or to_phase not in PHASES:
            raise StateError(f"unknown phase in {from_phase!r} -> {to_phase!r}")
        token = uuid.uuid4().hex
        return bool(
            int(
                self._script(
                    "transition",
                    [self.key(run, "round")],
                    [int(round), from_phase, int(to_round), to_phase, token, repr(time.time())],
                )
            )
        )

    # ------------------------------------------------------------------------------------------------ clients
    @staticmethod
    def _record(state: str, reason: str, ts: float) -> str:
        return json.dumps({"state": state, "reason": reason, "ts": float(ts)})

    def set_expected(self, run: str, round: int, clients: list[int], ts: float) -> None:
        key = self.key(run, "round", int(round), "clients")
        value = self._record("expected", "", ts)

        def run_() -> None:
            pipe = self._r.pipeline(transaction=True)
            for c in clients:
                pipe.hsetnx(key, str(int(c)), value)
            pipe.execute()

        self._call(run_)

    def mark_client(self, run: str, round: int, client: int, state: str, reason: str, ts: float) -> None:
        if state not in CLIENT_STATES:
            raise StateError(f"unknown client state {state!r}")
        key = self.key(run, "round", int(round), "clients")
        self._call(lambda: self._r.hset(key, str(int(client)), self._record(state, reason, ts)))

    def round_clients(self, run: str, round: int) -> dict[int, ClientRecord]:
        raw = self._call(lambda: self._r.hgetall(self.key(run, "round", int(round), "clients")))
        out = {}
        for c, value in raw.items():
            rec = json.loads(value)
            out[int(c)] = ClientRecord(rec["state"], rec["reason"], float(rec["ts"]))
        return out

    def claim_slot(self, run: str, n_slots: int, owner: str, ttl_s: float) -> SlotClaim | None:
        slot = int(
            self._script(
                "claim_slot",
                [self.key(run, "slots"), self.key(run, "workers")],
                [int(n_slots), owner, _ms(ttl_s), self.key(run, "hb", "")],
            )
        )
        return None if slot < 0 else SlotClaim(slot, owner)

    def release_slot(self, run: str, slot: int, owner: str) -> None:
        self._script("release_slot", [self.key(run, "slots")], [int(slot), owner])

    def heartbeat(self, run: str, worker: str, ttl_s: float, info: str = "") -> None:
        ms = _ms(ttl_s)

        def run_() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.set(self.key(run, "hb", worker), info, px=ms)
            pipe.sadd(self.key(run, "workers"), worker)
            pipe.execute()

        self._call(run_)

    def alive(self, run: str) -> dict[str, str]:
        flat = self._script("alive", [self.key(run, "workers")], [self.key(run, "hb", "")])
        return dict(zip(flat[::2], flat[1::2], strict=True))

    # ------------------------------------------------------------------------------------------------ leader
    def acquire_leader(self, run: str, role: str, owner: str, ttl_s: float) -> bool:
        return bool(int(self._script("acquire_leader", [self.key(run, "leader", role)], [owner, _ms(ttl_s)])))

    def release_leader(self, run: str, role: str, owner: str) -> None:
        self._script("release_if_owner", [self.key(run, "leader", role)], [owner])

    # --------------------------------------------------------------------------------------------- facts
    def _replace_hashes(self, items: list[tuple[str, dict[str, str]]]) -> None:
        def run_() -> None:
            pipe = self._r.pipeline(transaction=True)
            for key, mapping in items:
                pipe.delete(key)
                if mapping:
                    pipe.hset(key, mapping=mapping)
            pipe.execute()

        self._call(run_)

    def set_cuts(self, run: str, cuts: dict[int, str]) -> None:
        self._replace_hashes([(self.key(run, "cuts"), {str(int(k)): str(v) for k, v in cuts.items()})])

    def get_cuts(self, run: str) -> dict[int, str]:
        raw = self._call(lambda: self._r.hgetall(self.key(run, "cuts")))
        return {int(k): v for k, v in raw.items()}

    def set_clusters(
        self,
        run: str,
        round: int,
        assignment: dict[int, int],
        kld_intra: dict[int, float],
        kld_global: dict[int, float],
    ) -> None:
        def floats(d: dict[int, float]) -> dict[str, str]:
            return {str(int(k)): repr(float(v)) for k, v in d.items()}

        self._replace_hashes(
            [
                (
                    self.key(run, "round", int(round), "clusters"),
                    {str(int(k)): str(int(v)) for k, v in assignment.items()},
                ),
                (self.key(run, "round", int(round), "kld_intra"), floats(kld_intra)),
                (self.key(run, "round", int(round), "kld_global"), floats(kld_global)),
            ]
        )

    def get_clusters(self, run: str, round: int) -> tuple[dict[int, int], dict[int, float], dict[int, float]]:
        def run_() -> list[dict[str, str]]:
            pipe = self._r.pipeline(transaction=False)
            for part in ("clusters", "kld_intra", "kld_global"):
                pipe.hgetall(self.key(run, "round", int(round), part))
            return pipe.execute()

        a, i, g = self._call(run_)
        return (
            {int(k): int(v) for k, v in a.items()},
            {int(k): float(v) for k, v in i.items()},
            {int(k): float(v) for k, v in g.items()},
        )

    def set_weights(self, run: str, round: int, cluster: int, weights: dict[int, float]) -> None:
        value = json.dumps({str(int(k)): float(v) for k, v in weights.items()})
        self._call(lambda: self._r.hset(self.key(run, "round", int(round), "weights"), str(int(cluster)), value))

    def get_weights(self, run: str, round: int) -> dict[int, dict[int, float]]:
        raw = self._call(lambda: self._r.hgetall(self.key(run, "round", int(round), "weights")))
        return {int(c): {int(k): float(v) for k, v in json.loads(w).items()} for c, w in raw.items()}

    def set_model_digest(self, run: str, round: int, cluster: int, digest: str) -> bool:
        key = self.key(run, "round", int(round), "digests")
        return bool(self._call(lambda: self._r.hsetnx(key, str(int(cluster)), digest)))

    def get_model_digests(self, run: str, round: int) -> dict[int, str]:
        raw = self._call(lambda: self._r.hgetall(self.key(run, "round", int(round), "digests")))
        return {int(k): v for k, v in raw.items()}

    def set_log_offset(self, run: str, round: int, offset: int) -> None:
        self._call(lambda: self._r.hsetnx(self.key(run, "log_offsets"), str(int(round)), str(int(offset))))

    def get_log_offset(self, run: str, round: int) -> int | None:
        value = self._call(lambda: self._r.hget(self.key(run, "log_offsets"), str(int(round))))
        return None if value is None else int(value)

    def set_checkpoint(self, run: str, round: int, location: str) -> None:
        self._call(lambda: self._r.hset(self.key(run, "checkpoints"), str(int(round)), location))

    def get_checkpoints(self, run: str) -> dict[int, str]:
        raw = self._call(lambda: self._r.hgetall(self.key(run, "checkpoints")))
        return {int(k): v for k, v in raw.items()}

    def record_metrics(self, run: str, round: int, who: str, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        mapping = {str(k): repr(float(v)) for k, v in metrics.items()}

        def run_() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.sadd(self.key(run, "round", int(round), "metrics"), who)
            pipe.hset(self.key(run, "round", int(round), "metrics", who), mapping=mapping)
            pipe.execute()

        self._call(run_)

    def get_metrics(self, run: str, round: int) -> dict[str, dict[str, float]]:
        def run_() -> dict[str, dict[str, float]]:
            who = sorted(self._r.smembers(self.key(run, "round", int(round), "metrics")))
            pipe = self._r.pipeline(transaction=False)
            for w in who:
                pipe.hgetall(self.key(run, "round", int(round), "metrics", w))
            return {w: {k: float(v) for k, v in m.items()} for w, m in zip(who, pipe.execute(), strict=True)}

        return self._call(run_)

    def put_doc(self, run: str, round: int, name: str, doc: str) -> None:
        self._call(lambda: self._r.hset(self.key(run, "round", int(round), "docs"), name, doc))

    def get_docs(self, run: str, round: int) -> dict[str, str]:
        return dict(self._call(lambda: self._r.hgetall(self.key(run, "round", int(round), "docs"))))

    def delete_doc(self, run: str, round: int, name: str) -> None:
        self._call(lambda: self._r.hdel(self.key(run, "round", int(round), "docs"), name))

    def close(self) -> None:
        self._r.close()
        self._r.connection_pool.disconnect()
