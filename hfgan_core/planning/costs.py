"""Per-block FLOPs and cut bytes, derived from the real torch blocks of the model.

`compute_costs` builds the networks of a `ModelConfig`, runs each block once on a small batch with forward hooks on
every leaf layer, and counts every layer's forward and backward FLOPs from the shapes it saw. Nothing is typed in:
another architecture gets its costs the same way, as long as its layers are of the kinds listed in `_ACTIVATIONS`
or are Linear / Conv2d / ConvTranspose2d / BatchNorm / Embedding / Flatten / Dropout.

Two conventions (`cost_model`):

- ``"paper"``: the reference implementation's counting (reference/cut_selection/README.md), which reproduces its
  ``block_gflops`` and ``per_cut`` exactly. A transposed convolution is counted like a convolution on its *output*
  size, ``2*Cin*Cout*k*k*Hout*Wout``, which overcounts it by about stride^2.
- ``"corrected"``: identical except that a transposed convolution is counted on its *input* size,
  ``2*Cin*Cout*k*k*Hin*Win`` (each input pixel scatters one k x k x Cout patch), its true multiply-add count. The
  latency model also fixes the reference's one indexing slip when it is given a corrected table (see latency.py).

Per layer and per sample (B multiplies everything): a weight layer costs ``2*W + bias`` forward, where W is its
multiply count, and ``4*W + bias`` backward (weight gradient and input gradient), except the first weight layer of
each network, whose input needs no gradient: ``2*W + bias`` backward. BatchNorm costs 8 forward / 11 backward per
output element; ReLU 1/2, LeakyReLU 2/3, Tanh 5/3, Sigmoid 3/2. Embeddings (a table look-up) and reshapes are free.
The bytes that cross a cut placed after a block are its output elements times ``bytes_per_element`` times B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import COST_MODELS, ConfigError, ModelConfig
from ..model import SERVER, architecture, build_networks
from ..model.architecture import head_block_indices, tail_block_indices

# Per output element: (forward, backward) FLOPs of element-wise activations and of BatchNorm.
_ACTIVATIONS: dict[type[nn.Module], tuple[int, int]] = {
    nn.ReLU: (1, 2),
    nn.LeakyReLU: (2, 3),
    nn.Tanh: (5, 3),
    nn.Sigmoid: (3, 2),
}
_BATCHNORM = (8, 11)
_FREE = (nn.Embedding, nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)


@dataclass(frozen=True)
class LayerCost:
    """One leaf layer as the hooks saw it; FLOPs are per sample."""

    block: int
    kind: str  # the torch class name, e.g. "ConvTranspose2d"
    in_shape: tuple[int, ...]  # per sample, first input
    out_shape: tuple[int, ...]  # per sample
    fwd_flops: int
    bwd_flops: int


@dataclass(frozen=True)
class NetCosts:
    """Costs of one network for a whole batch: GFLOPs per block, bytes of each block's output, the block roles."""

    name: str  # "G" or "D"
    roles: tuple[str, ...]
    fwd_gflops: tuple[float, ...]
    bwd_gflops: tuple[float, ...]
    out_bytes: tuple[int, ...]
    layers: tuple[LayerCost, ...]

    # Block index sets, with the semantics of model.NetworkSpec (roles read client*, head*, server+, tail*, client*).
    def head_blocks(self, bit: int) -> list[int]:
        return head_block_indices(self.roles, bit)

    def tail_blocks(self, bit: int) -> list[int]:
        return tail_block_indices(self.roles, bit)

    def blocks_with_role(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == role]

    @staticmethod
    def _sum(values: tuple[float, ...], idx: list[int]) -> float:
        # Summed in block order from 0, as the reference does (keeps per_cut bit-identical).
        total = 0.0
        for i in idx:
            total += values[i]
        return total

    def head_fwd(self, bit: int) -> float:
        return self._sum(self.fwd_gflops, self.head_blocks(bit))

    def head_bwd(self, bit: int) -> float:
        return self._sum(self.bwd_gflops, self.head_blocks(bit))

    def tail_fwd(self, bit: int) -> float:
        return self._sum(self.fwd_gflops, self.tail_blocks(bit))

    def tail_bwd(self, bit: int) -> float:
        return self._sum(self.bwd_gflops, self.tail_blocks(bit))

    def head_out_bytes(self, bit: int) -> int:
        """Bytes the client sends up after its head (and receives back as a gradient)."""
        return self.out_bytes[self.head_blocks(bit)[-1]]

    def tail_in_bytes(self, bit: int) -> int:
        """Bytes the server sends down to the client's tail (and receives back as a gradient)."""
        return self.out_bytes[self.tail_blocks(bit)[0] - 1]

    def role_fwd(self, role: str) -> float:
        return self._sum(self.fwd_gflops, self.blocks_with_role(role))

    def role_bwd(self, role: str) -> float:
        return self._sum(self.bwd_gflops, self.blocks_with_role(role))

    def server_path_fwd(self, head_bit: int, tail_bit: int) -> float:
        held = set(self.head_blocks(head_bit)) | set(self.tail_blocks(tail_bit))
        return self._sum(self.fwd_gflops, [i for i in range(len(self.roles)) if i not in held])

    def server_path_bwd(self, head_bit: int, tail_bit: int) -> float:
        held = set(self.head_blocks(head_bit)) | set(self.tail_blocks(tail_bit))
        return self._sum(self.bwd_gflops, [i for i in range(len(self.roles)) if i not in held])


