"""Chunked messages: bodies above `max_frame_body` split into chunk messages and reassembled by the consumer."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika.exceptions as pex

from ...protocol.codec import WireError
from ..base import Delivery, TransportError
from .connection import _ConnectionLost
from .topology import (
    _CHUNK_HEADERS,
    H_ADDRESS,
    H_CHUNK_COUNT,
    H_CHUNK_ID,
    H_CHUNK_INDEX,
    H_REASON,
    H_REJECTED_BY,
    MIB,
)

if TYPE_CHECKING:
    from .transport import _Consumer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkLimits:
    """What a consumer accepts of chunked messages; anything beyond is dead-lettered with its reason.

    A sender is the publishing broker user (AMQP `user_id`, validated by RabbitMQ). The defaults admit the largest
    message the codec accepts (256 MiB) in chunks of at least 4 MiB, and a few messages per sender in flight."""

    max_chunks: int = 64  # chunks of one message
    max_message_bytes: int = 256 * MIB  # bytes of one reassembled message
    max_partials_per_sender: int = 4  # incomplete messages of one sender held at a time
    max_partial_bytes_per_sender: int = 256 * MIB  # bytes those hold together
    max_prefetch: int = 2048  # the channel prefetch, raised for reassembly, never exceeds this (AMQP: <= 65535)

    def __post_init__(self) -> None:
        if not 1 <= self.max_prefetch <= 65535:
            raise TransportError("max_prefetch must be between 1 and 65535 (an AMQP short)")
        if self.max_chunks < 2 or self.max_partials_per_sender < 1:
            raise TransportError("max_chunks must be at least 2 and max_partials_per_sender at least 1")


DEFAULT_CHUNK_LIMITS = ChunkLimits()
_DONE_WINDOW = 1024  # completed or refused chunked messages remembered per consumer (duplicates, late chunks)


def chunk_header(headers: Mapping[str, Any], limits: ChunkLimits) -> tuple[str, int, int]:
    """(chunk id, index, count) of a chunk message's headers, or WireError("bad_chunk")."""
    cid, index, count = headers.get(H_CHUNK_ID), headers.get(H_CHUNK_INDEX), headers.get(H_CHUNK_COUNT)
    if not isinstance(cid, str) or not 0 < len(cid) <= 64:
        raise WireError("bad_chunk", "chunk id must be a string of 1 to 64 characters")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (index, count)):
        raise WireError("bad_chunk", "chunk index and count must be integers")
    if not 2 <= count <= limits.max_chunks:
        raise WireError("bad_chunk", f"chunk count {count} outside 2..{limits.max_chunks}")
    if not 0 <= index < count:
        raise WireError("bad_chunk", f"chunk index {index} outside 0..{count - 1}")
    return cid, index, count


@dataclass(eq=False)
class _Partial:
    count: int
    started: float
    sender: str = ""
    cid: str = ""
    pieces: dict[int, bytes] = field(default_factory=dict)
    tags: list[int] = field(default_factory=list)
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    nbytes: int = 0

    def extra(self) -> int:
        """Prefetch this message needs beyond one: the chunks it holds and those still to come, less one."""
        return len(self.tags) + (self.count - len(self.pieces)) - 1

    def body(self) -> bytes:
        return b"".join(self.pieces[i] for i in sorted(self.pieces))


class ChunkRefused(WireError):
    """A chunk refused by the reassembly: `tags` are the deliveries to dead-letter (this chunk's, and those of the
    incomplete message it belonged to), `body` what arrived of that message."""

    def __init__(self, reason: str, detail: str, tags: list[int], body: bytes):
        super().__init__(reason, detail)
        self.tags = tags
        self.body = body


