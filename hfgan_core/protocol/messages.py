"""Typed, versioned messages exchanged by the roles, and their encode/decode.

Every message is a frozen dataclass with the envelope fields (`run`, `round`, `step`, `sender`, `msg_id`) and its
payload. Each payload field declares what it may hold (a plain type, a tensor, a map of tensors), so decoding is a
schema check: unknown kinds, unknown or missing fields, wrong types, dtypes, non-finite values and oversized
payloads are rejected with a `WireError` that says which field and why. Activations and gradients (the `compress`
fields) may travel as float16/bfloat16 and come back as float32.

What never appears here, by construction: labels, noise, images, real/fake targets, per-sample losses. The privacy
test checks every message of a round against that list.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from .codec import (
    DEFAULT_LIMITS,
    TORCH_DTYPES,
    Limits,
    WireError,
    pack,
    tensor_to_wire,
    unpack,
)
from .fields import Budget, Spec, decode_value
from .fields import spec_field as _f

WIRE_VERSION = 1


def new_msg_id() -> str:
    return uuid.uuid4().hex


REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound="Message")


def register(cls: type[Message]) -> type[Message]:
    if cls.KIND in REGISTRY:
        raise ValueError(f"duplicate message kind {cls.KIND}")
    REGISTRY[cls.KIND] = cls
    return cls


@dataclass(frozen=True, kw_only=True)
class Message:
    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = WIRE_VERSION
    # Per-step split traffic is useless once its step has passed: it travels as transient messages (much cheaper
    # for the broker); everything that must survive a broker restart is persistent.
    PERSISTENT: ClassVar[bool] = True

    run: str
    round: int
    sender: str
    step: int = -1
    msg_id: str = field(default_factory=new_msg_id)

    # ------------------------------------------------------------------------------------------------ encode
    def encode(self, wire_dtype: str | torch.dtype | None = None) -> bytes:
        """msgpack bytes; `wire_dtype` narrows the activation/gradient tensors (float16 or bfloat16)."""
        wdt = TORCH_DTYPES[wire_dtype] if isinstance(wire_dtype, str) else wire_dtype
        if wdt == torch.float32:
            wdt = None
        out: dict[str, Any] = {
            "v": self.VERSION,
            "kind": self.KIND,
            "run": self.run,
            "round": self.round,
            "step": self.step,
            "sender": self.sender,
            "msg_id": self.msg_id,
        }
        for f in _payload_fields(type(self)):
            value = getattr(self, f.name)
            if value is not None:
                spec: Spec = f.metadata["spec"]
                out[f.name] = _to_wire(value, spec, wdt if spec.compress else None)
        return pack(out)

    def plain_payload(self) -> dict[str, Any]:
        """The payload's fields other than tensors as plain, JSON-able data, as they travel (what the round ledger
        keeps of a message; `from_plain` reads it back with the wire's checks)."""
        out: dict[str, Any] = {}
        for f in _payload_fields(type(self)):
            spec: Spec = f.metadata["spec"]
            value = getattr(self, f.name)
            if value is not None and spec.kind not in ("tensor", "tensors"):
                out[f.name] = _to_wire(value, spec, None)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this message carries, by field path (used by the privacy checks and byte counters)."""
        out: dict[str, torch.Tensor] = {}
        for f in _payload_fields(type(self)):
            spec: Spec = f.metadata["spec"]
            value = getattr(self, f.name)
            if value is None:
                continue
            if spec.kind == "tensor":
                out[f.name] = value
            elif spec.kind == "tensors":
                out.update({f"{f.name}.{k}": v for k, v in value.items()})
        return out


def _payload_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "spec" in f.metadata]


def _to_wire(value: Any, spec: Spec, narrow: torch.dtype | None) -> Any:
    if spec.kind == "tensor":
        return tensor_to_wire(value, narrow)
    if spec.kind == "tensors":
        return {k: tensor_to_wire(v, narrow) for k, v in value.items()}
    if spec.kind == "cuts":
        return [list(map(int, c)) for c in value]
    if spec.kind in ("ints", "floats", "strs"):
        return list(value)
    if spec.kind in ("metrics", "strmap", "intmap", "floatmap"):
        return dict(value)
    return value


def _payload_kwargs(
    cls: type[Message], obj: Any, limits: Limits, kwargs: dict[str, Any], keep: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Checks and converts every payload field of `obj` into `kwargs` (fields named in `keep` are given)."""
    budget = Budget(limits)
    for f in _payload_fields(cls):
        if f.name in keep:
            continue
        spec: Spec = f.metadata["spec"]
        if f.name not in obj or obj[f.name] is None:
            if not spec.optional:
                raise WireError("malformed", f"{cls.KIND}: missing field {f.name!r}")
            continue
        kwargs[f.name] = decode_value(obj[f.name], spec, f"{cls.KIND}.{f.name}", limits, budget)
    return kwargs