@dataclass(frozen=True)
class CostTable:
    """What the latency model needs: both networks' costs for one batch size and one counting convention."""

    cost_model: str
    batch_size: int
    bytes_per_element: int
    generator: NetCosts
    discriminator: NetCosts

    @property
    def nets(self) -> tuple[NetCosts, NetCosts]:
        return (self.generator, self.discriminator)

    def block_gflops(self) -> dict[str, list[float]]:
        """The reference's ``block_gflops`` layout (ga_ref20.json)."""
        g, d = self.generator, self.discriminator
        return {
            "gen_forward": list(g.fwd_gflops),
            "disc_forward": list(d.fwd_gflops),
            "gen_backward": list(g.bwd_gflops),
            "disc_backward": list(d.bwd_gflops),
        }

    def per_cut(self) -> dict[str, dict[str, object]]:
        """The reference's ``per_cut`` layout: for each bit string ``g_head g_tail d_head d_tail``, the client and
        server GFLOPs and the bytes crossing each cut."""
        g, d = self.generator, self.discriminator
        out: dict[str, dict[str, object]] = {}
        for code in range(16):
            hg, tg, hd, td = ((code >> s) & 1 for s in (3, 2, 1, 0))
            out[f"{hg}{tg}{hd}{td}"] = {
                "client_gflops_fwd": [g.head_fwd(hg), g.tail_fwd(tg), d.head_fwd(hd), d.tail_fwd(td)],
                "client_gflops_bwd": [g.head_bwd(hg), g.tail_bwd(tg), d.head_bwd(hd), d.tail_bwd(td)],
                "server_gflops_fwd": [g.server_path_fwd(hg, tg), d.server_path_fwd(hd, td)],
                "server_gflops_bwd": [g.server_path_bwd(hg, tg), d.server_path_bwd(hd, td)],
                "bytes_gen_head_out": g.head_out_bytes(hg),
                "bytes_gen_tail_in": g.tail_in_bytes(tg),
                "bytes_disc_head_out": d.head_out_bytes(hd),
                "bytes_disc_tail_in": d.tail_in_bytes(td),
            }
        return out


# ----------------------------------------------------------------------------------------------------------------
# Counting


def _layer_flops(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], first: bool, cost_model: str
) -> tuple[int, int] | None:
    """(forward, backward) FLOPs per sample of one leaf layer; None for a layer kind we do not know."""
    out_elems = math.prod(out_shape)
    grad = 2 if first else 4  # the first weight layer computes no input gradient
    if isinstance(module, nn.Linear):
        mults = module.in_features * module.out_features
        bias = module.out_features if module.bias is not None else 0
        return 2 * mults + bias, grad * mults + bias
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        cin = module.in_channels // module.groups
        cout, hout, wout = out_shape[-3:]
        bias = cout * hout * wout if module.bias is not None else 0
        if isinstance(module, nn.ConvTranspose2d) and cost_model == "corrected":
            # Every input pixel scatters a k x k patch into each output channel: the work scales with the input.
            hin, win = in_shape[-2:]
            mults = cin * cout * kh * kw * hin * win
        else:
            mults = cin * cout * kh * kw * hout * wout
        return 2 * mults + bias, grad * mults + bias
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return _BATCHNORM[0] * out_elems, _BATCHNORM[1] * out_elems
    for kind, (f, b) in _ACTIVATIONS.items():
        if isinstance(module, kind):
            return f * out_elems, b * out_elems
    if isinstance(module, _FREE):
        return 0, 0
    return None


