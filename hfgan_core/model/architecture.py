"""Which blocks live where: block roles, cut bits, canonical parameter names and cut-boundary shapes.

An architecture is two block lists (G and D) with a role per block: `client` blocks are always held by the
client, `head`/`tail` blocks are held by the client when its head/tail cut bit is 1 (otherwise the server runs its
shared copy for that client), `server` blocks always run on the server. The rest of the system only speaks in
these terms, so another architecture is another `Architecture` value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig
from .blocks import base_side, d_final_side, discriminator_blocks, generator_blocks

CLIENT, HEAD, SERVER, TAIL = "client", "head", "server", "tail"


class CutBits(NamedTuple):
    """A client's four cut bits: does it keep the optional head/tail block of G and of D."""

    g_head: int
    g_tail: int
    d_head: int
    d_tail: int

    @staticmethod
    def parse(value: Iterable[int] | str) -> CutBits:
        bits = [int(c) for c in value] if isinstance(value, str) else [int(b) for b in value]
        if len(bits) != 4 or any(b not in (0, 1) for b in bits):
            raise ValueError(f"cut bits must be four 0/1 values [g_head, g_tail, d_head, d_tail], got {value!r}")
        return CutBits(*bits)

    def for_net(self, net: str) -> tuple[int, int]:
        return (self.g_head, self.g_tail) if net == "G" else (self.d_head, self.d_tail)

    def __str__(self) -> str:
        return "".join(str(b) for b in self)


def head_block_indices(roles: tuple[str, ...], head_bit: int) -> list[int]:
    """For roles that read client*, head*, server+, tail*, client*: the leading client blocks, then the head
    blocks if the head bit is 1 (what a client runs before the server). The cost model counts the same sets."""
    out = []
    for i, role in enumerate(roles):
        if role == CLIENT or (role == HEAD and head_bit):
            out.append(i)
        else:
            break
    return out


def tail_block_indices(roles: tuple[str, ...], tail_bit: int) -> list[int]:
    """The trailing counterpart of `head_block_indices`, in forward order."""
    out = []
    for i in range(len(roles) - 1, -1, -1):
        if roles[i] == CLIENT or (roles[i] == TAIL and tail_bit):
            out.append(i)
        else:
            break
    return out[::-1]


@dataclass(frozen=True)
class NetworkSpec:
    name: str  # "G" or "D"
    roles: tuple[str, ...]
    factory: Callable[[ModelConfig], list[nn.Module]]
    # Per-sample output shape of each block (what crosses a cut placed after that block).
    output_shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        roles = self.roles
        if len(roles) != len(self.output_shapes) or len(roles) < 3:
            raise ValueError(f"{self.name}: roles and output shapes must describe the same blocks (>= 3)")
        if roles[0] != CLIENT or roles[-1] != CLIENT or SERVER not in roles:
            raise ValueError(f"{self.name}: first and last blocks must be client blocks, one block a server block")
        order = {CLIENT: 0, HEAD: 1, SERVER: 2, TAIL: 3}
        inner = [order[r] for r in roles[1:-1]]
        if inner != sorted(inner) or CLIENT in roles[1:-1]:
            raise ValueError(f"{self.name}: roles must read client*, head*, server+, tail*, client*")

    @property
    def n_blocks(self) -> int:
        return len(self.roles)

    def client_head(self, head_bit: int) -> list[int]:
        """Indices of the blocks a client runs before the server: the leading client blocks, then the head
        blocks if its head bit is 1."""
        return head_block_indices(self.roles, head_bit)

    def client_tail(self, tail_bit: int) -> list[int]:
        """Indices of the blocks a client runs after the server, in forward order."""
        return tail_block_indices(self.roles, tail_bit)

    def client_blocks(self, head_bit: int, tail_bit: int) -> list[int]:
        return self.client_head(head_bit) + self.client_tail(tail_bit)

    def server_blocks(self) -> list[int]:
        """Blocks the server holds one shared copy of: every optional and every server block."""
        return [i for i, r in enumerate(self.roles) if r in (HEAD, SERVER, TAIL)]

    def server_path(self, head_bit: int, tail_bit: int) -> list[int]:
        """Blocks the server runs for a client with these bits, in order."""
        held = set(self.client_blocks(head_bit, tail_bit))
        return [i for i in range(self.n_blocks) if i not in held]

    def head_output_shape(self, head_bit: int) -> tuple[int, ...]:
        return self.output_shapes[self.client_head(head_bit)[-1]]

    def tail_input_shape(self, tail_bit: int) -> tuple[int, ...]:
        return self.output_shapes[self.client_tail(tail_bit)[0] - 1]


