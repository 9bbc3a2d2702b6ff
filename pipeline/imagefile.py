"""One image file: which are accepted, and how one is opened (checked) and decoded into (C, H, W) uint8.

The image-folder source (:mod:`pipeline.images`) reads a user's files through this module, and
so does :mod:`trainer.predict`, so that an image classified from its file reaches the model as its
training images did.

Accepted files are those torchvision's ``ImageFolder`` loads: PNG, JPEG, BMP,
PPM/PGM, TIFF and WebP, by suffix (its ``IMG_EXTENSIONS``, any case) and by the
format Pillow detects, whichever of the six it is (a ``.png`` that holds a JPEG
is read as a JPEG). A file of several frames (a camera's MPO, which Pillow tells
apart from a JPEG; a multi-page TIFF; an animated WebP) gives its first frame,
as torchvision's loader takes it. With ``data.image_shape`` every image is
converted to "L" (1 channel) or "RGB" (3) and resized with Pillow's bilinear
filter, which antialiases when shrinking as torchvision's ``Resize`` does.
Images of more than 8 bits per channel are refused either way: Pillow's
conversion to 8 bits would clip them, not scale them. EXIF orientation is not
applied, as torchvision's ``ImageFolder`` does not apply it either. The images are
their owner's own files, so Pillow's decompression-bomb warning (from 89 million
pixels) is not printed; its error (from 179 million) refuses the image in one line.
Pillow's other warnings about a file (a TIFF tag past the file's end, corrupt EXIF) name no
file; here each becomes one ``warning:`` line that names it (:func:`own_images`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageMode, UnidentifiedImageError

from pipeline.errors import DataError

# torchvision's IMG_EXTENSIONS, what a user whose folder loads there expects to load here (its GIF
# is left out there too: a GIF holds a 256-colour palette, seldom a dataset's pixels).
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
ACCEPTED = "PNG, JPEG, BMP, PPM/PGM, TIFF or WebP (" + ", ".join(SUFFIXES) + ")"
MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode the pixels are stored in
CHANNELS = {mode: c for c, mode in MODES.items()}
_DETECTED = frozenset({"PNG", "JPEG", "MPO", "BMP", "PPM", "TIFF", "WEBP"})  # Pillow's names for them
# What a broken file makes Pillow raise while opening or decoding it (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)
_PILLOW = os.path.dirname(Image.__file__) + os.sep  # a warning raised in a file below this is Pillow's
NAMED_PER_WARNING = 10  # files named for one text of Pillow's warnings (own_images); the others are not

log = logging.getLogger(__name__)


_reading = threading.local()  # .path: the file this thread is opening or decoding (set by open_image)


class PillowWarnings:
    """Pillow's warnings as ``warning:`` lines naming their file: once per file and text, for the
    first :data:`NAMED_PER_WARNING` files of each text, then one line saying the others go unnamed."""

    def __init__(self, hold: bool = False) -> None:
        self._files: dict[str, set[str]] = {}  # a warning's text -> the files named for it
        self._lock = threading.Lock()  # decoding threads warn at once
        # hold: kept here as (file, text), in order, for another process to say (pipeline.imagedecode)
        self.held: list[tuple[str, str]] | None = [] if hold else None

    def say(self, path: Path, message: str) -> None:
        """Log Pillow's ``message`` about ``path``, unless said of it already or of ten files before."""
        with self._lock:
            files = self._files.setdefault(message, set())
            if str(path) in files or len(files) > NAMED_PER_WARNING:
                return
            files.add(str(path))
            if self.held is not None:  # as many as the other process may name, and one to count past them
                self.held.append((str(path), message))
                return
            last = len(files) > NAMED_PER_WARNING
        if last:
            log.warning(
                "%s", f"Pillow: {message}: said of over {NAMED_PER_WARNING} files, the others not named"
            )
        else:
            log.warning("%s", f"{path}: Pillow: {message}")

    def say_all(self, held: Iterable[tuple[str, str]]) -> None:
        """Say the (file, text) pairs another process held (``hold=True``), in their order."""
        for path, message in held:
            self.say(Path(path), message)


