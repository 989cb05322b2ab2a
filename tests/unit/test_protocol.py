"""The wire codec: round trips of every message kind and dtype, and every way a message must be rejected.

Messages are built generically from each class's field specs, so a kind added to the registry is covered without
touching this file. Malformed messages are forged by unpacking a good encoding, changing one thing and packing it
again: each must fail with a `WireError` whose `reason` names the problem.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import msgpack
import pytest
import torch

from hfgan_core.protocol import (
    ALL_KINDS,
    REGISTRY,
    ClientUpdate,
    GHeadOut,
    Limits,
    Message,
    RoundDone,
    RoundStart,
    ServerUpdate,
    WireError,
    decode,
    expect_shape,
    from_plain,
)
from hfgan_core.protocol.codec import TORCH_DTYPES, pack, tensor_from_wire, tensor_to_wire, unpack
from hfgan_core.protocol.messages import Spec, _payload_fields

ENVELOPE = ("run", "round", "step", "sender", "msg_id")
WIRE_DTYPES = ("float32", "float16", "bfloat16")


def _value(spec: Spec, gen: torch.Generator) -> Any:
    """A valid, non-default value for a payload field of this spec."""
    k = spec.kind
    if k == "tensor":
        return torch.randn(3, 4, 2, generator=gen)
    if k == "tensors":
        out = {"G.0.weight": torch.randn(5, 3, generator=gen), "D.4.bias": torch.randn(1, generator=gen)}
        if not spec.float_only:  # state dicts carry BatchNorm's int64 counters
            out["G.0.num_batches_tracked"] = torch.tensor(17, dtype=torch.int64)
            out["D.1.num_batches_tracked"] = torch.tensor([1 << 40, -3], dtype=torch.int64)
        return out
    return {
        "int": 7,
        "float": 1234567.25,
        "str": "phase-or-reason",
        "bool": True,
        "ints": (0, 3, 2),
        "floats": (0.25, 1.5, 3.0),
        "strs": ("msg-a", "msg-b"),
        "cuts": ((0, 1, 0, 1), (1, 1, 1, 1)),
        "metrics": {"g_loss": 1.25, "step_s": 0.5},
        "floatmap": {"0": 0.125, "1": 2.0},
        "intmap": {"0": 1, "3": 0},
        "strmap": {"0": "abc", "server": "def"},
    }[k]


def sample(cls: type[Message], seed: int = 0, **overrides: Any) -> Message:
    gen = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {"run": "run-1", "round": 3, "step": 5, "sender": "client.1"}
    for f in _payload_fields(cls):
        kwargs[f.name] = _value(f.metadata["spec"], gen)
    kwargs.update(overrides)
    return cls(**kwargs)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def assert_equal_messages(expected: Message, got: Message) -> None:
    assert type(got) is type(expected)
    for name in ENVELOPE:
        assert getattr(got, name) == getattr(expected, name), name
    for f in _payload_fields(type(expected)):
        assert _same(getattr(expected, f.name), getattr(got, f.name)), f.name


def raw(msg: Message, **encode_kw: Any) -> dict:
    """The plain msgpack map of an encoded message, to be tampered with and re-packed."""
    return msgpack.unpackb(msg.encode(**encode_kw), raw=False)


def rejected(body: bytes | Any, reason: str, limits: Limits | None = None, **kw: Any) -> WireError:
    with pytest.raises(WireError) as exc:
        decode(body, limits, **kw) if limits is not None else decode(body, **kw)
    err = exc.value
    assert err.reason == reason, str(err)
    assert str(err).startswith(f"{reason}: ") and err.detail and "\n" not in str(err)
    return err


# ------------------------------------------------------------------------------------------------- round trips


def test_samples_cover_every_registered_kind():
    assert len(REGISTRY) >= 20 and set(ALL_KINDS) == set(REGISTRY.values())
    for kind, cls in REGISTRY.items():
        assert cls.KIND == kind
        msg = sample(cls)
        assert msg.KIND == kind


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_round_trip_every_kind_float32(kind):
    msg = sample(REGISTRY[kind], seed=len(kind))
    body = msg.encode()
    assert isinstance(body, bytes)
    got = decode(body)
    assert_equal_messages(msg, got)
    # The decoded message encodes to the same bytes: nothing is lost or reordered.
    assert got.encode() == body


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_plain_payload_is_json_and_reads_back_through_the_wire_checks(kind):
    """What the round ledger keeps of a message (its payload without tensors, as JSON) reads back to the same fields."""
    cls = REGISTRY[kind]
    msg = sample(cls, seed=len(kind))
    plain = json.loads(json.dumps(msg.plain_payload()))
    tensor_fields = {f.name for f in _payload_fields(cls) if f.metadata["spec"].kind in ("tensor", "tensors")}
    assert not tensor_fields & set(plain)
    given = {k: getattr(msg, k) for k in ("run", "round", "sender", "step", "msg_id", *tensor_fields)}
    assert_equal_messages(msg, from_plain(cls, plain, **given))


def test_from_plain_rejects_what_the_wire_rejects():
    doc = json.loads(json.dumps(sample(RoundStart).plain_payload()))
    env = {"run": "r", "round": 1, "sender": "coordinator"}
    with pytest.raises(WireError, match="cuts"):
        from_plain(RoundStart, {**doc, "cuts": [[0, 1, 2, 0]]}, **env)
    with pytest.raises(WireError, match="missing field 'steps'"):
        from_plain(RoundStart, {k: v for k, v in doc.items() if k != "steps"}, **env)
    # An optional field left out takes its default (a ledger entry written before the field existed).
    assert from_plain(RoundStart, {k: v for k, v in doc.items() if k != "steps_from"}, **env).steps_from == 0


@pytest.mark.parametrize("kind", sorted(REGISTRY))
@pytest.mark.parametrize("wire", WIRE_DTYPES[1:])
def test_round_trip_every_kind_narrow_wire(kind, wire):
    """Activations and gradients travel as float16/bfloat16 and come back as float32; state dicts, summaries and
    int64 counters travel exactly."""
    cls = REGISTRY[kind]
    msg = sample(cls, seed=len(kind))
    body = msg.encode(wire_dtype=wire)
    on_wire = msgpack.unpackb(body, raw=False)
    got = decode(body)
    assert type(got) is cls
    for name in ENVELOPE:
        assert getattr(got, name) == getattr(msg, name)
    for f in _payload_fields(cls):
        spec: Spec = f.metadata["spec"]
        sent, back = getattr(msg, f.name), getattr(got, f.name)
        if spec.kind == "tensor":
            if spec.compress:
                assert on_wire[f.name]["dtype"] == wire
                assert back.dtype == torch.float32
                assert torch.equal(back, sent.to(TORCH_DTYPES[wire]).float())
                assert not torch.equal(back, sent)  # it really was narrowed
            else:
                assert _same(sent, back)
        elif spec.kind == "tensors":
            for name, t in sent.items():
                wire_dtype = on_wire[f.name][name]["dtype"]
                if t.dtype == torch.int64:
                    assert wire_dtype == "int64" and _same(t, back[name])
                elif spec.compress:
                    assert wire_dtype == wire and torch.equal(back[name], t.to(TORCH_DTYPES[wire]).float())
                else:
                    assert wire_dtype == "float32" and _same(t, back[name])
        else:
            assert _same(sent, back), f.name


def test_float32_wire_dtype_is_the_identity():
    msg = sample(GHeadOut)
    assert msg.encode(wire_dtype="float32") == msg.encode() == msg.encode(wire_dtype=torch.float32)
    assert msg.encode(wire_dtype=torch.bfloat16) == msg.encode(wire_dtype="bfloat16")


def test_narrow_wire_halves_activation_bytes():
    msg = sample(GHeadOut, act=torch.randn(64, 256, 7, 7))
    full, half = len(msg.encode()), len(msg.encode(wire_dtype="float16"))
    assert half < 0.51 * full


def test_optional_fields_round_trip_as_absent():
    from hfgan_core.protocol import DHeadOut

    msg = sample(DHeadOut, real=None, phase="g")
    body = msg.encode()
    assert "real" not in msgpack.unpackb(body, raw=False)
    got = decode(body)
    assert got.real is None and torch.equal(got.fake, msg.fake)
    start = decode(sample(RoundStart).encode())
    assert start.steps_from == 7  # a non-default optional value survives; absent falls back to the default
    assert decode(pack({k: v for k, v in raw(sample(RoundStart)).items() if k != "steps_from"})).steps_from == 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64"])
def test_tensor_framing_every_allowed_dtype(dtype):
    tdt = TORCH_DTYPES[dtype]
    src = (torch.randn(4, 3) * 100).to(tdt) if tdt.is_floating_point else torch.tensor([[-(1 << 62), 0, 5]] * 2)
    wire = tensor_to_wire(src)
    assert wire["dtype"] == dtype and wire["shape"] == list(src.shape)
    assert len(wire["data"]) == src.numel() * src.element_size()
    back = tensor_from_wire(wire, Limits(), "t")
    assert back.dtype == tdt and torch.equal(back, src)
    # Little endian, C order: the bytes are exactly the tensor's memory on this (little-endian) host.
    view = src.view(torch.int16) if tdt == torch.bfloat16 else src
    assert wire["data"] == view.contiguous().numpy().tobytes()


def test_tensor_framing_non_contiguous_and_empty():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not t.is_contiguous()
    assert torch.equal(tensor_from_wire(tensor_to_wire(t), Limits(), "t"), t)
    empty = tensor_from_wire(tensor_to_wire(torch.empty(0, 5)), Limits(), "t")
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("dtype", ["float64", "int32", "uint8", "bool"])
def test_dtypes_outside_the_allow_list(dtype):
    t = torch.ones(2, 2, dtype=TORCH_DTYPES[dtype])
    wire = tensor_to_wire(t)
    with pytest.raises(WireError) as exc:
        tensor_from_wire(wire, Limits(), "state.x")
    assert exc.value.reason == "bad_dtype" and "state.x" in str(exc.value)
    # A receiver may widen its allow list explicitly.
    assert torch.equal(tensor_from_wire(wire, Limits(allowed_dtypes=frozenset({dtype})), "x"), t)


def test_unsendable_dtype_fails_on_the_sender():
    with pytest.raises(WireError) as exc:
        tensor_to_wire(torch.ones(2, dtype=torch.complex64))
    assert exc.value.reason == "bad_dtype"


# ---------------------------------------------------------------------------------------------------- rejections


def test_truncated_messages():
    body = sample(ClientUpdate).encode()
    for cut in (1, 10, len(body) // 2, len(body) - 1):
        rejected(body[:cut], "malformed")
    rejected(b"", "malformed")
    rejected(body + b"\x00", "malformed")  # trailing bytes after the map


def test_oversized_message():
    body = sample(ClientUpdate).encode()
    assert decode(body, Limits(max_bytes=len(body)))
    err = rejected(body, "too_large", Limits(max_bytes=len(body) - 1))
    assert str(len(body)) in str(err)


def test_non_bytes_body_and_non_map_top_level():
    rejected("a string", "malformed")
    for top in ([1, 2, 3], "kind", 42, None, b"bytes"):
        err = rejected(pack(top), "malformed")
        assert "map" in str(err)


def test_unknown_and_unexpected_kind():
    m = raw(sample(RoundDone))
    m["kind"] = "launch_missiles"
    err = rejected(pack(m), "unknown_kind")
    assert "launch_missiles" in str(err)
    body = sample(RoundDone).encode()
    rejected(body, "unexpected_kind", kinds=(GHeadOut, RoundStart))
    assert isinstance(decode(body, kinds=(RoundDone,)), RoundDone)


def test_wrong_version():
    m = raw(sample(RoundStart))
    m["v"] = 2
    err = rejected(pack(m), "bad_version")
    assert "2" in err.detail and "round_start" in err.detail


@pytest.mark.parametrize("field", ["v", "kind", "run", "round", "step", "sender", "msg_id"])
def test_missing_envelope_field(field):
    m = raw(sample(GHeadOut))
    del m[field]
    assert field in str(rejected(pack(m), "malformed"))


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_missing_payload_field(kind):
    cls = REGISTRY[kind]
    required = [f.name for f in _payload_fields(cls) if not f.metadata["spec"].optional]
    assert required, kind
    m = raw(sample(cls))
    del m[required[0]]
    err = rejected(pack(m), "malformed")
    assert required[0] in str(err) and "missing" in str(err)


def test_extra_field():
    m = raw(sample(GHeadOut))
    m["labels"] = [1, 2, 3]
    err = rejected(pack(m), "malformed")
    assert "unknown field" in str(err) and "labels" in str(err)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("round", "3"),
        ("round", True),  # booleans are not integers on this wire
        ("step", 1.5),
        ("sender", 7),
        ("run", None),
        ("client", "0"),
        ("client", 1.0),
        ("act", [1.0, 2.0]),
        ("act", b"\x00" * 16),
    ],
)
def test_wrong_field_type(field, value):
    m = raw(sample(GHeadOut))
    m[field] = value
    assert field in str(rejected(pack(m), "malformed"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("participants", [0, "1"]),
        ("participants", [0, True]),
        ("cuts", [[0, 1, 0]]),
        ("cuts", [[0, 1, 2, 0]]),
        ("cuts", [[0, 1, True, 0]]),
        ("steps", 8.0),
        ("deadline", "soon"),
        ("deadline", True),
    ],
)
def test_wrong_field_type_in_lifecycle_messages(field, value):
    m = raw(sample(RoundStart))
    m[field] = value
    assert field in str(rejected(pack(m), "malformed"))


def test_wrong_map_types():
    m = raw(sample(RoundDone))
    m["metrics"] = {"g_loss": "low"}
    rejected(pack(m), "malformed")
    m["metrics"] = [1.0]
    rejected(pack(m), "malformed")


def test_envelope_strings_are_bounded():
    m = raw(sample(GHeadOut))
    m["sender"] = "x" * 201
    rejected(pack(m), "malformed")


def test_ext_types_are_never_accepted():
    """Nothing but plain data: an ext type (e.g. a smuggled pickle) is malformed."""
    m = raw(sample(RoundDone))
    m["update_digest"] = msgpack.ExtType(42, b"\x80\x04K\x01.")
    rejected(msgpack.packb(m, use_bin_type=True), "malformed")


def test_wrong_dtype_in_messages():
    m = raw(sample(GHeadOut))
    m["act"]["dtype"] = "float64"
    m["act"]["data"] = m["act"]["data"] * 2
    rejected(pack(m), "bad_dtype")
    m = raw(sample(GHeadOut))
    m["act"]["dtype"] = "complex64"
    rejected(pack(m), "bad_dtype")
    m = raw(sample(GHeadOut))
    m["act"]["dtype"] = 3
    rejected(pack(m), "bad_dtype")
    # Activations must be floating point even though int64 is on the allow list (state dicts need it).
    int_act = sample(GHeadOut, act=torch.arange(6).reshape(2, 3))
    err = rejected(int_act.encode(), "bad_dtype")
    assert "g_head_out.act" in str(err)
    ok = decode(sample(ServerUpdate).encode())
    assert ok.state["G.0.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors(bad):
    act = torch.randn(2, 3)
    act[1, 2] = bad
    err = rejected(sample(GHeadOut, act=act).encode(), "non_finite")
    assert "g_head_out.act" in str(err)
    state = {"G.0.weight": torch.tensor([0.0, bad])}
    err = rejected(sample(ClientUpdate, state=state).encode(), "non_finite")
    assert "client_update.state.G.0.weight" in str(err)


@pytest.mark.parametrize("wire", WIRE_DTYPES[1:])
def test_non_finite_on_a_narrow_wire(wire):
    act = torch.randn(2, 3)
    act[0, 0] = math.nan
    rejected(sample(GHeadOut, act=act).encode(wire_dtype=wire), "non_finite")


def test_float16_overflow_is_rejected_not_passed_on_as_inf():
    """A gradient too large for float16 becomes inf on the wire; the receiver must reject it, not train on it."""
    big = sample(GHeadOut, act=torch.tensor([[1e6, 1.0]]))
    assert torch.equal(decode(big.encode()).act, big.act)
    rejected(big.encode(wire_dtype="float16"), "non_finite")
    # bfloat16 has float32's range: the same value travels (rounded).
    assert math.isclose(decode(big.encode(wire_dtype="bfloat16")).act[0, 0].item(), 1e6, rel_tol=1e-2)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scalars(bad):
    rejected(sample(RoundStart, deadline=bad).encode(), "non_finite")
    rejected(sample(RoundDone, metrics={"g_loss": bad}).encode(), "non_finite")
    from hfgan_core.protocol import AggregateJob

    rejected(sample(AggregateJob, weights=(0.5, bad)).encode(), "non_finite")


def test_tensor_map_with_bad_keys():
    # A tensor is a map of exactly dtype, shape and data.
    m = raw(sample(GHeadOut))
    m["act"]["order"] = "F"
    assert "g_head_out.act" in str(rejected(pack(m), "malformed"))
    m = raw(sample(GHeadOut))
    del m["act"]["data"]
    assert "g_head_out.act" in str(rejected(pack(m), "malformed"))
    # A map of tensors is keyed by names (strings).
    m = raw(sample(ClientUpdate))
    m["state"] = {b"G.0.weight": m["state"]["G.0.weight"]}
    rejected(pack(m), "malformed")
    m = raw(sample(ClientUpdate))
    m["state"] = [m["state"]["G.0.weight"]]
    rejected(pack(m), "malformed")
    # Integer map keys are not even valid msgpack for this decoder (strict map keys).
    m = raw(sample(ClientUpdate))
    m["state"] = {1: m["state"]["G.0.weight"]}
    rejected(pack(m), "malformed")


@pytest.mark.parametrize("shape", [[3, 4, 3], [3, 4], [], [-1, 24], [3.0, 4, 2], "3x4x2", [1] * 9])
def test_byte_length_or_shape_mismatch(shape):
    m = raw(sample(GHeadOut))  # 3x4x2 float32 = 96 bytes
    m["act"]["shape"] = shape
    rejected(pack(m), "malformed")


def test_data_longer_than_the_shape():
    m = raw(sample(GHeadOut))
    m["act"]["data"] = m["act"]["data"] + b"\x00\x00\x00\x00"
    assert "bytes" in str(rejected(pack(m), "malformed"))


def test_too_many_elements_in_a_tensor():
    body = sample(GHeadOut).encode()  # 24 elements
    assert decode(body, Limits(max_tensor_elements=24))
    assert "24" in str(rejected(body, "too_large", Limits(max_tensor_elements=23)))


def test_forged_huge_shape_is_rejected_before_allocation():
    m = raw(sample(GHeadOut))
    m["act"]["shape"] = [1 << 20, 1 << 20, 1 << 10]  # 2^50 elements claimed, 96 bytes sent
    rejected(pack(m), "too_large")


def test_too_many_elements_in_all():
    msg = sample(ClientUpdate)  # 15 + 1 + 1 + 2 elements
    assert decode(msg.encode(), Limits(max_total_elements=19))
    rejected(msg.encode(), "too_large", Limits(max_total_elements=18))


def test_too_many_tensors():
    msg = sample(ClientUpdate)  # four tensors
    assert decode(msg.encode(), Limits(max_tensors=4))
    err = rejected(msg.encode(), "too_large", Limits(max_tensors=3))
    assert "tensors" in str(err)
    many = sample(ServerUpdate, state={f"G.2.w{i}": torch.zeros(1) for i in range(20)})
    rejected(many.encode(), "too_large", Limits(max_tensors=19))


def test_collections_are_bounded():
    m = raw(sample(RoundStart))
    m["participants"] = list(range(50))
    assert decode(pack(m), Limits(max_collection=50))
    rejected(pack(m), "malformed", Limits(max_collection=49))


def test_unpack_rejects_before_parsing_when_too_large():
    with pytest.raises(WireError) as exc:
        unpack(b"\x80" * 11, Limits(max_bytes=10))
    assert exc.value.reason == "too_large"


# ----------------------------------------------------------------------------------------------------- shapes


def test_expect_shape_helper():
    t = torch.zeros(4, 256, 7, 7)
    expect_shape("g_head_out.act", t, (4, 256, 7, 7))
    expect_shape("x", torch.zeros(()), ())
    with pytest.raises(WireError) as exc:
        expect_shape("g_head_out.act", t, (4, 128, 14, 14))
    err = exc.value
    assert err.reason == "bad_shape"
    assert "g_head_out.act" in err.detail and "[4, 256, 7, 7]" in err.detail and "[4, 128, 14, 14]" in err.detail
    with pytest.raises(WireError):
        expect_shape("x", t.reshape(4, -1), (4, 256, 7, 7))  # same elements, other shape


def test_messages_are_frozen_and_ids_unique():
    a, b = sample(GHeadOut), sample(GHeadOut)
    assert a.msg_id != b.msg_id and len(a.msg_id) == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.round = 4  # type: ignore[misc]
