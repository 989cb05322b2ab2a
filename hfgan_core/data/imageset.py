"""`ImageSet`: one split of one dataset as tensors (uint8 kept inside, float in [-1, 1] handed out)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W] (grayscale) or [N,C,H,W] -> float32 [N,C,H,W] in [-1, 1], with the same float ops as
    ToTensor + Normalize(0.5, 0.5)."""
    x = pixels.to(torch.float32).div(255)
    x = x.sub(0.5).div(0.5)
    return x.unsqueeze(1) if pixels.dim() == 3 else x


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image split.

    `pixels` is uint8 [N, H, W] for grayscale or [N, C, H, W] for colour (the stored form, 4x smaller); `images` is
    the float32 [N, C, H, W] tensor in [-1, 1] that training uses, built on first access and cached. `labels` is
    int64 [N].
    """

    name: str
    pixels: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.dim() not in (3, 4):
            raise ValueError(f"ImageSet {self.name}: pixels must be uint8 [N, H, W] or [N, C, H, W]")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.pixels.shape[0],):
            raise ValueError(f"ImageSet {self.name}: labels must be int64 [N] matching the images")

    @staticmethod
    def from_numpy(name: str, pixels: np.ndarray, labels: np.ndarray) -> ImageSet:
        # Copies: arrays parsed from file bytes are read-only, and torch wants writable memory.
        return ImageSet(
            name,
            torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)),
            torch.from_numpy(np.array(labels, dtype=np.int64, copy=True)),
        )

    @cached_property
    def images(self) -> torch.Tensor:
        return normalise(self.pixels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def channels(self) -> int:
        return 1 if self.pixels.dim() == 3 else int(self.pixels.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        h, w = self.pixels.shape[-2:]
        return (self.channels, int(h), int(w))

    def labels_numpy(self) -> np.ndarray:
        return self.labels.numpy()

    def subset(self, indices: np.ndarray | torch.Tensor, name: str | None = None) -> ImageSet:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageSet(name or self.name, self.pixels[idx].contiguous(), self.labels[idx].contiguous())


__all__ = ["ImageSet", "normalise"]