def _example_inputs(net: str, cfg: ModelConfig, batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs of block 0: G takes (z, labels), D takes (images, labels)."""
    labels = torch.arange(batch) % cfg.num_classes
    if net == "G":
        return torch.zeros(batch, cfg.z_dim), labels
    return torch.zeros(batch, cfg.channels, cfg.image_size, cfg.image_size), labels


def _trace_net(
    net: str, blocks: list[nn.Module], cfg: ModelConfig, cost_model: str
) -> tuple[list[LayerCost], list[tuple[int, ...]]]:
    """Run the blocks once with hooks on every leaf layer; the layers in execution order and each block's output
    shape (per sample)."""
    seen: list[tuple[int, nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    current = [0]
    handles = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        first_in = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        in_shape = tuple(first_in.shape[1:]) if first_in is not None else ()
        seen.append((current[0], module, in_shape, tuple(output.shape[1:])))

    for block in blocks:
        for m in block.modules():
            if not any(True for _ in m.children()):
                handles.append(m.register_forward_hook(hook))
    out_shapes: list[tuple[int, ...]] = []
    try:
        with torch.no_grad():
            was_training = [b.training for b in blocks]
            for b in blocks:
                b.eval()  # BatchNorm in eval mode: shapes only, no running-stat updates
            x: tuple[torch.Tensor, ...] = _example_inputs(net, cfg, 2)
            for i, block in enumerate(blocks):
                current[0] = i
                y = block(*x)
                out_shapes.append(tuple(y.shape[1:]))
                x = (y,)
            for b, t in zip(blocks, was_training, strict=True):
                b.train(t)
    finally:
        for h in handles:
            h.remove()

    layers: list[LayerCost] = []
    first_weight_layer_done = False
    for block_idx, module, in_shape, out_shape in seen:
        is_weight_layer = isinstance(module, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)
        flops = _layer_flops(module, in_shape, out_shape, is_weight_layer and not first_weight_layer_done, cost_model)
        if flops is None:
            raise ValueError(f"{net} block {block_idx}: no FLOP count for layer type {type(module).__name__}")
        first_weight_layer_done = first_weight_layer_done or is_weight_layer
        layers.append(LayerCost(block_idx, type(module).__name__, in_shape, out_shape, *flops))
    return layers, out_shapes


def compute_costs(
    model_cfg: ModelConfig | None = None, batch_size: int = 64, cost_model: str = "paper", bytes_per_element: int = 4
) -> CostTable:
    """Per-block forward/backward GFLOPs and cut bytes of the model, for one batch, under a counting convention.

    Raises ConfigError for a non-positive batch size or an unknown cost model.
    """
    cfg = model_cfg if model_cfg is not None else ModelConfig()
    if cost_model not in COST_MODELS:
        raise ConfigError(f"cost model must be one of {', '.join(COST_MODELS)}, got {cost_model!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if bytes_per_element <= 0:
        raise ConfigError("bytes per element must be positive")
    arch = architecture(cfg)
    nets = build_networks(cfg, seed=0)
    tables = []
    for spec in arch.nets:
        layers, out_shapes = _trace_net(spec.name, nets[spec.name], cfg, cost_model)
        if tuple(out_shapes) != tuple(spec.output_shapes):
            raise ValueError(
                f"{spec.name}: traced block outputs {out_shapes} differ from the declared {list(spec.output_shapes)}"
            )
        fwd = [0] * spec.n_blocks
        bwd = [0] * spec.n_blocks
        for layer in layers:
            fwd[layer.block] += layer.fwd_flops
            bwd[layer.block] += layer.bwd_flops
        # Integers until here, so GFLOPs are the exactly rounded quotients (bit-equal to the reference's numbers).
        tables.append(
            NetCosts(
                name=spec.name,
                roles=tuple(spec.roles),
                fwd_gflops=tuple(f * batch_size / 1e9 for f in fwd),
                bwd_gflops=tuple(b * batch_size / 1e9 for b in bwd),
                out_bytes=tuple(math.prod(s) * bytes_per_element * batch_size for s in spec.output_shapes),
                layers=tuple(layers),
            )
        )
    for t in tables:
        if not t.blocks_with_role(SERVER):
            raise ValueError(f"{t.name}: no server block")
    return CostTable(cost_model, batch_size, bytes_per_element, tables[0], tables[1])


__all__ = ["COST_MODELS", "CostTable", "LayerCost", "NetCosts", "compute_costs"]