@contextlib.contextmanager
def own_images(pillow_warnings: PillowWarnings | None = None) -> Iterator[None]:
    """Pillow's warnings while these images are read: the decompression bomb's not printed, the others
    naming their file.

    The bomb warning is not printed because these are the user's own files, not a stranger's; its
    error, at twice the warning's pixel count, still refuses an image (:func:`open_image`). Pillow's
    other warnings about a file (``Tag data larger than file``, ``Corrupt EXIF data``) say nothing of
    which file, and Python prints each text once per process, with a line of Pillow's source: a user
    with thousands of photos could not find the one it meant. Raised while a thread opens or decodes a
    file, each is logged as ``warning: <file>: Pillow: <text>`` instead (``pillow_warnings`` counts
    them across blocks; by default each block counts its own). The warning filters and hook are
    process-global, so this is entered in the main thread, around any decoding threads.
    """
    named = pillow_warnings or PillowWarnings()
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def hook(message, category, filename, lineno, file=None, line=None):
            path = getattr(_reading, "path", None)
            if path is None or not str(filename).startswith(_PILLOW):
                return shown(message, category, filename, lineno, file, line)
            named.say(path, str(message))
            return None

        warnings.showwarning = hook
        warnings.filterwarnings("always", category=UserWarning, module=r"PIL\.")  # each file, not the first
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """Open an image lazily (header only), refusing unreadable files, foreign formats and more than
    8 bits; Pillow's warnings while it is open name ``path`` (:func:`own_images`)."""
    _reading.path = path
    try:
        with _opened_unnamed(path) as im:
            yield im
    finally:
        _reading.path = None


@contextlib.contextmanager
def _opened_unnamed(path: Path) -> Iterator[Image.Image]:
    """:func:`open_image`'s checks: each failure one :class:`DataError` line naming ``path``."""
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: Pillow cannot identify an image in this file; expected {ACCEPTED}"
        ) from None
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; expected the file the listing names") from None
    except Image.DecompressionBombError:
        raise DataError(
            f"{path}: image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, the most Pillow decodes "
            "(its guard against decompression bombs); expected a smaller image: downscale it first"
        ) from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: cannot open image: {exc}; expected a readable {ACCEPTED} file") from None
    with im:
        if im.format not in _DETECTED:
            raise DataError(f"{path}: image is {im.format}, expected {ACCEPTED}")
        if ImageMode.getmode(im.mode).typestr not in ("|u1", "|b1"):
            raise DataError(
                f"{path}: image mode {im.mode} has more than 8 bits per channel; expected 8 bits: scale "
                "it to 0..255 first (how its range maps to 8 bits, a shift or a window, is the data's choice)"
            )
        yield im


@functools.cache
def _converts(mode: str, target: str) -> bool:
    """Whether Pillow converts ``mode`` straight to ``target``, tried on one pixel. It cannot take
    every mode it reads straight to ``L``: a TIFF's CIE ``LAB`` goes through ``RGB``, as torchvision's
    loader (``RGB``, then ``Grayscale``) takes every image."""
    try:
        Image.new(mode, (1, 1)).convert(target)
    except ValueError:
        return False
    return True


def describe(size: tuple[int, int], mode: str) -> str:
    """An image's size and mode as a person says them: "32x24 RGB" (width x height)."""
    return f"{size[0]}x{size[1]} {mode}"


def check_plain_mode(path: Path, mode: str) -> None:
    """Without data.image_shape the pixels are taken as they are: only "L" and "RGB" are."""
    if mode not in CHANNELS:
        raise DataError(
            f"{path}: image mode is {mode}, expected L or RGB; set data.image_shape [C, H, W] to convert"
        )


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """A truncated image is an error while we decode, whatever another library set globally.

    Pillow has only this global switch; another thread that sets it True meanwhile is not guarded against.
    """
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def decode_image(path: Path, image_shape: tuple[int, int, int] | None) -> np.ndarray:
    """Decode one image fully into a (C, H, W) uint8 array.

    With ``image_shape`` the image is converted to its mode and resized to its
    H x W; with ``None`` it is kept as it is, and must then be "L" or "RGB".
    """
    with open_image(path) as im:
        if image_shape is None:
            check_plain_mode(path, im.mode)
        try:
            with strict_decoding():
                im.load()
            if image_shape is not None:
                channels, height, width = image_shape
                if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
                    im = im.convert("RGBA")  # Pillow's advice: straight to L/RGB it warns (same pixels)
                if im.mode != MODES[channels] and not _converts(im.mode, MODES[channels]):
                    im = im.convert("RGB")
                if im.mode != MODES[channels]:
                    im = im.convert(MODES[channels])
                if im.size != (width, height):
                    im = im.resize((width, height), Image.Resampling.BILINEAR)
        except _DECODE_ERRORS as exc:
            raise DataError(
                f"{path}: cannot decode image: {exc}; expected a complete {ACCEPTED} file"
            ) from None
        pixels = np.asarray(im, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
