"""The update log: a RabbitMQ stream, appended to and read in bounded reads."""

from __future__ import annotations

import logging
import time
from typing import Any

from ...protocol.codec import WireError
from ..base import (
    LogRecord,
)
from .chunking import chunk_header
from .topology import (
    H_CHUNK_ID,
    H_ROUND,
    STREAM_PREFETCH,
)

log = logging.getLogger(__name__)


class _UpdateLog:
    """Update-log methods of `AmqpTransport`."""

    # ---------------------------------------------------------------------------------------------------- log
    def append_log(self, body: bytes, *, round: int) -> None:
        self._check_open()
        body = bytes(body)
        frames = self._frames(body, {H_ROUND: int(round)})
        self._retrying(lambda: self._send(self.names.log, "updates", frames, True, True), "append_log")
        self.published_bytes += len(body)

    def _read_stream(
        self, offset: int | str, *, first_wait: float, idle: float, stop_at: int | None, follow_s: float | None = None
    ) -> list[tuple[int, dict[str, Any], bytes]]:
        """(offset, headers, body) of the stream's messages from `offset`: waits up to `first_wait` for the first,
        then stops after `idle` seconds without one (or 3x the longest wait for a record so far, when that is longer:
        a busy broker or host delivers slower, and a read must not end early because of it), or once `stop_at` was
        reached and nothing followed briefly.

        Acknowledgements are the stream's credit: once `stop_at` is reached (or `follow_s` seconds after the first
        record) nothing more is acknowledged, so the broker stops after the prefetch window even while records keep
        being appended: a read is bounded. The consumer is then torn down by `_close_stream_channel`, never by
        pika's `BlockingChannel.basic_cancel` or `close` (they reject what the consumer holds)."""
        out: list[tuple[int, dict[str, Any], bytes]] = []
        ch = self._conn.channel()
        flow: dict[str, Any] = {"ack": True, "until": None, "start": time.monotonic()}
        try:
            ch.basic_qos(prefetch_count=STREAM_PREFETCH)  # streams require a prefetch; acks are credit

            def on_message(c: Any, method: Any, props: Any, body: bytes) -> None:
                headers = dict(props.headers or {})
                headers["user_id"] = props.user_id  # the broker checked it against the publishing connection
                off = int(headers.get("x-stream-offset", -1))
                out.append((off, headers, body))
                if stop_at is not None and off >= stop_at:
                    flow["ack"] = False  # everything needed is here: let the credit run out
                if follow_s is not None:
                    now = time.monotonic()
                    if flow["until"] is None:
                        # Ten times as long as the first record took, at least: a busy broker delivers the rest of
                        # the last chunk (a whole chunked update, often) slower too, and the tail must reach its end.
                        flow["until"] = now + max(follow_s, 10 * (now - flow["start"]))
                    elif now >= flow["until"]:
                        flow["ack"] = False
                if flow["ack"]:
                    c.basic_ack(method.delivery_tag)

            ch.basic_consume(self.names.updates, on_message, auto_ack=False, arguments={"x-stream-offset": offset})
            start = last = time.monotonic()
            seen = 0
            slowest = 0.0  # the longest wait for a record so far (the first one's included)
            while True:
                self._conn.process_data_events(time_limit=0.02)
                now = time.monotonic()
                if len(out) != seen:
                    slowest = max(slowest, now - last)
                    seen, last = len(out), now
                    continue
                if not out:
                    if now - start >= first_wait:
                        break
                elif stop_at is not None and out[-1][0] >= stop_at:
                    if now - last >= min(idle, 0.05):
                        break
                elif now - last >= max(idle, 3 * slowest):
                    break
        finally:
            flow["ack"] = False
            self._close_stream_channel(ch)
        return out

    def _close_stream_channel(self, ch: Any) -> None:
        """Close a channel that consumes the stream without rejecting anything.

        pika's `BlockingChannel.basic_cancel` (which `BlockingChannel.close` and `BlockingConnection.close` call for
        every consumer) sends `basic.reject` for each delivery it has buffered but not dispatched yet, and its
        async channel rejects every delivery that arrives between `basic.cancel` and `cancel-ok` while the channel
        is still open (pika 1.x, `adapters/blocking_connection.py` and `channel.py` `_on_deliver`). RabbitMQ does
        not implement reject on stream queues: it closes the whole connection (540 NOT_IMPLEMENTED), taking
        every consumer of this transport with it. So the channel is closed through pika's async channel
        (`_impl.close()`): it sends `basic.cancel` and `channel.close` and is no longer open, so deliveries that
        still arrive are dropped without a reply (a stream never redelivers; nothing is lost)."""
        impl = getattr(ch, "_impl", None)
        try:
            if impl is None:  # a pika without the async channel underneath: nothing safer to fall back to
                ch.close()
                return
            if impl.is_open:
                impl.close()
            deadline = time.monotonic() + 10.0
            while not impl.is_closed and time.monotonic() < deadline and self._conn.is_open:
                self._conn.process_data_events(time_limit=0.01)
        except Exception as exc:  # the read is complete; a connection that died meanwhile is reopened on next use
            log.debug("closing the update-log reader channel: %r", exc)

    def _log_tail(self, wait: float) -> int:
        """The offset after the last record of the stream (0 if it is empty)."""
        # A snapshot: records appended while it reads are followed for a moment only, or it would never end.
        last = self._read_stream("last", first_wait=wait, idle=0.05, stop_at=None, follow_s=0.1)
        return max((o for o, _, _ in last), default=-1) + 1

    def log_length(self) -> int:
        """The next offset of the update log (what memory's `log_length()` is): record offsets stay below it."""
        self._check_open()
        return self._retrying(lambda: self._log_tail(self.log_idle), "log_length")

    def read_log(self, *, from_offset: int = 0, round: int | None = None, timeout: float = 2.0) -> list[LogRecord]:
        self._check_open()
        from_offset = max(0, int(from_offset))

        def run() -> list[tuple[int, dict[str, Any], bytes]]:
            tail = self._log_tail(timeout)  # the first record may take a while on a busy host
            if tail <= from_offset:
                return []
            return self._read_stream(from_offset, first_wait=timeout, idle=self.log_idle, stop_at=tail - 1)

        raw = self._retrying(run, "read_log")
        records: list[LogRecord] = []
        # Chunks are grouped per publisher: nobody can complete or spoil another user's record with chunks of its own.
        partials: dict[tuple[str | None, str], tuple[int, int, dict[int, bytes]]] = {}
        for offset, headers, body in raw:
            if offset < from_offset:
                continue  # a stream starts delivering at the beginning of the chunk holding from_offset
            user = headers.get("user_id")
            rnd = headers.get(H_ROUND, -1)
            if not isinstance(rnd, int) or isinstance(rnd, bool):
                log.warning("update log record at %d skipped: its round header is %r", offset, type(rnd).__name__)
                continue
            if H_CHUNK_ID not in headers:
                records.append(LogRecord(offset, rnd, body, user))
                continue
            try:
                cid, index, count = chunk_header(headers, self.chunk_limits)
            except WireError as exc:  # anyone who may append may append junk: skipped, never fatal
                log.warning("update log record at %d skipped: %s", offset, exc)
                continue
            key = (user, cid)
            first, known, pieces = partials.setdefault(key, (offset, count, {}))
            if known != count:
                log.warning(
                    "update log record at %d skipped: chunk count %d, its first chunk said %d", offset, count, known
                )
                continue
            pieces.setdefault(index, body)
            if len(pieces) == count:
                records.append(LogRecord(first, rnd, b"".join(pieces[i] for i in range(count)), user))
                partials[key] = (first, count, {})  # completed: later duplicates start a new (ignored) partial
        for (_, cid), (first, count, pieces) in partials.items():
            # Without its first chunk the record began before from_offset (expected when a round's offset follows
            # the previous round's last chunk); with it, chunks are missing (retention, or a writer that died).
            if 0 in pieces:
                log.warning(
                    "update log record at %d (chunks %s) is incomplete: %d of %d chunks", first, cid, len(pieces), count
                )
        records.sort(key=lambda r: r.offset)
        return [r for r in records if round is None or r.round == round]
