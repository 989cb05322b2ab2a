"""Image-set adapters and the plain supervised training / inference loops shared by the evaluation classifiers.

Evaluation code takes images as float32 [N, C, H, W] in [-1, 1] (the reference normalises with
ToTensor + Normalize(0.5, 0.5)) and labels as int64 [N]. It accepts anything with `.images` and `.labels` (the
`ImageSet` of `hfgan_core.data`) or a plain `(images, labels)` pair, so it does not depend on the data package.
uint8 images (raw IDX pixels) are converted with the reference's normalisation.

The training loop is the reference's: Adam, cross-entropy, batch 64, a fresh shuffle each epoch, the last partial
batch kept. Everything random is drawn from seeded local generators; the global torch RNG is left untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ImageSource(Protocol):
    """What evaluation needs from a data set: images float32 [N,1,28,28] in [-1,1], labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor


def as_tensors(data: Any, what: str = "data set") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N,C,H,W], labels int64 [N]) from an ImageSet-like object or an (images, labels) pair
    (uint8 [N,H,W] is one channel)."""
    if isinstance(data, ImageSource):
        images, labels = data.images, data.labels
    elif isinstance(data, tuple | list) and len(data) == 2:
        images, labels = data
    else:
        raise TypeError(f"{what}: expected an object with .images and .labels or an (images, labels) pair")
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels)
    if images.dtype == torch.uint8:
        # The reference's ToTensor + Normalize((0.5,), (0.5,)), with the same float operations.
        images = images.to(torch.float32).div_(255).sub_(0.5).div_(0.5)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what}: images must be [N, C, H, W] with C = 1 or 3, got {list(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{what}: labels must be [N] matching {images.shape[0]} images, got {list(labels.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{what}: images must be floating point in [-1, 1] or uint8, got {images.dtype}")
    return images.to(torch.float32), labels.to(torch.int64)


def seeded_init(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with its parameters initialised from `seed`, without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def fast_layout(model: nn.Module, device: str | torch.device) -> nn.Module:
    """On the CPU, store conv weights channels-last: oneDNN then keeps activations NHWC, measured 1.3-1.6x faster
    for these small CNNs (training and inference, one thread). Values are unchanged; only strides differ."""
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def train_supervised(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Adam + cross-entropy over shuffled mini-batches (the reference's loop); returns the model in eval mode."""
    device = torch.device(device)
    fast_layout(model.to(device), device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    # Moving the whole set once is cheaper than per batch on an accelerator and a no-op on the CPU.
    x_all = images.to(device)
    y_all = labels.to(device)
    shuffle = torch.Generator().manual_seed(seed)
    n = x_all.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=shuffle).to(device)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        if on_epoch is not None:
            on_epoch(epoch + 1, total / max(count, 1))
    return model.eval()


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1000, device: str | torch.device | None = None
) -> torch.Tensor:
    """Logits of `model` over `images`, batched, in eval mode (the model's mode is restored), on the CPU."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        starts = range(0, images.shape[0], batch_size)
        out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in starts]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy_percent(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kw: Any) -> float:
    """Top-1 accuracy in percent."""
    pred = predict_logits(model, images, **kw).argmax(1)
    return 100.0 * float((pred == labels.cpu()).sum()) / max(labels.shape[0], 1)


class Stopwatch:
    """Wall time of a block: `with Stopwatch() as sw: ...; sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
