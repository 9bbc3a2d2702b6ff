"""An image listing decoded on every core, batch by batch, each image into its own row.

The ``parquet`` stage decodes an image folder through :func:`decoded_batches`, one row group
at a time. How the work is shared out depends on the images (:func:`decode_plan`):

- **Threads** for images from 128x128 pixels: Pillow releases the GIL while it decodes and
  resizes, which is most of the time such an image takes.
- **Processes** for smaller ones (CIFAR-sized): opening a small file is mostly Python (Pillow's
  plugins parse the headers in Python), so threads only take turns on the GIL. The stage's
  process and ``prep.workers - 1`` workers (:class:`pipeline.pool.Workers`) each decode a piece
  of a few hundred images into a temporary file, which this process reads back into the batch,
  and return the Pillow warnings they met, which this process then says, once per file, as if it
  had decoded them itself.
- **One thread** for a listing too short to pay for starting the worker processes.

Whichever runs, the pixels never depend on it: every image goes into its own row, and a failing
image is named in listing order, as one thread would name it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, OutputError
from pipeline.imagefile import (
    MODES,
    PillowWarnings,
    decode_image,
    describe,
    open_image,
    own_images,
    strict_decoding,
)
from pipeline.images import ImageEntry
from pipeline.pool import Workers

# Images a decoding thread takes per task: a task per image cost a fifth of the decode time of small
# images, and 64 still spreads a batch evenly over the threads (bench/notes.md).
DECODE_CHUNK = 64
# From this many pixels in its first image (in listing order) a folder is decoded on threads; below
# it, opening a file is mostly Python, and threads taking turns on the GIL were slower than one
# (bench/notes.md), so processes decode it, from this many images (fewer did not pay for starting
# them: bench/decode.md):
THREADS_FROM_PIXELS = 128 * 128
PROCESSES_FROM_IMAGES = 4096
# Images per process piece, whose pixels cross to the stage's process through a file, and at most
# this many bytes of them, so memory and scratch files stay bounded by a few pieces per process.
PIECE_IMAGES = 256
PIECE_BYTES = 4 << 20


def _shape_text(shape: tuple[int, ...]) -> str:
    """A (C, H, W) as :func:`describe` says it."""
    return describe((shape[2], shape[1]), MODES[shape[0]])


def _decode_into(
    pixels: np.ndarray, i: int, path: Path, image_shape: tuple[int, int, int], convert: bool, first: Path
) -> None:
    image = decode_image(path, image_shape if convert else None)
    if image.shape != image_shape:
        raise DataError(
            f"{path}: image is {_shape_text(image.shape)}, expected "
            f"{_shape_text(image_shape)} as {first}; set data.image_shape to convert"
        )
    pixels[i] = image


def _decode_run(
    pixels: np.ndarray,
    lo: int,
    paths: Sequence[Path],
    image_shape: tuple[int, int, int],
    convert: bool,
    first: Path,
) -> None:
    """Decode ``paths`` into rows ``lo``, ``lo + 1``, ... of ``pixels``, stopping at the first that fails."""
    for i, path in enumerate(paths, start=lo):
        _decode_into(pixels, i, path, image_shape, convert, first)


@dataclass(frozen=True)
class Plan:
    """How a listing is decoded: on ``count`` threads of this process, or in ``count`` processes."""

    how: str  # "threads" or "processes"
    count: int


def decode_plan(
    entries: Sequence[ImageEntry],
    images_dir: Path,
    workers: int,
    pillow_warnings: PillowWarnings | None = None,
) -> Plan:
    """Threads where the first image (in listing order) has at least :data:`THREADS_FROM_PIXELS`
    pixels; processes for smaller ones, from :data:`PROCESSES_FROM_IMAGES` images; else one thread.
    Speed only: every image is decoded into its own row whatever the plan."""
    if workers <= 1 or not entries:
        return Plan("threads", 1)
    with own_images(pillow_warnings), open_image(Path(images_dir) / entries[0].file) as im:
        width, height = im.size
    if width * height >= THREADS_FROM_PIXELS:
        return Plan("threads", workers)
    return Plan("processes", workers) if len(entries) >= PROCESSES_FROM_IMAGES else Plan("threads", 1)


def decoded_batches(
    entries: Sequence[ImageEntry],
    images_dir: Path,
    image_shape: tuple[int, int, int],
    convert: bool,
    rows: int,
    workers: int = 1,
) -> Iterator[tuple[Sequence[ImageEntry], np.ndarray]]:
    """The images of ``entries`` decoded, ``rows`` at a time: (entries, uint8 pixels [k, C, H, W]).

    Without ``convert`` every image must already have ``image_shape`` (the first differing one is
    named). Up to ``workers`` threads or processes share the work (:func:`decode_plan`), each image
    into its own row, so the pixels never depend on the plan; a failing image is named in listing
    order, as one thread would name it.
    """
    images_dir = Path(images_dir)
    first = images_dir / entries[0].file if entries else images_dir
    pillow_warnings = PillowWarnings()  # counted over every batch
    plan = decode_plan(entries, images_dir, workers, pillow_warnings)
    decode = _in_processes if plan.how == "processes" else _in_threads
    yield from decode(entries, images_dir, image_shape, convert, rows, plan.count, first, pillow_warnings)


def _in_threads(
    entries: Sequence[ImageEntry],
    images_dir: Path,
    image_shape: tuple[int, int, int],
    convert: bool,
    rows: int,
    threads: int,
    first: Path,
    pillow_warnings: PillowWarnings,
) -> Iterator[tuple[Sequence[ImageEntry], np.ndarray]]:
    """:func:`decoded_batches` on ``threads`` threads, :data:`DECODE_CHUNK` images per task."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(entries), rows):
            batch = entries[start : start + rows]
            paths = [images_dir / e.file for e in batch]
            pixels = np.empty((len(batch), *image_shape), dtype=np.uint8)
            # Pillow's switches are global: set here, in this thread, while this batch's threads decode,
            # and not across the yield, where the caller's code runs.
            with own_images(pillow_warnings), strict_decoding():
                futures = [
                    pool.submit(
                        _decode_run, pixels, lo, paths[lo : lo + DECODE_CHUNK], image_shape, convert, first
                    )
                    for lo in range(0, len(batch), DECODE_CHUNK)
                ]
                try:
                    for future in futures:  # in order: the first failing image in the listing is reported
                        future.result()
                finally:  # after a failure, the chunks not started are dropped and the others end here
                    for future in futures:
                        future.cancel()
                    wait(futures)
            yield batch, pixels


