"""User datasets: a domain's own images by path and format, read and validated into `ImageSet`s.

Formats (`[[scenario.domains]]` with `path` and `format`; a relative path is relative to the data directory):

- `idx`: a directory holding `train-images-idx3-ubyte` / `train-labels-idx1-ubyte` and/or `t10k-images-idx3-ubyte` /
  `t10k-labels-idx1-ubyte` (each optionally `.gz`); images uint8 N x H x W (or N x H x W x C), labels uint8.
- `npz`: one `.npz` file with `x_train`, `y_train` and optionally `x_test`, `y_test` (read with pickles refused);
  images uint8 N x H x W or N x H x W x C (C = 1 or 3), labels of an integer type.
- `imagefolder`: a directory with one sub-directory per class of PNG/JPEG files (the torchvision ImageFolder
  layout; classes are the sorted directory names), or `train/` and `test/` directories each laid out so. Decoded with
  Pillow: all-grayscale data gives one channel, anything else is converted to RGB.

When the data has no test split, `test_fraction` holds out that share of every class (a seeded, stratified split,
the same on every machine). Every way the data can be wrong raises a one-line `ConfigError` naming the file: an
unreadable file, mixed image sizes, a class with no images, a label out of range, images and labels of different
counts, a test split given twice or missing.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ..config import ConfigError, DomainConfig
from .idx import parse_idx, read_raw
from .imageset import ImageSet

# Seed of the held-out split (fixed: the split is part of the dataset's definition, not of a run).
HOLDOUT_SEED = 20251202
MAX_CLASSES = 1000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA")


def resolve_path(path: str, data_dir: str | os.PathLike[str]) -> Path:
    """A user dataset's location: absolute as given, relative to the data directory otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(data_dir) / p


