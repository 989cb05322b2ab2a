"""What a run leaves on disk: sample grids (PNG), score plots, the per-round metrics log and atomic JSON files.

- PNGs are written by hand (8-bit grayscale, zlib + struct): no imaging library in the training loop.
- Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no display).
- `MetricsLog` appends one JSON object per round to `metrics.jsonl` (write + flush + fsync per line, so a crash
  loses at most the line being written, and a torn last line is cut off when the log is reopened) and mirrors the
  records to `metrics.csv`, whose columns are the union of the (flattened) keys seen so far.
- `write_json_atomic` writes a temp file in the same directory and renames it over the target.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..fsutil import write_bytes_atomic

# ----------------------------------------------------------------------------------------------------------------
# Atomic files


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data from tensors, numpy values, paths, tuples; non-finite floats become null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor | np.ndarray | np.generic):
        return to_jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write `obj` as strict JSON (see `to_jsonable`) atomically; used for summary.json and the like."""
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=False)
    return write_bytes_atomic(path, (text + "\n").encode())


# ----------------------------------------------------------------------------------------------------------------
# PNG


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png_gray(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a uint8 [H, W] array, or an RGB PNG of [H, W, 3] (filter type 0 on every row,
    zlib level 6)."""
    a = np.ascontiguousarray(pixels)
    colour = a.ndim == 3 and a.shape[2] == 3
    if a.dtype != np.uint8 or not (a.ndim == 2 or colour) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError("need a non-empty uint8 [H, W] or [H, W, 3] array")
    h, w = a.shape[:2]
    raw = np.empty((h, w * (3 if colour else 1) + 1), dtype=np.uint8)
    raw[:, 0] = 0  # filter byte: None
    raw[:, 1:] = a.reshape(h, -1)
    # 8-bit, grayscale (0) or truecolour (2), deflate, adaptive filters, no interlace
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if colour else 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 as torchvision's save_image does after denormalising: floor((x+1)/2*255 + 0.5)."""
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    return ((x + 1.0) * 0.5 * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).numpy()


def make_grid(images: torch.Tensor | np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile [N, 1, H, W] (or [N, H, W]) images in [-1, 1] into a uint8 [H', W'] grid, or [N, 3, H, W] images into
    a uint8 [H', W', 3] grid, `nrow` images per row (torchvision's make_grid layout: `padding` pixels around and
    between tiles)."""
    x = torch.as_tensor(images)
    if x.dim() == 4:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"need 1- or 3-channel images, got {x.shape[1]} channels")
        x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    if x.dim() not in (3, 4) or x.shape[0] == 0:
        raise ValueError(f"need a non-empty batch [N, C, H, W], got {list(x.shape)}")
    if nrow <= 0 or padding < 0:
        raise ValueError("nrow must be positive and padding non-negative")
    tiles = to_uint8(x)
    n, h, w = tiles.shape[:3]
    cols = min(nrow, n)
    rows = -(-n // cols)
    shape = (rows * (h + padding) + padding, cols * (w + padding) + padding, *tiles.shape[3:])
    grid = np.full(shape, pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0 = padding + r * (h + padding)
        x0 = padding + c * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = tiles[i]
    return grid


def save_sample_grid(
    images: torch.Tensor | np.ndarray, path: str | os.PathLike[str], nrow: int = 8, padding: int = 2
) -> Path:
    """Write a PNG grid of [N, C, H, W] images in [-1, 1] (C = 1 or 3; atomically); returns the path."""
    return write_bytes_atomic(path, encode_png_gray(make_grid(images, nrow=nrow, padding=padding)))


# ----------------------------------------------------------------------------------------------------------------
# Plots


def plot_scores(
    history: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "Generation score per round",
    ylabel: str = "generation score",
    ymin: float | None = 1.0,
    ymax: float | None = 10.0,
) -> Path:
    """One line per domain of (round, score) points, saved as a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for domain, points in history.items():
        pts = [(int(r), float(s)) for r, s in points if s is not None and math.isfinite(float(s))]
        if not pts:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=str(domain))
        drawn = True
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    # The generation score lies in [1, number of classes]; fixed limits make plots of different runs comparable.
    ax.set_ylim(bottom=ymin, top=ymax)
    if drawn:
        ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Metrics log


def flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (`generation_score.MNIST`); lists become JSON text (for the CSV mirror)."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_record(v, key + "."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v, separators=(",", ":"))
        else:
            out[key] = v
    return out


class MetricsLog:
    """Append-only per-round metrics: `<directory>/metrics.jsonl` (the record of truth) and `metrics.csv`.

    Reopening an existing log keeps its records (a resumed run appends to it); a torn last line is cut off.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, jsonl_name: str = "metrics.jsonl", csv_name: str = "metrics.csv"
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.directory / jsonl_name
        self.csv_path = self.directory / csv_name
        self._records: list[dict[str, Any]] = self._load_and_repair()
        self._columns: list[str] = []
        self._rewrite_csv()

    # -- reading

    @property
    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._records]

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """The complete records of a metrics.jsonl (a torn last line is ignored)."""
        p = Path(path)
        if not p.exists():
            return []
        out = []
        for line in p.read_bytes().split(b"\n"):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn line from a crash mid-write
        return out

    def _load_and_repair(self) -> list[dict[str, Any]]:
        if not self.jsonl_path.exists():
            return []
        data = self.jsonl_path.read_bytes()
        good_end = data.rfind(b"\n") + 1  # keep whole lines only
        records = []
        for i, line in enumerate(data[:good_end].split(b"\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{self.jsonl_path}: line {i} is not a JSON record") from None
        if good_end != len(data):
            with open(self.jsonl_path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return records

    # -- writing

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record (e.g. {"round": 3, "wall_s": ..., "generation_score": {"MNIST": 7.1}, ...})."""
        rec = to_jsonable(dict(record))
        line = json.dumps(rec, separators=(",", ":"), allow_nan=False) + "\n"
        with open(self.jsonl_path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        self._records.append(rec)
        flat = flatten_record(rec)
        if all(k in self._columns for k in flat):
            self._append_csv_row(flat)
        else:
            self._rewrite_csv()
        return rec

    def drop_after(self, round_: int, key: str = "round") -> int:
        """Remove records whose `key` is greater than `round_` (resuming from an earlier checkpoint); returns how
        many were dropped. Both files are rewritten atomically."""
        keep = [r for r in self._records if not (isinstance(r.get(key), int | float) and r[key] > round_)]
        dropped = len(self._records) - len(keep)
        if dropped:
            text = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in keep)
            write_bytes_atomic(self.jsonl_path, text.encode())
            self._records = keep
            self._rewrite_csv()
        return dropped

    def _column_order(self, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        cols: list[str] = []
        seen: set[str] = set()
        for row in rows:
            for k in row:
                if k not in seen:
                    seen.add(k)
                    cols.append(k)
        # `round` first when present, the rest in order of first appearance.
        return sorted(cols, key=lambda c: 0 if c == "round" else 1)

    def _rewrite_csv(self) -> None:
        rows = [flatten_record(r) for r in self._records]
        self._columns = self._column_order(rows)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic(self.csv_path, buf.getvalue().encode())

    def _append_csv_row(self, flat: Mapping[str, Any]) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self._columns, lineterminator="\n", restval="").writerow(flat)
        with open(self.csv_path, "ab") as f:
            f.write(buf.getvalue().encode())
            f.flush()
            os.fsync(f.fileno())
