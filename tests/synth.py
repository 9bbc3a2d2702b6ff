"""Tiny generated data for the tests: IDX gz files, dataset specs, CSVs, params files.

Everything here is deterministic (seeded) and small (a few hundred samples at
most), so tests stay fast and never need the network or the real datasets.
Import it from a test as ``import synth`` (pytest puts ``tests/`` on sys.path).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.idx import encode_idx
from pipeline.sources import DatasetSpec, IdxFile, SplitFiles
from pipeline.tabular import HEADER, NUM_PIXELS, PIXEL_COLUMNS_ZERO_BASED

REPO = Path(__file__).resolve().parents[1]

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# --------------------------------------------------------------------------- samples


def images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 28, 28] covering the whole 0..255 range (first image holds 0..255 in order)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    if n:
        out[0].reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    return out


def labels(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n] in 0..9, every class present when n >= 10."""
    rng = np.random.default_rng(seed + 1000)
    out = rng.integers(0, 10, size=n, dtype=np.uint8)
    out[: min(n, 10)] = np.arange(min(n, 10), dtype=np.uint8)
    return out


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [n, 28, 28]
    labels: np.ndarray  # uint8 [n]

    @property
    def pixels(self) -> np.ndarray:
        return self.images.reshape(len(self.images), NUM_PIXELS)


def split(n: int, seed: int = 0) -> Split:
    return Split(images(n, seed), labels(n, seed))


# --------------------------------------------------------------------------- IDX / gzip


def gz(data: bytes, level: int = 9, mtime: int = 0) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=mtime)


def idx_file(name: str, raw: bytes, shape: tuple[int, ...]) -> IdxFile:
    return IdxFile(name, hashlib.sha256(raw).hexdigest(), len(raw), tuple(shape))


@dataclass(frozen=True)
class SynthDataset:
    """A custom DatasetSpec plus the bytes each of its files must decompress to."""

    spec: DatasetSpec
    raw: dict[str, bytes]  # file name -> decompressed IDX bytes
    train: Split
    test: Split

    def gz(self, name: str, level: int = 9) -> bytes:
        return gz(self.raw[name], level)

    def write_folder(self, folder: Path, level: int = 9) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.raw:
            (folder / name).write_bytes(self.gz(name, level))
        return folder

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.spec.files]


def dataset(
    n_train: int = 120, n_test: int = 40, seed: int = 0, sources: tuple[str, ...] = (), name: str = "synth"
) -> SynthDataset:
    tr, te = split(n_train, seed), split(n_test, seed + 1)
    raw: dict[str, bytes] = {}
    splits = []
    for (img_name, lbl_name), s in zip(IDX_NAMES.values(), (tr, te)):
        img_raw, lbl_raw = encode_idx(s.images), encode_idx(s.labels)
        raw[img_name], raw[lbl_name] = img_raw, lbl_raw
        splits.append(
            SplitFiles(
                idx_file(img_name, img_raw, s.images.shape), idx_file(lbl_name, lbl_raw, s.labels.shape)
            )
        )
    spec = DatasetSpec(name, splits[0], splits[1], sources=tuple(sources))
    return SynthDataset(spec, raw, tr, te)


def spec_to_json(spec: DatasetSpec) -> str:
    def f(x: IdxFile) -> dict:
        return {"name": x.name, "sha256": x.sha256, "size": x.size, "shape": list(x.shape)}

    return json.dumps(
        {
            "name": spec.name,
            "sources": list(spec.sources),
            "train": [f(spec.train.images), f(spec.train.labels)],
            "test": [f(spec.test.images), f(spec.test.labels)],
        }
    )


