"""Shared test settings: one torch thread (CI machines have two cores and tests run beside other work)."""

import torch

torch.set_num_threads(1)
