"""Activation summaries: what a client's data looks like to the server, reduced to one tensor per round.

The clustering service groups clients by the output of D's server block E2 on each client's real batch of the
round's last step (docs/ARCHITECTURE.md section 3). The summary of client k is that output averaged over its batch; it
is both the KMeans feature (flattened) and the input of the KLD scores.
"""

from __future__ import annotations

import torch


def activation_summary(e2_out: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of one client's E2 output: [B, C, H, W] -> [C, H, W], detached, float32.

    The cast to float32 happens before the mean so that a lower-precision wire dtype (float16/bfloat16) does not
    also lower the precision of the reduction; the reference computes this mean in float32 as well.
    """
    if not isinstance(e2_out, torch.Tensor):
        raise TypeError(f"activation_summary expects a tensor, got {type(e2_out).__name__}")
    if e2_out.dim() != 4 or e2_out.shape[0] == 0:
        raise ValueError(f"activation_summary expects a non-empty [B, C, H, W] batch, got shape {tuple(e2_out.shape)}")
    return e2_out.detach().to(torch.float32).mean(dim=0)