def _images_array(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8 [N, H, W] (grayscale) or [N, 3, H, W] (colour) from N x H x W or N x H x W x C (C = 1 or 3)."""
    if arr.dtype != np.uint8:
        raise ConfigError(f"bad dataset {where}: images must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 4 and arr.shape[3] in (1, 3):
        arr = arr[..., 0] if arr.shape[3] == 1 else np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    if arr.ndim not in (3, 4):
        raise ConfigError(
            f"bad dataset {where}: images must be N x H x W or N x H x W x C (C = 1 or 3), "
            f"got {'x'.join(map(str, arr.shape))}"
        )
    return arr


def _labels_array(arr: np.ndarray, n: int, where: str) -> np.ndarray:
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(
            f"bad dataset {where}: labels must be integers of one dimension, got {arr.dtype} "
            f"{'x'.join(map(str, arr.shape))}"
        )
    if arr.shape[0] != n:
        raise ConfigError(f"bad dataset {where}: {n} images but {arr.shape[0]} labels")
    if n == 0:
        raise ConfigError(f"bad dataset {where}: no samples")
    if int(arr.min()) < 0:
        raise ConfigError(f"bad dataset {where}: label {int(arr.min())} out of range (labels start at 0)")
    return arr.astype(np.int64)


def validate_splits(name: str, train: ImageSet, test: ImageSet) -> tuple[ImageSet, ImageSet]:
    """The checks every user dataset passes: one image shape, labels 0..K-1 with every class present in training."""
    if train.image_shape != test.image_shape:
        raise ConfigError(
            f"bad dataset {name}: training images are {_shape_text(train.image_shape)} but test images are "
            f"{_shape_text(test.image_shape)} (mixed image sizes)"
        )
    k = int(train.labels.max()) + 1
    if k > MAX_CLASSES:
        raise ConfigError(f"bad dataset {name}: label {k - 1} out of range (at most {MAX_CLASSES} classes)")
    counts = np.bincount(train.labels_numpy(), minlength=k)
    empty = [c for c in range(k) if counts[c] == 0]
    if empty:
        raise ConfigError(
            f"bad dataset {name}: class {empty[0]} has no images in the training split (labels 0..{k - 1})"
        )
    if int(test.labels.max()) >= k:
        raise ConfigError(
            f"bad dataset {name}: test label {int(test.labels.max())} out of range 0..{k - 1} (the training classes)"
        )
    return train, test


def _shape_text(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{h}x{w}x{c}"


def holdout_split(name: str, data: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet]:
    """(train, test): `fraction` of every class held out as the test set, by a seeded permutation per class."""
    labels = data.labels_numpy()
    rng = np.random.default_rng(HOLDOUT_SEED)
    test_idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(len(members) * fraction))
        test_idx.append(rng.permutation(members)[:take])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    if test_mask.all() or not test_mask.any():
        raise ConfigError(
            f"bad dataset {name}: test_fraction {fraction} of {len(labels)} samples leaves an empty "
            f"{'training' if test_mask.all() else 'test'} split"
        )
    return (
        data.subset(np.flatnonzero(~test_mask), name),
        data.subset(np.flatnonzero(test_mask), name),
    )


def _finish(dom: DomainConfig, where: Path, train: ImageSet, test: ImageSet | None) -> tuple[ImageSet, ImageSet]:
    """Apply the held-out split when there is no test set, then the common checks."""
    name = dom.dataset
    if test is None:
        if dom.test_fraction is None:
            raise ConfigError(f"dataset {name}: {where} has no test split; set test_fraction to hold one out")
        # Labels are checked before the split, so an empty class is reported as such and not as a split problem.
        validate_splits(name, train, train)
        train, test = holdout_split(name, train, dom.test_fraction)
    elif dom.test_fraction is not None:
        raise ConfigError(f"dataset {name}: {where} has a test split; test_fraction applies only when it has none")
    return validate_splits(name, train, test)


# ----------------------------------------------------------------------------------------------------------------
# The three formats


def _idx_pair(name: str, root: Path, split: str) -> ImageSet | None:
    files = {}
    for kind in ("images-idx3", "labels-idx1"):
        base = root / f"{split}-{kind}-ubyte"
        found = next((p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()), None)
        files[kind] = found
    if files["images-idx3"] is None and files["labels-idx1"] is None:
        return None
    missing = [f"{split}-{k}-ubyte" for k, p in files.items() if p is None]
    if missing:
        raise ConfigError(f"dataset {name}: {missing[0]}[.gz] missing under {root}")
    img_path, lab_path = files["images-idx3"], files["labels-idx1"]
    assert img_path is not None and lab_path is not None
    images = _images_array(parse_idx(read_raw(img_path).content, img_path), str(img_path))
    labels = _labels_array(parse_idx(read_raw(lab_path).content, lab_path), images.shape[0], str(lab_path))
    return ImageSet.from_numpy(name, images, labels)


def load_idx(dom: DomainConfig, root: Path) -> tuple[ImageSet, ImageSet]:
    if not root.is_dir():
        raise ConfigError(f"dataset {dom.dataset}: {root} is not a directory (format idx)")
    train = _idx_pair(dom.dataset, root, "train")
    test = _idx_pair(dom.dataset, root, "t10k")
    if train is None and test is None:
        raise ConfigError(f"dataset {dom.dataset}: no train-/t10k-images-idx3-ubyte[.gz] files under {root}")
    if train is None:
        # Only a test file (the KMNIST and NotMNIST test sets): it is the data to split.
        train, test = test, None
    assert train is not None
    return _finish(dom, root, train, test)


def load_npz(dom: DomainConfig, path: Path) -> tuple[ImageSet, ImageSet]:
    name = dom.dataset
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for key in ("x_train", "y_train"):
                if key not in keys:
                    raise ConfigError(f"dataset {name}: {path} has no {key} array (has: {', '.join(sorted(keys))})")
            if ("x_test" in keys) != ("y_test" in keys):
                raise ConfigError(f"dataset {name}: {path} needs both x_test and y_test, or neither")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in keys}
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"dataset {name}: {path} not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"dataset {name}: cannot read {path} as .npz ({reason[:160]})") from None

    def split(x: str, y: str) -> ImageSet:
        images = _images_array(arrays[x], f"{path}:{x}")
        labels = _labels_array(arrays[y], images.shape[0], f"{path}:{y}")
        return ImageSet.from_numpy(name, images, labels)

    train = split("x_train", "y_train")
    test = split("x_test", "y_test") if "x_test" in arrays else None
    return _finish(dom, path, train, test)


def _class_dirs(name: str, root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ConfigError(f"dataset {name}: no class directories under {root} (format imagefolder)")
    return dirs


def _image_files(name: str, class_dir: Path) -> list[Path]:
    files = sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ConfigError(f"dataset {name}: class {class_dir.name!r} has no images ({class_dir})")
    return files


def _decode(name: str, path: Path) -> tuple[np.ndarray, bool]:
    """(uint8 H x W or H x W x 3 array, is grayscale) of one image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            gray = img.mode in GRAY_MODES
            arr = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"dataset {name}: unreadable image file {path} ({reason[:160]})") from None
    return arr, gray


