"""The blocks one role holds, with their Adam optimizers, addressed by canonical names.

Clients and the server both hold a subset of the blocks of G and D. Optimizer state is kept per parameter and
survives rounds (docs/ARCHITECTURE.md section 3) and changes of cut bits: when a client starts holding a block it gets
fresh Adam state for it; parameters it keeps holding keep theirs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..model import canonical_state, load_canonical
from ..model.precision import use_bfloat16


class BlockHolder:
    def __init__(
        self, cfg: RunConfig, full: dict[str, list[nn.Module]], held: dict[str, list[int]], device: str = "cpu"
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.blocks: dict[str, dict[int, nn.Module]] = {net: {} for net in ("G", "D")}
        self.optim: dict[str, torch.optim.Adam] = {}
        self.set_held(full, held)

    # ---------------------------------------------------------------------------------------------- holdings
    def held(self) -> dict[str, list[int]]:
        return {net: sorted(b) for net, b in self.blocks.items()}

    def set_held(
        self,
        source: dict[str, list[nn.Module]] | None,
        held: dict[str, list[int]],
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Hold exactly `held` blocks. New blocks come from `source` modules (copied) or are created and then
        filled from `state`; blocks no longer held are dropped with their optimizer state."""
        old_state = {net: self._named_state(net) for net in self.optim}
        for net, idxs in held.items():
            current = self.blocks[net]
            for i in [i for i in current if i not in idxs]:
                del current[i]
            for i in idxs:
                if i not in current:
                    if source is None:
                        raise ValueError(f"no source for new block {net}.{i}")
                    module = source[net][i]
                    current[i] = prepare_module(_clone(module), self.cfg, self.device)
        if state is not None:
            self.load(state)
        for net in ("G", "D"):
            params = self._named_params(net)
            opt = make_adam([p for _, p in params], self.cfg)
            for name, p in params:
                prev = old_state.get(net, {}).get(name)
                if prev is not None:
                    opt.state[p] = prev
            self.optim[net] = opt

    def _named_params(self, net: str) -> list[tuple[str, nn.Parameter]]:
        out = []
        for i, block in sorted(self.blocks[net].items()):
            out.extend((f"{net}.{i}.{k}", p) for k, p in block.named_parameters())
        return out

    def _named_state(self, net: str) -> dict[str, dict[str, Any]]:
        opt = self.optim[net]
        return {name: opt.state[p] for name, p in self._named_params(net) if p in opt.state}

    def param_names(self, net: str) -> list[str]:
        return [n for n, _ in self._named_params(net)]

    # ------------------------------------------------------------------------------------------------ state
    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for net in ("G", "D"):
            out.update({k: v.detach().cpu() for k, v in canonical_state(net, self.blocks[net]).items()})
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy values in place (parameters stay the same objects, so optimizer state stays attached)."""
        for net in ("G", "D"):
            if self.blocks[net]:
                load_canonical(
                    net, self.blocks[net], {k: v.to(self.device) for k, v in state.items() if k.startswith(net + ".")}
                )

    def expected_keys(self) -> set[str]:
        return set(self.state())

    def optimizer_states(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for net in ("G", "D"):
            out[net] = {
                name: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                for name, st in self._named_state(net).items()
            }
        return out

    def load_optimizer_states(self, states: dict[str, Any]) -> None:
        for net in ("G", "D"):
            opt = self.optim[net]
            saved = states.get(net, {})
            for name, p in self._named_params(net):
                if name in saved:
                    opt.state[p] = {
                        k: (v.to(self.device) if torch.is_tensor(v) and k != "step" else v)
                        for k, v in saved[name].items()
                    }

    def zero_grad(self, net: str) -> None:
        self.optim[net].zero_grad(set_to_none=True)

    def parameters(self, net: str) -> list[nn.Parameter]:
        return [p for _, p in self._named_params(net)]

    def step(self, net: str) -> None:
        self.optim[net].step()

    def train(self, mode: bool = True) -> None:
        for net in ("G", "D"):
            for b in self.blocks[net].values():
                b.train(mode)


def make_adam(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Adam:
    """The run's Adam over `params`. `foreach=True`: one multi-tensor kernel per operation instead of a Python loop
    over the parameters (on CPU torch defaults to the loop); it performs the same operations in the same order, so
    the parameters come out bit-identical (tests/unit/test_speed_paths.py)."""
    tr = cfg.train
    return torch.optim.Adam(params, lr=tr.lr, betas=tuple(tr.betas), foreach=True)


def prepare_module(module: nn.Module, cfg: RunConfig, device: torch.device | str) -> nn.Module:
    """Move a block to its device and, where the run asks for it, to the channels-last memory format (faster
    convolutions and BatchNorm on CPU, but a different summation order: results differ in the last bits, so it
    is off by default; docs/benchmarks.md) and to bfloat16 compute (`train.compute_dtype`, model/precision.py)."""
    module = module.to(device)
    if cfg.runtime.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.train.compute_dtype == "bfloat16":
        module = use_bfloat16(module, device)
    return module


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)
