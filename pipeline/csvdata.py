"""The ``csv`` stage: IDX -> Kaggle-layout CSV, or the user's own CSV made canonical.

Canonical means header ``label,pixel1..pixelN``, LF line ends, no BOM; the labels
stay as the user wrote them (integers or class names). Values are checked by the
Parquet stage, which reads every cell anyway; the user's own CSV is also checked
here (``check_values``), so that a bad cell is reported against the user's file,
line and column name, not against the copy. The check parses the copy block by
block (:mod:`pipeline.csvblocks`), in memory bounded by the block size.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.atomic import atomic_file
from pipeline.csvblocks import Schema, parsed_blocks
from pipeline.csvcheck import BOM, MAX_HEADER_BYTES, check_header
from pipeline.errors import DataError, ParamsError
from pipeline.idx import decode_idx
from pipeline.tabular import INT_LABELS, LABEL, header, header_line, label_kind, resolve_shape

COPY_CHUNK = 1 << 20


def _read_idx_gz(path: Path) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read gzip IDX file: {exc}") from None
    return decode_idx(raw, str(path))


def idx_to_csv(images_gz: Path, labels_gz: Path, out_csv: Path) -> int:
    """Write one split of an IDX dataset as a canonical CSV, atomically.

    Args:
        images_gz: the gzipped IDX images file ([n, H, W] uint8).
        labels_gz: the gzipped IDX labels file ([n] uint8).
        out_csv: the CSV to write (``label,pixel1..pixelN``).

    Returns:
        The number of rows written.

    Raises:
        DataError: a file cannot be read or decoded, or the two disagree on the sample count.
    """
    images = _read_idx_gz(images_gz)
    labels = _read_idx_gz(labels_gz)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_gz}: expected uint8 images [n, H, W], found {images.dtype} {list(images.shape)}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_gz}: expected uint8 labels [n], found {labels.dtype} {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(f"{images_gz} has {len(images)} images but {labels_gz} has {len(labels)} labels")
    num_pixels = images.shape[1] * images.shape[2]
    table = np.concatenate([labels[:, None], images.reshape(len(images), num_pixels)], axis=1)
    frame = pl.DataFrame(table, schema=list(header(num_pixels)), orient="row")
    with atomic_file(out_csv) as tmp:
        frame.write_csv(tmp, line_terminator="\n")
    return len(frame)


def check_user_location(path: Path, folder: Path, key: str, where: str = "params.yaml") -> None:
    """Refuse a user CSV (or image folder) outside ``folder``.

    dvc.yaml tracks that folder, so edits to a file elsewhere would go unseen by ``dvc repro``.

    Args:
        path: the CSV or the image folder, as params.yaml names it.
        folder: the folder dvc.yaml tracks (``data/user``).
        key: the params.yaml key that names ``path``, for the message.
        where: the file the key is in, for the message.

    Raises:
        ParamsError: ``path`` is outside ``folder``, by name or through a symbolic link.
    """
    resolved = path.resolve()
    if resolved.is_relative_to(folder.resolve()):
        return
    what = "folder" if path.is_dir() else "file"
    # inside by name, not through links
    if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder)):
        if not path.is_symlink():
            fix = f"a folder on its way is a link: make it a real folder under {folder}/ holding a copy"
        elif what == "folder":
            fix = f"replace the link by a copy (rm {path} && cp -r {resolved} {path})"
        else:
            fix = f"replace the link by a copy (cp --remove-destination {resolved} {path})"
        raise ParamsError(
            f"{where}: {key}: {path} is a symbolic link to {resolved}, outside {folder}/, "
            f"the folder dvc.yaml tracks, so dvc repro would not notice when that {what} changes: {fix}"
        )
    raise ParamsError(
        f"{where}: {key}: {path} is outside {folder}/, the folder dvc.yaml tracks, so dvc repro would "
        f"not notice when the {what} changes: "
        f"copy it to {folder / path.name} and set {key}: {folder / path.name}"
    )


def _check_values(canonical_csv: Path, src: Path, names: list[str], labels: str) -> None:
    """Parse every cell of the canonical copy in blocks; a problem is told in ``src``'s words.

    The copy has the same lines as ``src`` (only line ends differ), so a row number in the copy
    is the row in ``src``, and ``names`` are the column names as the user's file spells them.
    """
    schema = Schema(len(names) - 1, labels)
    rows = sum(
        df.height
        for df in parsed_blocks(
            canonical_csv, len(header_line(schema.num_pixels)), schema, where=str(src), names=names
        )
    )
    if rows == 0:
        raise DataError(f"{src}: has a header but no data rows")


def check_test_classes(train_csv: Path, test_csv: Path, train_src: Path, test_src: Path) -> None:
    """Refuse a test row whose class name the train split lacks, at the user's own line.

    ``train_csv`` and ``test_csv`` are the canonical copies of ``train_src`` and ``test_src``, whose
    lines they keep one for one, so a copy's row is the user's row. For names only: a class has an
    index only if train has it, and ``tensorize`` would refuse the row later, naming its Parquet
    file. (A test class train lacks as an integer label has an index; ``tensorize`` notes it.)
    """

    def labels(path: Path) -> pl.LazyFrame:  # as text, blanks stripped: the names the Parquet file holds
        return pl.scan_csv(path, infer_schema=False).select(pl.col(LABEL).str.strip_chars())

    known = labels(train_csv).unique().collect().get_column(LABEL)
    unknown = (
        labels(test_csv)
        .with_row_index("row", offset=1)
        .filter(~pl.col(LABEL).is_in(known.implode()))
        .head(1)
        .collect()
    )
    if unknown.height:
        row, name = unknown.row(0)
        raise DataError(
            f"{test_src}: row {row} (line {row + 1}), column 1 (label): class {name!r} has no samples in "
            f"{train_src}, whose classes are {', '.join(sorted(known))}"[:400]
        )


def write_empty_csv(out_csv: Path, num_pixels: int) -> None:
    """A split with no rows (a source without a test split): just the canonical header."""
    with atomic_file(out_csv) as tmp:
        tmp.write_bytes(header_line(num_pixels))


def import_user_csv(
    src: Path, out_csv: Path, *, image_shape: tuple[int, int, int] | None = None, check_values: bool = False
) -> tuple[tuple[int, int, int], str]:
    """Copy the user's CSV with a canonical header and LF line ends, in bounded memory.

    The image shape is ``image_shape``, or one square grey channel inferred from the column
    count. With ``check_values`` every cell is checked too, and a problem is reported against
    ``src`` (its line, its own column name); nothing is written then.

    Args:
        src: the user's CSV (``label`` first, then the pixels, one row per image).
        out_csv: the canonical copy to write.
        image_shape: ``data.image_shape`` (None: infer a square grey image).
        check_values: check every cell here (labels, pixels 0..255) rather than in the Parquet stage.

    Returns:
        The image shape (C, H, W) and the label kind (``int`` or ``name``, from the first row).

    Raises:
        DataError: the header, the column count or (with ``check_values``) a cell is wrong; the
            message names the line and column of ``src``.
    """
    if not src.exists():
        raise DataError(
            f"{src}: file not found (data.dataset is csv; set data.train_csv / data.test_csv to your "
            "files, or data.test_csv to null to hold the test split out of train)"
        )
    if not src.is_file():
        raise DataError(f"{src}: expected a CSV file, found a directory or special file")
    try:
        with open(src, "rb") as f, atomic_file(out_csv) as tmp:
            with open(tmp, "wb") as out:
                line = f.readline(MAX_HEADER_BYTES + 1)
                if not line.strip(BOM + b" \r\n"):
                    raise DataError(f"{src}: file is empty; expected a header line label,pixel1..pixelN")
                names = check_header(line, str(src))  # also refuses a header longer than MAX_HEADER_BYTES
                shape = resolve_shape(image_shape, len(names) - 1, f"{src}: line 1 (header)")
                first = f.readline(MAX_HEADER_BYTES + 1)
                labels = label_kind(first.split(b",", 1)[0]) if first.strip() else INT_LABELS
                out.write(header_line(len(names) - 1))
                carry = b""
                block = first
                while block:
                    block = carry + block
                    # a CR at the end of a block may be half of a CRLF split across blocks
                    carry = b"\r" if block.endswith(b"\r") else b""
                    out.write(block[: len(block) - len(carry)].replace(b"\r\n", b"\n"))
                    block = f.read(COPY_CHUNK)
                if carry:
                    out.write(b"\n")
            if check_values:
                _check_values(tmp, src, names, labels)
    except OSError as exc:
        raise DataError(f"{src}: cannot copy to {out_csv}: {exc}") from None
    return shape, labels