class Reassembly:
    """The chunked messages one consumer is reassembling, bounded by `ChunkLimits` (no I/O: fuzzed in unit tests).

    `add` returns ("pending" | "duplicate" | "complete", partial); a chunk that is malformed or breaks a limit raises
    ChunkRefused (a WireError), and the rest of its message is refused as it arrives."""

    def __init__(self, limits: ChunkLimits = DEFAULT_CHUNK_LIMITS):
        self.limits = limits
        self.partials: dict[tuple[str, str], _Partial] = {}
        self.done: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()  # key -> completed

    def extra_prefetch(self) -> int:
        return sum(p.extra() for p in self.partials.values())

    def _close(self, key: tuple[str, str], completed: bool) -> None:
        self.done[key] = completed
        self.done.move_to_end(key)
        while len(self.done) > _DONE_WINDOW:
            self.done.popitem(last=False)

    def _refuse(self, key: tuple[str, str], tag: int, body: bytes, reason: str, detail: str) -> ChunkRefused:
        dropped = self.partials.pop(key, None)
        self._close(key, False)
        if dropped is None:
            return ChunkRefused(reason, detail, [tag], body)
        tags = dropped.tags if tag in dropped.tags else [*dropped.tags, tag]
        return ChunkRefused(reason, detail, tags, dropped.body() if dropped.pieces else body)

    def _check_new(self, key: tuple[str, str], count: int, base_prefetch: int) -> str | None:
        """Why a new incomplete message of this sender cannot be held, or None."""
        lim = self.limits
        mine = sum(1 for p in self.partials.values() if p.sender == key[0])
        if mine >= lim.max_partials_per_sender:
            return f"{key[0]!r} already has {mine} incomplete chunked messages"
        if base_prefetch + self.extra_prefetch() + count - 1 > lim.max_prefetch:
            return f"reassembly window full ({lim.max_prefetch} deliveries)"
        return None

    def add(
        self,
        sender: str,
        headers: dict[str, Any],
        body: bytes,
        tag: int,
        *,
        now: float,
        base_prefetch: int = 1,
        redelivered: bool = False,
    ) -> tuple[str, _Partial | None]:
        try:
            cid, index, count = chunk_header(headers, self.limits)
        except WireError as exc:
            raise ChunkRefused(exc.reason, exc.detail, [tag], body) from None
        key = (sender, cid)
        if key in self.done:
            if self.done[key]:
                return "duplicate", None  # a retried publish of a message already delivered
            raise ChunkRefused("bad_chunk", f"a chunk of refused message {cid}", [tag], body)
        part = self.partials.get(key)
        if part is None:
            why = self._check_new(key, count, base_prefetch)
            if why:
                raise self._refuse(key, tag, body, "chunk_flood", why)
            part = self.partials[key] = _Partial(count, now, sender=sender, cid=cid)
        elif part.count != count:
            raise self._refuse(key, tag, body, "bad_chunk", f"chunk count {count}, not {part.count}")
        part.tags.append(tag)
        part.redelivered |= redelivered
        if len(part.tags) > 2 * count:
            raise self._refuse(key, tag, body, "chunk_flood", f"over {2 * count} deliveries of a {count}-chunk message")
        if index in part.pieces:
            return "pending", part  # a duplicate chunk (retried publish): held, settled with the message
        if index == 0:
            part.headers = headers
        part.pieces[index] = body
        part.nbytes += len(body)
        if part.nbytes > self.limits.max_message_bytes:
            raise self._refuse(key, tag, body, "too_large", f"over {self.limits.max_message_bytes} bytes")
        held = sum(p.nbytes for p in self.partials.values() if p.sender == sender)
        if held > self.limits.max_partial_bytes_per_sender:
            raise self._refuse(key, tag, body, "chunk_flood", f"{sender!r} holds {held} bytes of incomplete messages")
        if len(part.pieces) < count:
            return "pending", part
        del self.partials[key]
        self._close(key, True)
        return "complete", part

    def expired(self, now: float, timeout: float) -> list[_Partial]:
        """Remove and return the partial messages older than `timeout` seconds."""
        old = [k for k, p in self.partials.items() if now - p.started >= timeout]
        out = [self.partials.pop(k) for k in old]
        for k in old:
            self._close(k, False)
        return out

    def reopen(self, sender: str, cid: str) -> None:
        """Forget that a message was completed: its chunks were requeued and will arrive again."""
        self.done.pop((sender, cid), None)

    def clear(self) -> None:
        self.partials.clear()


