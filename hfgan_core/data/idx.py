"""Reading and writing IDX files (the MNIST file format), raw or gzip-compressed, with strict validation.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one big-endian
uint32 per dimension, then the data in C order. Every way a file can be wrong (not gzip, truncated stream, bad
magic, wrong dims, payload of the wrong length) raises `ConfigError` with one line that names the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..fsutil import write_bytes_atomic

# IDX dtype codes; multi-byte types are big-endian on disk.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("=").str if dt.itemsize > 1 else dt.str: code for code, dt in _DTYPES.items()}

# A decompressed MNIST-family file is at most ~47 MB; this bound stops a gzip bomb in a data directory.
MAX_DECOMPRESSED_BYTES = 1 << 30


@dataclass(frozen=True)
class RawFile:
    """The bytes of one file as stored (`stored`) and after decompression (`content`)."""

    path: Path
    stored: bytes
    content: bytes

    @property
    def compressed(self) -> bool:
        return self.path.name.endswith(".gz")

    def stored_sha256(self) -> str:
        return hashlib.sha256(self.stored).hexdigest()

    def content_sha256(self) -> str:
        return self.stored_sha256() if not self.compressed else hashlib.sha256(self.content).hexdigest()


def gunzip(data: bytes, name: str | os.PathLike[str], limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """Decompress a gzip stream; a broken or truncated one raises ConfigError naming `name`."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(limit + 1)
    except EOFError:
        raise ConfigError(f"corrupt dataset file {name}: truncated gzip stream") from None
    except gzip.BadGzipFile as exc:
        raise ConfigError(f"corrupt dataset file {name}: not a valid gzip file ({exc})") from None
    except (zlib.error, OSError) as exc:
        raise ConfigError(f"corrupt dataset file {name}: broken gzip stream ({exc})") from None
    if len(out) > limit:
        raise ConfigError(f"corrupt dataset file {name}: decompresses to more than {limit} bytes")
    return out


def read_raw(path: str | os.PathLike[str]) -> RawFile:
    """Read a file and, if its name ends in .gz, decompress it."""
    p = Path(path)
    try:
        stored = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read dataset file {p}: {exc.strerror}") from None
    content = gunzip(stored, p) if p.name.endswith(".gz") else stored
    return RawFile(p, stored, content)


def parse_idx(content: bytes, name: str | os.PathLike[str]) -> np.ndarray:
    """Parse decompressed IDX bytes into an array (native byte order)."""
    if len(content) < 4:
        raise ConfigError(f"corrupt dataset file {name}: truncated IDX header ({len(content)} bytes)")
    zero0, zero1, code, ndim = content[0], content[1], content[2], content[3]
    if zero0 != 0 or zero1 != 0 or code not in _DTYPES or ndim == 0:
        raise ConfigError(f"corrupt dataset file {name}: bad IDX magic number 0x{content[:4].hex()}")
    header = 4 + 4 * ndim
    if len(content) < header:
        raise ConfigError(f"corrupt dataset file {name}: truncated IDX header ({len(content)} bytes)")
    dims = struct.unpack(f">{ndim}I", content[4:header])
    dtype = _DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(content) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes in"
        raise ConfigError(
            f"corrupt dataset file {name}: {what} IDX data ({got} bytes for dims {'x'.join(map(str, dims))})"
        )
    arr = np.frombuffer(content, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or .gz)."""
    raw = read_raw(path)
    return parse_idx(raw.content, raw.path)


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of an array (uint8, int8, int16, int32, float32 or float64)."""
    arr = np.ascontiguousarray(array)
    key = arr.dtype.newbyteorder("=").str if arr.dtype.itemsize > 1 else arr.dtype.str
    if key not in _CODES:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError("IDX needs between 1 and 255 dimensions")
    code = _CODES[key]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(_DTYPES[code], copy=False).tobytes()


def gzip_bytes(content: bytes) -> bytes:
    """Deterministic gzip (mtime 0, no file name) so rebuilt files are byte-identical between runs."""
    return gzip.compress(content, compresslevel=6, mtime=0)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write through a temporary file and rename, so a crash never leaves a half-written dataset file."""
    return write_bytes_atomic(path, data)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write an IDX file; gzip-compressed when the name ends in .gz."""
    content = encode_idx(array)
    return write_atomic(path, gzip_bytes(content) if str(path).endswith(".gz") else content)


def check_images(arr: np.ndarray, name: str | os.PathLike[str], size: int = 28) -> np.ndarray:
    """An image file must be uint8 [N, size, size]."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1:] != (size, size):
        raise ConfigError(
            f"corrupt dataset file {name}: expected uint8 images N x {size} x {size}, "
            f"got {arr.dtype} {'x'.join(map(str, arr.shape))}"
        )
    return arr


def check_labels(arr: np.ndarray, name: str | os.PathLike[str], num_classes: int = 10) -> np.ndarray:
    """A label file must be uint8 [N] with values below num_classes."""
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ConfigError(
            f"corrupt dataset file {name}: expected uint8 labels of one dimension, "
            f"got {arr.dtype} {'x'.join(map(str, arr.shape))}"
        )
    if arr.size and int(arr.max()) >= num_classes:
        raise ConfigError(f"corrupt dataset file {name}: label {int(arr.max())} outside 0..{num_classes - 1}")
    return arr


__all__ = [
    "MAX_DECOMPRESSED_BYTES",
    "RawFile",
    "check_images",
    "check_labels",
    "encode_idx",
    "gunzip",
    "gzip_bytes",
    "parse_idx",
    "read_idx",
    "read_raw",
    "write_atomic",
    "write_idx",
]