def from_plain(cls: type[M], plain: Mapping[str, Any], **given: Any) -> M:
    """A message from `plain_payload` data and its envelope (`run`, `round`, `sender`, `msg_id`, ...) in `given`,
    which may also set payload fields; the plain values get the wire's checks (WireError when they fail)."""
    return cls(**_payload_kwargs(cls, plain, DEFAULT_LIMITS, dict(given), frozenset(given)))


_ENVELOPE = {"v": int, "kind": str, "run": str, "round": int, "step": int, "sender": str, "msg_id": str}


def decode(
    body: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    kinds: tuple[type[Message], ...] | None = None,
) -> Message:
    """Bytes -> message, or WireError. `kinds` restricts which message types the receiving queue accepts."""
    try:
        return _decode(body, limits, kinds)
    except WireError:
        raise
    except Exception as exc:  # noqa: BLE001 - a receiver must never crash on its input; the fuzz tests hunt these
        raise WireError("malformed", f"undecodable message ({type(exc).__name__}: {exc})"[:300]) from None


def _decode(body: bytes | bytearray | memoryview, limits: Limits, kinds: tuple[type[Message], ...] | None) -> Message:
    obj = unpack(body, limits)
    for key, typ in _ENVELOPE.items():
        if key not in obj:
            raise WireError("malformed", f"missing envelope field {key!r}")
        if not isinstance(obj[key], typ) or isinstance(obj[key], bool):
            raise WireError("malformed", f"envelope field {key!r} must be {typ.__name__}")
    kind = obj["kind"]
    cls = REGISTRY.get(kind)
    if cls is None:
        raise WireError("unknown_kind", f"unknown message kind {kind!r}")
    if kinds is not None and cls not in kinds:
        raise WireError("unexpected_kind", f"{kind!r} is not accepted here")
    if obj["v"] != cls.VERSION:
        raise WireError("bad_version", f"{kind} version {obj['v']} is not supported (this build speaks {cls.VERSION})")
    if len(obj["run"]) > 200 or len(obj["sender"]) > 200 or len(obj["msg_id"]) > 200:
        raise WireError("malformed", "envelope strings are limited to 200 characters")
    fields = _payload_fields(cls)
    known = set(_ENVELOPE) | {f.name for f in fields}
    extra = sorted(set(obj) - known)
    if extra:
        raise WireError("malformed", f"{kind}: unknown field(s) {', '.join(extra)}")
    envelope = {k: obj[k] for k in ("run", "round", "step", "sender", "msg_id")}
    return cls(**_payload_kwargs(cls, obj, limits, envelope))


