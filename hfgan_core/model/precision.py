"""bfloat16 compute for the convolution blocks: autocast inside each block, float32 at every block boundary.

`train.compute_dtype = "bfloat16"` runs each block that holds a convolution under `torch.autocast` (oneDNN's
bfloat16 kernels on CPUs with AVX-512 BF16, tensor cores on GPUs). Weights, gradients, Adam and every block's
output stay float32, so:

- what crosses a cut is the same dtype as with float32 compute, and a split run computes exactly what the unsplit
  model with the same setting computes (each block runs the same autocast region either way);
- the blocks without a convolution (G's input block with its embedding and linear layer, D's output block with its
  linear layer, sigmoid and, after it, the loss) keep float32, so the probabilities the loss takes the log of are
  not rounded to bfloat16's 8 bits.

It is a different numerical path from the paper's float32 (docs/benchmarks.md, "bfloat16 compute"), hence a
setting of the run and never a default.
"""

from __future__ import annotations

import types

import torch
from torch import nn

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def has_convolution(module: nn.Module) -> bool:
    return any(isinstance(m, _CONVOLUTIONS) for m in module.modules())


def _autocast_forward(self: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    # The class's forward under autocast; the output back to float32 so the next block (or the wire) sees float32.
    with torch.autocast(self._hfgan_autocast_device, dtype=torch.bfloat16):
        out = type(self).forward(self, *args)
    return out.float()


def use_bfloat16(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Make a block that holds a convolution compute in bfloat16 (in place; returns it). A bound method on the
    instance rather than a wrapper module, so parameter names, state dicts and checkpoints do not change; a
    deep copy of the block rebinds it to the copy.

    The whole block, not only its convolution: BatchNorm and the activation then read and write bfloat16 too,
    which measured 1.1-1.3x faster than autocasting the convolutions alone, with gradients as close to
    float32's (docs/benchmarks.md, "bfloat16 compute")."""
    if has_convolution(module):
        module._hfgan_autocast_device = torch.device(device).type
        module.forward = types.MethodType(_autocast_forward, module)
    return module


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX), from /proc/cpuinfo; None where that
    cannot be read (not Linux). Without them oneDNN emulates bfloat16 and the setting costs speed instead."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bfloat16_notice(device: str, cpuinfo: str | None = None) -> str:
    """The line a run with bfloat16 compute logs at its start: what the setting means, and a warning where the
    CPU would emulate it."""
    text = "bfloat16 compute in the convolution blocks (train.compute_dtype): faster, but not the paper's float32"
    if torch.device(device).type == "cpu" and cpu_has_bfloat16(cpuinfo) is False:
        text += "; this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16), so it will likely be slower"
    return text
