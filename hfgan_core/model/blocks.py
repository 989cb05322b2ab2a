"""The blocks of the default conditional GAN (DESIGN section 3): five per network, block = layer + BN + activation.

Block 0 of each network takes the labels as a second input (the label embedding lives there, so labels never
leave the client); every other block maps one tensor to one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


class GeneratorInput(nn.Module):
    """G block B1: Embedding(classes, classes) ++ z -> Linear -> BN1d -> ReLU -> 256x7x7."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.label_embedding = nn.Embedding(cfg.num_classes, cfg.num_classes)
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim + cfg.num_classes, 256 * 7 * 7),
            nn.BatchNorm1d(256 * 7 * 7),
            nn.ReLU(True),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.fc(x).view(-1, 256, 7, 7)


class DiscriminatorInput(nn.Module):
    """D block B1: Embedding(classes, 784) as a 1x28x28 plane ++ image -> Conv(2,64,4,2,1) -> BN -> LReLU."""

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
    """D block B5: Flatten -> Linear(2304, 1) -> Sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(256 * 3 * 3, 1)
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
        _deconv(256, 128, 4, 2, 1),  # E1 -> 128x14x14
        _deconv(128, 128, 3, 1, 1),  # E2
        _deconv(128, 64, 4, 2, 1),  # E3 -> 64x28x28
        nn.Sequential(nn.ConvTranspose2d(64, cfg.channels, 3, 1, 1), nn.Tanh()),  # B5 -> 1x28x28
    ]


def discriminator_blocks(cfg: ModelConfig) -> list[nn.Module]:
    """B1, E1, E2, E3, B5 of D, freshly initialised from the current torch RNG state."""
    return [
        DiscriminatorInput(cfg),
        _conv(64, 128, 4, 2, 1),  # E1 -> 128x7x7
        _conv(128, 128, 3, 1, 1),  # E2
        _conv(128, 256, 4, 2, 1),  # E3 -> 256x3x3
        DiscriminatorOutput(),
    ]