def _read_tree(
    name: str, root: Path, classes: list[str] | None
) -> tuple[list[np.ndarray], list[bool], list[int], list[str]]:
    """Decoded images, their grayscale flags, labels and the class names of one ImageFolder tree."""
    dirs = _class_dirs(name, root)
    names = [d.name for d in dirs]
    if classes is not None:
        extra = [n for n in names if n not in classes]
        if extra:
            raise ConfigError(f"dataset {name}: test class {extra[0]!r} has no training images ({root / extra[0]})")
    index = {n: i for i, n in enumerate(classes if classes is not None else names)}
    images: list[np.ndarray] = []
    grays: list[bool] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, int]] | None = None
    for d in dirs:
        for f in _image_files(name, d):
            arr, gray = _decode(name, f)
            size = (arr.shape[0], arr.shape[1])
            if first is None:
                first = (f, size)
            elif size != first[1]:
                raise ConfigError(
                    f"dataset {name}: mixed image sizes: {f} is {size[1]}x{size[0]} but {first[0]} is "
                    f"{first[1][1]}x{first[1][0]}"
                )
            images.append(arr)
            grays.append(gray)
            labels.append(index[d.name])
    return images, grays, labels, names


def _stack(name: str, images: list[np.ndarray], labels: list[int], gray: bool) -> ImageSet:
    if gray:
        arr = np.stack(images)
    else:
        # Grayscale files in a colour dataset: repeat the plane.
        arr = np.stack([a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in images])
        arr = np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    return ImageSet.from_numpy(name, arr, np.asarray(labels, dtype=np.int64))


def load_imagefolder(dom: DomainConfig, root: Path) -> tuple[ImageSet, ImageSet]:
    name = dom.dataset
    if not root.is_dir():
        raise ConfigError(f"dataset {name}: {root} is not a directory (format imagefolder)")
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    tr_img, tr_gray, tr_lab, classes = _read_tree(name, root / "train" if split_layout else root, None)
    te_img: list[np.ndarray] = []
    te_gray: list[bool] = []
    te_lab: list[int] = []
    if split_layout:
        te_img, te_gray, te_lab, _ = _read_tree(name, root / "test", classes)
        if te_img[0].shape[:2] != tr_img[0].shape[:2]:
            h, w = te_img[0].shape[:2]
            th, tw = tr_img[0].shape[:2]
            raise ConfigError(f"dataset {name}: mixed image sizes: test images are {w}x{h}, training images {tw}x{th}")
    gray = all(tr_gray) and all(te_gray)
    train = _stack(name, tr_img, tr_lab, gray)
    test = _stack(name, te_img, te_lab, gray) if split_layout else None
    return _finish(dom, root, train, test)


def load_user_dataset(dom: DomainConfig, data_dir: str | os.PathLike[str]) -> tuple[ImageSet, ImageSet]:
    """(train, test) of a user dataset domain (see the module docstring); a bad dataset raises ConfigError."""
    if dom.path is None:
        raise ValueError(f"domain {dom.dataset} is not a user dataset")
    path = resolve_path(dom.path, data_dir)
    if not path.exists():
        raise ConfigError(f"dataset {dom.dataset}: {path} not found")
    loaders = {"idx": load_idx, "npz": load_npz, "imagefolder": load_imagefolder}
    if dom.format not in loaders:
        raise ConfigError(f"dataset {dom.dataset}: unknown format {dom.format!r} (known: {', '.join(loaders)})")
    return loaders[dom.format](dom, path)


__all__ = ["HOLDOUT_SEED", "MAX_CLASSES", "holdout_split", "load_user_dataset", "resolve_path", "validate_splits"]
