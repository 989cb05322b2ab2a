"""In-process RoundStore: the ledger as dictionaries on the instance (embedded runs and unit tests)."""

from __future__ import annotations

import threading
import time

from .base import CLIENT_STATES, PHASES, RUN_STATUSES, ClientRecord, RoundStore, SlotClaim, StateError


class MemoryRoundStore(RoundStore):
    def __init__(self, url: str = "memory://", *, clock=time.time):
        self.url = url
        self._clock = clock
        self._lock = threading.RLock()  # the embedded runner may host a watchdog thread
        self._runs: dict[str, dict[str, str]] = {}
        self._round: dict[str, tuple[int, str]] = {}
        self._clients: dict[tuple[str, int], dict[int, ClientRecord]] = {}
        self._slots: dict[str, dict[int, str]] = {}
        self._beats: dict[str, dict[str, tuple[float, str]]] = {}
        self._leaders: dict[tuple[str, str], tuple[str, float]] = {}
        self._cuts: dict[str, dict[int, str]] = {}
        self._clusters: dict[tuple[str, int], tuple[dict, dict, dict]] = {}
        self._weights: dict[tuple[str, int], dict[int, dict[int, float]]] = {}
        self._digests: dict[tuple[str, int], dict[int, str]] = {}
        self._offsets: dict[tuple[str, int], int] = {}
        self._checkpoints: dict[str, dict[int, str]] = {}
        self._metrics: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
        self._docs: dict[tuple[str, int], dict[str, str]] = {}

    # ------------------------------------------------------------------------------------------------- run
    def init_run(self, run: str, config_digest: str, config_json: str) -> bool:
        with self._lock:
            info = self._runs.get(run)
            if info is not None:
                if info["digest"] != config_digest:
                    raise StateError(f"run {run!r} already exists with a different configuration")
                return False
            self._runs[run] = {
                "digest": config_digest,
                "config": config_json,
                "status": "created",
                "created": repr(self._clock()),
            }
            self._round[run] = (0, "admitting")
            return True

    def run_info(self, run: str) -> dict[str, str] | None:
        with self._lock:
            info = self._runs.get(run)
            return dict(info) if info else None

    def set_status(self, run: str, status: str) -> None:
        if status not in RUN_STATUSES:
            raise StateError(f"unknown run status {status!r}")
        with self._lock:
            if run not in self._runs:
                raise StateError(f"unknown run {run!r}")
            self._runs[run]["status"] = status

    # ------------------------------------------------------------------------------------------ round/phase
    def get_round(self, run: str) -> tuple[int, str]:
        with self._lock:
            return self._round.get(run, (0, "admitting"))

    def transition(self, run: str, round: int, from_phase: str, to_round: int, to_phase: str) -> bool:
        if from_phase not in PHASES or to_phase not in PHASES:
            raise StateError(f"unknown phase in {from_phase!r} -> {to_phase!r}")
        with self._lock:
            if self._round.get(run, (0, "admitting")) != (round, from_phase):
                return False
            self._round[run] = (to_round, to_phase)
            return True

    # ------------------------------------------------------------------------------------------------ clients
    def set_expected(self, run: str, round: int, clients: list[int], ts: float) -> None:
        with self._lock:
            table = self._clients.setdefault((run, round), {})
            for c in clients:
                table.setdefault(int(c), ClientRecord("expected", "", ts))

    def mark_client(self, run: str, round: int, client: int, state: str, reason: str, ts: float) -> None:
        if state not in CLIENT_STATES:
            raise StateError(f"unknown client state {state!r}")
        with self._lock:
            self._clients.setdefault((run, round), {})[int(client)] = ClientRecord(state, reason, ts)

    def round_clients(self, run: str, round: int) -> dict[int, ClientRecord]:
        with self._lock:
            return dict(self._clients.get((run, round), {}))

    def _expire(self, run: str) -> None:
        now = self._clock()
        beats = self._beats.get(run, {})
        for w in [w for w, (exp, _) in beats.items() if exp <= now]:
            del beats[w]
        slots = self._slots.get(run, {})
        for s in [s for s, owner in slots.items() if owner not in beats]:
            del slots[s]

    def claim_slot(self, run: str, n_slots: int, owner: str, ttl_s: float) -> SlotClaim | None:
        with self._lock:
            self._expire(run)
            slots = self._slots.setdefault(run, {})
            for s, o in slots.items():
                if o == owner:
                    return SlotClaim(s, owner)
            for s in range(n_slots):
                if s not in slots:
                    slots[s] = owner
                    self._beats.setdefault(run, {})[owner] = (self._clock() + ttl_s, f"slot {s}")
                    return SlotClaim(s, owner)
            return None

    def release_slot(self, run: str, slot: int, owner: str) -> None:
        with self._lock:
            slots = self._slots.get(run, {})
            if slots.get(slot) == owner:
                del slots[slot]

    def heartbeat(self, run: str, worker: str, ttl_s: float, info: str = "") -> None:
        with self._lock:
            self._beats.setdefault(run, {})[worker] = (self._clock() + ttl_s, info)

    def alive(self, run: str) -> dict[str, str]:
        with self._lock:
            self._expire(run)
            return {w: info for w, (_, info) in self._beats.get(run, {}).items()}

    # ------------------------------------------------------------------------------------------------ leader
    def acquire_leader(self, run: str, role: str, owner: str, ttl_s: float) -> bool:
        with self._lock:
            now = self._clock()
            cur = self._leaders.get((run, role))
            if cur is None or cur[1] <= now or cur[0] == owner:
                self._leaders[(run, role)] = (owner, now + ttl_s)
                return True
            return False

    def release_leader(self, run: str, role: str, owner: str) -> None:
        with self._lock:
            cur = self._leaders.get((run, role))
            if cur is not None and cur[0] == owner:
                del self._leaders[(run, role)]

    # --------------------------------------------------------------------------------------------- facts
    def set_cuts(self, run: str, cuts: dict[int, str]) -> None:
        with self._lock:
            self._cuts[run] = {int(k): str(v) for k, v in cuts.items()}

    def get_cuts(self, run: str) -> dict[int, str]:
        with self._lock:
            return dict(self._cuts.get(run, {}))

    def set_clusters(self, run, round, assignment, kld_intra, kld_global) -> None:
        with self._lock:
            self._clusters[(run, round)] = (
                {int(k): int(v) for k, v in assignment.items()},
                {int(k): float(v) for k, v in kld_intra.items()},
                {int(k): float(v) for k, v in kld_global.items()},
            )

    def get_clusters(self, run, round):
        with self._lock:
            a, i, g = self._clusters.get((run, round), ({}, {}, {}))
            return dict(a), dict(i), dict(g)

    def set_weights(self, run: str, round: int, cluster: int, weights: dict[int, float]) -> None:
        with self._lock:
            self._weights.setdefault((run, round), {})[int(cluster)] = {int(k): float(v) for k, v in weights.items()}

    def get_weights(self, run: str, round: int) -> dict[int, dict[int, float]]:
        with self._lock:
            return {c: dict(w) for c, w in self._weights.get((run, round), {}).items()}

    def set_model_digest(self, run: str, round: int, cluster: int, digest: str) -> bool:
        with self._lock:
            table = self._digests.setdefault((run, round), {})
            if int(cluster) in table:
                return False
            table[int(cluster)] = digest
            return True

    def get_model_digests(self, run: str, round: int) -> dict[int, str]:
        with self._lock:
            return dict(self._digests.get((run, round), {}))

    def set_log_offset(self, run: str, round: int, offset: int) -> None:
        with self._lock:
            self._offsets.setdefault((run, round), int(offset))

    def get_log_offset(self, run: str, round: int) -> int | None:
        with self._lock:
            return self._offsets.get((run, round))

    def set_checkpoint(self, run: str, round: int, location: str) -> None:
        with self._lock:
            self._checkpoints.setdefault(run, {})[int(round)] = location

    def get_checkpoints(self, run: str) -> dict[int, str]:
        with self._lock:
            return dict(self._checkpoints.get(run, {}))

    def record_metrics(self, run: str, round: int, who: str, metrics: dict[str, float]) -> None:
        with self._lock:
            self._metrics.setdefault((run, round), {}).setdefault(who, {}).update(
                {k: float(v) for k, v in metrics.items()}
            )

    def get_metrics(self, run: str, round: int) -> dict[str, dict[str, float]]:
        with self._lock:
            return {w: dict(m) for w, m in self._metrics.get((run, round), {}).items()}

    def put_doc(self, run: str, round: int, name: str, doc: str) -> None:
        with self._lock:
            self._docs.setdefault((run, round), {})[name] = doc

    def get_docs(self, run: str, round: int) -> dict[str, str]:
        with self._lock:
            return dict(self._docs.get((run, round), {}))

    def delete_doc(self, run: str, round: int, name: str) -> None:
        with self._lock:
            self._docs.get((run, round), {}).pop(name, None)

    def close(self) -> None:
        pass
