"""Payload field specs: what each message field may hold, and the schema check that decodes a received value
against its spec (types, dtypes, finiteness, the tensor budget of one message)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .codec import Limits, WireError, is_finite, tensor_from_wire


@dataclass(frozen=True)
class Spec:
    """How one payload field travels and what a decoder accepts for it."""

    kind: str  # int, float, str, bool, ints, floats, strs, cuts, metrics, strmap, intmap, floatmap, tensor, tensors
    optional: bool = False
    finite: bool = True  # tensors and floats: reject NaN / inf
    compress: bool = False  # tensors: may travel as float16/bfloat16 (activations and gradients)
    float_only: bool = True  # tensors: only floating dtypes


def spec_field(kind: str, *, default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A payload dataclass field carrying its Spec; optional where it has a default."""
    meta = {"spec": Spec(kind, optional=default is not dataclasses.MISSING, **spec)}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, list | dict):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


class Budget:
    """The tensors and elements one message has decoded so far, checked against the limits."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.tensors = 0
        self.elements = 0

    def charge(self, t: torch.Tensor, where: str) -> None:
        self.tensors += 1
        self.elements += t.numel()
        if self.tensors > self.limits.max_tensors:
            raise WireError("too_large", f"{where}: more than {self.limits.max_tensors} tensors")
        if self.elements > self.limits.max_total_elements:
            raise WireError("too_large", f"{where}: more than {self.limits.max_total_elements} elements in all")


def _decode_tensor(obj: Any, spec: Spec, where: str, limits: Limits, budget: Budget) -> torch.Tensor:
    t = tensor_from_wire(obj, limits, where)
    budget.charge(t, where)
    if spec.float_only and not t.is_floating_point():
        raise WireError("bad_dtype", f"{where}: expected a floating-point tensor, got {t.dtype}")
    if spec.finite and not is_finite(t):
        raise WireError("non_finite", f"{where}: contains NaN or infinite values")
    if spec.compress and t.dtype != torch.float32:
        t = t.float()
    return t


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise WireError("malformed", f"{where}: expected {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, int | float)) and not isinstance(x, bool)


def decode_value(value: Any, spec: Spec, where: str, limits: Limits, budget: Budget) -> Any:
    k = spec.kind
    if k == "tensor":
        return _decode_tensor(value, spec, where, limits, budget)
    if k == "tensors":
        _check(isinstance(value, dict) and all(isinstance(n, str) for n in value), where, "a map of named tensors")
        return {n: _decode_tensor(v, spec, f"{where}.{n}", limits, budget) for n, v in value.items()}
    if k == "int":
        _check(_is_int(value), where, "an integer")
        return value
    if k == "float":
        _check(_is_num(value), where, "a number")
        if spec.finite and not math.isfinite(value):
            raise WireError("non_finite", f"{where}: not finite")
        return float(value)
    if k == "str":
        _check(isinstance(value, str) and len(value) <= 4096, where, "a string of at most 4096 characters")
        return value
    if k == "bool":
        _check(isinstance(value, bool), where, "a boolean")
        return value
    if k == "ints":
        _check(isinstance(value, list) and all(_is_int(x) for x in value), where, "a list of integers")
        return tuple(value)
    if k == "floats":
        _check(isinstance(value, list) and all(_is_num(x) for x in value), where, "a list of numbers")
        if spec.finite and not all(math.isfinite(x) for x in value):
            raise WireError("non_finite", f"{where}: not finite")
        return tuple(float(x) for x in value)
    if k == "strs":
        _check(
            isinstance(value, list) and all(isinstance(x, str) and len(x) <= 200 for x in value),
            where,
            "a list of strings of at most 200 characters",
        )
        return tuple(value)
    if k == "cuts":
        ok = isinstance(value, list) and all(
            isinstance(c, list) and len(c) == 4 and all(b in (0, 1) and _is_int(b) for b in c) for c in value
        )
        _check(ok, where, "a list of four-bit lists")
        return tuple(tuple(c) for c in value)
    if k in ("metrics", "floatmap"):
        _check(
            isinstance(value, dict) and all(isinstance(n, str) and _is_num(v) for n, v in value.items()),
            where,
            "a map of names to numbers",
        )
        if spec.finite and not all(math.isfinite(v) for v in value.values()):
            raise WireError("non_finite", f"{where}: not finite")
        return {n: float(v) for n, v in value.items()}
    if k == "intmap":
        _check(
            isinstance(value, dict) and all(isinstance(n, str) and _is_int(v) for n, v in value.items()),
            where,
            "a map of names to integers",
        )
        return dict(value)
    if k == "strmap":
        _check(
            isinstance(value, dict) and all(isinstance(n, str) and isinstance(v, str) for n, v in value.items()),
            where,
            "a map of names to strings",
        )
        return dict(value)
    raise AssertionError(f"unknown spec kind {k}")  # pragma: no cover