def expect_shape(where: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Receiving roles check shapes against what they expect for this sender (its batch and cut bits)."""
    if tuple(t.shape) != tuple(shape):
        raise WireError("bad_shape", f"{where}: shape {list(t.shape)} where {list(shape)} was expected")


# ======================================================================================================== split


# The per-step split messages come in three payload shapes; each kind below only names itself. The bases are not
# registered: only a concrete kind travels.


@dataclass(frozen=True, kw_only=True)
class _SplitActivation(Message):
    PERSISTENT: ClassVar[bool] = False
    client: int = _f("int")
    act: torch.Tensor = _f("tensor", compress=True)


@dataclass(frozen=True, kw_only=True)
class _SplitGradient(Message):
    PERSISTENT: ClassVar[bool] = False
    client: int = _f("int")
    grad: torch.Tensor = _f("tensor", compress=True)


@dataclass(frozen=True, kw_only=True)
class _DPhasePair(Message):
    """The D traffic of one phase: "d" carries the detached fakes and the reals, "g" the fakes only."""

    PERSISTENT: ClassVar[bool] = False
    client: int = _f("int")
    phase: str = _f("str")
    fake: torch.Tensor = _f("tensor", compress=True)
    real: torch.Tensor | None = _f("tensor", compress=True, default=None)


@register
@dataclass(frozen=True, kw_only=True)
class GHeadOut(_SplitActivation):
    """Client -> server: output of the client's G head (B1, or B1+E1)."""

    KIND: ClassVar[str] = "g_head_out"


@register
@dataclass(frozen=True, kw_only=True)
class GMidOut(_SplitActivation):
    """Server -> client: input of the client's G tail."""

    KIND: ClassVar[str] = "g_mid_out"


@register
@dataclass(frozen=True, kw_only=True)
class DHeadOut(_DPhasePair):
    """Client -> server: D head outputs."""

    KIND: ClassVar[str] = "d_head_out"


@register
@dataclass(frozen=True, kw_only=True)
class DMidOut(_DPhasePair):
    """Server -> client: input of the client's D tail."""

    KIND: ClassVar[str] = "d_mid_out"


@register
@dataclass(frozen=True, kw_only=True)
class DTailGrad(_DPhasePair):
    """Client -> server: gradient of the client's loss w.r.t. its D tail inputs."""

    KIND: ClassVar[str] = "d_tail_grad"


@register
@dataclass(frozen=True, kw_only=True)
class DMidGrad(_DPhasePair):
    """Server -> client: gradient w.r.t. the client's D head outputs."""

    KIND: ClassVar[str] = "d_mid_grad"


@register
@dataclass(frozen=True, kw_only=True)
class GTailGrad(_SplitGradient):
    """Client -> server: gradient of the generator loss w.r.t. the client's G tail input."""

    KIND: ClassVar[str] = "g_tail_grad"


@register
@dataclass(frozen=True, kw_only=True)
class GMidGrad(_SplitGradient):
    """Server -> client: gradient w.r.t. the client's G head output."""

    KIND: ClassVar[str] = "g_mid_grad"


@register
@dataclass(frozen=True, kw_only=True)
class StepDropped(Message):
    """Server -> client: this step went on without you (late, or the window closed); continue with the next."""

    KIND: ClassVar[str] = "step_dropped"
    PERSISTENT: ClassVar[bool] = False
    client: int = _f("int")
    reason: str = _f("str")


@register
@dataclass(frozen=True, kw_only=True)
class StepsLost(Message):
    """Server -> client: the server restarted in this round and lost the steps it had in flight. A client past its
    step's first reply abandons the step and goes on with the next; one still waiting for that reply sends its
    activation again (client.py `_on_steps_lost`). Either way, at once instead of after its step timeout."""

    KIND: ClassVar[str] = "steps_lost"
    PERSISTENT: ClassVar[bool] = False
    client: int = _f("int")
    reason: str = _f("str")


# ==================================================================================================== lifecycle


@register
@dataclass(frozen=True, kw_only=True)
class Join(Message):
    """Client -> coordinator: I am client `client` with this device profile and this many samples."""

    KIND: ClassVar[str] = "join"
    client: int = _f("int")
    domain: int = _f("int")
    n_samples: int = _f("int")
    profile: dict[str, float] = _f("floatmap")


@register
@dataclass(frozen=True, kw_only=True)
class RoundStart(Message):
    """Coordinator -> clients and server: round `round` begins with these participants and cut bits."""

    KIND: ClassVar[str] = "round_start"
    participants: tuple[int, ...] = _f("ints")
    cuts: tuple[tuple[int, int, int, int], ...] = _f("cuts")  # per client index, all clients
    steps: int = _f("int")
    deadline: float = _f("float")  # wall-clock (epoch seconds) round deadline
    steps_from: int = _f("int", default=0)  # first step index (non-zero when a round is resumed)


@register
@dataclass(frozen=True, kw_only=True)
class RoundClose(Message):
    """Coordinator -> server and clients: the round's deadline passed; stop and report what you have."""

    KIND: ClassVar[str] = "round_close"
    reason: str = _f("str")


@register
@dataclass(frozen=True, kw_only=True)
class RunEnd(Message):
    KIND: ClassVar[str] = "run_end"
    reason: str = _f("str")


@register
@dataclass(frozen=True, kw_only=True)
class ClientUpdate(Message):
    """Client -> update log and aggregators: the layers this client holds, after the round's local training."""

    KIND: ClassVar[str] = "client_update"
    client: int = _f("int")
    cuts: tuple[tuple[int, int, int, int], ...] = _f("cuts")  # one entry: this client's bits
    n_samples: int = _f("int")
    state: dict[str, torch.Tensor] = _f("tensors", float_only=False)


@register
@dataclass(frozen=True, kw_only=True)
class ServerUpdate(Message):
    """Server -> update log and aggregators: the server's shared layers after the round."""

    KIND: ClassVar[str] = "server_update"
    state: dict[str, torch.Tensor] = _f("tensors", float_only=False)


@register
@dataclass(frozen=True, kw_only=True)
class RoundDone(Message):
    """Client -> coordinator: my round is over; scalar training metrics only (mean losses, step times)."""

    KIND: ClassVar[str] = "round_done"
    client: int = _f("int")
    n_samples: int = _f("int")
    steps_done: int = _f("int")
    update_digest: str = _f("str")
    metrics: dict[str, float] = _f("metrics")


@register
@dataclass(frozen=True, kw_only=True)
class ServerRoundDone(Message):
    """Server -> coordinator: the server's round is over (its update is logged)."""

    KIND: ClassVar[str] = "server_round_done"
    steps_done: int = _f("int")
    update_digest: str = _f("str")
    metrics: dict[str, float] = _f("metrics")
    late: dict[str, int] = _f("intmap", default={})  # client -> number of steps it missed or was late for


@register
@dataclass(frozen=True, kw_only=True)
class ActivationSummaries(Message):
    """Server -> clustering: per client, the batch mean of server block E2 of D on its real batch (128x7x7)."""

    KIND: ClassVar[str] = "activation_summaries"
    summaries: dict[str, torch.Tensor] = _f("tensors")


@register
@dataclass(frozen=True, kw_only=True)
class ClusterResult(Message):
    KIND: ClassVar[str] = "cluster_result"
    assignment: dict[str, int] = _f("intmap")
    kld_intra: dict[str, float] = _f("floatmap")
    kld_global: dict[str, float] = _f("floatmap")
    k: int = _f("int")


@register
@dataclass(frozen=True, kw_only=True)
class AggregateJob(Message):
    """Coordinator -> aggregators: average cluster `cluster` (-1: the global model for the server)."""

    KIND: ClassVar[str] = "aggregate_job"
    cluster: int = _f("int")
    members: tuple[int, ...] = _f("ints")
    weights: tuple[float, ...] = _f("floats")
    recipients: tuple[int, ...] = _f("ints")  # clients that load this cluster's layers (members and absentees)
    cuts: tuple[tuple[int, int, int, int], ...] = _f("cuts")  # per recipient: its cut bits for the next round
    update_ids: dict[str, str] = _f("strmap")  # client (or "server") -> msg_id of the update to use
    log_offset: int = _f("int", default=0)  # where this round's updates start in the update log


@register
@dataclass(frozen=True, kw_only=True)
class ModelAssignment(Message):
    """Aggregator -> one client: its cluster's average of exactly the layers this client holds."""

    KIND: ClassVar[str] = "model_assignment"
    client: int = _f("int")
    cluster: int = _f("int")
    state: dict[str, torch.Tensor] = _f("tensors", float_only=False)


@register
@dataclass(frozen=True, kw_only=True)
class ServerModel(Message):
    """Aggregator -> server: the global average of the server's layers."""

    KIND: ClassVar[str] = "server_model"
    state: dict[str, torch.Tensor] = _f("tensors", float_only=False)


@register
@dataclass(frozen=True, kw_only=True)
class AggregateDone(Message):
    """Aggregator -> coordinator: a cluster's (or the global) average, with its digest, for evaluation and
    checkpoints."""

    KIND: ClassVar[str] = "aggregate_done"
    cluster: int = _f("int")
    members: tuple[int, ...] = _f("ints")
    digest: str = _f("str")
    state: dict[str, torch.Tensor] = _f("tensors", float_only=False)
    # msg_ids of every update of the round the aggregator found in the log (the coordinator accounts for those
    # that no job used).
    seen_updates: tuple[str, ...] = _f("strs", default=())


@register
@dataclass(frozen=True, kw_only=True)
class RoundEvent(Message):
    """Coordinator -> topic exchange: round lifecycle events for observers (status, progress bars)."""

    KIND: ClassVar[str] = "round_event"
    event: str = _f("str")
    detail: dict[str, str] = _f("strmap", default={})


@register
@dataclass(frozen=True, kw_only=True)
class ClientHeartbeat(Message):
    """Client -> coordinator: process `owner` holds (or asks for) slot `client`; the first one is the request."""

    KIND: ClassVar[str] = "client_heartbeat"
    PERSISTENT: ClassVar[bool] = False
    client: int = _f("int")
    owner: str = _f("str")
    info: str = _f("str", default="")
    traffic: dict[str, float] = _f("floatmap", default={})  # bytes_sent, messages_sent so far


@register
@dataclass(frozen=True, kw_only=True)
class SlotGrant(Message):
    """Coordinator -> `events.slot.<owner>`: the slot is the owner's (granted), or not; then `free_slot` is one
    that is free (-1: none, wait as a spare)."""

    KIND: ClassVar[str] = "slot_grant"
    PERSISTENT: ClassVar[bool] = False
    client: int = _f("int")
    owner: str = _f("str")
    granted: bool = _f("bool")
    free_slot: int = _f("int", default=-1)
    reason: str = _f("str", default="")


ALL_KINDS = tuple(REGISTRY.values())
