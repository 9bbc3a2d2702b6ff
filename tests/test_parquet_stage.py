"""The `parquet` stage: strict CSV -> UInt16-label / UInt8-pixel Parquet; every violation named by file, row,
column."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import synth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.csvcheck import MAX_HEADER_BYTES, find_problem
from pipeline.errors import DataError
from pipeline.parquet import csv_to_parquet
from pipeline.tabular import HEADER, HEADER_LINE

MB = 1 << 20
N = 200


@pytest.fixture(scope="module")
def train() -> synth.Split:
    return synth.split(N, seed=11)


@pytest.fixture(scope="module")
def good(train) -> bytes:
    return synth.csv_bytes(train)


def convert(
    src: Path, out: Path, compression: str = "zstd", level: int | None = None, rgs: int = 65536
) -> int:
    return csv_to_parquet(src, out, compression=compression, compression_level=level, row_group_size=rgs)


def assert_table(out: Path, s: synth.Split) -> None:
    df = pl.read_parquet(out)
    assert df.columns == list(HEADER)  # canonical names, whatever the CSV called the pixels
    assert df.schema["label"] == pl.UInt16  # integer labels 0..65535
    assert set(df.drop("label").dtypes) == {pl.UInt8}
    np.testing.assert_array_equal(df.get_column("label").to_numpy(), s.labels)
    np.testing.assert_array_equal(df.drop("label").to_numpy(), s.pixels)


def mutate(data: bytes, row: int, col: int, value: bytes) -> bytes:
    """Replace cell ``col`` (0 = label) of data row ``row`` (1-based) in a CSV."""
    lines = data.split(b"\n")
    cells = lines[row].split(b",")
    cells[col] = value
    lines[row] = b",".join(cells)
    return b"\n".join(lines)


def with_line(data: bytes, row: int, line: bytes | None) -> bytes:
    """Replace data row ``row`` by ``line`` (or insert it before, when ``line`` starts with '+')."""
    lines = data.split(b"\n")
    lines[row] = line
    return b"\n".join(lines)


# ============================================================================ success


def test_converts_exactly(train, good, tmp_path):
    src = tmp_path / "train.csv"
    src.write_bytes(good)
    out = tmp_path / "pq" / "train.parquet"
    assert convert(src, out) == N
    assert_table(out, train)
    assert synth.leftovers(out.parent) == ["train.parquet"]


@pytest.mark.parametrize(
    "codec, stored",
    [
        ("zstd", "ZSTD"),
        ("snappy", "SNAPPY"),
        ("lz4", "LZ4"),
        ("gzip", "GZIP"),
        ("brotli", "BROTLI"),
        ("uncompressed", "UNCOMPRESSED"),
    ],
)
def test_codec_and_row_groups_from_params(train, good, tmp_path, codec, stored):
    src = tmp_path / "train.csv"
    src.write_bytes(good)
    out = tmp_path / "train.parquet"
    convert(src, out, compression=codec, rgs=64)
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == N
    assert meta.num_row_groups == math.ceil(N / 64)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [64, 64, 64, 8]
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {stored}
    assert_table(out, train)


@pytest.mark.parametrize("codec, level", [("zstd", 1), ("zstd", 19), ("gzip", 9), ("brotli", 0)])
def test_compression_level(train, good, tmp_path, codec, level):
    src = tmp_path / "train.csv"
    src.write_bytes(good)
    convert(src, tmp_path / "o.parquet", compression=codec, level=level)
    assert_table(tmp_path / "o.parquet", train)


@pytest.mark.parametrize(
    "variant",
    [
        dict(bom=True),
        dict(newline="\r\n"),
        dict(zero_based=True),
        dict(bom=True, newline="\r\n", zero_based=True),
    ],
    ids=["bom", "crlf", "pixel0..783", "all"],
)
def test_accepted_layout_variants(train, tmp_path, variant):
    src = synth.write_csv(tmp_path / "t.csv", train, **variant)
    assert convert(src, tmp_path / "o.parquet") == N
    assert_table(tmp_path / "o.parquet", train)


def test_quoted_and_spaced_header_names(train, good, tmp_path):
    head, rest = good.split(b"\n", 1)
    head = b",".join(b'"%s"' % n if i % 2 else b" %s" % n for i, n in enumerate(head.split(b",")))
    (tmp_path / "t.csv").write_bytes(head + b"\n" + rest)
    convert(tmp_path / "t.csv", tmp_path / "o.parquet")
    assert_table(tmp_path / "o.parquet", train)


@pytest.mark.parametrize(
    "cell, value",
    [
        (b"7", 7),
        (b" 7", 7),
        (b"\t7", 7),
        (b"+7", 7),
        (b"007", 7),
        (b'"7"', 7),
        (b'" 7"', 7),
        (b"255", 255),
        (b"0", 0),
        (b"-0", 0),
    ],
)
def test_integer_spellings_that_mean_the_same_value(good, tmp_path, cell, value):
    (tmp_path / "t.csv").write_bytes(mutate(good, 3, 400, cell))
    convert(tmp_path / "t.csv", tmp_path / "o.parquet")
    assert pl.read_parquet(tmp_path / "o.parquet").row(2)[400] == value
    assert (
        find_problem(mutate(good, 3, 400, cell).splitlines(keepends=True), "x") is None
    )  # the checker agrees


@pytest.mark.parametrize(
    "names",
    [
        lambda i: "pixelX" if i == 5 else f"pixel{i}",  # one pixel renamed
        lambda i: f"col_{784 - i}",  # other names, in an order unrelated to the canonical one
        lambda i: f"r{(i - 1) // 28}c{(i - 1) % 28}",
    ],
    ids=["one-renamed", "reversed-names", "row-col"],
)
def test_any_pixel_column_names_are_accepted_and_stored_canonically(train, good, tmp_path, names):
    """Pixel columns are read by position: other names arrive intact under pixel1..pixel784."""
    head = ",".join(["label", *(names(i) for i in range(1, 785))]).encode()
    (tmp_path / "t.csv").write_bytes(head + b"\n" + good.split(b"\n", 1)[1])
    assert convert(tmp_path / "t.csv", tmp_path / "o.parquet") == N
    assert_table(tmp_path / "o.parquet", train)


@pytest.mark.parametrize("label", [10, 255, 256, 65535])
def test_labels_past_9_up_to_65535_are_valid(good, tmp_path, label):
    (tmp_path / "t.csv").write_bytes(mutate(good, 7, 0, str(label).encode()))
    assert convert(tmp_path / "t.csv", tmp_path / "o.parquet") == N
    df = pl.read_parquet(tmp_path / "o.parquet")
    assert df.schema["label"] == pl.UInt16 and df.row(6)[0] == label


def test_class_name_labels_are_stored_as_strings(train, good, tmp_path):
    names = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    head, *rows = good.rstrip(b"\n").split(b"\n")
    rows = [names[int(r.split(b",", 1)[0])].encode() + b"," + r.split(b",", 1)[1] for r in rows]
    (tmp_path / "t.csv").write_bytes(b"\n".join([head, *rows]) + b"\n")
    assert convert(tmp_path / "t.csv", tmp_path / "o.parquet") == N
    df = pl.read_parquet(tmp_path / "o.parquet")
    assert df.columns == list(HEADER) and df.schema["label"] == pl.String
    assert df.get_column("label").to_list() == [names[v] for v in train.labels]
    np.testing.assert_array_equal(df.drop("label").to_numpy(), train.pixels)


def test_no_final_newline(train, good, tmp_path):
    (tmp_path / "t.csv").write_bytes(good.rstrip(b"\n"))
    assert convert(tmp_path / "t.csv", tmp_path / "o.parquet") == N


# ============================================================================ violations

PIX = "expected an integer 0..255, found"
LAB = "expected an integer 0..65535, found"
MIX = "(labels must not mix integers and names)"

CASES = [
    # id, make(good) -> bytes, expected message after "{file}: "
    (
        "wrong-header-name",
        lambda g: g.replace(b"label,", b"lbl,", 1),
        "line 1 (header), column 1: expected 'label', found 'lbl'",
    ),
    (
        "empty-header-name",
        lambda g: g.replace(b",pixel5,", b",,", 1),
        "line 1 (header), column 6: expected a column name, found an empty one",
    ),
    (
        "label-only-header",
        lambda g: b"label\n" + g.split(b"\n", 1)[1],
        "line 1 (header): expected label and at least one pixel column, found only 'label'",
    ),
    # the header decides the column count: rows then have one value too many
    (
        "wrong-header-count",
        lambda g: g.replace(b",pixel784\n", b"\n", 1),
        "row 1 (line 2): expected 784 values, found 785",
    ),
    ("value-256", lambda g: mutate(g, 5, 300, b"256"), f"row 5 (line 6), column 301 (pixel300): {PIX} 256"),
    ("value--1", lambda g: mutate(g, 5, 300, b"-1"), f"row 5 (line 6), column 301 (pixel300): {PIX} -1"),
    (
        "value-1000",
        lambda g: mutate(g, 199, 784, b"1000"),
        f"row 199 (line 200), column 785 (pixel784): {PIX} 1000",
    ),
    ("label-65536", lambda g: mutate(g, 7, 0, b"65536"), f"row 7 (line 8), column 1 (label): {LAB} 65536"),
    ("label--1", lambda g: mutate(g, 1, 0, b"-1"), f"row 1 (line 2), column 1 (label): {LAB} -1"),
    (
        "label-2**32",
        lambda g: mutate(g, N, 0, b"4294967296"),
        f"row {N} (line {N + 1}), column 1 (label): {LAB} 4294967296",
    ),
    (
        "name-label-after-int",
        lambda g: mutate(g, 7, 0, b"cat"),
        "row 7 (line 8), column 1 (label): expected an integer 0..65535 like the first row's, "
        f"found 'cat' {MIX}",
    ),
    (
        "empty-pixel",
        lambda g: mutate(g, 9, 784, b""),
        "row 9 (line 10), column 785 (pixel784): expected an integer 0..255, found an empty cell",
    ),
    (
        "empty-middle",
        lambda g: mutate(g, 9, 20, b""),
        "row 9 (line 10), column 21 (pixel20): expected an integer 0..255, found an empty cell",
    ),
    (
        "empty-label",
        lambda g: mutate(g, 2, 0, b""),
        "row 2 (line 3), column 1 (label): expected an integer 0..65535, found an empty cell",
    ),
    (
        "ragged-short",
        lambda g: with_line(g, 4, g.split(b"\n")[4].rsplit(b",", 1)[0]),
        "row 4 (line 5): expected 785 values, found 784",
    ),
    (
        "ragged-long",
        lambda g: with_line(g, 4, g.split(b"\n")[4] + b",7"),
        "row 4 (line 5): expected 785 values, found 786",
    ),
    ("ragged-one-cell", lambda g: with_line(g, 4, b"3"), "row 4 (line 5): expected 785 values, found 1"),
    ("non-numeric", lambda g: mutate(g, 3, 17, b"abc"), f"row 3 (line 4), column 18 (pixel17): {PIX} 'abc'"),
    (
        "float",
        lambda g: mutate(g, 3, 17, b"0.5"),  # a pixel scaled to 0..1, or 12.0 from a float column
        f"row 3 (line 4), column 18 (pixel17): {PIX} '0.5'; write pixels as integers 0..255 (pandas: "
        "df.round().astype(int), after * 255 if scaled to 0..1)",
    ),
    (
        "float-label",
        lambda g: mutate(g, 3, 0, b"1.0"),  # as pandas writes an integer label once the column is float
        "row 3 (line 4), column 1 (label): expected an integer 0..65535 or a class name, found the number "
        "'1.0'; write integer labels without a decimal point (pandas: df['label'].astype(int))",
    ),
    (
        "exponent",
        lambda g: mutate(g, 3, 17, b"1e2"),
        f"row 3 (line 4), column 18 (pixel17): {PIX} '1e2'; write pixels as integers 0..255 (pandas: "
        "df.round().astype(int), after * 255 if scaled to 0..1)",
    ),
    ("nan", lambda g: mutate(g, 3, 17, b"NaN"), f"row 3 (line 4), column 18 (pixel17): {PIX} 'NaN'"),
    (
        "trailing-space",
        lambda g: mutate(g, 6, 300, b"7 "),
        f"row 6 (line 7), column 301 (pixel300): {PIX} '7 '",
    ),
    (
        "nul-byte",
        lambda g: mutate(g, 6, 300, b"\x00"),
        f"row 6 (line 7), column 301 (pixel300): {PIX} '\\x00'",
    ),
    (
        "huge-number",
        lambda g: mutate(g, 6, 300, b"9" * 5000),
        f"row 6 (line 7), column 301 (pixel300): {PIX} '{'9' * 40}...'",
    ),
    (
        "int32-overflow",
        lambda g: mutate(g, 6, 300, b"2147483648"),
        f"row 6 (line 7), column 301 (pixel300): {PIX} 2147483648",
    ),
    ("blank-line", lambda g: with_line(g, 4, b""), "row 4 (line 5): empty line; expected 785 values"),
    (
        "unbalanced-quote",
        lambda g: mutate(g, 6, 300, b'"7'),
        f"row 6 (line 7), column 301 (pixel300): {PIX} '\"7'",
    ),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_violation_named_and_nothing_written(good, tmp_path, make, expected):
    src = tmp_path / "csv" / "train.csv"
    src.parent.mkdir()
    src.write_bytes(make(good))
    out = tmp_path / "parquet" / "train.parquet"
    with pytest.raises(DataError) as err:
        convert(src, out)
    assert str(err.value) == f"{src}: {expected}"
    assert not out.exists()
    assert synth.leftovers(out.parent) == []


def test_failure_keeps_the_previous_complete_output(train, good, tmp_path):
    src = tmp_path / "t.csv"
    src.write_bytes(good)
    out = tmp_path / "o.parquet"
    convert(src, out)
    before = out.read_bytes()
    src.write_bytes(mutate(good, 150, 5, b"300"))
    with pytest.raises(DataError, match="row 150"):
        convert(src, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.parquet", "t.csv"]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "file is empty; expected a header line label,pixel1..pixelN"),
        (b"\n\n", "file is empty; expected a header line label,pixel1..pixelN"),
        (HEADER_LINE, "has a header but no data rows"),
        (HEADER_LINE.rstrip(b"\n"), "has a header but no data rows"),
        (b"\xef\xbb\xbf" + HEADER_LINE.replace(b"\n", b"\r\n"), "has a header but no data rows"),
    ],
    ids=["empty", "blank-lines", "header-only", "header-no-newline", "bom-crlf-header-only"],
)
def test_empty_and_header_only(tmp_path, content, expected):
    src = tmp_path / "t.csv"
    src.write_bytes(content)
    out = tmp_path / "out" / "t.parquet"
    with pytest.raises(DataError) as err:
        convert(src, out)
    assert str(err.value) == f"{src}: {expected}"
    assert synth.leftovers(out.parent) == []


@pytest.mark.parametrize(
    "content",
    [HEADER_LINE, b"\xef\xbb\xbf" + HEADER_LINE.replace(b"\n", b"\r\n"), b"label,a,b,c\n"],
    ids=["header-only", "bom-crlf-header-only", "other-names"],
)
def test_header_only_is_an_empty_split_when_allowed(tmp_path, content):
    """A source without a test split: the empty test table becomes a Parquet file with no rows."""
    src = tmp_path / "t.csv"
    src.write_bytes(content)
    out = tmp_path / "out" / "t.parquet"
    assert (
        csv_to_parquet(
            src, out, compression="zstd", compression_level=None, row_group_size=64, allow_empty=True
        )
        == 0
    )
    df = pl.read_parquet(out)
    assert df.height == 0
    assert df.columns == ["label", *(f"pixel{i}" for i in range(1, len(content.split(b","))))]
    assert df.schema["label"] == pl.UInt16 and set(df.drop("label").dtypes) == {pl.UInt8}


def test_input_is_a_directory_or_missing(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    for src in (tmp_path / "dir.csv", tmp_path / "missing.csv"):
        with pytest.raises(DataError) as err:
            convert(src, tmp_path / "out" / "o.parquet")
        assert str(err.value).startswith(f"{src}: cannot read: ")
    assert synth.leftovers(tmp_path / "out") == []


def test_header_with_20_million_columns_fails_fast_in_bounded_memory(tmp_path):
    src = synth.write_wide_header(tmp_path / "wide.csv", 20_000_000)
    out = tmp_path / "out" / "o.parquet"
    # The header is ~40 MB: it is refused after reading a few times MAX_HEADER_BYTES of it (readline's
    # buffer doubles a line; the first data line is read before the header is checked), never all of it.
    assert src.stat().st_size > 4 * MAX_HEADER_BYTES
    err = synth.refused_fast_in_bounded_memory(
        lambda: convert(src, out), DataError, max_bytes=3 * MAX_HEADER_BYTES + (2 << 20)
    )
    assert str(err) == (
        f"{src}: line 1 (header) is longer than {MAX_HEADER_BYTES} bytes; "
        "expected label and one column per pixel"
    )
    assert synth.leftovers(out.parent) == []


def test_data_row_with_10_million_columns_in_bounded_memory(good, tmp_path):
    src = tmp_path / "t.csv"
    lines = good.split(b"\n")
    with open(src, "wb") as f:
        f.write(b"\n".join(lines[:3]) + b"\n")
        f.write(b"1" + b",0" * 10_000_000 + b"\n")
        f.write(b"\n".join(lines[3:]))
    # Refused as it is read, past the longest a row of 784 pixels can be (a block, 8 MiB), before the
    # line is held whole (a few blocks, not the line): it used to be counted ("found 10000001
    # values") at twice its size.
    err = synth.refused_fast_in_bounded_memory(
        lambda: convert(src, tmp_path / "o.parquet"), DataError, 60, 32 * MB
    )
    assert str(err) == (
        f"{src}: row 3 (line 4): longer than {8 << 20:,} bytes, more than a label and 784 pixel values "
        "can take"
    )
    assert not (tmp_path / "o.parquet").exists()


# ============================================================================ differential property

CELL = st.text(alphabet=' \t+-"0123456789.xe', min_size=0, max_size=6).map(str.encode)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cell=CELL, col=st.sampled_from([0, 1, 392, 784]))
def test_checker_and_polars_agree_on_any_cell(good, tmp_path_factory, cell, col):
    """Either both accept the cell with the same value, or the error names row 2 and the column.

    Polars does the conversion; :mod:`pipeline.csvcheck` explains failures. If
    they disagreed, a bad file would get a vague message (or a good one a wrong one).
    """
    small = b"\n".join(good.split(b"\n")[:4]) + b"\n"
    data = mutate(small, 2, col, cell)
    folder = tmp_path_factory.mktemp("prop")
    src = folder / "t.csv"
    src.write_bytes(data)
    out = folder / "o.parquet"
    problem = find_problem(data.splitlines(keepends=True), str(src))
    try:
        convert(src, out)
    except DataError as exc:
        name = HEADER[col]
        assert str(exc).startswith(
            f"{src}: row 2 (line 3), column {col + 1} ({name}): expected an integer"
        ), str(exc)
        assert problem is not None and str(problem) == str(exc)
        assert not out.exists()
    else:
        assert problem is None, f"polars accepted {cell!r} but the checker says {problem}"
        value = pl.read_parquet(out).row(1)[col]
        assert value == int(cell.strip(b' \t"'))


# ============================================================================ the stage, as a process


def run_parquet(tmp_path: Path, train_csv: Path, test_csv: Path, **prep):
    params = synth.write_params(tmp_path / "params.yaml", prep=prep)
    return synth.run_stage(
        "parquet",
        "--params",
        params,
        "--train-csv",
        train_csv,
        "--test-csv",
        test_csv,
        "--train",
        "data/parquet/train.parquet",
        "--test",
        "data/parquet/test.parquet",
        cwd=tmp_path,
    )


def test_stage_converts_both_splits(tmp_path):
    tr, te = synth.split(N, seed=1), synth.split(50, seed=2)
    a = synth.write_csv(tmp_path / "csv" / "train.csv", tr)
    b = synth.write_csv(tmp_path / "csv" / "test.csv", te)
    proc = run_parquet(tmp_path, a, b, compression="snappy", row_group_size=50)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "parquet"
    assert_table(out / "train.parquet", tr)
    assert_table(out / "test.parquet", te)
    meta = pq.ParquetFile(out / "train.parquet").metadata
    assert meta.num_row_groups == 4 and meta.row_group(0).column(0).compression == "SNAPPY"
    assert f"{N} rows" in proc.stdout and "50 rows" in proc.stdout
    assert synth.leftovers(out) == ["test.parquet", "train.parquet"]


STAGE_CASES = [
    "wrong-header-name",
    "value-256",
    "value--1",
    "label-65536",
    "empty-pixel",
    "ragged-short",
    "ragged-long",
    "non-numeric",
    "huge-number",
]


@pytest.mark.parametrize("case", STAGE_CASES)
def test_stage_violation_exit_2_message_no_output(good, tmp_path, case):
    _, make, expected = next(c for c in CASES if c[0] == case)
    bad = tmp_path / "csv" / "train.csv"
    bad.parent.mkdir()
    bad.write_bytes(make(good))
    test = synth.write_csv(tmp_path / "csv" / "test.csv", synth.split(20))
    proc = run_parquet(tmp_path, bad, test)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {bad}: {expected}\n"  # one line, no traceback
    assert synth.leftovers(tmp_path / "data") in ([], ["parquet"])
    assert synth.leftovers(tmp_path / "data" / "parquet") == []


def test_stage_bad_test_split(good, tmp_path):
    train = synth.write_csv(tmp_path / "csv" / "train.csv", synth.split(20))
    bad = tmp_path / "csv" / "test.csv"
    bad.write_bytes(mutate(good, 12, 0, b"65536"))
    proc = run_parquet(tmp_path, train, bad)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {bad}: row 12 (line 13), column 1 (label): {LAB} 65536\n"
    assert not (tmp_path / "data" / "parquet" / "test.parquet").exists()
    assert synth.leftovers(tmp_path / "data" / "parquet") in ([], ["train.parquet"])


def test_stage_header_only_test_split_is_empty_but_train_is_refused(tmp_path):
    """A source without a test split has a header-only test table; the train table needs rows."""
    tr = synth.split(N, seed=1)
    a = synth.write_csv(tmp_path / "csv" / "train.csv", tr)
    b = tmp_path / "csv" / "test.csv"
    b.write_bytes(HEADER_LINE)
    proc = run_parquet(tmp_path, a, b)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "parquet"
    assert_table(out / "train.parquet", tr)
    assert pl.read_parquet(out / "test.parquet").height == 0
    assert f"{N} rows" in proc.stdout and ": 0 rows" in proc.stdout
    (out / "test.parquet").unlink()
    (out / "train.parquet").unlink()
    proc = run_parquet(tmp_path, b, a)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {b}: has a header but no data rows\n"
    assert synth.leftovers(out) == []


@pytest.mark.parametrize("problem", ["empty", "header-only", "directory", "missing", "40M-columns"])
def test_stage_unusable_inputs(tmp_path, problem):
    src = tmp_path / "csv" / "train.csv"
    src.parent.mkdir()
    expected = {
        "empty": f"error: {src}: file is empty; expected a header line label,pixel1..pixelN\n",
        "header-only": f"error: {src}: has a header but no data rows\n",
        "40M-columns": (
            f"error: {src}: line 1 (header) is longer than {MAX_HEADER_BYTES} bytes; "
            "expected label and one column per pixel\n"
        ),
    }.get(problem)
    if problem == "empty":
        src.write_bytes(b"")
    elif problem == "header-only":
        src.write_bytes(b"\xef\xbb\xbf" + HEADER_LINE)
    elif problem == "directory":
        src.mkdir()
    elif problem == "40M-columns":  # an 80 MB header
        synth.write_wide_header(src, 40_000_000)
    test = synth.write_csv(tmp_path / "csv" / "test.csv", synth.split(20))
    params = synth.write_params(tmp_path / "params.yaml", prep={})

    def run(train: Path) -> tuple[subprocess.CompletedProcess, int]:
        out = ("--train", "data/parquet/train.parquet", "--test", "data/parquet/test.parquet")
        args = ("--params", params, "--train-csv", train, "--test-csv", test, *out)
        return synth.run_stage_measured("parquet", *args, cwd=tmp_path)

    short = tmp_path / "short.csv"
    short.write_bytes(b"lbl,x\n1,2\n")
    baseline, base_peak = run(short)  # the same stage refusing a short header
    assert baseline.returncode == 2 and "column 1: expected 'label'" in baseline.stderr, baseline.stderr
    start = time.monotonic()
    proc, peak = run(src)
    assert proc.returncode == 2
    if expected is None:
        assert proc.stderr.startswith(f"error: {src}: cannot read: ") and proc.stderr.count("\n") == 1
    else:
        assert proc.stderr == expected
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 20
    # at most a header's worth of MAX_HEADER_BYTES read beyond the short header's run, never the file
    assert peak - base_peak < 2 * MAX_HEADER_BYTES, f"peak RSS {base_peak / MB:.0f} -> {peak / MB:.0f} MB"
    assert synth.leftovers(tmp_path / "data" / "parquet") == []


def test_stage_refuses_bad_params(tmp_path):
    a = synth.write_csv(tmp_path / "a.csv", synth.split(5))
    proc = run_parquet(tmp_path, a, a, compression="zip")
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        f"error: {tmp_path / 'params.yaml'}: prep.compression: expected one of 'zstd'"
    )
    assert not (tmp_path / "data").exists()


def test_stage_help():
    proc = synth.run_stage("parquet", "--help", cwd=synth.REPO)
    assert proc.returncode == 0 and "--train-csv" in proc.stdout
