"""Test helpers: small user datasets written to disk in each supported format (IDX, .npz, ImageFolder of PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hfgan_core.data import write_idx
from hfgan_core.data.imageset import ImageSet


def hwc(pixels: np.ndarray) -> np.ndarray:
    """[N, H, W] stays; [N, C, H, W] -> [N, H, W, C] (the layout of .npz files and image files)."""
    return pixels if pixels.ndim == 3 else pixels.transpose(0, 2, 3, 1)


def write_png_folder(root: Path, split: ImageSet, classes: list[str] | None = None) -> Path:
    """One directory per class under `root`, one PNG per image (RGB or grayscale as the data is)."""
    from PIL import Image

    pixels = hwc(split.pixels.numpy())
    labels = split.labels.numpy()
    names = classes or [f"class_{k:02d}" for k in range(int(labels.max()) + 1)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(pixels, labels)):
        Image.fromarray(img, "L" if img.ndim == 2 else "RGB").save(root / names[lab] / f"{i:05d}.png")
    return root


def write_npz(path: Path, train: ImageSet, test: ImageSet | None = None) -> Path:
    arrays = {"x_train": hwc(train.pixels.numpy()), "y_train": train.labels.numpy().astype(np.uint8)}
    if test is not None:
        arrays.update(x_test=hwc(test.pixels.numpy()), y_test=test.labels.numpy().astype(np.uint8))
    np.savez(path, **arrays)
    return path


def write_idx_dir(root: Path, train: ImageSet | None, test: ImageSet | None, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, data in (("train", train), ("t10k", test)):
        if data is None:
            continue
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", hwc(data.pixels.numpy()))
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", data.labels.numpy().astype(np.uint8))
    return root