def gzip_bomb(decompressed: int, chunk: int = 1 << 20) -> bytes:
    """A gzip stream of ``decompressed`` zero bytes, built without holding them in memory."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(chunk)
    parts = []
    left = decompressed
    while left:
        k = min(left, chunk)
        parts.append(c.compress(zeros[:k]))
        left -= k
    parts.append(c.flush())
    return b"".join(parts)


# --------------------------------------------------------------------------- CSV


def header_line(zero_based: bool = False) -> str:
    names = ("label", *PIXEL_COLUMNS_ZERO_BASED) if zero_based else HEADER
    return ",".join(names)


def csv_bytes(s: Split, *, zero_based: bool = False, newline: str = "\n", bom: bool = False) -> bytes:
    table = np.concatenate([s.labels[:, None], s.pixels], axis=1)
    lines = [header_line(zero_based)] + [",".join(map(str, row)) for row in table.tolist()]
    text = newline.join(lines) + newline
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("ascii")


def write_csv(path: Path, s: Split, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(csv_bytes(s, **kw))
    return path


def row_line(label: int | str, pixels: list | None = None) -> str:
    pixels = [0] * NUM_PIXELS if pixels is None else pixels
    return ",".join(map(str, [label, *pixels]))


# --------------------------------------------------------------------------- params


def params_yaml(**sections: dict) -> str:
    """A params.yaml with only the given sections/keys (the rest take their defaults)."""
    out = []
    for section, keys in sections.items():
        out.append(f"{section}:")
        for key, value in keys.items():
            out.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(out) + "\n"


def write_params(path: Path, **sections: dict) -> Path:
    path.write_text(params_yaml(**sections), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- subprocess


def run_stage(
    stage: str,
    *args: str | os.PathLike,
    cwd: Path,
    extra_path: list[Path] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<stage> ARGS`` in ``cwd`` with the repo importable."""
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path or [])] + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_stage_measured(
    stage: str,
    *args: str | os.PathLike,
    cwd: Path,
    timeout: float = 120,
) -> tuple[subprocess.CompletedProcess, int]:
    """Like :func:`run_stage`, also returning the stage process's own peak resident memory in bytes
    (Linux)."""
    from benchmarks.scale import run_module_measured

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return run_module_measured(
        f"stages.{stage}",
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        peak_file=cwd / ".peak_kib",
        timeout=timeout,
    )


def refused_fast_in_bounded_memory(
    call: Any, error: type[Exception], seconds: float = 2, max_bytes: int = 2 << 20
) -> Exception:
    """Run ``call()``, which must raise ``error`` within ``seconds`` while allocating at most
    ``max_bytes`` of Python memory (tracemalloc); return the error."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.monotonic()
    try:
        try:
            call()
        except error as exc:
            caught = exc
        else:
            raise AssertionError(f"{call} did not raise {error.__name__}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < seconds
    assert peak < max_bytes, f"peak Python allocation {peak} bytes"
    return caught


def write_wide_header(path: Path, columns: int, data_rows: int = 1) -> Path:
    """A CSV whose header has ``columns`` names (``label,x,x,...``), written in chunks, plus a few rows."""
    with open(path, "wb") as f:
        f.write(b"label")
        left = columns - 1
        block = b",x" * (1 << 20)
        while left:
            k = min(left, 1 << 20)
            f.write(block[: 2 * k])
            left -= k
        f.write(b"\n")
        for _ in range(data_rows):
            f.write((row_line(1) + "\n").encode())
    return path


def leftovers(folder: Path) -> list[str]:
    """Every path under ``folder`` (relative), to assert nothing half-written stayed behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# Pillow's warning for damaged_tiff's files, as pipeline.imagefile logs it after the file's name.
TIFF_TAG_WARNING = "Pillow: Metadata Warning, tag 296 had too many entries: 2, expected 1"


def damaged_tiff(path: Path, pixels: np.ndarray) -> Path:
    """A TIFF whose ResolutionUnit tag (296, one value) holds two: Pillow warns "Metadata Warning, tag
    296 had too many entries: 2, expected 1" and reads the pixels, every release from 10.0 (pyproject's
    floor) to 13.0. A tag claiming more bytes than the file holds, the damage used before, warned and
    read in 13.0 but could not be opened at all in 12.3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, tiffinfo={296: 2})  # inches
    data = bytearray(path.read_bytes())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    tags = [struct.unpack_from("<H", data, ifd + 2 + 12 * k)[0] for k in range(entries)]
    struct.pack_into("<I", data, ifd + 2 + 12 * tags.index(296) + 4, 2)  # the count; both shorts fit inline
    path.write_bytes(bytes(data))
    return path
