"""Chunked messages: bodies above `max_frame_body` split into chunk messages and reassembled by the consumer."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika.exceptions as pex

from ..base import (
    Delivery,
)
from .connection import _ConnectionLost
from .topology import (
    _CHUNK_HEADERS,
    H_ADDRESS,
    H_CHUNK_COUNT,
    H_CHUNK_ID,
    H_CHUNK_INDEX,
    H_REASON,
    H_REJECTED_BY,
)

if TYPE_CHECKING:
    from .transport import _Consumer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Partial:
    count: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    tags: list[int] = field(default_factory=list)
    headers: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    redelivered: bool = False


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
        cid = str(headers[H_CHUNK_ID])
        try:
            index, count = int(headers[H_CHUNK_INDEX]), int(headers[H_CHUNK_COUNT])
        except (TypeError, ValueError):
            index, count = -1, 0
        if cid in cons.done or not 0 <= index < count:
            # A duplicate of a chunk whose message was already delivered (its publish was retried), or garbage.
            with contextlib.suppress(pex.AMQPError):
                cons.channel.basic_ack(method.delivery_tag)
            return None
        part = cons.partials.get(cid)
        if part is None:
            part = cons.partials[cid] = _Partial(count, time.monotonic(), user_id=props.user_id)
        part.tags.append(method.delivery_tag)
        part.redelivered |= bool(method.redelivered)
        part.pieces.setdefault(index, body)
        if index == 0:
            part.headers = headers
        if len(part.pieces) < part.count:
            self._update_qos(cons)
            return None
        del cons.partials[cid]
        cons.done[cid] = None
        while len(cons.done) > 1024:
            cons.done.popitem(last=False)
        full = b"".join(part.pieces[i] for i in range(part.count))
        delivery = self._delivery(
            cons, part.tags, full, part.headers, part.user_id, part.redelivered, method.routing_key
        )
        self._update_qos(cons)
        return delivery

    def _update_qos(self, cons: _Consumer) -> None:
        """Raise the channel prefetch by the chunks that partial and unsettled chunked messages hold or still need,
        so that reassembly can always complete; back to the plain prefetch once they are settled."""
        if cons.prefetch == 0 or cons.channel is None or not cons.channel.is_open:
            return
        extra = sum(len(p.tags) + (p.count - len(p.pieces)) - 1 for p in cons.partials.values())
        extra += sum(cons.unsettled_extra.values())
        want = cons.prefetch + extra
        if want != cons.qos:
            with contextlib.suppress(pex.AMQPError):
                cons.channel.basic_qos(prefetch_count=want, global_qos=True)
                cons.qos = want

    def _expire_partials(self, cons: _Consumer) -> None:
        now = time.monotonic()
        for cid, part in list(cons.partials.items()):
            if now - part.started < self.chunk_timeout:
                continue
            del cons.partials[cid]
            present = sorted(part.pieces)
            reason = f"incomplete_chunked_message: chunks {present} of {part.count} after {self.chunk_timeout:.1f} s"
            log.warning("%s on %s: dead-lettering what arrived", reason, cons.address)
            ch = cons.channel
            # The dead letter holds the chunks that arrived, concatenated in order (the reason says which).
            body = b"".join(part.pieces[i] for i in present)
            hdr = {k: v for k, v in part.headers.items() if k not in _CHUNK_HEADERS}
            hdr.update({H_ADDRESS: cons.address, H_REASON: reason, H_REJECTED_BY: self._username})
            try:
                with self._guard():
                    self._send(self.names.dlx, "", self._frames(body, hdr), True, True)
                for tag in part.tags:
                    ch.basic_ack(tag)
            except (_ConnectionLost, pex.AMQPError) as exc:
                log.warning("could not dead-letter the incomplete message on %s: %s", cons.address, exc)
            self._update_qos(cons)