@dataclass(frozen=True)
class Architecture:
    name: str
    generator: NetworkSpec
    discriminator: NetworkSpec
    summary_block: int  # D block whose (server-side) output summarises a client's data for clustering

    def net(self, name: str) -> NetworkSpec:
        return self.generator if name == "G" else self.discriminator

    @property
    def nets(self) -> tuple[NetworkSpec, NetworkSpec]:
        return (self.generator, self.discriminator)


def cgan28(cfg: ModelConfig) -> Architecture:
    """The five-block cGAN family (named after its 28x28 member): shapes follow the image size and channels."""
    roles = (CLIENT, HEAD, SERVER, TAIL, CLIENT)
    s = base_side(cfg)  # 7 at 28x28
    f = d_final_side(cfg)  # 3 at 28x28
    g = NetworkSpec(
        "G",
        roles,
        generator_blocks,
        ((256, s, s), (128, 2 * s, 2 * s), (128, 2 * s, 2 * s), (64, 4 * s, 4 * s), cfg.image_shape),
    )
    half, quarter = cfg.image_size // 2, s
    d = NetworkSpec(
        "D",
        roles,
        discriminator_blocks,
        ((64, half, half), (128, quarter, quarter), (128, quarter, quarter), (256, f, f), (1,)),
    )
    return Architecture("cgan28", g, d, summary_block=2)


def architecture(cfg: ModelConfig) -> Architecture:
    if cfg.arch == "cgan28":
        return cgan28(cfg)
    raise ValueError(f"unknown architecture {cfg.arch!r}")


# --------------------------------------------------------------------------------------------------------------
# Full networks and canonical names


def build_networks(cfg: ModelConfig, seed: int) -> dict[str, list[nn.Module]]:
    """Both networks' blocks, initialised deterministically from `seed` (G first, then D)."""
    arch = architecture(cfg)
    gen = torch.Generator().manual_seed(seed)
    # nn.Module initialisers draw from the global RNG; fork it so building a model never disturbs the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        return {spec.name: spec.factory(cfg) for spec in arch.nets}


def canonical_state(net: str, blocks: dict[int, nn.Module]) -> dict[str, torch.Tensor]:
    """{"G.1.0.weight": tensor, ...}: parameters and buffers of the given blocks under network-wide names."""
    out: dict[str, torch.Tensor] = {}
    for i, block in sorted(blocks.items()):
        for key, value in block.state_dict().items():
            out[f"{net}.{i}.{key}"] = value
    return out


def block_keys(cfg: ModelConfig) -> dict[str, dict[int, dict[str, tuple[tuple[int, ...], torch.dtype]]]]:
    """For each network and block: the canonical state keys with their shapes and dtypes (the wire schema)."""
    nets = build_networks(cfg, 0)
    out: dict[str, dict[int, dict[str, tuple[tuple[int, ...], torch.dtype]]]] = {}
    for net, blocks in nets.items():
        out[net] = {
            i: {f"{net}.{i}.{k}": (tuple(v.shape), v.dtype) for k, v in b.state_dict().items()}
            for i, b in enumerate(blocks)
        }
    return out


def load_canonical(net: str, blocks: dict[int, nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Load the entries of `state` that belong to `blocks` (strict: every key of those blocks must be present)."""
    for i, block in blocks.items():
        prefix = f"{net}.{i}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        block.load_state_dict(sub, strict=True)
