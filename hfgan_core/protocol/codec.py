"""msgpack framing of messages and tensors, with strict limits on what a decoder accepts.

A tensor travels as the map `{"dtype": str, "shape": [int, ...], "data": bytes}` (little endian, C order). Decoding
checks the total size, the number of tensors, elements per tensor and overall, the dtype against an allow list, that
the byte length matches dtype and shape, and (where a field asks for it) that every value is finite. Nothing here
ever unpickles; msgpack carries only plain data.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import msgpack
import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little endian
    raise ImportError("hfgan's wire format assumes a little-endian host")


class WireError(ValueError):
    """A message that must be rejected; `reason` is a short machine-friendly tag, str(exc) says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in TORCH_DTYPES.items()}
# Dtypes with no numpy equivalent are moved as same-width integers.
_RAW_VIEW = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts. The defaults fit this model (a 12.8 MB activation, 9 MB of client layers) with room."""

    max_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 4096
    max_tensor_elements: int = 64 * 1024 * 1024
    max_total_elements: int = 128 * 1024 * 1024
    max_depth: int = 8
    max_dims: int = 8
    max_collection: int = 100_000
    allowed_dtypes: frozenset[str] = frozenset({"float32", "float16", "bfloat16", "int64"})


DEFAULT_LIMITS = Limits()

_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})


def tensor_to_wire(t: torch.Tensor, wire_dtype: torch.dtype | None = None) -> dict:
    """The wire map of a tensor, optionally cast to a narrower float type first."""
    t = t.detach()
    if wire_dtype is not None and t.is_floating_point() and t.dtype != wire_dtype:
        t = t.to(wire_dtype)
    t = t.contiguous().cpu()
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise WireError("bad_dtype", f"cannot send tensors of dtype {t.dtype}")
    raw = t.view(_RAW_VIEW[t.dtype]) if t.dtype in _RAW_VIEW else t
    # A byte view of the tensor's memory, not a copy: msgpack copies it once, straight into the message body (the
    # view keeps the tensor alive until then).
    return {"dtype": name, "shape": list(t.shape), "data": memoryview(raw.reshape(-1).numpy()).cast("B")}


def tensor_from_wire(obj: dict, limits: Limits, where: str) -> torch.Tensor:
    if not isinstance(obj, dict) or set(obj) != _TENSOR_KEYS:
        raise WireError("malformed", f"{where}: a tensor must be a map with exactly dtype, shape and data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in TORCH_DTYPES or dtype not in limits.allowed_dtypes:
        raise WireError("bad_dtype", f"{where}: dtype {dtype!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_dims
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise WireError("malformed", f"{where}: shape must be a list of at most {limits.max_dims} integers >= 0")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("malformed", f"{where}: data must be bytes")
    # Each dimension and the product of the non-zero ones are bounded, so an empty tensor cannot claim a shape
    # (e.g. [0, 2**64-1]) that torch refuses to build.
    cap = limits.max_tensor_elements
    n, extent = 1, 1
    for s in shape:
        if s > cap:
            raise WireError("too_large", f"{where}: dimension {s} exceeds the limit of {cap}")
        n *= s
        extent *= max(s, 1)
        if extent > cap:
            raise WireError("too_large", f"{where}: {extent} elements (shape {shape}) exceed the limit of {cap}")
    if len(data) != n * ITEMSIZE[dtype]:
        raise WireError("malformed", f"{where}: {len(data)} bytes do not hold {shape} {dtype}")
    tdt = TORCH_DTYPES[dtype]
    if n == 0:
        return torch.empty(shape, dtype=tdt)
    view_dt = _RAW_VIEW.get(tdt, tdt)
    with warnings.catch_warnings():
        # Zero-copy view of the received bytes; received tensors are only ever read, never written in place.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(data, dtype=view_dt)
    if view_dt is not tdt:
        t = t.view(tdt)
    return t.view(shape)


def is_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    # A sum is NaN or infinite whenever any element is, so a finite sum proves every element finite in one
    # reduction with no temporary; only a sum that overflowed (or a tensor that really holds inf/NaN) takes the
    # element-wise check.
    if t.numel() and bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Unpack a message body into plain data, bounded by the limits; raises WireError."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise WireError("malformed", "body must be bytes")
    if len(body) > limits.max_bytes:
        raise WireError("too_large", f"{len(body)} bytes exceed the message limit of {limits.max_bytes}")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_bytes,
            max_str_len=1024 * 1024,
            max_array_len=limits.max_collection,
            max_map_len=limits.max_collection,
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise WireError("malformed", f"not a msgpack message ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # truncated input raises OutOfData, a bare Exception subclass in some versions
        raise WireError("malformed", f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise WireError("malformed", "a message must be a map")
    return obj
