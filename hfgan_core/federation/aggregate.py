"""Weighted averaging of split models: full per-member states, cluster and global averages, bit-exact digests.

State dicts here use the canonical names of `hfgan_core.model.canonical_state`: "G.<block>.<key>" and
"D.<block>.<key>". A client holds the blocks `client_blocks(head bit, tail bit)` of each network (its cut bits);
the server holds one shared copy of `server_blocks()` (every optional and every server block). docs/ARCHITECTURE.md
section 3:

- the *full state of a member* is its own copy of the blocks it holds plus the server's copy of the rest;
- a cluster's model is the weighted average of its members' full states (intra-cluster weights); each member, and
  each client assigned to the cluster that did not arrive this round, loads its client-held layers from it;
- the global model is the weighted average of every arrived member's full state (global weights); the server loads
  its layers from it. No client ever receives another cluster's model.

Functions take the architecture either as an `Architecture` or as a `StateLayout` (the architecture plus the exact
keys, shapes and dtypes of every block, from `StateLayout.from_config`). With a layout every state is checked key
by key; with a bare architecture the check is per block (every held block present, nothing from other blocks) and,
for the optional blocks both sides hold, key by key against the server's copy.

Averaging decisions:
- floating tensors (parameters, BatchNorm running mean/var) accumulate in float64 as sum_i w_i * x_i, member by
  member in the order given, with separate multiply and add (no fused ops whose rounding could depend on the CPU),
  and are returned in their own dtype (float32 for this model);
- integer tensors (BatchNorm num_batches_tracked, int64) are averaged the same way and rounded to the nearest
  integer, ties to even. The reference instead truncates (it loads a float average into the int64 buffer). The
  counter only matters for BatchNorm with momentum=None, which this model does not use;
- weights must be non-negative and sum to 1 (within 1e-6); they are used exactly as given, so a single member with
  weight 1 reproduces its state bit for bit;
- results are fresh tensors: they never alias an input.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model.architecture import Architecture, CutBits, architecture, block_keys
from .weights import Weights

State = dict[str, torch.Tensor]
BlockId = tuple[str, int]


@dataclass(frozen=True)
class StateLayout:
    """An architecture with the exact state schema of each block: net -> block -> {canonical key: (shape, dtype)}."""

    arch: Architecture
    keys: dict[str, dict[int, dict[str, tuple[tuple[int, ...], torch.dtype]]]]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> StateLayout:
        return cls(architecture(cfg), block_keys(cfg))

    def block_schema(self, block: BlockId) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self.keys[block[0]][block[1]]


ArchLike = Architecture | StateLayout


def _split(arch: ArchLike) -> tuple[Architecture, StateLayout | None]:
    if isinstance(arch, StateLayout):
        return arch.arch, arch
    if isinstance(arch, Architecture):
        return arch, None
    raise TypeError(f"expected an Architecture or a StateLayout, got {type(arch).__name__}")


def _cuts(cuts: CutBits | Iterable[int] | str) -> CutBits:
    return cuts if isinstance(cuts, CutBits) else CutBits.parse(cuts)


def held_blocks(arch: ArchLike, cuts: CutBits | Iterable[int] | str) -> list[BlockId]:
    """Blocks a client with these cut bits holds, per network in forward order."""
    a, _ = _split(arch)
    bits = _cuts(cuts)
    return [(spec.name, i) for spec in a.nets for i in spec.client_blocks(*bits.for_net(spec.name))]


def server_blocks(arch: ArchLike) -> list[BlockId]:
    """Blocks the server holds a shared copy of."""
    a, _ = _split(arch)
    return [(spec.name, i) for spec in a.nets for i in spec.server_blocks()]


def _block_of(a: Architecture, key: str) -> BlockId | None:
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[0] not in {spec.name for spec in a.nets} or not parts[1].isdigit():
        return None
    net, block = parts[0], int(parts[1])
    if block >= a.net(net).n_blocks:
        return None
    return net, block


def _group(a: Architecture, state: Mapping[str, torch.Tensor]) -> tuple[dict[BlockId, list[str]], list[str]]:
    """Keys of a state grouped by block (in the state's order), and the keys that name no block."""
    groups: dict[BlockId, list[str]] = {}
    stray: list[str] = []
    for key in state:
        block = _block_of(a, key)
        if block is None:
            stray.append(key)
        else:
            groups.setdefault(block, []).append(key)
    return groups, stray


def _short(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_holds(
    a: Architecture,
    layout: StateLayout | None,
    state: Mapping[str, torch.Tensor],
    blocks: Sequence[BlockId],
    what: str,
) -> dict[BlockId, list[str]]:
    """Check that `state` holds exactly `blocks` (key by key with a layout); return its keys grouped by block."""
    groups, stray = _group(a, state)
    wanted = set(blocks)
    extra = stray + [k for b, ks in groups.items() if b not in wanted for k in ks]
    missing: list[str] = []
    wrong: list[str] = []
    for b in blocks:
        present = groups.get(b, [])
        if layout is None:
            if not present:
                missing.append(f"{b[0]}.{b[1]}.*")
            continue
        schema = layout.block_schema(b)
        missing += [k for k in schema if k not in state]
        extra += [k for k in present if k not in schema]
        for k in present:
            if k in schema:
                shape, dtype = schema[k]
                t = state[k]
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    wrong.append(f"{k} is {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if extra:
            parts.append(f"unexpected {_short(extra)}")
        raise ValueError(f"{what}: {'; '.join(parts)}")
    if wrong:
        raise ValueError(f"{what}: {'; '.join(wrong[:4])}")
    return groups


def member_full_state(
    arch: ArchLike,
    cuts: CutBits | Iterable[int] | str,
    client_state: Mapping[str, torch.Tensor],
    server_state: Mapping[str, torch.Tensor],
) -> State:
    """The full G and D state as seen by one member: its own copy of the blocks its cut bits give it, the server's
    copy of every other block. Keys in network order (G then D), block order, then the source's key order. The
    tensors are the inputs' own (no copies). Raises ValueError naming missing or unexpected keys when the client
    state is not exactly its held blocks or the server state not exactly the server blocks."""
    a, layout = _split(arch)
    held = held_blocks(a, cuts)
    mine = _check_holds(a, layout, client_state, held, f"client state for cut bits {_cuts(cuts)}")
    theirs = _check_holds(a, layout, server_state, server_blocks(a), "server state")
    if layout is None:
        # Blocks both sides hold (the optional ones) must agree key for key, shape and dtype.
        for b in held:
            if b in theirs and set(mine[b]) != set(theirs[b]):
                diff = sorted(set(mine[b]) ^ set(theirs[b]))
                raise ValueError(
                    f"client state for cut bits {_cuts(cuts)}: block {b[0]}.{b[1]} keys differ from the "
                    f"server's copy: {_short(diff)}"
                )
    for b in held:
        for k in theirs.get(b, []):
            c, s = client_state[k], server_state[k]
            if c.shape != s.shape or c.dtype != s.dtype:
                raise ValueError(
                    f"client state: {k} is {tuple(c.shape)} {c.dtype} but the server's copy is "
                    f"{tuple(s.shape)} {s.dtype}"
                )
    held_set = set(held)
    out: State = {}
    for spec in a.nets:
        for i in range(spec.n_blocks):
            b = (spec.name, i)
            source, keys = (client_state, mine[b]) if b in held_set else (server_state, theirs[b])
            for k in keys:
                out[k] = source[k]
    return out


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """sum_i weights[i] * states[i] for every tensor (see the module docstring for precision and integer buffers).

    All states must have the same keys, shapes and dtypes; the result has the keys in the first state's order."""
    if len(states) == 0:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"weights must be finite and non-negative, got {ws}")
    if abs(math.fsum(ws) - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, got {math.fsum(ws)!r}")
    first = states[0]
    names = set(first)
    for j, s in enumerate(states[1:], start=1):
        if set(s) != names:
            missing, extra = sorted(names - set(s)), sorted(set(s) - names)
            raise ValueError(
                f"state {j} differs from state 0: missing {_short(missing) or 'nothing'}; "
                f"unexpected {_short(extra) or 'nothing'}"
            )
    out: State = {}
    for key, ref in first.items():
        if ref.dtype == torch.bool or ref.is_complex():
            raise ValueError(f"{key}: cannot average a {ref.dtype} tensor")
        for j, s in enumerate(states):
            t = s[key]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"{key}: state {j} has {tuple(t.shape)} {t.dtype}, state 0 has {tuple(ref.shape)} {ref.dtype}"
                )
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for s, w in zip(states, ws, strict=True):
            # Separate multiply and add: each is correctly rounded on every CPU, so replay is bit-exact anywhere.
            acc += s[key].detach().to(device="cpu", dtype=torch.float64) * w
        if ref.is_floating_point():
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = torch.round(acc).to(ref.dtype)
    return out


def _subset(
    a: Architecture, layout: StateLayout | None, state: Mapping[str, torch.Tensor], blocks: Sequence[BlockId], what: str
) -> State:
    groups, _ = _group(a, state)
    missing: list[str] = []
    for b in blocks:
        if layout is not None:
            missing += [k for k in layout.block_schema(b) if k not in state]
        elif not groups.get(b):
            missing.append(f"{b[0]}.{b[1]}.*")
    if missing:
        raise ValueError(f"{what}: the model lacks {_short(missing)}")
    if layout is not None:
        return {k: state[k] for b in blocks for k in layout.block_schema(b)}
    return {k: state[k] for b in blocks for k in groups[b]}


def client_layers(arch: ArchLike, cuts: CutBits | Iterable[int] | str, full_state: Mapping[str, torch.Tensor]) -> State:
    """The part of a full state that a client with these cut bits holds (the inputs' tensors, not copies)."""
    a, layout = _split(arch)
    return _subset(a, layout, full_state, held_blocks(a, cuts), f"client layers for cut bits {_cuts(cuts)}")


def server_layers(arch: ArchLike, full_state: Mapping[str, torch.Tensor]) -> State:
    """The part of a full state that the server holds (the inputs' tensors, not copies)."""
    a, layout = _split(arch)
    return _subset(a, layout, full_state, server_blocks(a), "server layers")


def _le_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)  # numpy has no bfloat16; the bit pattern is what we hash
    arr = flat.numpy()
    if sys.byteorder != "little" and arr.dtype.itemsize > 1:
        arr = arr.byteswap()
    return arr.tobytes()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the keys in sorted order, each with its dtype, shape and raw little-endian C-order bytes.

    Bit-exact: equal iff every tensor is bit-identical (so -0.0 and 0.0 differ). Every field is length-prefixed,
    so no two different states share a byte stream."""
    h = hashlib.sha256(b"hfgan-state-v1\0")
    for key in sorted(state):
        t = state[key]
        data = _le_bytes(t)
        for field in (key.encode(), str(t.dtype).removeprefix("torch.").encode()):
            h.update(struct.pack("<Q", len(field)))
            h.update(field)
        h.update(struct.pack("<Q", t.dim()))
        h.update(struct.pack(f"<{t.dim()}q", *t.shape))
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def average_members(
    arch: ArchLike,
    member_weights: Mapping[int, float],
    cuts: Mapping[int, CutBits | Iterable[int] | str],
    client_states: Mapping[int, Mapping[str, torch.Tensor]],
    server_state: Mapping[str, torch.Tensor],
) -> State:
    """Weighted average of the full states of the given members (client id -> weight), in increasing client id.
    This is one cluster's model (or, with the global weights, the global model); entries of `cuts` and
    `client_states` for other clients are ignored, so one aggregator job can be handed the whole round."""
    if not member_weights:
        raise ValueError("average_members needs at least one member")
    ids = sorted(member_weights)
    missing = [c for c in ids if c not in client_states or c not in cuts]
    if missing:
        raise ValueError(f"no client state or cut bits for members {missing}")
    fulls = [member_full_state(arch, cuts[c], client_states[c], server_state) for c in ids]
    return weighted_average(fulls, [member_weights[c] for c in ids])


def aggregate_round(
    arch: ArchLike,
    weights: Weights,
    cuts: Mapping[int, CutBits | Iterable[int] | str],
    client_states: Mapping[int, Mapping[str, torch.Tensor]],
    server_state: Mapping[str, torch.Tensor],
) -> tuple[dict[int, State], State]:
    """All of a round's models: {cluster id: cluster model} for every cluster in `weights` (clusters with no arrived
    member have none: their clients keep their model) and the global model. Afterwards the server loads
    `server_layers(global_model)` and every client of cluster c loads `client_layers(cluster_models[c], its cuts)`."""
    ids = sorted(weights.global_)
    missing = [c for c in ids if c not in client_states or c not in cuts]
    if missing:
        raise ValueError(f"no client state or cut bits for arrived clients {missing}")
    in_clusters = sorted(weights.assignment)
    if in_clusters != ids:
        raise ValueError(f"cluster weights cover clients {in_clusters} but global weights cover {ids}")
    fulls = {c: member_full_state(arch, cuts[c], client_states[c], server_state) for c in ids}
    cluster_models = {
        cluster: weighted_average([fulls[c] for c in sorted(members)], [members[c] for c in sorted(members)])
        for cluster, members in sorted(weights.clusters.items())
    }
    global_model = weighted_average([fulls[c] for c in ids], [weights.global_[c] for c in ids])
    return cluster_models, global_model
