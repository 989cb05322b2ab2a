"""Admission: client slots, who joins a run, with what shard size and device profile, and the cut bits they get.

Slots (slots.py): a `ClientHeartbeat` from broker user `client-<k>` asks for or renews slot k; the answer goes to
`events.slot.<owner>` (granted, or refused with a free slot to try). The coordinator also records the holder's
heartbeat in the ledger for `hfgan status` (one write, whatever the number of clients).

A join is a client's claim about itself; the coordinator admits only what it can check: the client index its broker
user owns, the domain the scenario gives that client, and a sample count no larger than the size cap the scenario
gives that client's shard (`shard_cap`). The admitted count, never one reported later, weights the client's updates.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DeviceProfile
from ..data.partition import shard_cap
from ..model import CutBits
from ..protocol import ClientHeartbeat, ClusterResult, Join, SlotGrant
from ..transport import client_address
from ..transport.base import EVENTS_PREFIX
from . import ledger
from .host import Reject
from .slots import OWNER


@dataclass
class Member:
    client: int
    domain: int
    n_samples: int
    profile: DeviceProfile | None


class AdmissionMixin:
    """Slots, join and clustering-result checks and the admission of `CoordinatorRole` (its state is there)."""

    def _on_heartbeat(self, msg: ClientHeartbeat) -> None:
        c, ctx = msg.client, self.ctx
        if not 0 <= c < self.expected:
            raise Reject(f"unknown_client: slot {c} is outside 0..{self.expected - 1}")
        if msg.sender != client_address(c):
            raise Reject(f"bad_sender: {msg.sender!r} asked for slot {c}")
        if not OWNER.fullmatch(msg.owner):
            raise Reject("malformed: a slot owner is 1-64 letters, digits, '_' or '-'")
        now = ctx.clock()
        outcome = self.slots.beat(c, msg.owner, now)
        if outcome != "refused":
            ctx.store.heartbeat(ctx.run, client_address(c), self.slots.ttl_s, msg.info[:200])
            if msg.traffic and msg.traffic != self._traffic.get(c):
                self._traffic[c] = dict(msg.traffic)
                traffic = {k: float(v) for k, v in msg.traffic.items() if k in ("bytes_sent", "messages_sent")}
                ctx.store.record_metrics(ctx.run, 0, f"traffic.{client_address(c)}", traffic)
            if msg.info == "exited":
                self.clients_exited.add(c)
        if outcome == "renewed":
            return
        granted = outcome == "granted"
        if granted:
            ctx.log.info("coordinator: slot %d granted to %s", c, msg.owner)
        grant = SlotGrant(
            **self.envelope(self.round),
            client=c,
            owner=msg.owner,
            granted=granted,
            free_slot=-1 if granted else self.slots.free_slot(now),
            reason="" if granted else f"slot {c} is held by another process",
        )
        self.send(f"{EVENTS_PREFIX}slot.{msg.owner}", grant)

    def _check_cluster_result(self, msg: ClusterResult) -> None:
        """A result the aggregation may use: from the clustering service, about members of the run only, with
        cluster ids below k (anything else would reassign clients to clusters that do not exist)."""
        if msg.sender != "clustering":
            raise Reject(f"bad_sender: cluster results come from the clustering service, not {msg.sender!r}")
        if not 1 <= msg.k <= max(1, len(self.members)):
            raise Reject(f"malformed: cluster result with k = {msg.k} for {len(self.members)} member(s)")
        for name, mapping in (
            ("assignment", msg.assignment),
            ("kld_intra", msg.kld_intra),
            ("kld_global", msg.kld_global),
        ):
            unknown = [c for c in mapping if not c.isdigit() or int(c) not in self.members]
            if unknown:
                raise Reject(f"malformed: cluster result {name} names clients {unknown[:5]} that are not members")
        bad = {c: k for c, k in msg.assignment.items() if not 0 <= k < msg.k}
        if bad:
            raise Reject(f"malformed: cluster ids {bad} outside 0..{msg.k - 1}")

    def _on_join(self, msg: Join) -> None:
        c = msg.client
        if not 0 <= c < self.expected:
            raise Reject(f"unknown_client: client {c} is outside 0..{self.expected - 1}")
        if msg.sender != client_address(c):
            raise Reject(f"bad_sender: {msg.sender!r} joined as client {c}")
        scenario = self.ctx.cfg.scenario
        if msg.domain != scenario.client_domains()[c] or msg.n_samples <= 0:
            raise Reject(
                f"malformed: join of client {c} with domain {msg.domain} (the scenario gives it domain "
                f"{scenario.client_domains()[c]}) and {msg.n_samples} samples"
            )
        # The sample count weights the client's updates: never more than its shard can hold.
        n_samples = min(int(msg.n_samples), shard_cap(scenario, c))
        if n_samples != msg.n_samples:
            self.ctx.log.warning(
                "coordinator: client %d claims %d samples; admitted with its cap %d", c, msg.n_samples, n_samples
            )
        profile = None
        if msg.profile:
            try:
                profile = DeviceProfile(
                    msg.profile["cpu_mhz"], msg.profile["flops_per_cycle"], msg.profile["data_rate"]
                )
            except KeyError as exc:
                raise Reject(f"malformed: profile without {exc}") from None
            if min(profile.cpu_mhz, profile.flops_per_cycle, profile.data_rate) <= 0:
                raise Reject("malformed: non-positive device profile")
        rejoin = c in self.members
        self.members[c] = Member(c, msg.domain, n_samples, profile)
        # The join is recorded in the members document; heartbeats are the workers' own (liveness, not joins).
        self.ctx.store.put_doc(self.ctx.run, 0, ledger.MEMBERS, ledger.members_doc(self.members))
        self._event("joined", client=c, rejoin=rejoin)
        start = self._start_msg
        if rejoin and self.phase == "training" and c in self.participants and c not in self.done and start:
            # A restarted client rejoins its round from the first step (it cannot read the round from the ledger).
            self.send(client_address(c), start)
        if self.phase == "admitting" and len(self.members) == self.expected:
            self._admit()

    def _admit(self) -> None:
        cfg = self.ctx.cfg
        clients = sorted(self.members)
        if not self.cuts or any(c not in self.cuts for c in clients):
            if cfg.train.cuts == "plan":
                if self.planner is None:
                    raise RuntimeError("cuts = 'plan' needs a planner")
                profiles = self._profiles(clients)
                planned = self.planner(profiles)
                self.cuts = {c: CutBits(*b) for c, b in zip(clients, planned)}
            else:
                table = cfg.train.cuts
                self.cuts = {c: CutBits(*table[c % len(table)]) for c in clients}
        self.ctx.store.set_cuts(self.ctx.run, {c: str(b) for c, b in self.cuts.items()})
        self._event("admitted", clients=len(clients), cuts=" ".join(str(self.cuts[c]) for c in clients))
        self._start_round(self.round + 1)

    def _profiles(self, clients: list[int]) -> list[DeviceProfile]:
        configured = self.ctx.cfg.devices.client_profiles(self.expected)
        return [self.members[c].profile or configured[c] for c in clients]
