"""The two small CNNs of the evaluation: the per-domain scoring classifier and the utility classifier.

Both follow the reference implementation (HuSCF-GAN, Metrics/evaluation.py) layer for layer and keep its layer
names (`conv1`, `conv2`, `fc1`, `fc2`), so a state dict from the reference loads into them unchanged:

- `ScoringClassifier` (the reference's MNISTClassifier, identical for every domain): unpadded 3x3 convolutions,
  conv(C,32) -> ReLU -> maxpool2 -> conv(32,64) -> ReLU -> maxpool2 -> fc(1600,128) -> ReLU -> fc(128,10). It gives
  p(y|x) for the generation score and is trained on the domain's real training data (normalised to [-1, 1]).
  (1600 and 3136 are for 1x28x28 images; both CNNs follow the data's channels and size.)
- `UtilityCNN` (the reference's `Classifier`): padded 3x3 convolutions, conv(1,32) -> ReLU -> pool ->
  conv(32,64) -> ReLU -> pool -> fc(3136,128) -> ReLU -> fc(128,10). It is trained only on generated samples and
  tested on real data. The reference declares a Dropout(0.5) that its forward pass never uses; it is left out.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

SCORING_ARCH = "scoring-cnn-v1"
UTILITY_ARCH = "utility-cnn-v1"


class _TwoConvCNN(nn.Module):
    """conv(C,32) -> ReLU -> pool -> conv(32,64) -> ReLU -> pool -> fc(.,128) -> ReLU -> fc(128,classes), with 3x3
    convolutions padded by `padding`: the shape both evaluation CNNs share (their layer names are the reference's)."""

    def __init__(self, num_classes: int, channels: int, image_size: int, padding: int) -> None:
        super().__init__()
        side = image_size
        for _ in range(2):  # a 3x3 convolution (it trims 2 - 2 * padding), then a 2x2 pool
            side = (side - 2 + 2 * padding) // 2
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, stride=1, padding=padding)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=padding)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations [B, 128] (the space of the classifier Fréchet distance)."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


class ScoringClassifier(_TwoConvCNN):
    """p(y|x) for the generation score; input [B, C, S, S] in [-1, 1] (1x28x28 for the MNIST family), output
    logits [B, num_classes]. Unpadded convolutions: 5x5 features at 28."""

    def __init__(self, num_classes: int = 10, channels: int = 1, image_size: int = 28) -> None:
        super().__init__(num_classes, channels, image_size, padding=0)


class UtilityCNN(_TwoConvCNN):
    """The downstream classifier trained on generated samples (conv32-pool-conv64-pool-fc128-fc10). Padded
    convolutions: 7x7 features at 28."""

    def __init__(self, num_classes: int = 10, channels: int = 1, image_size: int = 28) -> None:
        super().__init__(num_classes, channels, image_size, padding=1)


ARCHITECTURES: MappingProxyType[str, type[nn.Module]] = MappingProxyType(
    {SCORING_ARCH: ScoringClassifier, UTILITY_ARCH: UtilityCNN}
)


def build_model(arch: str, num_classes: int = 10, channels: int = 1, image_size: int = 28) -> nn.Module:
    """A fresh (randomly initialised) model of a named evaluation architecture for images of this shape."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown evaluation architecture {arch!r} (known: {', '.join(ARCHITECTURES)})") from None
    return cls(num_classes, channels, image_size)