class _Chunking:
    """Chunking and reassembly methods of `AmqpTransport`."""

    def _frames(self, body: bytes, headers: dict[str, Any]) -> list[tuple[dict[str, Any], bytes | memoryview]]:
        if len(body) <= self.max_frame_body:
            return [(headers, body)]
        view = memoryview(body)
        count = -(-len(body) // self.max_frame_body)
        cid = uuid.uuid4().hex
        return [
            (
                {**headers, H_CHUNK_ID: cid, H_CHUNK_INDEX: i, H_CHUNK_COUNT: count},
                view[i * self.max_frame_body : (i + 1) * self.max_frame_body],
            )
            for i in range(count)
        ]

    def _add_chunk(
        self, cons: _Consumer, method: Any, props: Any, headers: dict[str, Any], body: bytes
    ) -> Delivery | None:
        tag = method.delivery_tag
        try:
            status, part = cons.chunks.add(
                props.user_id or "",
                headers,
                body,
                tag,
                now=time.monotonic(),
                base_prefetch=cons.prefetch,
                redelivered=bool(method.redelivered),
            )
        except ChunkRefused as exc:
            self._dead_letter_chunks(cons, exc.tags, exc.body, headers, str(exc))
            return None
        if status == "duplicate":
            with contextlib.suppress(pex.AMQPError):
                cons.channel.basic_ack(tag)
            return None
        if status == "pending" or part is None:
            self._update_qos(cons)
            return None
        full = b"".join(part.pieces[i] for i in range(part.count))
        delivery = self._delivery(
            cons, part.tags, full, part.headers, part.sender or None, part.redelivered, method.routing_key
        )
        self._update_qos(cons)
        return delivery

    def _update_qos(self, cons: _Consumer) -> None:
        """Raise the channel prefetch by the chunks that partial and unsettled chunked messages hold or still need,
        so that reassembly can always complete (capped at ChunkLimits.max_prefetch); back to the plain prefetch
        once they are settled."""
        if cons.prefetch == 0 or cons.channel is None or not cons.channel.is_open:
            return
        extra = cons.chunks.extra_prefetch() + sum(cons.unsettled_extra.values())
        want = min(cons.prefetch + extra, max(cons.prefetch, cons.chunks.limits.max_prefetch))
        if want != cons.qos:
            with contextlib.suppress(pex.AMQPError):
                cons.channel.basic_qos(prefetch_count=want, global_qos=True)
                cons.qos = want

    def _expire_partials(self, cons: _Consumer) -> None:
        for part in cons.chunks.expired(time.monotonic(), self.chunk_timeout):
            present = sorted(part.pieces)
            reason = f"incomplete_chunked_message: chunks {present} of {part.count} after {self.chunk_timeout:.1f} s"
            # The dead letter holds the chunks that arrived, concatenated in order (the reason says which).
            self._dead_letter_chunks(cons, part.tags, part.body(), part.headers, reason)

    def _dead_letter_chunks(
        self, cons: _Consumer, tags: list[int], body: bytes, headers: dict[str, Any], reason: str
    ) -> None:
        """Dead-letter (confirmed) what arrived of a chunked message, then acknowledge its chunks."""
        log.warning("%s on %s: dead-lettering %d chunk(s)", reason, cons.address, len(tags))
        hdr = {k: v for k, v in headers.items() if k not in _CHUNK_HEADERS}
        hdr.update({H_ADDRESS: cons.address, H_REASON: reason.splitlines()[0][:1000], H_REJECTED_BY: self._username})
        ch = cons.channel
        try:
            with self._guard():
                self._send(self.names.dlx, "", self._frames(body, hdr), True, True)
            for tag in tags:
                ch.basic_ack(tag)
        except (_ConnectionLost, pex.AMQPError) as exc:
            log.warning("could not dead-letter chunks on %s: %s", cons.address, exc)
        self._update_qos(cons)
