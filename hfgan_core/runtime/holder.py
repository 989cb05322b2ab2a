"""The blocks one role holds, with their Adam optimizers, addressed by canonical names.

Clients and the server both hold a subset of the blocks of G and D. Optimizer state is kept per parameter and
survives rounds (DESIGN section 3) and changes of cut bits: when a client starts holding a block it gets fresh Adam
state for it; parameters it keeps holding keep theirs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..model import canonical_state, load_canonical


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
                    current[i] = _clone(module).to(self.device)
        if state is not None:
            self.load(state)
        tr = self.cfg.train
        for net in ("G", "D"):
            params = self._named_params(net)
            opt = torch.optim.Adam([p for _, p in params], lr=tr.lr, betas=tuple(tr.betas))
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

    def step(self, net: str) -> None:
        self.optim[net].step()

    def train(self, mode: bool = True) -> None:
        for net in ("G", "D"):
            for b in self.blocks[net].values():
                b.train(mode)


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)
