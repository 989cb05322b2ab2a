"""The blocks of the conditional GAN family: five per network, block = layer + BN + activation.

One family member per image size (28, 32 or 64 pixels), channel count (1 or 3) and number of classes: G starts from
256 planes of size/4 x size/4 and doubles twice; D halves three times (size/2, size/4, size/8 rounded down) before
its linear output. At 28x28x1 with 10 classes this is the reference model, unchanged.

Block 0 of each network takes the labels as a second input (the label embedding lives there, so labels never
leave the client); every other block maps one tensor to one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


def base_side(cfg: ModelConfig) -> int:
    """Side of G's first feature planes (7 for 28x28 images)."""
    return cfg.image_size // 4


def d_final_side(cfg: ModelConfig) -> int:
    """Side of D's last feature planes (3 for 28x28 images): a 4/2/1 convolution halves, rounding down."""
    return base_side(cfg) // 2


class GeneratorInput(nn.Module):
    """G block B1: Embedding(classes, classes) ++ z -> Linear -> BN1d -> ReLU -> 256 x s x s (s = size/4)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.side = base_side(cfg)
        self.label_embedding = nn.Embedding(cfg.num_classes, cfg.num_classes)
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim + cfg.num_classes, 256 * self.side * self.side),
            nn.BatchNorm1d(256 * self.side * self.side),
            nn.ReLU(True),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.fc(x).view(-1, 256, self.side, self.side)


class DiscriminatorInput(nn.Module):
    """D block B1: Embedding(classes, size^2) as a 1 x size x size plane ++ image -> Conv(channels+1, 64, 4, 2, 1)
    -> BN -> LReLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        side = cfg.image_size
        self.side = side
        self.label_embedding = nn.Embedding(cfg.num_classes, side * side)
        self.conv = nn.Sequential(
            nn.Conv2d(cfg.channels + 1, 64, 4, 2, 1),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2, inplace=True),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        plane = self.label_embedding(labels).view(-1, 1, self.side, self.side)
        return self.conv(torch.cat([images, plane], dim=1))


class DiscriminatorOutput(nn.Module):
    """D block B5: Flatten -> Linear(256 x s x s, 1) -> Sigmoid (s = 3 for 28x28 images: 2304 inputs)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        side = d_final_side(cfg)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(256 * side * side, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(self.fc(self.flatten(x)))


def _deconv(cin: int, cout: int, k: int, s: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.ReLU(True))


def _conv(cin: int, cout: int, k: int, s: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


def generator_blocks(cfg: ModelConfig) -> list[nn.Module]:
    """B1, E1, E2, E3, B5 of G, freshly initialised from the current torch RNG state."""
    return [
        GeneratorInput(cfg),
        _deconv(256, 128, 4, 2, 1),  # E1 -> 128 x size/2 x size/2
        _deconv(128, 128, 3, 1, 1),  # E2
        _deconv(128, 64, 4, 2, 1),  # E3 -> 64 x size x size
        nn.Sequential(nn.ConvTranspose2d(64, cfg.channels, 3, 1, 1), nn.Tanh()),  # B5 -> channels x size x size
    ]


def discriminator_blocks(cfg: ModelConfig) -> list[nn.Module]:
    """B1, E1, E2, E3, B5 of D, freshly initialised from the current torch RNG state."""
    return [
        DiscriminatorInput(cfg),
        _conv(64, 128, 4, 2, 1),  # E1 -> 128 x size/4 x size/4
        _conv(128, 128, 3, 1, 1),  # E2
        _conv(128, 256, 4, 2, 1),  # E3 -> 256 x size/8 x size/8 (rounded down)
        DiscriminatorOutput(cfg),
    ]
