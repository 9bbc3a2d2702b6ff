"""Block-wise CSV parsing: blocks are whole lines, only a genuine single over-long line takes the slow
path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import synth

from pipeline import csvblocks
from pipeline.errors import DataError
from pipeline.tabular import HEADER_LINE, INT_LABELS, NAME_LABELS


def _rows(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    table = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 784))], axis=1)
    return b"".join(b",".join(str(v).encode() for v in row) + b"\n" for row in table)


def test_blocks_are_whole_lines_and_only_a_single_long_line_is_taken_for_one(monkeypatch) -> None:
    size = 10_000
    monkeypatch.setattr(csvblocks, "BLOCK_BYTES", size)  # small blocks, so a few rows cross every boundary
    data = _rows(40)
    blocks = list(csvblocks._blocks(io.BytesIO(data), size))
    assert b"".join(blocks) == data and all(b.endswith(b"\n") for b in blocks)
    over = [b for b in blocks if len(b) > size]
    # blocks of many lines run a line over the block size: they are not "one hostile line"
    assert over and not any(csvblocks._one_long_line(b) for b in over)
    long_line = b"1," * (size // 2) + b"1\n"
    assert csvblocks._one_long_line(long_line)
    cut = data.index(b"\n", 3000) + 1
    spliced = data[:cut] + long_line + data[cut:]
    blocks = list(csvblocks._blocks(io.BytesIO(spliced), size))
    assert b"".join(blocks) == spliced
    # the hostile line is a block of its own, so explaining it copies none of its neighbours
    assert [b for b in blocks if csvblocks._one_long_line(b)] == [long_line]


def test_a_line_longer_than_any_row_is_refused_before_it_is_held_whole(tmp_path: Path, monkeypatch) -> None:
    """Memory stays bounded by the block size: a 4 MiB line of one "value" used to be read whole, twice."""
    monkeypatch.setattr(csvblocks, "BLOCK_BYTES", 10_000)
    schema = csvblocks.Schema(64)
    longest = 16 * 65 + (64 << 10)  # room for every value zero-padded, and a long class name
    assert schema.longest_line == longest
    header = b"label," + b",".join(b"p%d" % i for i in range(64)) + b"\n"
    path = tmp_path / "long.csv"
    path.write_bytes(header + b"0," + b"1," * 63 + b"1\n" + b"7" * (4 << 20) + b"\n")
    err = synth.refused_fast_in_bounded_memory(
        lambda: list(csvblocks.parsed_blocks(path, len(header), schema)), DataError, 60, 4 * longest
    )
    assert str(err) == (
        f"{path}: row 2 (line 3): longer than {longest:,} bytes, more than a label and 64 pixel values "
        "can take"
    )
    # Just under it, a row zero-padded to tens of thousands of digits is read (and is valid: label 0).
    path.write_bytes(header + b"0," + b"1," * 63 + b"1\n" + b"0" * (longest - 200) + b",1" * 64 + b"\n")
    assert sum(df.height for df in csvblocks.parsed_blocks(path, len(header), schema)) == 2


def test_parsed_blocks_speak_of_the_given_file_and_column_names(tmp_path: Path) -> None:
    body = _rows(30).split(b"\n")
    body[24] = body[24].rsplit(b",", 1)[0] + b",256"
    path = tmp_path / "copy.csv"
    path.write_bytes(HEADER_LINE + b"\n".join(body))
    names = ["label", *(f"pixel{i}" for i in range(784))]  # Kaggle's zero-based spelling
    with pytest.raises(DataError) as err:
        list(
            csvblocks.parsed_blocks(
                path, len(HEADER_LINE), csvblocks.Schema(784), where="user.csv", names=names
            )
        )
    assert str(err.value) == (
        "user.csv: row 25 (line 26), column 785 (pixel783): expected an integer 0..255, found 256"
    )
    good = tmp_path / "good.csv"
    good.write_bytes(HEADER_LINE + _rows(30))
    assert (
        sum(df.height for df in csvblocks.parsed_blocks(good, len(HEADER_LINE), csvblocks.Schema(784))) == 30
    )


def test_integer_labels_span_uint16_and_one_past_is_refused(tmp_path: Path) -> None:
    header = b"label,a,b,c,d\n"  # any pixel names, any square count
    path = tmp_path / "wide.csv"
    path.write_bytes(header + b"0,1,2,3,4\n10,0,0,0,0\n65535,255,255,255,255\n")
    [df] = list(csvblocks.parsed_blocks(path, len(header), csvblocks.Schema(4)))
    assert df.schema["label"] == pl.UInt16 and df["label"].to_list() == [0, 10, 65535]
    assert df.columns == ["label", "pixel1", "pixel2", "pixel3", "pixel4"]
    assert df.row(2) == (65535, 255, 255, 255, 255)
    path.write_bytes(header + b"0,1,2,3,4\n65536,0,0,0,0\n")
    with pytest.raises(DataError) as err:
        list(
            csvblocks.parsed_blocks(
                path, len(header), csvblocks.Schema(4), names=["label", "a", "b", "c", "d"]
            )
        )
    assert (
        str(err.value)
        == f"{path}: row 2 (line 3), column 1 (label): expected an integer 0..65535, found 65536"
    )


def test_class_name_labels_parse_as_strings_and_an_integer_among_them_is_refused(tmp_path: Path) -> None:
    header = b"label,p1,p2,p3,p4\n"
    path = tmp_path / "names.csv"
    path.write_bytes(header + b"cat,1,2,3,4\ndog,5,6,7,8\n")
    schema = csvblocks.Schema(4, NAME_LABELS)
    [df] = list(csvblocks.parsed_blocks(path, len(header), schema))
    assert df.schema["label"] == pl.String and df["label"].to_list() == ["cat", "dog"]
    assert df.row(1) == ("dog", 5, 6, 7, 8)
    path.write_bytes(header + b"cat,1,2,3,4\n7,5,6,7,8\n")
    with pytest.raises(DataError) as err:
        list(csvblocks.parsed_blocks(path, len(header), schema, names=["label", "p1", "p2", "p3", "p4"]))
    assert str(err.value) == (
        f"{path}: row 2 (line 3), column 1 (label): expected a class name like the first "
        f"row's, found the integer '7' (labels must not mix integers and names)"
    )


@pytest.mark.parametrize("labels", [NAME_LABELS, INT_LABELS])
@pytest.mark.parametrize("cell", [b"3.0", b"3.", b".5", b"1e3", b'"2.0"', b" -1.5E+2"])
def test_a_label_written_as_a_float_is_refused_with_the_fix(tmp_path: Path, labels: str, cell: bytes) -> None:
    """pandas writes integer labels as 3.0 once the column is float: neither an integer label nor a
    class name (a class '3.0' would be silently apart from class 3). Polars' check and the line-by-line
    one agree, so the message is the specific one, not Polars' own."""
    header = b"label,p1,p2,p3,p4\n"
    first = b"cat" if labels == NAME_LABELS else b"3"
    path = tmp_path / "floats.csv"
    path.write_bytes(header + first + b",1,2,3,4\n" + cell + b",5,6,7,8\n")
    schema = csvblocks.Schema(4, labels)
    with pytest.raises(DataError) as err:
        list(csvblocks.parsed_blocks(path, len(header), schema, names=["label", "p1", "p2", "p3", "p4"]))
    shown = repr((cell.replace(b'"', b"") if labels == NAME_LABELS else cell).decode())  # csv unquotes names
    assert str(err.value) == (
        f"{path}: row 2 (line 3), column 1 (label): expected an integer 0..65535 or a class name, found "
        f"the number {shown}; write integer labels without a decimal point (pandas: df['label'].astype(int))"
    )