@dataclass(frozen=True)
class _Piece:
    """Images a worker process decodes, and the file it writes their pixels to (small: sent to it)."""

    paths: tuple[str, ...]
    image_shape: tuple[int, int, int]
    convert: bool
    first: str
    out: str


def _decode_piece(piece: _Piece) -> list[tuple[str, str]]:
    """Decode a piece's images into its ``out`` file, rows in order, and return the Pillow warnings
    met on the way, (file, text) in order: the process that gave the piece says them, so each file
    is named once whichever process decoded it. The pixels go through a file, not back with the
    result: a result is sent through a pipe, and a worker stopped (Ctrl-C, out of memory) while it
    sends one larger than the pipe holds leaves ``concurrent.futures`` waiting for the rest forever."""
    pixels = np.empty((len(piece.paths), *piece.image_shape), dtype=np.uint8)
    held = PillowWarnings(hold=True)
    with own_images(held), strict_decoding():
        _decode_run(
            pixels, 0, [Path(p) for p in piece.paths], piece.image_shape, piece.convert, Path(piece.first)
        )
    try:
        pixels.tofile(piece.out)
    except OSError as exc:
        raise OutputError(f"{piece.out}: cannot write decoded pixels: {exc}") from None
    return held.held or []


def _scratch_folder() -> tempfile.TemporaryDirectory[str]:
    """The temporary folder the pieces' pixels pass through (``TMPDIR``, else the system's)."""
    try:
        return tempfile.TemporaryDirectory(prefix="decoded-")
    except OSError as exc:
        raise OutputError(
            f"{tempfile.gettempdir()}: cannot make a folder for decoded pixels: {exc}; expected a writable "
            "temporary folder (set TMPDIR)"
        ) from None


def _in_processes(
    entries: Sequence[ImageEntry],
    images_dir: Path,
    image_shape: tuple[int, int, int],
    convert: bool,
    rows: int,
    processes: int,
    first: Path,
    pillow_warnings: PillowWarnings,
) -> Iterator[tuple[Sequence[ImageEntry], np.ndarray]]:
    """:func:`decoded_batches` in ``processes`` processes (this one among them), pieces of at most
    :data:`PIECE_IMAGES` images and :data:`PIECE_BYTES` bytes of pixels, none across two batches.
    Each piece's pixels pass through a file of a temporary folder, read back and removed in turn, so
    the files alive at once are the few pieces :class:`pipeline.pool.Workers` draws ahead."""
    per_piece = max(1, min(PIECE_IMAGES, PIECE_BYTES // int(np.prod(image_shape))))
    spans = []  # (the batch's first and end row, the piece's first and end row) of every piece, in order
    for start in range(0, len(entries), rows):
        stop = min(start + rows, len(entries))
        spans += [(start, stop, lo, min(lo + per_piece, stop)) for lo in range(start, stop, per_piece)]
    with (
        _scratch_folder() as scratch,
        Workers(processes, preload=(__name__,)) as pool,
    ):

        def piece_file(n: int) -> str:
            return os.path.join(scratch, f"{n}.u8")

        pieces = (
            _Piece(
                tuple(str(images_dir / e.file) for e in entries[lo:end]),
                image_shape,
                convert,
                str(first),
                piece_file(n),
            )
            for n, (_, _, lo, end) in enumerate(spans)
        )
        results = pool.map(_decode_piece, pieces)  # each piece's Pillow warnings, in order
        for n, ((start, stop, lo, end), held) in enumerate(zip(spans, results, strict=True)):
            if lo == start:
                pixels = np.empty((stop - start, *image_shape), dtype=np.uint8)
            part = np.fromfile(piece_file(n), np.uint8).reshape(end - lo, *image_shape)
            pixels[lo - start : end - start] = part
            os.remove(piece_file(n))
            pillow_warnings.say_all(held)
            if end == stop:
                yield entries[start:stop], pixels
