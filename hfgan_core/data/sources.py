"""Dataset providers: the IDX datasets of a data directory (torchvision layout), verified by checksum.

Layout: `<data_dir>/<Name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` for Name in MNIST, FashionMNIST,
KMNIST and NotMNIST. When both the uncompressed file and the .gz exist, the uncompressed one is read (as
torchvision does after extracting).

Verification of one file:
- a .gz whose own sha256 is the original distribution's: verified;
- otherwise (a recompressed .gz, e.g. Debian's, or one this project rebuilt) or an uncompressed file: the sha256 of
  the decompressed IDX bytes is compared with the reference content hash where one is known;
- a known reference that does not match: `ConfigError("corrupt dataset file ... (sha256 mismatch)")`;
- no reference known: the file is checked for structure only (header, dims, size, labels 0..9) and reported as
  unverified.

Reference hashes: MNIST and FashionMNIST .gz sha256 of the original
distributions, whose md5 are the well-known ones), and the sha256 of their decompressed content computed from those
verified files. KMNIST: the sha256 of the original ROIS-CODH .gz files as listed by several independent public
dataset libraries (torchvision's prototype datasets among them; they agree, and their md5 counterparts are
torchvision's); no KMNIST copy was available offline to check them against, and no content hashes are known, so an
uncompressed or recompressed KMNIST file is structure-checked only. NotMNIST has no standard IDX distribution (the
reference code uses its own .pt file split 80/20): put IDX files made from it under `<data_dir>/NotMNIST/raw/` with
the same four names; they are structure-checked only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .idx import check_images, check_labels, parse_idx, read_raw
from .imageset import ImageSet
from .synthetic import VARIANTS, synthetic_colour_sets, synthetic_sets

REAL_DATASETS = ("MNIST", "FashionMNIST", "KMNIST", "NotMNIST")
SPLITS = ("train", "t10k")
KINDS = ("images-idx3", "labels-idx1")


def base_name(split: str, kind: str) -> str:
    return f"{split}-{kind}-ubyte"


@dataclass(frozen=True)
class FileRef:
    """Reference checksums of one file: of the original .gz and of its decompressed IDX bytes."""

    gz_sha256: str | None = None
    content_sha256: str | None = None
    count: int | None = None


# (split, kind) -> reference. Counts are the standard 60000 / 10000.
KNOWN_FILES: dict[str, dict[tuple[str, str], FileRef]] = {
    "MNIST": {
        ("train", "images-idx3"): FileRef(
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            60000,
        ),
        ("train", "labels-idx1"): FileRef(
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            60000,
        ),
        ("t10k", "images-idx3"): FileRef(
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            10000,
        ),
        ("t10k", "labels-idx1"): FileRef(
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            10000,
        ),
    },
    "FashionMNIST": {
        ("train", "images-idx3"): FileRef(
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            60000,
        ),
        ("train", "labels-idx1"): FileRef(
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            60000,
        ),
        ("t10k", "images-idx3"): FileRef(
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            10000,
        ),
        ("t10k", "labels-idx1"): FileRef(
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            10000,
        ),
    },
    "KMNIST": {
        ("train", "images-idx3"): FileRef(
            "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4", None, 60000
        ),
        ("train", "labels-idx1"): FileRef(
            "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17", None, 60000
        ),
        ("t10k", "images-idx3"): FileRef(
            "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5", None, 10000
        ),
        ("t10k", "labels-idx1"): FileRef(
            "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c", None, 10000
        ),
    },
    "NotMNIST": {},
}


def raw_dir(data_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(data_dir) / name / "raw"


def find_file(data_dir: str | os.PathLike[str], name: str, split: str, kind: str) -> Path | None:
    """The file to read for one (split, kind), uncompressed first, or None."""
    base = raw_dir(data_dir, name) / base_name(split, kind)
    for p in (base, base.with_name(base.name + ".gz")):
        if p.is_file():
            return p
    return None


@dataclass(frozen=True)
class FileCheck:
    path: Path
    verified: bool  # matched a reference checksum (False: structure only)
    how: str  # "original .gz sha256", "decompressed sha256", "structure only"


def read_verified(path: Path, ref: FileRef | None) -> tuple[np.ndarray, FileCheck]:
    """Read, verify against `ref` and parse one IDX file; a mismatch raises ConfigError (sha256 mismatch)."""
    raw = read_raw(path)
    check: FileCheck
    if ref is not None and raw.compressed and ref.gz_sha256 and raw.stored_sha256() == ref.gz_sha256:
        check = FileCheck(path, True, "original .gz sha256")
    elif ref is not None and ref.content_sha256:
        if raw.content_sha256() != ref.content_sha256:
            raise ConfigError(f"corrupt dataset file {path} (sha256 mismatch)")
        check = FileCheck(path, True, "decompressed sha256")
    elif ref is not None and ref.gz_sha256 and raw.compressed:
        # Only the original .gz is known (KMNIST): any other .gz is not the standard file.
        raise ConfigError(f"corrupt dataset file {path} (sha256 mismatch)")
    else:
        check = FileCheck(path, False, "structure only")
    arr = parse_idx(raw.content, path)
    if ref is not None and ref.count is not None and arr.shape[:1] != (ref.count,):
        raise ConfigError(f"corrupt dataset file {path}: {arr.shape[0] if arr.ndim else 0} items, expected {ref.count}")
    return arr, check


def _ref(name: str, split: str, kind: str) -> FileRef | None:
    return KNOWN_FILES.get(name, {}).get((split, kind))


def load_split_checked(data_dir: str | os.PathLike[str], name: str, train: bool) -> tuple[ImageSet, list[FileCheck]]:
    """Load one split of a real dataset with its file checks; a missing file raises FileNotFoundError."""
    if name not in REAL_DATASETS:
        raise ConfigError(f"unknown dataset {name!r} (known: {', '.join(REAL_DATASETS)})")
    split = "train" if train else "t10k"
    arrays = []
    checks = []
    for kind in KINDS:
        path = find_file(data_dir, name, split, kind)
        if path is None:
            raise FileNotFoundError(f"{name}: {base_name(split, kind)}[.gz] not found under {raw_dir(data_dir, name)}")
        arr, chk = read_verified(path, _ref(name, split, kind))
        arrays.append(arr)
        checks.append(chk)
    images = check_images(arrays[0], checks[0].path)
    labels = check_labels(arrays[1], checks[1].path)
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"corrupt dataset {name} ({split}): {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ConfigError(f"corrupt dataset {name} ({split}): no samples")
    return ImageSet.from_numpy(name, images, labels), checks


def load_split(data_dir: str | os.PathLike[str], name: str, train: bool) -> ImageSet:
    return load_split_checked(data_dir, name, train)[0]


def missing_files(data_dir: str | os.PathLike[str], name: str) -> list[str]:
    """Base names of the standard files that are absent (neither raw nor .gz)."""
    return [base_name(s, k) for s in SPLITS for k in KINDS if find_file(data_dir, name, s, k) is None]


def is_present(data_dir: str | os.PathLike[str], name: str) -> bool:
    """All four files exist (not checked)."""
    return not missing_files(data_dir, name)


@dataclass(frozen=True)
class DatasetStatus:
    """What `hfgan data check` reports for one dataset."""

    name: str
    path: str
    found: bool  # all four files present
    verified: bool  # every file matched a reference checksum
    detail: str
    corrupt: bool = False  # present but unreadable or with a checksum mismatch


def check_dataset(data_dir: str | os.PathLike[str], name: str) -> DatasetStatus:
    """Read and verify all four files of one dataset."""
    where = str(raw_dir(data_dir, name))
    missing = missing_files(data_dir, name)
    if len(missing) == len(SPLITS) * len(KINDS):
        return DatasetStatus(name, where, False, False, "not found")
    if missing:
        return DatasetStatus(name, where, False, False, f"incomplete: missing {', '.join(missing)}", corrupt=True)
    try:
        train, checks_train = load_split_checked(data_dir, name, True)
        test, checks_test = load_split_checked(data_dir, name, False)
    except ConfigError as exc:
        return DatasetStatus(name, where, True, False, str(exc), corrupt=True)
    checks = checks_train + checks_test
    verified = all(c.verified for c in checks)
    hows = sorted({c.how for c in checks})
    detail = f"{len(train)} train / {len(test)} test; {', '.join(hows)}"
    if not verified:
        detail += " (no reference checksum known)"
    return DatasetStatus(name, where, True, verified, detail)


def check(data_dir: str | os.PathLike[str]) -> list[DatasetStatus]:
    """The status of every dataset (the synthetic one is always available)."""
    out = [check_dataset(data_dir, name) for name in REAL_DATASETS]
    out.append(DatasetStatus("synthetic", "(generated)", True, True, "deterministic, needs no files"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Choosing a dataset for a domain, with the synthetic fallback


@dataclass(frozen=True)
class DomainData:
    """The train and test split used for one domain, and a notice when it is a substitute."""

    domain: str
    train: ImageSet
    test: ImageSet
    source: str  # the directory read, or "synthetic"
    notice: str | None = None


def load_domain(
    name: str,
    data_dir: str | os.PathLike[str],
    synthetic_train_per_class: int = 600,
    allow_synthetic_fallback: bool = False,
    log: Callable[[str], None] | None = None,
) -> DomainData:
    """Load a domain's dataset; a missing real dataset becomes synthetic data when allowed (with a notice).

    A dataset that is present but corrupt is never replaced silently: that raises ConfigError.
    """
    if name == "synthetic":
        train, test = synthetic_sets(synthetic_train_per_class, VARIANTS["synthetic"], "synthetic")
        return DomainData(name, train, test, "synthetic")
    if name == "synthetic-colour":
        train, test = synthetic_colour_sets(synthetic_train_per_class, name)
        return DomainData(name, train, test, "synthetic")
    if name not in REAL_DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r} (known: {', '.join((*REAL_DATASETS, 'synthetic', 'synthetic-colour'))})"
        )
    where = raw_dir(data_dir, name)
    missing = missing_files(data_dir, name)
    if not missing:
        train = load_split(data_dir, name, True)
        test = load_split(data_dir, name, False)
        return DomainData(name, train, test, str(where))
    if len(missing) < len(SPLITS) * len(KINDS):
        raise ConfigError(f"dataset {name} is incomplete under {where}: missing {', '.join(missing)}")
    if not allow_synthetic_fallback:
        raise ConfigError(
            f"dataset {name} not found under {where} (run `hfgan data prepare` or allow the synthetic fallback)"
        )
    notice = f"{name} not available under {where}: using the synthetic dataset (variant {VARIANTS[name]}) instead"
    if log is not None:
        log(notice)
    train, test = synthetic_sets(synthetic_train_per_class, VARIANTS[name], f"synthetic-for-{name}")
    return DomainData(name, train, test, "synthetic", notice)


__all__ = [
    "KNOWN_FILES",
    "REAL_DATASETS",
    "DatasetStatus",
    "DomainData",
    "FileCheck",
    "FileRef",
    "check",
    "check_dataset",
    "find_file",
    "is_present",
    "load_domain",
    "load_split",
    "load_split_checked",
    "missing_files",
    "raw_dir",
    "read_verified",
]