@pytest.mark.parametrize("cell", [b"caf\xe9", b'"caf\xe9, noir"'])
def test_a_class_name_that_is_not_utf8_is_named_at_its_row(tmp_path: Path, cell: bytes) -> None:
    """A spreadsheet saved as Latin-1: the row and the fix, not Polars' bare 'invalid utf-8 sequence'."""
    header = b"label,p1,p2,p3,p4\n"
    path = tmp_path / "latin1.csv"
    path.write_bytes(header + b"cat,1,2,3,4\n" + cell + b",5,6,7,8\n")
    with pytest.raises(DataError) as err:
        list(csvblocks.parsed_blocks(path, len(header), csvblocks.Schema(4, NAME_LABELS)))
    shown = repr(cell.strip(b'"').decode("utf-8", "replace"))
    assert str(err.value) == (
        f"{path}: row 2 (line 3), column 1 (label): expected a class name in UTF-8, found {shown}; save the "
        "file as UTF-8"
    )


@pytest.mark.parametrize("labels", [NAME_LABELS, INT_LABELS])
@pytest.mark.parametrize("again", [b"label,p1,p2,p3,p4", b'\xef\xbb\xbf"label", p1,p2,p3,p4'])
def test_the_header_line_again_is_named_as_such(tmp_path: Path, labels: str, again: bytes) -> None:
    """`cat a.csv b.csv`, or pandas' to_csv(mode="a") with its header each time: the second header
    is named as a header, not as a label or pixel that is not a number."""
    header = b"label,p1,p2,p3,p4\n"
    first = b"cat" if labels == NAME_LABELS else b"3"
    path = tmp_path / "joined.csv"
    path.write_bytes(header + first + b",1,2,3,4\n" + again + b"\n" + first + b",5,6,7,8\n")
    with pytest.raises(DataError) as err:
        list(
            csvblocks.parsed_blocks(
                path, len(header), csvblocks.Schema(4, labels), names=["label", "p1", "p2", "p3", "p4"]
            )
        )
    assert str(err.value) == (
        f"{path}: row 2 (line 3): the header line again, where data was expected (files joined or "
        "appended to with their headers?); keep only the first header line"
    )
