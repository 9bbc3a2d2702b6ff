"""The image-folder source: ``train/<class>/<image>`` (and optionally ``test/...``) -> listing CSV -> Parquet.

A user's images live under ``data.images_dir`` as ``train/<class>/<file>`` and
optionally ``test/<class>/<file>`` (any other folder there is refused, so that a
``val/`` is not left out unseen); files may sit in subfolders of a class
folder, and hidden names (starting with ``.``, or the files Windows Explorer writes and hides:
``Thumbs.db``, ``ehthumbs.db``, ``desktop.ini``) are ignored. Class names are the
train folder names; a class's index is its position in the sorted names.

The source is read in three steps, each one cheap to re-check:

1. :func:`scan_split` lists the files (no image is opened) in a fixed order, the
   SHA-256 of each path, which mixes classes so every shard sees all of them;
2. :func:`check_images` opens each file's header only (Pillow opens lazily) to
   refuse foreign formats and, without ``data.image_shape``, mixed sizes or modes;
3. :func:`images_to_parquet` decodes every image fully (a truncated file is an
   error, never a grey tail) into one Parquet file, one row group at a time.

The Parquet "image layout": ``label`` and ``file`` (strings) and ``pixels``, a
``fixed_size_binary(C*H*W)`` holding the image's bytes as channel planes, row
major (C, H, W) order, as PyTorch wants them; the key-value metadata
``image_shape`` is the JSON ``[C, H, W]``.

Which files are accepted, and how one is opened and decoded, is :mod:`pipeline.imagefile`;
how a listing's images are decoded on every core, :mod:`pipeline.imagedecode`.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.atomic import atomic_file
from pipeline.errors import DataError
from pipeline.imagefile import (
    ACCEPTED,
    CHANNELS,
    MODES,
    SUFFIXES,
    PillowWarnings,
    check_plain_mode,
    decode_image,
    describe,
    open_image,
    own_images,
)
from pipeline.pool import Workers

SPLITS = ("train", "test")
LISTING_HEADER = ["label", "file"]

# Headers to check before processes pay for starting (bench/decode.md), and headers per process piece.
CHECKS_IN_PROCESSES_FROM = 8192
CHECK_PIECE = 256


@dataclass(frozen=True)
class ImageEntry:
    """One image of the source."""

    label: str  # class name (folder name)
    file: str  # path relative to images_dir, posix, e.g. "train/cat/a/001.png"
    key: str  # the path inside the class folder, e.g. "a/001.png": the identity hashed into splits


# ============================================================================ scanning


def _order(entry: ImageEntry) -> bytes:
    return hashlib.sha256(entry.file.encode("utf-8")).digest()


# Files Windows Explorer writes into a folder of pictures and hides from its owner (a refusal would
# name a file the user cannot see), and the folder of macOS metadata (._ files) that a ZIP made on a
# Mac holds at its top, which unpacks beside train/; the other systems' hidden files start with a dot.
_HIDDEN_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})
_VALIDATION_NAMES = frozenset({"val", "valid", "validation", "dev"})  # a split this source has no place for


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _HIDDEN_NAMES


def _visible_children(folder: Path) -> list[Path]:
    """The folder's entries without hidden ones, sorted so that errors do not depend on the filesystem."""
    try:
        return sorted(p for p in folder.iterdir() if not _hidden(p.name))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder: {exc.strerror or exc}") from None


def _not_a_link(folder: Path) -> None:
    """Refuse a folder reached through a symbolic link: DVC hashes ``data/user`` without going into
    one, so images added or changed there would not rerun the data stages (a linked file is hashed
    by its content and is fine)."""
    if folder.is_symlink():
        raise DataError(
            f"{folder}: a folder reached through a symbolic link (to {os.path.realpath(folder)}); DVC does "
            "not look inside one, so changes there would not rerun the data stages: make it a real folder"
        )


def _files_under(folder: Path) -> Iterator[Path]:
    """Every visible file below ``folder`` (which holds no linked folder, see :func:`_not_a_link`)."""
    for child in _visible_children(folder):
        if child.is_dir():
            _not_a_link(child)
            yield from _files_under(child)
        else:
            yield child


