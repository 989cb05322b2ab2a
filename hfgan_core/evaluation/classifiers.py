"""Per-domain scoring classifiers: fitting them on real data, storing them as self-describing files, loading them.

A classifier file is a plain dict saved with `torch.save`, loadable with `torch.load(path, weights_only=True)`:

    {"format": "hfgan-classifier", "version": 1, "dataset": "MNIST", "arch": "scoring-cnn-v1",
     "num_classes": 10, "state_dict": {...}, "test_accuracy": 98.9 (percent, on the real test split),
     "data_digest": "sha256:..." (of the training images and labels it was fitted on), "epochs": 3, "seed": 0}

The default location is `<data_dir>/classifiers/<Dataset>.pt`. `load_classifier` refuses a file that is not such
a dict, has another version, or was fitted for another dataset, with a one-line `ConfigError`.

The reference ships pre-trained classifiers without their training recipe; we fit ours with the loop of its utility
classifier (Adam 1e-3, batch 64) on the domain's full real training split normalised to [-1, 1].
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..fsutil import atomic_write
from .models import ARCHITECTURES, SCORING_ARCH, build_model
from .training import Stopwatch, accuracy_percent, as_tensors, fast_layout, seeded_init, train_supervised

CLASSIFIER_FORMAT = "hfgan-classifier"
CLASSIFIER_VERSION = 1
DEFAULT_EPOCHS = 3


def classifier_path(data_dir: str | os.PathLike[str], dataset: str) -> Path:
    """Default location of a domain's scoring classifier: `<data_dir>/classifiers/<Dataset>.pt`."""
    return Path(data_dir) / "classifiers" / f"{dataset}.pt"


def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 over the float32 images and int64 labels (C order, native little endian), with shapes."""
    h = hashlib.sha256()
    h.update(f"{list(images.shape)}:{list(labels.shape)}".encode())
    # numpy arrays are hashed through the buffer protocol: no copy of a 188 MB training set.
    h.update(images.detach().to("cpu", torch.float32).contiguous().numpy())
    h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy())
    return "sha256:" + h.hexdigest()


def fit_classifier(
    train_set: Any,
    test_set: Any,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    lr: float = 1e-3,
    num_classes: int = 10,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, float]:
    """Fit a scoring classifier on `train_set`; returns (model in eval mode, test accuracy in percent)."""
    x_train, y_train = as_tensors(train_set, "training set")
    x_test, y_test = as_tensors(test_set, "test set")
    model = seeded_init(lambda: build_model(SCORING_ARCH, num_classes, x_train.shape[1], x_train.shape[-1]), seed)
    train_supervised(
        model,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        on_epoch=on_epoch,
    )
    return model, accuracy_percent(model, x_test, y_test)


def classifier_record(
    model: nn.Module, dataset: str, *, test_accuracy: float, data_digest: str, **extra: Any
) -> dict[str, Any]:
    """The dict stored in a classifier file (tensors moved to the CPU)."""
    arch = next((name for name, cls in ARCHITECTURES.items() if type(model) is cls), None)
    if arch is None:
        raise ValueError(f"not an evaluation classifier: {type(model).__name__}")
    # Stored in the standard (contiguous) layout whatever layout training used.
    state = {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()
    }
    return {
        "format": CLASSIFIER_FORMAT,
        "version": CLASSIFIER_VERSION,
        "dataset": dataset,
        "arch": arch,
        "num_classes": int(model.fc2.out_features),
        "channels": int(model.conv1.in_channels),
        "state_dict": state,
        "test_accuracy": float(test_accuracy),
        "data_digest": data_digest,
        **extra,
    }


def save_classifier(record: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a classifier record atomically (temp file in the same directory, then rename)."""
    return atomic_write(path, lambda f: torch.save(dict(record), f))


def read_classifier_record(path: str | os.PathLike[str], expected_dataset: str | None = None) -> dict[str, Any]:
    """Load and validate a classifier file; one-line ConfigError when it is missing, foreign or for another domain."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"classifier file {path} not found (create it with `hfgan eval fit-classifiers`)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign pickle, a truncated file, not a torch file at all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not a loadable classifier file ({reason[:160]})") from None
    if not isinstance(record, dict) or record.get("format") != CLASSIFIER_FORMAT:
        raise ConfigError(f"{path}: not an hfgan classifier file (format is not {CLASSIFIER_FORMAT!r})")
    if record.get("version") != CLASSIFIER_VERSION:
        raise ConfigError(
            f"{path}: classifier file version {record.get('version')!r} is not supported (expected "
            f"{CLASSIFIER_VERSION})"
        )
    if expected_dataset is not None and record.get("dataset") != expected_dataset:
        raise ConfigError(f"{path}: classifier was fitted on {record.get('dataset')!r}, not on {expected_dataset!r}")
    if record.get("arch") not in ARCHITECTURES:
        raise ConfigError(f"{path}: unknown classifier architecture {record.get('arch')!r}")
    if not isinstance(record.get("state_dict"), dict):
        raise ConfigError(f"{path}: classifier file has no state_dict")
    return record


def load_classifier(
    path: str | os.PathLike[str], expected_dataset: str | None, *, device: str | torch.device = "cpu"
) -> nn.Module:
    """The stored classifier as a module in eval mode on `device` (validated, see `read_classifier_record`)."""
    record = read_classifier_record(path, expected_dataset)
    num_classes = record.get("num_classes", 10)
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(f"{path}: bad num_classes {num_classes!r}")
    channels, image_size = record.get("channels", 1), record.get("image_size", 28)
    if channels not in (1, 3) or not isinstance(image_size, int) or image_size < 12:
        raise ConfigError(f"{path}: bad image shape (channels {channels!r}, image_size {image_size!r})")
    model = build_model(record["arch"], num_classes, channels, image_size)
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: classifier weights do not fit {record['arch']} ({first[:160]})") from None
    return fast_layout(model.to(device), device).eval()


def fit_classifiers(
    datasets: Mapping[str, tuple[Any, Any]],
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fit and store one scoring classifier per domain: `datasets` maps name -> (train set, test set).

    Files go to `<out_dir>/<name>.pt`. Returns per name: path, test_accuracy (percent), fit_s, data_digest.
    """
    out_dir = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    for name, (train_set, test_set) in datasets.items():
        x_train, y_train = as_tensors(train_set, f"{name} training set")
        x_test, y_test = as_tensors(test_set, f"{name} test set")

        def on_epoch(epoch: int, loss: float, _name: str = name) -> None:
            if log is not None:
                log(f"{_name}: epoch {epoch}/{epochs} loss {loss:.4f}")

        with Stopwatch() as sw:
            model, acc = fit_classifier(
                (x_train, y_train),
                (x_test, y_test),
                epochs=epochs,
                seed=seed,
                device=device,
                on_epoch=on_epoch,
                num_classes=int(y_train.max()) + 1,
            )
        digest = data_digest(x_train, y_train)
        record = classifier_record(
            model,
            name,
            test_accuracy=acc,
            data_digest=digest,
            epochs=int(epochs),
            seed=int(seed),
            train_samples=int(x_train.shape[0]),
            image_size=int(x_train.shape[-1]),
        )
        path = save_classifier(record, out_dir / f"{name}.pt")
        results[name] = {"path": str(path), "test_accuracy": acc, "fit_s": sw.seconds, "data_digest": digest}
        if log is not None:
            log(f"{name}: test accuracy {acc:.2f}% in {sw.seconds:.1f} s -> {path}")
    return results
