"""The coordinator's durable round record: the JSON documents it keeps in the ledger (`RoundStore.put_doc`).

A coordinator writes each fact it learns to the ledger *before* it acknowledges the message that taught it, so a
coordinator that restarts (or a standby that takes over) rebuilds its round from these documents and the messages
still queued for it; nothing acknowledged is lost. Documents per round `r` (`get_docs(run, r)`):

| name              | written when                        | content                                               |
|-------------------|-------------------------------------|-------------------------------------------------------|
| `members` (r = 0) | a client joins                      | client -> {domain, n_samples, profile or null}        |
| `start`           | before round r's round_start is sent | participants, steps, steps_from, deadline, started,   |
|                   |                                     | cuts (per client, all clients), round_start's msg_id  |
| `done.<k>`        | client k's round_done is accepted   | n_samples, steps_done, update_digest, metrics, msg_id |
| `server_done`     | the server's server_round_done      | steps_done, update_digest, metrics, late, msg_id      |
| `cluster_result`  | the clustering service's result     | assignment, kld_intra, kld_global, k, msg_id          |
| `job.<k>`         | before the round is `aggregating`   | the aggregation job (aggregator.job_document)         |
| `agg.<k>`         | an aggregate_done is accepted       | digest, members, msg_id (the model is recomputed)     |
| `refused.<k>`     | an aggregator refused job k because | job (its msg_id), missing (client -> update msg_id),  |
|                   | a member's update is not in the log | count (refusals of that job), reason                  |
| `discarded`       | the round's updates are settled     | update msg_id -> why it will never be aggregated      |

All numbers survive the JSON round trip exactly (Python writes floats with repr), so a job rebuilt from its
document reproduces the aggregation bit for bit.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import DeviceProfile
from ..protocol import AggregateJob, ClusterResult, Message, RoundDone, RoundStart, ServerRoundDone, from_plain
from ..state import RoundStore
from ..transport import client_address

MEMBERS = "members"
START = "start"
SERVER_DONE = "server_done"
CLUSTER_RESULT = "cluster_result"
DISCARDED = "discarded"


def done_name(client: int) -> str:
    return f"done.{int(client)}"


def job_name(cluster: int) -> str:
    return f"job.{int(cluster)}"


def agg_name(cluster: int) -> str:
    return f"agg.{int(cluster)}"


def refused_name(cluster: int) -> str:
    return f"refused.{int(cluster)}"


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, allow_nan=False)


class RoundDocs:
    """The documents of one round, parsed (missing ones are None / empty)."""

    def __init__(self, raw: dict[str, str]):
        self.raw = raw
        self.start = _load(raw.get(START))
        self.server_done = _load(raw.get(SERVER_DONE))
        self.cluster_result = _load(raw.get(CLUSTER_RESULT))
        self.discarded: dict[str, str] = _load(raw.get(DISCARDED)) or {}
        self.done = {
            int(k.split(".", 1)[1]): _load(v)
            for k, v in raw.items()
            if k.startswith("done.") and k.split(".", 1)[1].lstrip("-").isdigit()
        }
        self.jobs = {
            int(k.split(".", 1)[1]): _load(v)
            for k, v in raw.items()
            if k.startswith("job.") and k.split(".", 1)[1].lstrip("-").isdigit()
        }
        self.aggs = {
            int(k.split(".", 1)[1]): _load(v)
            for k, v in raw.items()
            if k.startswith("agg.") and k.split(".", 1)[1].lstrip("-").isdigit()
        }

    @staticmethod
    def read(store: RoundStore, run: str, round: int) -> RoundDocs:
        return RoundDocs(store.get_docs(run, round))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# ------------------------------------------------------------------------------------------------- writers
def members_doc(members: dict[int, Any]) -> str:
    """`members`: Member objects of the coordinator (client, domain, n_samples, profile)."""
    out = {}
    for c, m in sorted(members.items()):
        p = m.profile
        out[str(c)] = {
            "domain": m.domain,
            "n_samples": m.n_samples,
            "profile": None
            if p is None
            else {"cpu_mhz": p.cpu_mhz, "flops_per_cycle": p.flops_per_cycle, "data_rate": p.data_rate},
        }
    return _dump(out)


def parse_members(text: str | None) -> dict[int, tuple[int, int, DeviceProfile | None]]:
    """client -> (domain, n_samples, profile)."""
    if not text:
        return {}
    out = {}
    for c, m in json.loads(text).items():
        p = m.get("profile")
        prof = DeviceProfile(p["cpu_mhz"], p["flops_per_cycle"], p["data_rate"]) if p else None
        out[int(c)] = (int(m["domain"]), int(m["n_samples"]), prof)
    return out


# The round's messages are kept as their plain payload (`Message.plain_payload`) plus their msg_id, and read back
# with the wire's checks (`from_plain`): a resumed coordinator re-sends the same round_start (same msg_id, so a
# redelivered copy is recognised as a duplicate) and accounts for what it had already received.


def message_doc(msg: Message, **extra: Any) -> str:
    return _dump({**msg.plain_payload(), **extra, "msg_id": msg.msg_id})


def start_doc(msg: RoundStart, started: float) -> str:
    return message_doc(msg, started=started)


def round_start_from_doc(run: str, round: int, doc: dict[str, Any]) -> RoundStart:
    return from_plain(RoundStart, doc, run=run, round=round, sender="coordinator", msg_id=doc["msg_id"])


def round_done_from_doc(run: str, round: int, client: int, doc: dict[str, Any]) -> RoundDone:
    return from_plain(
        RoundDone, doc, run=run, round=round, sender=client_address(client), msg_id=doc["msg_id"], client=client
    )


def server_done_from_doc(run: str, round: int, doc: dict[str, Any]) -> ServerRoundDone:
    return from_plain(ServerRoundDone, doc, run=run, round=round, sender="server", msg_id=doc["msg_id"])


def cluster_result_from_doc(run: str, round: int, doc: dict[str, Any]) -> ClusterResult:
    msg_id = doc.get("msg_id") or "restored"
    return from_plain(ClusterResult, doc, run=run, round=round, sender="clustering", msg_id=msg_id)


def add_discarded(store: RoundStore, run: str, round: int, updates: dict[str, str]) -> None:
    """Record updates that will never be aggregated, with the reason (merged into the round's `discarded`)."""
    if not updates:
        return
    current = _load(store.get_docs(run, round).get(DISCARDED)) or {}
    current.update(updates)
    store.put_doc(run, round, DISCARDED, _dump(current))


def agg_doc(cluster: int, digest: str, members: tuple[int, ...], msg_id: str) -> str:
    return _dump({"cluster": int(cluster), "digest": digest, "members": list(members), "msg_id": msg_id})


def job_from_doc(run: str, round: int, doc: dict[str, Any], log_offset: int) -> AggregateJob:
    """The aggregation job a `job.<k>` document records (same msg_id as the job the coordinator queued)."""
    return AggregateJob(
        run=run,
        round=round,
        sender="coordinator",
        msg_id=doc["msg_id"],
        cluster=int(doc["cluster"]),
        members=tuple(int(c) for c in doc["members"]),
        weights=tuple(float(w) for w in doc["weights"]),
        recipients=tuple(int(c) for c in doc["recipients"]),
        cuts=tuple(tuple(int(b) for b in c) for c in doc["cuts"]),
        update_ids={str(k): str(v) for k, v in doc["update_ids"].items()},
        log_offset=int(log_offset),
    )


__all__ = [
    "CLUSTER_RESULT",
    "MEMBERS",
    "SERVER_DONE",
    "START",
    "RoundDocs",
    "agg_doc",
    "agg_name",
    "cluster_result_from_doc",
    "done_name",
    "job_from_doc",
    "job_name",
    "refused_name",
    "members_doc",
    "parse_members",
    "round_done_from_doc",
    "round_start_from_doc",
    "message_doc",
    "server_done_from_doc",
    "start_doc",
]
