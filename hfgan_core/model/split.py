"""Split forward helpers: a client's head/tail segments and the server's batched middle.

The server runs each of its blocks once per pass on the concatenation of every client that needs it, in the
reference implementation's order: clients whose head block the server runs first (they enter at an earlier block),
then the others, each group by client index. BatchNorm therefore sees the union of those clients' batches, as in
the paper's code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .architecture import NetworkSpec


def run_blocks(
    blocks: dict[int, nn.Module], order: Sequence[int], x: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the given blocks in order; block 0 takes the labels as its second input."""
    for i in order:
        x = blocks[i](x, labels) if i == 0 else blocks[i](x)
    return x


def server_order(spec: NetworkSpec, bits: dict[int, tuple[int, int]]) -> list[int]:
    """Concatenation order of clients at the server: earlier entry point first, then client index."""
    return sorted(bits, key=lambda c: (len(spec.client_head(bits[c][0])), c))


def server_forward(
    spec: NetworkSpec,
    blocks: dict[int, nn.Module],
    inputs: dict[int, torch.Tensor],
    bits: dict[int, tuple[int, int]],
    capture: int | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run the server's part for several clients at once.

    `inputs[c]` is client c's head output, `bits[c]` its (head, tail) bits for this network. Returns each client's
    tail input and, if `capture` names a block, each client's slice of that block's output.
    """
    order = server_order(spec, {c: bits[c] for c in inputs})
    current = dict(inputs)
    captured: dict[int, torch.Tensor] = {}
    paths = {c: set(spec.server_path(*bits[c])) for c in order}
    for j in range(spec.n_blocks):
        users = [c for c in order if j in paths[c]]
        if not users:
            continue
        if j not in blocks:
            raise KeyError(f"{spec.name}: server has no block {j}")
        x = torch.cat([current[c] for c in users], dim=0) if len(users) > 1 else current[users[0]]
        y = blocks[j](x)
        parts = torch.split(y, [current[c].shape[0] for c in users], dim=0) if len(users) > 1 else (y,)
        for c, part in zip(users, parts):
            current[c] = part
            if capture == j:
                captured[c] = part
    return current, captured
