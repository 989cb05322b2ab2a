"""A scenario domain's data whatever its source (built-in, synthetic or a user dataset), its content digest, and the
model shape it asks for.

Every domain's (train, test) pair gets a content digest (sha256 over the shapes, uint8 pixels and labels of both
splits) that a run records, so that a result can be tied to the exact data it was trained and scored on. The image
shape and number of classes are read from the data: all domains must agree (one model family member serves them
all), and that shape must be one the model family takes (square 28, 32 or 64 pixels, 1 or 3 channels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping

from ..config import IMAGE_SIZES, ConfigError, DomainConfig, ModelConfig
from .imageset import ImageSet
from .sources import DatasetStatus, DomainData, load_domain
from .user import load_user_dataset, resolve_path


def content_digest(train: ImageSet, test: ImageSet) -> str:
    """sha256 of a domain's data: for each split its shape, then its uint8 pixels and int64 labels (C order)."""
    h = hashlib.sha256()
    for split in (train, test):
        h.update(f"{list(split.pixels.shape)}:{list(split.labels.shape)};".encode())
        h.update(split.pixels.contiguous().numpy())
        h.update(split.labels.contiguous().numpy())
    return "sha256:" + h.hexdigest()


def load_domain_config(
    dom: DomainConfig,
    data_dir: str | os.PathLike[str],
    synthetic_train_per_class: int = 600,
    allow_synthetic_fallback: bool = False,
    log: Callable[[str], None] | None = None,
) -> DomainData:
    """A domain's data: a user dataset read from its path, or a built-in dataset as `load_domain` gives it."""
    if dom.is_user:
        train, test = load_user_dataset(dom, data_dir)
        return DomainData(dom.dataset, train, test, str(resolve_path(dom.path or "", data_dir)))
    return load_domain(dom.dataset, data_dir, synthetic_train_per_class, allow_synthetic_fallback, log)


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What the model needs to know about a domain's data."""

    channels: int
    image_size: int
    num_classes: int

    def __str__(self) -> str:
        return f"{self.image_size}x{self.image_size}x{self.channels} images in {self.num_classes} classes"


def data_shape(name: str, train: ImageSet) -> DataShape:
    """The data's shape; a shape the model family does not take raises ConfigError."""
    c, h, w = train.image_shape
    if h != w or h not in IMAGE_SIZES:
        raise ConfigError(
            f"dataset {name}: {h}x{w} images; the model family takes square images of "
            f"{', '.join(map(str, IMAGE_SIZES))} pixels"
        )
    if c not in (1, 3):
        raise ConfigError(f"dataset {name}: {c} channels; the model takes 1 (grayscale) or 3 (colour)")
    return DataShape(c, h, train.num_classes)


def model_for_data(model: ModelConfig, train_sets: Mapping[str, ImageSet], adopt: bool) -> ModelConfig:
    """The model config that fits the domains' data.

    All domains must share one shape. With `adopt`, the model takes the data's image size, channels and number of
    classes (the embedded trainer chooses the model from the data); without, a mismatch raises ConfigError that
    names the keys to set.
    """
    shapes = {name: data_shape(name, s) for name, s in train_sets.items()}
    first_name, first = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if shape != first:
            raise ConfigError(
                f"domains {first_name} and {name} differ in shape ({first} vs {shape}); one model serves all domains"
            )
    want = dataclasses.replace(
        model, channels=first.channels, image_size=first.image_size, num_classes=first.num_classes
    )
    if adopt or want == model:
        return want
    raise ConfigError(
        f"the data ({first_name}: {first}) does not fit the model ({model.image_size}x{model.image_size}x"
        f"{model.channels}, {model.num_classes} classes): set [model] image_size = {want.image_size}, "
        f"channels = {want.channels}, num_classes = {want.num_classes}"
    )


def check_user_domain(dom: DomainConfig, data_dir: str | os.PathLike[str]) -> DatasetStatus:
    """What `hfgan data check` reports for a user dataset domain of a config."""
    where = str(resolve_path(dom.path or "", data_dir))
    try:
        train, test = load_user_dataset(dom, data_dir)
        shape = data_shape(dom.dataset, train)
    except ConfigError as exc:
        found = os.path.exists(where)
        return DatasetStatus(dom.dataset, where, found, False, str(exc), corrupt=found)
    split = "" if dom.test_fraction is None else f" (test_fraction {dom.test_fraction})"
    detail = f"{dom.format}: {len(train)} train / {len(test)} test{split}; {shape}; {content_digest(train, test)}"
    return DatasetStatus(dom.dataset, where, True, False, detail)


__all__ = [
    "DataShape",
    "check_user_domain",
    "content_digest",
    "data_shape",
    "load_domain_config",
    "model_for_data",
]