def _some(names: Sequence[str], limit: int = 10) -> str:
    """A list short enough for a one-line message."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _check_name(path: Path) -> None:
    """Refuse names the listing CSV and Parquet cannot hold as text (not UTF-8)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{path!r}: file name is not valid UTF-8; expected UTF-8 names") from None


def _scan_class(split: str, folder: Path) -> list[ImageEntry]:
    """The images of one class folder; any other file is refused."""
    entries = []
    for path in _files_under(folder):
        _check_name(path)
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: not an accepted image file; expected {ACCEPTED}")
        key = path.relative_to(folder).as_posix()
        entries.append(ImageEntry(label=folder.name, file=f"{split}/{folder.name}/{key}", key=key))
    if not entries:
        raise DataError(f"{folder}: class folder holds no images; expected at least one {ACCEPTED} file")
    return entries


def scan_split(images_dir: Path, split: str, known_classes: Sequence[str] | None = None) -> list[ImageEntry]:
    """List ``images_dir/split/<class>/...`` ordered by the SHA-256 of each path; no image is opened.

    The hash order is a fixed shuffle: it does not depend on the file system or on when files were
    added, so the same folder always gives the same Parquet file.

    Args:
        images_dir: the folder holding ``train/`` and, optionally, ``test/``.
        split: ``train`` or ``test``; ``test`` may be absent (then ``[]``).
        known_classes: the train classes; a test class folder not among them is refused.

    Returns:
        One entry (label, path relative to ``images_dir``) per image file.

    Raises:
        DataError: the folder or the split is missing, the split holds no class folders or a file
            outside one, or a test class is not a train class.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        found = "a file" if images_dir.exists() else "nothing"
        raise DataError(
            f"{images_dir}: expected the images folder, with train/<class>/<image> inside it, found {found}"
        )
    others = _other_folders(images_dir) if split == "train" else []
    root = images_dir / split
    if split == "test" and not (root.exists() or root.is_symlink()):
        return []
    if not root.is_dir():
        found = "a file" if root.exists() else "nothing"
        raise DataError(
            f"{root}: expected a folder of class folders {split}/<class>/<image>, found {found}"
            + _in_place_of_train(images_dir, others)
        )
    if others:
        raise _beside_the_splits(images_dir, others[0])
    _not_a_link(root)
    entries: list[ImageEntry] = []
    for child in _visible_children(root):
        if not child.is_dir():
            raise DataError(
                f"{child}: file directly under {split}/; expected it in a class folder {split}/<class>/"
            )
        _not_a_link(child)
        if known_classes is not None and child.name not in known_classes:
            raise DataError(
                f"{child}: class {child.name!r} is not a train class; expected one of "
                f"{_some(sorted(known_classes))}"
            )
        entries += _scan_class(split, child)
    if not entries:
        raise DataError(f"{root}: no class folders; expected {split}/<class>/<image>")
    return sorted(entries, key=_order)


def _other_folders(images_dir: Path) -> list[Path]:
    """The visible folders beside ``train/`` and ``test/``: a ``val/`` (ImageNet's layout), class folders
    put straight into the images folder (torchvision's ``ImageFolder`` layout), or splits named
    otherwise (``training_set/``), which would otherwise be left out without a word. Files there (a
    README, a licence) are no split and stay allowed."""
    return [p for p in _visible_children(images_dir) if p.is_dir() and p.name not in SPLITS]


def _in_place_of_train(images_dir: Path, others: Sequence[Path]) -> str:
    """The likely fix when ``train/`` is missing and other folders are there ("" when none are)."""
    if not others:
        return ""
    if images_dir.name in SPLITS:  # data.images_dir names the train folder itself
        return (
            f"; {images_dir} is itself a {images_dir.name}/ folder: set data.images_dir to the folder "
            f"that holds it, {images_dir.parent}"
        )
    return (
        f"; {images_dir} holds {_some([p.name for p in others])}: rename or move them so that it holds "
        "train/<class>/ (and optionally test/<class>/)"
    )


def _beside_the_splits(images_dir: Path, odd: Path) -> DataError:
    """A folder beside ``train/`` and ``test/``, refused with its likely fix."""
    fix = (
        "rename it test/ to test on it, or merge it into train/ and set data.val_fraction "
        "(the validation split is held out of train)"
        if odd.name.lower() in _VALIDATION_NAMES
        else "move it out (class folders go in train/<class>/ and test/<class>/)"
    )
    return DataError(f"{odd}: expected only train/ and test/ in {images_dir}, found {odd.name}/; {fix}")


def class_names(entries: Sequence[ImageEntry]) -> list[str]:
    """The distinct labels, sorted: a class's index is its position here."""
    return sorted({e.label for e in entries})


def scan_splits(images_dir: Path) -> tuple[list[ImageEntry], list[ImageEntry]]:
    """Both splits (:func:`scan_split`); train must hold at least two classes.

    One class folder is a layout mistake (``train/all/*.png``) rather than a dataset: a classifier
    of one class learns nothing, and its test accuracy would read 1.0.
    """
    train = scan_split(images_dir, "train")
    names = class_names(train)
    if len(names) < 2:
        raise DataError(
            f"{Path(images_dir) / 'train'}: holds one class folder, {names[0]!r}; expected a folder per "
            "class, at least 2 (train/<class>/<image>)"
        )
    return train, scan_split(images_dir, "test", names)


# ============================================================================ checking headers


def _resolve_shape(image_shape: Sequence[int], where: str) -> tuple[int, int, int]:
    """Validate a ``[C, H, W]`` (C 1 or 3, H and W positive); ``where`` names its source in the error."""
    shape = tuple(image_shape)
    if (
        len(shape) != 3
        or shape[0] not in MODES
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise DataError(
            f"{where}: expected [C, H, W] with C 1 (grey) or 3 (RGB), the channels of an image, and H, W "
            f"positive, found {list(image_shape)}"
        )
    return shape  # type: ignore[return-value]


def check_images(
    images_dir: Path,
    entries: Sequence[ImageEntry],
    image_shape: tuple[int, int, int] | None,
    workers: int = 1,
) -> tuple[int, int, int]:
    """Read every image's header; return the (C, H, W) the Parquet file will hold.

    Opening a header is mostly Python (Pillow's plugins parse it), so from
    :data:`CHECKS_IN_PROCESSES_FROM` images ``workers`` processes share them
    (:class:`pipeline.pool.Workers`), :data:`CHECK_PIECE` a piece; each hands back the Pillow
    warnings it met, said here once per file. Either way the first failing image in listing order
    is named.

    Args:
        images_dir: the folder the entries' paths are relative to.
        entries: the images, as :func:`scan_split` lists them.
        image_shape: ``data.image_shape``; with it any readable image will do (it will be
            converted); without, all must share the first one's size and mode, "L" or "RGB".
        workers: processes that may share the checks (``prep.workers``, resolved).

    Returns:
        The (C, H, W) of every row.

    Raises:
        DataError: an image cannot be opened, or differs from the first (without ``image_shape``);
            the message names the file.
    """
    images_dir = Path(images_dir)
    said = PillowWarnings()
    with own_images(said):
        shape, expected, first = _first_header(images_dir, entries, image_shape)
        rest = [str(images_dir / e.file) for e in entries[0 if expected is None else 1 :]]
        if workers <= 1 or len(entries) < CHECKS_IN_PROCESSES_FROM:
            _check_run(rest, expected, first)
            return shape
    pieces = (
        _Headers(tuple(rest[lo : lo + CHECK_PIECE]), expected, first)
        for lo in range(0, len(rest), CHECK_PIECE)
    )
    with Workers(workers, preload=(__name__,)) as pool:
        for held in pool.map(_check_piece, pieces):
            said.say_all(held)
    return shape


def _first_header(
    images_dir: Path, entries: Sequence[ImageEntry], image_shape: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int], tuple[tuple[int, int], str] | None, str]:
    """The shape of every row, the (size, mode) every image must have (None: any, to be converted),
    and the first image's path, which a mismatch names."""
    if image_shape is not None:
        return _resolve_shape(image_shape, "data.image_shape"), None, ""
    if not entries:
        raise DataError(f"{images_dir}: no images to take the shape from; set data.image_shape")
    first = images_dir / entries[0].file
    with open_image(first) as im:
        check_plain_mode(first, im.mode)
        size, mode = im.size, im.mode
    return (CHANNELS[mode], size[1], size[0]), (size, mode), str(first)


def _check_run(paths: Sequence[str], expected: tuple[tuple[int, int], str] | None, first: str) -> None:
    """Open each header in turn (opening checks the format and bit depth), and compare its size and
    mode with ``expected``; the first that fails is raised."""
    for path in paths:
        with open_image(Path(path)) as im:
            if expected is not None and (im.size, im.mode) != expected:
                raise DataError(
                    f"{path}: image is {describe(im.size, im.mode)}, expected {describe(*expected)} "
                    f"as {first}; set data.image_shape to convert"
                )


@dataclass(frozen=True)
class _Headers:
    """Headers a worker process checks, and what they must match (small: sent to it)."""

    paths: tuple[str, ...]
    expected: tuple[tuple[int, int], str] | None
    first: str


def _check_piece(piece: _Headers) -> list[tuple[str, str]]:
    """Check a piece's headers; return the Pillow warnings met, (file, text) in order, for the
    process that gave the piece to say."""
    held = PillowWarnings(hold=True)
    with own_images(held):
        _check_run(piece.paths, piece.expected, piece.first)
    return held.held or []


# ============================================================================ the listing CSV


def write_listing(entries: Sequence[ImageEntry], out_csv: Path) -> None:
    """Write the ``label,file`` listing atomically (UTF-8, CSV quoting for awkward names)."""
    with atomic_file(out_csv) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(LISTING_HEADER)
        writer.writerows((e.label, e.file) for e in entries)


def _entry_from_row(row: list[str], at: str) -> ImageEntry:
    """One data row -> an entry; its path must be ``<split>/<label>/<key>`` inside images_dir."""
    if len(row) != 2:
        raise DataError(f"{at}: expected 2 values (label,file), found {len(row)}")
    label, file = row
    parts = PurePosixPath(file).parts
    if (
        len(parts) < 3
        or parts[0] not in SPLITS
        or parts[1] != label
        or file.startswith("/")
        or any(p in ("", ".", "..") for p in file.split("/"))
        or "\\" in file
    ):
        raise DataError(
            f"{at}: expected a file train/<label>/<path> or test/<label>/<path> with label "
            f"{label!r}, found {file!r}"
        )
    return ImageEntry(label=label, file=file, key="/".join(parts[2:]))


def read_listing(csv_path: Path) -> list[ImageEntry]:
    """Read a listing :func:`write_listing` wrote; refuse anything else, naming the row.

    Data rows are counted from 1 and named with their CSV record, the header's being 1 (a quoted
    newline does not start a record).
    """
    try:
        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, strict=True))
    except FileNotFoundError:
        raise DataError(f"{csv_path}: listing not found; expected a label,file CSV") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{csv_path}: byte {exc.start} is not UTF-8; expected a UTF-8 label,file CSV"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a valid CSV ({exc}); expected a label,file CSV") from None
    if not rows or rows[0] != LISTING_HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(f"{csv_path}: line 1 (header): expected label,file, found {found!r:.60}")
    # Data rows counted from 1, as the CSV stage counts them, with the CSV record they are
    return [
        _entry_from_row(row, f"{csv_path}: row {n} (record {n + 1})")
        for n, row in enumerate(rows[1:], start=1)
    ]


def image_shape_of(
    listing: Sequence[ImageEntry], images_dir: Path, image_shape: tuple[int, int, int] | None, where: str
) -> tuple[int, int, int]:
    """The shape the images of ``listing`` are stored in: ``image_shape``, or the first image's own."""
    if image_shape is not None:
        return _resolve_shape(image_shape, "image_shape")
    if not listing:
        raise DataError(
            f"{where}: listing is empty and data.image_shape is not set; expected one or the other"
        )
    with own_images():
        return decode_image(Path(images_dir) / listing[0].file, None).shape
