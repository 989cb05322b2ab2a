"""Fuzzing the wire with Hypothesis: the codec (`decode`) and the chunk layer (`chunk_header`, `Reassembly`).

Whatever arrives, the only exception is `WireError`, the work is bounded (a watchdog fails an example that hangs)
and so is the memory: what a decoder keeps is bounded by its limits, whatever the input claims. CI runs a few
thousand examples; HFGAN_FUZZ_EXAMPLES=100000 is the nightly-style run (docs/wire.md has its result).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tracemalloc
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfgan_core.protocol import REGISTRY, Limits, WireError, decode
from hfgan_core.transport.amqp import H_CHUNK_COUNT, H_CHUNK_ID, H_CHUNK_INDEX, ChunkLimits, ChunkRefused, Reassembly
from tests.unit.test_protocol import sample

# Messages per fuzz test: each codec example is one message, each chunk example a sequence of 1 to 60 chunk
# messages (30 on average), so the chunk test runs MESSAGES // 30 sequences.
EXAMPLES = int(os.environ.get("HFGAN_FUZZ_EXAMPLES", "0")) or None
MESSAGES = EXAMPLES or 2000


def _fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # the watchdog below bounds the work, not this host's speed
        suppress_health_check=list(HealthCheck),
        derandomize=EXAMPLES is None,  # CI: the same examples every run; nightly: fresh ones
        database=None,
    )


# Small limits, so that the fuzzer reaches them; what they bound is what the assertions check.
LIMITS = Limits(
    max_bytes=64 * 1024, max_tensors=16, max_tensor_elements=4096, max_total_elements=8192, max_collection=256
)
WATCHDOG_S = 30  # far above any honest example; only a hang reaches it


@contextlib.contextmanager
def watchdog():
    def fire(*_: Any) -> None:
        raise AssertionError(f"no result after {WATCHDOG_S} s: unbounded work")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(WATCHDOG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------- the codec
SEEDS = [sample(cls, seed=i).encode() for i, cls in enumerate(REGISTRY.values())]
SEEDS += [sample(cls, seed=i).encode("float16") for i, cls in enumerate(REGISTRY.values())]

_ints = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([0, 1, 2**31 - 1, 2**32, 2**53, 2**63 - 1, 2**64 - 1, -(2**63), 4095, 4096, 4097]),
)
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    _ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=200),
)
_shape = st.lists(_ints, max_size=10)
_tensor = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "uint8", "complex64", 3]),
        "shape": st.one_of(_shape, _leaf),
        "data": st.one_of(st.binary(max_size=600), _leaf),
    }
)
_value = st.recursive(
    st.one_of(_leaf, _tensor),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=20,
)


@st.composite
def structured(draw) -> bytes:
    """A valid message with fields replaced, added or removed."""
    obj = msgpack.unpackb(draw(st.sampled_from(SEEDS)), raw=False)
    keys = sorted(obj)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["replace", "add", "drop", "tensor"]))
        key = draw(st.sampled_from(keys))
        if action == "replace":
            obj[key] = draw(_value)
        elif action == "add":
            obj[draw(st.text(max_size=10))] = draw(_value)
        elif action == "drop":
            obj.pop(key, None)
        else:
            obj[key] = draw(_tensor)
    return msgpack.packb(obj, use_bin_type=True)


@st.composite
def mutated(draw) -> bytes:
    """A valid encoding with bytes flipped, inserted, deleted or cut off."""
    body = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and body:
            body[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xCF, 0xD3, 0xDD, 0xDF, 0xFF]))
        elif op == "insert":
            body[i:i] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del body[i : i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del body[i:]
    return bytes(body)


def _elements(msg: Any) -> int:
    total = 0
    for value in vars(msg).values():
        items = value.values() if isinstance(value, dict) else [value]
        total += sum(v.numel() for v in items if isinstance(v, torch.Tensor))
    return total


def _decode_peak(body: bytes) -> tuple[Any, int]:
    """(message or None, peak bytes Python allocated while decoding)."""
    tracemalloc.start()
    try:
        with watchdog():
            try:
                return decode(body, LIMITS), tracemalloc.get_traced_memory()[1]
            except WireError:
                return None, 0
    finally:
        tracemalloc.stop()


MEMORY_BOUND = 16 * LIMITS.max_bytes + (1 << 20)
for _seed in SEEDS:  # first calls initialise things lazily (torch, dtype paths): not a cost of any one message
    _decode_peak(_seed)


def check_decode(body: bytes) -> None:
    msg, peak = _decode_peak(body)
    if msg is None:
        return
    if peak > MEMORY_BOUND:  # a one-off allocation (a lazy first call) does not repeat; a real blow-up does
        peak = min(peak, _decode_peak(body)[1])
    # What was accepted is within the limits; Python-side memory stays a small multiple of the accepted bytes
    # (tensors are views of the body, so torch allocates only float16 -> float32 copies, bounded by the elements).
    assert _elements(msg) <= LIMITS.max_total_elements
    assert peak <= MEMORY_BOUND, peak


@_fuzz(MESSAGES)
@given(body=st.one_of(structured(), mutated(), st.binary(max_size=300)))
def test_decode_raises_only_wire_error(body: bytes) -> None:
    check_decode(body)


@pytest.mark.parametrize(
    "shape, data",
    [([0, 2**64 - 1], b""), ([2**63, 0], b""), ([0] * 9, b""), ([True, 2], b"\0" * 8), ([4097], b"\0" * 16388)],
)
def test_the_shape_overflow_poison_is_a_wire_error(shape: list, data: bytes) -> None:
    obj = msgpack.unpackb(sample(REGISTRY["g_head_out"]).encode(), raw=False)
    obj["act"] = {"dtype": "float32", "shape": shape, "data": data}
    with pytest.raises(WireError) as exc:
        decode(msgpack.packb(obj, use_bin_type=True), LIMITS)
    assert exc.value.reason in ("malformed", "too_large"), exc.value


# ------------------------------------------------------------------------------------------- the chunk layer
CHUNKS = ChunkLimits(
    max_chunks=8,
    max_message_bytes=4096,
    max_partials_per_sender=3,
    max_partial_bytes_per_sender=6000,
    max_prefetch=40,
)
_header_value = st.one_of(_ints, _leaf, st.lists(_ints, max_size=2))
_cid = st.one_of(st.sampled_from(["a", "b", "c", "d", "e"]), st.text(max_size=70), _leaf)


@st.composite
def chunk_events(draw) -> list[tuple[str, dict, bytes, float]]:
    """Interleaved chunks of a few senders: well-formed ones (some complete, some not) and junk headers."""
    events = []
    for _ in range(draw(st.integers(1, 60))):
        sender = draw(st.sampled_from(["", "client-0", "client-1", "server"]))
        if draw(st.integers(0, 3)):
            count = draw(st.integers(2, 10))
            headers = {H_CHUNK_ID: draw(_cid), H_CHUNK_INDEX: draw(st.integers(0, count)), H_CHUNK_COUNT: count}
        else:
            headers = {H_CHUNK_ID: draw(_cid), H_CHUNK_INDEX: draw(_header_value), H_CHUNK_COUNT: draw(_header_value)}
            if draw(st.booleans()):
                headers.pop(draw(st.sampled_from([H_CHUNK_ID, H_CHUNK_INDEX, H_CHUNK_COUNT])))
        body = b"x" * draw(st.sampled_from([0, 1, 100, 1000, 2500, 5000]))
        events.append((sender, headers, body, draw(st.sampled_from([0.0, 0.5, 30.0]))))
    return events


def run_chunks(events: list[tuple[str, dict, bytes, float]]) -> None:
    r = Reassembly(CHUNKS)
    settled: dict[int, str] = {}  # every delivery tag ends up settled exactly once, or still held
    now = 0.0

    def settle(tags: list[int], how: str) -> None:
        for tag in tags:
            assert tag not in settled, (tag, how, settled[tag])
            settled[tag] = how

    with watchdog():
        for tag, (sender, headers, body, dt) in enumerate(events):
            now += dt
            try:
                status, part = r.add(sender, headers, body, tag, now=now, base_prefetch=1)
            except ChunkRefused as exc:
                assert tag in exc.tags and exc.reason in ("bad_chunk", "chunk_flood", "too_large"), exc
                settle(exc.tags, "dead")
                continue
            if status == "duplicate":
                settle([tag], "ack")
            elif status == "complete":
                assert part is not None and len(part.pieces) == part.count
                assert len(b"".join(part.pieces.values())) <= CHUNKS.max_message_bytes
                settle(part.tags, "delivered")
            for old in r.expired(now, 10.0):
                settle(old.tags, "dead")
            senders = [p.sender for p in r.partials.values()]
            assert all(senders.count(s) <= CHUNKS.max_partials_per_sender for s in senders)
            for s in set(senders):
                held = sum(p.nbytes for p in r.partials.values() if p.sender == s)
                assert held <= CHUNKS.max_partial_bytes_per_sender
            assert 1 + r.extra_prefetch() <= CHUNKS.max_prefetch + 2 * CHUNKS.max_chunks
            assert len(r.done) <= 1024
    held = [t for p in r.partials.values() for t in p.tags]
    assert sorted([*settled, *held]) == list(range(len(events))), "a delivery was neither settled nor held"


@_fuzz(max(100, MESSAGES // 30))
@given(events=chunk_events())
def test_reassembly_raises_only_wire_errors_and_stays_bounded(events) -> None:
    run_chunks(events)


def test_the_chunk_count_poison_is_refused_before_any_qos() -> None:
    r = Reassembly()
    with pytest.raises(ChunkRefused) as exc:
        r.add("client-1", {H_CHUNK_ID: "x", H_CHUNK_INDEX: 0, H_CHUNK_COUNT: 100_000}, b"a", 1, now=0.0)
    assert exc.value.reason == "bad_chunk" and exc.value.tags == [1] and isinstance(exc.value, WireError)
    assert r.partials == {} and r.extra_prefetch() == 0


def test_many_incomplete_messages_of_one_sender_hold_only_a_few() -> None:
    """The audit's 150 incomplete chunked messages: at most `max_partials_per_sender` are held (and the prefetch
    they need), the others are refused at once; another sender is unaffected."""
    r = Reassembly()
    refused = 0
    for i in range(150):
        try:
            r.add("client-1", {H_CHUNK_ID: f"m{i}", H_CHUNK_INDEX: 0, H_CHUNK_COUNT: 2}, b"x" * 1000, i, now=0.0)
        except ChunkRefused as exc:
            assert exc.reason == "chunk_flood"
            refused += 1
    limit = r.limits.max_partials_per_sender
    assert (len(r.partials), refused, r.extra_prefetch()) == (limit, 150 - limit, limit)
    for i in range(2):
        status, _ = r.add("client-2", {H_CHUNK_ID: "ok", H_CHUNK_INDEX: i, H_CHUNK_COUNT: 2}, b"y", 1000 + i, now=1.0)
    assert status == "complete"


def test_a_message_larger_than_the_limit_is_refused_whole() -> None:
    r = Reassembly(CHUNKS)
    r.add("s", {H_CHUNK_ID: "m", H_CHUNK_INDEX: 0, H_CHUNK_COUNT: 3}, b"x" * 3000, 1, now=0.0)
    with pytest.raises(ChunkRefused) as exc:
        r.add("s", {H_CHUNK_ID: "m", H_CHUNK_INDEX: 1, H_CHUNK_COUNT: 3}, b"x" * 3000, 2, now=0.0)
    assert exc.value.reason == "too_large" and exc.value.tags == [1, 2] and len(exc.value.body) == 6000
    with pytest.raises(ChunkRefused, match="refused message"):  # its last chunk follows it to the dead letters
        r.add("s", {H_CHUNK_ID: "m", H_CHUNK_INDEX: 2, H_CHUNK_COUNT: 3}, b"x", 3, now=0.0)


def test_requeued_chunks_reassemble_again_and_duplicates_are_acked() -> None:
    r = Reassembly()
    h = [{H_CHUNK_ID: "m", H_CHUNK_INDEX: i, H_CHUNK_COUNT: 2} for i in range(2)]
    r.add("s", h[0], b"a", 1, now=0.0)
    assert r.add("s", h[1], b"b", 2, now=0.0)[0] == "complete"
    assert r.add("s", h[0], b"a", 3, now=0.0)[0] == "duplicate"
    r.reopen("s", "m")
    r.add("s", h[0], b"a", 4, now=0.0)
    assert r.add("s", h[1], b"b", 5, now=0.0)[0] == "complete"
