"""The RoundStore interface: the run's ledger (rounds, phases, clients, clusters, digests, checkpoints).

Implementations: `memory.py` (one process) and `redis.py` (the shared ledger of a distributed run). The Redis key
schema, which this interface mirrors, is documented in `state/redis.py` and the README; every key lives under
`hfgan:{run}:`.

Phases of a round, in order: `training` -> `aggregating` -> `done`. A phase transition is a compare-and-set, so two
coordinators (active and standby) can never both move a round forward.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

PHASES = ("admitting", "training", "aggregating", "done")
# clipped and rejected: an aggregator clipped the arrived update to its peers, or left it out (its reason says why).
CLIENT_STATES = ("expected", "arrived", "late", "dropped", "clipped", "rejected")
RUN_STATUSES = ("created", "running", "finished", "failed", "stopped")


class StateError(RuntimeError):
    """The ledger refuses an operation (a different run under this id, unknown phase, unreachable store)."""


@dataclass(frozen=True)
class ClientRecord:
    state: str  # one of CLIENT_STATES
    reason: str
    ts: float


@dataclass(frozen=True)
class SlotClaim:
    slot: int
    owner: str


class RoundStore(abc.ABC):
    url: str

    # ------------------------------------------------------------------------------------------------- run
    @abc.abstractmethod
    def init_run(self, run: str, config_digest: str, config_json: str) -> bool:
        """Register a run. True if created, False if it already exists with the same digest; StateError if it
        exists with a different one."""

    @abc.abstractmethod
    def run_info(self, run: str) -> dict[str, str] | None:
        """{"digest", "config", "status", "created"} or None for an unknown run."""

    @abc.abstractmethod
    def set_status(self, run: str, status: str) -> None: ...

    # ------------------------------------------------------------------------------------------ round/phase
    @abc.abstractmethod
    def get_round(self, run: str) -> tuple[int, str]:
        """(current round, its phase); (0, "admitting") before the first round."""

    @abc.abstractmethod
    def transition(self, run: str, round: int, from_phase: str, to_round: int, to_phase: str) -> bool:
        """Atomically move (round, from_phase) -> (to_round, to_phase); False if the ledger was elsewhere."""

    # ------------------------------------------------------------------------------------------------ clients
    @abc.abstractmethod
    def set_expected(self, run: str, round: int, clients: list[int], ts: float) -> None: ...

    @abc.abstractmethod
    def mark_client(self, run: str, round: int, client: int, state: str, reason: str, ts: float) -> None: ...

    @abc.abstractmethod
    def round_clients(self, run: str, round: int) -> dict[int, ClientRecord]: ...

    @abc.abstractmethod
    def claim_slot(self, run: str, n_slots: int, owner: str, ttl_s: float) -> SlotClaim | None:
        """Claim the lowest free client slot for `owner` (held while its heartbeat lives); None if all are taken."""

    @abc.abstractmethod
    def release_slot(self, run: str, slot: int, owner: str) -> None: ...

    @abc.abstractmethod
    def heartbeat(self, run: str, worker: str, ttl_s: float, info: str = "") -> None:
        """Record that `worker` is alive for `ttl_s` seconds (a client's heartbeat also keeps its slot)."""

    @abc.abstractmethod
    def alive(self, run: str) -> dict[str, str]:
        """Workers whose heartbeat has not expired -> their info string."""

    # ------------------------------------------------------------------------------------------------ leader
    @abc.abstractmethod
    def acquire_leader(self, run: str, role: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the `role` lease (e.g. the active coordinator); False while another owner holds it."""

    @abc.abstractmethod
    def release_leader(self, run: str, role: str, owner: str) -> None: ...

    # --------------------------------------------------------------------------------------------- facts
    @abc.abstractmethod
    def set_cuts(self, run: str, cuts: dict[int, str]) -> None:
        """Cut bits per client as 4-character strings ("1010")."""

    @abc.abstractmethod
    def get_cuts(self, run: str) -> dict[int, str]: ...

    @abc.abstractmethod
    def set_clusters(
        self,
        run: str,
        round: int,
        assignment: dict[int, int],
        kld_intra: dict[int, float],
        kld_global: dict[int, float],
    ) -> None: ...

    @abc.abstractmethod
    def get_clusters(self, run: str, round: int) -> tuple[dict[int, int], dict[int, float], dict[int, float]]: ...

    @abc.abstractmethod
    def set_weights(self, run: str, round: int, cluster: int, weights: dict[int, float]) -> None: ...

    @abc.abstractmethod
    def get_weights(self, run: str, round: int) -> dict[int, dict[int, float]]: ...

    @abc.abstractmethod
    def set_model_digest(self, run: str, round: int, cluster: int, digest: str) -> bool:
        """Record a cluster's (-1: global) model digest; True if new, False if already recorded (same value)."""

    @abc.abstractmethod
    def get_model_digests(self, run: str, round: int) -> dict[int, str]: ...

    @abc.abstractmethod
    def set_log_offset(self, run: str, round: int, offset: int) -> None:
        """Where the round's updates start in the update log (only the first call per round counts)."""

    @abc.abstractmethod
    def get_log_offset(self, run: str, round: int) -> int | None: ...

    @abc.abstractmethod
    def set_checkpoint(self, run: str, round: int, location: str) -> None: ...

    @abc.abstractmethod
    def get_checkpoints(self, run: str) -> dict[int, str]: ...

    @abc.abstractmethod
    def record_metrics(self, run: str, round: int, who: str, metrics: dict[str, float]) -> None:
        """Scalar training metrics only (mean losses, step times): never per-sample values."""

    @abc.abstractmethod
    def get_metrics(self, run: str, round: int) -> dict[str, dict[str, float]]: ...

    @abc.abstractmethod
    def put_doc(self, run: str, round: int, name: str, doc: str) -> None:
        """Store a JSON document for a round (e.g. `job.<cluster>`: an aggregation job, for replay)."""

    @abc.abstractmethod
    def get_docs(self, run: str, round: int) -> dict[str, str]: ...

    def delete_doc(self, run: str, round: int, name: str) -> None:
        """Remove a round's document (a job the coordinator planned again without it; absent: nothing)."""
        raise NotImplementedError

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> RoundStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
