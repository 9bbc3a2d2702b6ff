"""The `csv` stage: IDX -> Kaggle-layout CSV, and the user's own CSV made canonical."""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import synth
from raw_spec import run_stage_with_spec

from pipeline import csvdata
from pipeline.csvcheck import MAX_HEADER_BYTES
from pipeline.csvdata import idx_to_csv, import_user_csv
from pipeline.download import verify_raw
from pipeline.errors import DataError
from pipeline.idx import encode_idx
from pipeline.tabular import HEADER_LINE, INT_LABELS, NAME_LABELS, header_line

MB = 1 << 20


@pytest.fixture(scope="module")
def train() -> synth.Split:
    return synth.split(150, seed=5)


def write_gz(path: Path, array: np.ndarray) -> Path:
    path.write_bytes(synth.gz(encode_idx(array), level=1))
    return path


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert synth.leftovers(out.parent) == [], "temporary left behind"


# ============================================================================ IDX -> CSV


def test_idx_to_csv_exact_content(train, tmp_path):
    img = write_gz(tmp_path / "img.gz", train.images)
    lbl = write_gz(tmp_path / "lbl.gz", train.labels)
    out = tmp_path / "csv" / "train.csv"
    assert idx_to_csv(img, lbl, out) == 150
    data = out.read_bytes()
    assert data.startswith(HEADER_LINE)
    assert b"\r" not in data
    assert data == synth.csv_bytes(train)  # label first, then pixel1..pixel784 in C order
    assert synth.leftovers(out.parent) == ["train.csv"]


def test_idx_to_csv_values_parse_back(train, tmp_path):
    out = tmp_path / "t.csv"
    idx_to_csv(write_gz(tmp_path / "i.gz", train.images), write_gz(tmp_path / "l.gz", train.labels), out)
    table = np.loadtxt(out, delimiter=",", skiprows=1, dtype=np.int64)
    np.testing.assert_array_equal(table[:, 0], train.labels)
    np.testing.assert_array_equal(table[:, 1:], train.pixels)


@pytest.mark.parametrize("shape", [(27, 27), (5, 9), (1, 1)], ids=["27x27", "5x9", "1x1"])
def test_idx_to_csv_any_image_size(tmp_path, shape):
    """Any uint8 [n, H, W] IDX images: label then H*W pixel columns pixel1..pixelN in C order."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, *shape), dtype=np.uint8)
    labels = np.array([0, 1, 9, 3, 4, 5], np.uint8)
    out = tmp_path / "csv" / "train.csv"
    assert idx_to_csv(write_gz(tmp_path / "img.gz", images), write_gz(tmp_path / "lbl.gz", labels), out) == 6
    data = out.read_bytes()
    assert data.startswith(header_line(shape[0] * shape[1]))
    table = np.loadtxt(out, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    np.testing.assert_array_equal(table[:, 0], labels)
    np.testing.assert_array_equal(table[:, 1:], images.reshape(6, -1))


@pytest.mark.parametrize(
    "images, labels, fragment",
    [
        (
            np.zeros((4, 784), np.uint8),
            np.zeros(4, np.uint8),
            "expected uint8 images [n, H, W], found uint8 [4, 784]",
        ),
        (
            np.zeros((4, 28, 28), ">i2"),
            np.zeros(4, np.uint8),
            "expected uint8 images [n, H, W], found int16 [4, 28, 28]",
        ),
        (
            np.zeros((4, 3, 28, 28), np.uint8),
            np.zeros(4, np.uint8),
            "expected uint8 images [n, H, W], found uint8 [4, 3, 28, 28]",
        ),
        (
            np.zeros((4, 28, 28), np.uint8),
            np.zeros((4, 1), np.uint8),
            "expected uint8 labels [n], found uint8 [4, 1]",
        ),
        (np.zeros((4, 28, 28), np.uint8), np.zeros(4, ">f4"), "expected uint8 labels [n], found float32 [4]"),
        (np.zeros((4, 28, 28), np.uint8), np.zeros(5, np.uint8), "has 4 images but"),
    ],
    ids=["flat", "int16", "4d", "labels-2d", "labels-float", "count-mismatch"],
)
def test_idx_to_csv_refuses_wrong_arrays(tmp_path, images, labels, fragment):
    img = write_gz(tmp_path / "img.gz", images)
    lbl = write_gz(tmp_path / "lbl.gz", labels)
    out = tmp_path / "out" / "train.csv"
    with pytest.raises(DataError) as err:
        idx_to_csv(img, lbl, out)
    assert fragment in str(err.value)
    assert str(tmp_path) in str(err.value)
    assert_no_output(out)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "cannot read gzip IDX file"),  # missing file
        (b"not gzip at all", "cannot read gzip IDX file"),
        (synth.gz(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"), "IDX shape [5] of uint8 needs 13 bytes, found 10"),
        (synth.gz(encode_idx(np.zeros((2, 28, 28), np.uint8)))[:-20], "cannot read gzip IDX file"),
    ],
    ids=["missing", "not-gzip", "bad-idx", "cut-gzip"],
)
def test_idx_to_csv_refuses_unreadable_files(train, tmp_path, content, fragment):
    img = tmp_path / "img.gz"
    if content is not None:
        img.write_bytes(content)
    lbl = write_gz(tmp_path / "lbl.gz", train.labels)
    out = tmp_path / "out" / "train.csv"
    with pytest.raises(DataError) as err:
        idx_to_csv(img, lbl, out)
    assert str(err.value).startswith(f"{img}: ")
    assert fragment in str(err.value)
    assert_no_output(out)


# ============================================================================ user CSV import


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(zero_based=True),
        dict(newline="\r\n"),
        dict(bom=True),
        dict(zero_based=True, newline="\r\n", bom=True),
    ],
    ids=["canonical", "pixel0..783", "crlf", "bom", "all-three"],
)
def test_import_makes_canonical(train, tmp_path, variant):
    src = synth.write_csv(tmp_path / "user.csv", train, **variant)
    out = tmp_path / "csv" / "train.csv"
    import_user_csv(src, out)
    assert out.read_bytes() == synth.csv_bytes(train)  # label,pixel1..pixel784 + LF + no BOM
    assert synth.leftovers(out.parent) == ["train.csv"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096])
def test_crlf_split_across_copy_blocks(train, tmp_path, monkeypatch, chunk):
    """A CR at the end of one block and its LF at the start of the next still become one LF."""
    monkeypatch.setattr(csvdata, "COPY_CHUNK", chunk)
    small = synth.Split(train.images[:3], train.labels[:3])
    src = synth.write_csv(tmp_path / "u.csv", small, newline="\r\n")
    import_user_csv(src, tmp_path / "o.csv")
    assert (tmp_path / "o.csv").read_bytes() == synth.csv_bytes(small)


def test_import_keeps_a_missing_final_newline_and_lone_final_cr(train, tmp_path):
    small = synth.Split(train.images[:2], train.labels[:2])
    body = synth.csv_bytes(small).rstrip(b"\n")
    (tmp_path / "a.csv").write_bytes(body)
    import_user_csv(tmp_path / "a.csv", tmp_path / "a.out")
    assert (tmp_path / "a.out").read_bytes() == body
    (tmp_path / "b.csv").write_bytes(body.replace(b"\n", b"\r\n") + b"\r")
    import_user_csv(tmp_path / "b.csv", tmp_path / "b.out")
    assert (tmp_path / "b.out").read_bytes() == body + b"\n"


def test_import_accepts_quoted_and_spaced_header_names(train, tmp_path):
    small = synth.Split(train.images[:2], train.labels[:2])
    data = synth.csv_bytes(small)
    head, rest = data.split(b"\n", 1)
    head = b",".join(b'"%s"' % n if i % 2 else b" %s " % n for i, n in enumerate(head.split(b",")))
    (tmp_path / "u.csv").write_bytes(head + b"\n" + rest)
    import_user_csv(tmp_path / "u.csv", tmp_path / "o.csv")
    assert (tmp_path / "o.csv").read_bytes() == data


def test_import_leaves_values_for_the_parquet_stage(tmp_path):
    """Values are not checked here (the Parquet stage reads every cell); the copy is verbatim."""
    body = HEADER_LINE + (synth.row_line(1, [256] * 784) + "\n").encode()
    (tmp_path / "u.csv").write_bytes(body)
    import_user_csv(tmp_path / "u.csv", tmp_path / "o.csv")
    assert (tmp_path / "o.csv").read_bytes() == body


def _header_error(
    tmp_path: Path,
    content: bytes | None,
    *,
    directory: bool = False,
    image_shape: tuple[int, int, int] | None = None,
) -> tuple[str, Path, Path]:
    src = tmp_path / "user" / "train.csv"
    if directory:
        src.mkdir(parents=True)
    elif content is not None:
        src.parent.mkdir(parents=True)
        src.write_bytes(content)
    out = tmp_path / "csv" / "train.csv"
    with pytest.raises(DataError) as err:
        import_user_csv(src, out, image_shape=image_shape)
    assert_no_output(out)
    return str(err.value), src, out


def test_import_missing_file(tmp_path):
    msg, src, _ = _header_error(tmp_path, None)
    assert msg == (
        f"{src}: file not found (data.dataset is csv; set data.train_csv / data.test_csv to your files, "
        "or data.test_csv to null to hold the test split out of train)"
    )


def test_import_directory(tmp_path):
    msg, src, _ = _header_error(tmp_path, None, directory=True)
    assert msg == f"{src}: expected a CSV file, found a directory or special file"


@pytest.mark.parametrize(
    "content",
    [b"", b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n", b"   \n"],
    ids=["empty", "lf", "crlf", "bom-only", "bom-crlf", "spaces"],
)
def test_import_empty_file(tmp_path, content):
    msg, src, _ = _header_error(tmp_path, content)
    assert msg == f"{src}: file is empty; expected a header line label,pixel1..pixelN"


SAVE_AS_UTF8 = "save it as UTF-8 (in Excel: CSV UTF-8)"


@pytest.mark.parametrize(
    "header, expected",
    [
        (
            b"label,pixel1,pixel2\n",
            "line 1 (header): 2 pixel columns are not a square grey image; "
            "set data.image_shape to [C, H, W] in params.yaml",
        ),
        (
            HEADER_LINE.replace(b"label,", b"colour,"),  # no likelier reason to name
            "line 1 (header), column 1: expected 'label', found 'colour'",
        ),
        (
            b"label," + b",".join(b"pixel%d" % i for i in range(784)) + b",pixel784\n",
            "line 1 (header): 785 pixel columns are not a square grey image; "
            "set data.image_shape to [C, H, W] in params.yaml",
        ),
        (
            b"1," + b",".join([b"0"] * 784) + b"\n",
            "line 1 (header), column 1: expected 'label', found '1': the file seems to have no header "
            "line; expected label,pixel1..pixelN first",
        ),
        (
            HEADER_LINE.replace(b"pixel5,", b",", 1),
            "line 1 (header), column 6: expected a column name, found an empty one",
        ),
        (
            HEADER_LINE.replace(b",pixel784", b",", 1),
            "line 1 (header), column 785: expected a column name, found an empty one",
        ),
        (b"label\n", "line 1 (header): expected label and at least one pixel column, found only 'label'"),
        (b" label \n", "line 1 (header): expected label and at least one pixel column, found only 'label'"),
        # Files that arrive another way than plain comma-separated UTF-8: the likeliest reason is named.
        *[
            (content, f"line 1 (header): expected CSV text (UTF-8 or ASCII), found {what}")
            for content, what in [
                (gzip.compress(HEADER_LINE), "gzip-compressed data; decompress it (gunzip) first"),
                (
                    b"PK\x03\x04\x14\x00",
                    "a ZIP archive or an Excel workbook (.xlsx); extract the CSV from the archive, or save "
                    "the workbook as CSV UTF-8",
                ),
                (
                    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00",
                    "an Excel 97-2003 workbook (.xls); save it as CSV UTF-8",
                ),
                (HEADER_LINE.decode().encode("utf-16"), f"UTF-16 text; {SAVE_AS_UTF8}"),
                (b"\xfe\xff" + HEADER_LINE.decode().encode("utf-16-be"), f"UTF-16 text; {SAVE_AS_UTF8}"),
            ]
        ],
        *[
            (
                content,
                "line 1 (header): expected LF or CRLF line ends, found CR alone (classic Mac OS line "
                "ends); convert them to LF",
            )
            for content in [
                HEADER_LINE.replace(b"\n", b"\r") + b"1" + b",0" * 784 + b"\r",
                HEADER_LINE.replace(b"\n", b"\r") + (b"1" + b",0" * 784 + b"\r") * 6000,  # 9.4 MB, one "line"
            ]
        ],
        *[
            (
                HEADER_LINE.replace(b",", sep),
                "line 1 (header), column 1: expected 'label', found "
                f"{shown}: the values are separated by {name}; expected commas",
            )
            for sep, shown, name in [
                (b";", "'label;pixel1;pixel2;pixel3;pixel4;pixel5...'", "semicolons"),
                (b"\t", "'label\\tpixel1\\tpixel2\\tpixel3\\tpixel4\\tpixel5...'", "tabs"),
                (b"|", "'label|pixel1|pixel2|pixel3|pixel4|pixel5...'", "vertical bars"),
            ]
        ],
        (
            HEADER_LINE.replace(b"label", b"cat\xe9gorie"),
            "line 1 (header), column 1: expected 'label', found "
            "'cat\ufffdgorie': the header is not UTF-8 text; save the file as UTF-8",
        ),
        (
            HEADER_LINE.replace(b"label,", b"").rstrip(b"\n") + b",label\n",
            "line 1 (header), column 1: expected 'label', "
            "found 'pixel1': 'label' is column 785; it must come first",
        ),
        (
            HEADER_LINE.replace(b"label,", b"", 1),
            "line 1 (header), column 1: expected 'label', found "
            "'pixel1': no column is named 'label'; a file without labels (as Kaggle's test.csv) cannot be "
            "tested against: set data.test_csv: null and a test split is held out of train",
        ),
        *[
            (
                first + b"," + HEADER_LINE,
                f"line 1 (header), column 1: expected 'label', found {shown}: the first column is an index, "
                "as pandas' to_csv writes it; save with df.to_csv(path, index=False)",
            )
            for first, shown in [(b"", "''"), (b"Unnamed: 0", "'Unnamed: 0'")]
        ],
        *[
            (
                HEADER_LINE.replace(b"label", first, 1),
                f"line 1 (header), column 1: expected 'label', found {shown}: name the label column "
                "'label' (lower case), as the first column already is",
            )
            for first, shown in [(b"Label", "'Label'"), (b"class", "'class'"), (b"TARGET", "'TARGET'")]
        ],
    ],
    ids=[
        "3-columns",
        "label-name",
        "786-columns",
        "no-header",
        "empty-name",
        "empty-last-name",
        "label-only",
        "label-only-spaced",
        "gzip",
        "zip",
        "xls",
        "utf-16-le",
        "utf-16-be",
        "cr-line-ends",
        "cr-line-ends-longer-than-a-header",
        "semicolons",
        "tabs",
        "bars",
        "latin-1",
        "label-last",
        "kaggle-test-without-labels",
        "pandas-index",
        "pandas-index-read-and-written-again",
        "capital-label",
        "class",
        "target",
    ],
)
def test_import_wrong_header(tmp_path, header, expected):
    msg, src, _ = _header_error(tmp_path, header + b"1" + b",0" * 784 + b"\n")
    assert msg == f"{src}: {expected}"


@pytest.mark.parametrize(
    "header",
    [
        HEADER_LINE.replace(b"pixel5,", b"pixel5x,"),
        HEADER_LINE.replace(b"pixel784", b"pixel785"),
        b"label," + b",".join(b"pixel%d" % i for i in range(784)) + b"\n",
        b"label," + b",".join(b"x%d_%d" % (r, c) for r in range(28) for c in range(28)) + b"\n",
        b"label," + b",".join([b"same"] * 784) + b"\n",
    ],
    ids=["one-renamed", "last-renamed", "zero-based", "row-col-names", "repeated-names"],
)
def test_import_accepts_any_pixel_column_names(train, tmp_path, header):
    """Pixel names are free: the copy has the canonical header and the values verbatim."""
    small = synth.Split(train.images[:3], train.labels[:3])
    rest = synth.csv_bytes(small).split(b"\n", 1)[1]
    (tmp_path / "u.csv").write_bytes(header + rest)
    assert import_user_csv(tmp_path / "u.csv", tmp_path / "o.csv", check_values=True) == (
        (1, 28, 28),
        INT_LABELS,
    )
    assert (tmp_path / "o.csv").read_bytes() == synth.csv_bytes(small)


@pytest.mark.parametrize(
    "shape, image_shape",
    [((1, 4, 4), None), ((1, 5, 5), None), ((3, 2, 4), (3, 2, 4)), ((1, 28, 28), (1, 28, 28))],
)
def test_import_returns_the_image_shape_and_label_kind(tmp_path, shape, image_shape):
    n = int(np.prod(shape))
    rows = [
        f"{lab}," + ",".join(str((i * 7 + r) % 256) for i in range(n)) for r, lab in enumerate([3, 11, 65535])
    ]
    body = ("label," + ",".join(f"c{i}" for i in range(n)) + "\n" + "\n".join(rows) + "\n").encode()
    (tmp_path / "u.csv").write_bytes(body)
    got = import_user_csv(tmp_path / "u.csv", tmp_path / "o.csv", image_shape=image_shape, check_values=True)
    assert got == (shape, INT_LABELS)
    assert (tmp_path / "o.csv").read_bytes() == header_line(n) + body.split(b"\n", 1)[1]
    names = body.replace(b"\n3,", b"\ncat,").replace(b"\n11,", b"\ndog,").replace(b"\n65535,", b"\nbird,")
    (tmp_path / "n.csv").write_bytes(names)
    assert import_user_csv(
        tmp_path / "n.csv", tmp_path / "n.out", image_shape=image_shape, check_values=True
    ) == (shape, NAME_LABELS)
    assert (tmp_path / "n.out").read_bytes() == header_line(n) + names.split(b"\n", 1)[1]


def test_import_refuses_a_count_that_is_not_the_set_image_shape(tmp_path):
    msg, src, _ = _header_error(tmp_path, HEADER_LINE + b"1" + b",0" * 784 + b"\n", image_shape=(3, 28, 28))
    assert (
        msg == f"{src}: line 1 (header): expected 3x28x28 = 2352 pixel columns as data.image_shape says, "
        "found 784"
    )


def test_import_header_with_10_million_columns_fails_fast_in_bounded_memory(tmp_path):
    src = synth.write_wide_header(tmp_path / "wide.csv", 10_000_000)
    assert src.stat().st_size > 19 * MB > 2 * MAX_HEADER_BYTES
    out = tmp_path / "csv" / "train.csv"
    # refused after reading MAX_HEADER_BYTES of the header (readline's buffer doubles it), never all of it
    err = synth.refused_fast_in_bounded_memory(
        lambda: import_user_csv(src, out), DataError, max_bytes=2 * MAX_HEADER_BYTES + (2 << 20)
    )
    assert str(err) == (
        f"{src}: line 1 (header) is longer than {MAX_HEADER_BYTES} bytes; "
        "expected label and one column per pixel"
    )
    assert_no_output(out)


def test_import_failure_keeps_previous_output(train, tmp_path):
    out = tmp_path / "o.csv"
    out.write_bytes(b"previous complete output")
    (tmp_path / "bad.csv").write_bytes(b"a,b\n1,2\n")
    with pytest.raises(DataError):
        import_user_csv(tmp_path / "bad.csv", out)
    assert out.read_bytes() == b"previous complete output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "o.csv"]


# ============================================================================ the stage, as a process


def test_stage_idx_mode(tmp_path):
    ds = synth.dataset(n_train=150, n_test=60, seed=8)
    raw = ds.write_folder(tmp_path / "data" / "raw")
    params = synth.write_params(tmp_path / "p.yaml", data={"dataset": "fashion-mnist"})
    proc = run_stage_with_spec(
        "csv",
        ds.spec,
        "fashion-mnist",
        "--params",
        params,
        "--raw",
        raw,
        "--train",
        "data/csv/train.csv",
        "--test",
        "data/csv/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data/csv/train.csv").read_bytes() == synth.csv_bytes(ds.train)
    assert (tmp_path / "data/csv/test.csv").read_bytes() == synth.csv_bytes(ds.test)
    assert "csv: train: 150 rows" in proc.stdout and "csv: test: 60 rows" in proc.stdout


def test_stage_idx_mode_missing_raw_files(tmp_path):
    params = synth.write_params(tmp_path / "p.yaml", data={"dataset": "mnist"})
    (tmp_path / "raw").mkdir()
    proc = synth.run_stage(
        "csv",
        "--params",
        params,
        "--raw",
        "raw",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        "error: raw/train-images-idx3-ubyte.gz: not found; it must hold what `download` "
        "verifies for mnist: rerun `dvc repro download`\n"
    ), proc.stderr
    assert synth.leftovers(tmp_path / "out") == []


def test_stage_refuses_a_hand_made_raw_folder_of_another_dataset(tmp_path):
    """12 rows and a source.json naming mnist, as data/raw for fashion-mnist: it converted with exit 0."""
    raw = synth.dataset(n_train=12, n_test=4, seed=3).write_folder(tmp_path / "raw")
    (raw / "source.json").write_text(json.dumps({"dataset": "mnist", "files": {}}))
    params = synth.write_params(tmp_path / "p.yaml", data={"dataset": "fashion-mnist"})
    proc = synth.run_stage(
        "csv",
        "--params",
        params,
        "--raw",
        "raw",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, (
        proc.stderr
    )
    assert proc.stderr.startswith("error: raw/train-images-idx3-ubyte.gz: ")
    assert "rerun `dvc repro download`" in proc.stderr
    assert synth.leftovers(tmp_path / "out") == []


def test_stage_refuses_a_raw_folder_whose_source_record_names_another_dataset(tmp_path):
    ds = synth.dataset(n_train=20, n_test=10, seed=5)
    raw = ds.write_folder(tmp_path / "raw")
    (raw / "source.json").write_text(json.dumps({"dataset": "mnist", "files": {}}))
    params = synth.write_params(tmp_path / "p.yaml", data={"dataset": "fashion-mnist"})
    proc = run_stage_with_spec(
        "csv",
        ds.spec,
        "fashion-mnist",
        "--params",
        params,
        "--raw",
        "raw",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "error: raw/source.json: dataset: expected 'synth', found 'mnist'; it must hold what "
        "`download` verifies for synth: rerun `dvc repro download`\n"
    )


def test_a_gzip_bomb_in_raw_is_refused_in_bounded_memory(tmp_path):
    """A 100 KB member that inflates to 100 MB: refused at the expected size, not after inflating it all."""
    ds = synth.dataset(n_train=150, n_test=60, seed=8)
    raw = ds.write_folder(tmp_path / "raw")
    bomb = synth.gzip_bomb(100 << 20)
    assert len(bomb) < 120_000 and ds.spec.train.images.size < 200_000
    (raw / ds.spec.train.images.name).write_bytes(bomb)
    error = synth.refused_fast_in_bounded_memory(
        lambda: verify_raw(ds.spec, raw), DataError, max_bytes=2 << 20
    )
    assert str(error).startswith(f"{raw / ds.spec.train.images.name}: decompresses to more than the expected")


def test_stage_user_csv_mode(tmp_path):
    tr, te = synth.split(120, seed=1), synth.split(30, seed=2)
    synth.write_csv(tmp_path / "user" / "train.csv", tr, zero_based=True, newline="\r\n", bom=True)
    synth.write_csv(tmp_path / "user" / "test.csv", te)
    params = synth.write_params(
        tmp_path / "p.yaml",
        data={
            "dataset": "csv",
            "train_csv": "user/train.csv",
            "test_csv": str(tmp_path / "user" / "test.csv"),
        },
    )
    proc = synth.run_stage(
        "csv",
        "--params",
        params,
        "--raw",
        "nonexistent",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/train.csv").read_bytes() == synth.csv_bytes(tr)
    assert (tmp_path / "out/test.csv").read_bytes() == synth.csv_bytes(te)
    assert "csv: train: user/train.csv -> out/train.csv (int labels, images [1, 28, 28])" in proc.stdout


def test_stage_user_csv_without_test_split(tmp_path):
    """data.test_csv null: the test table is the canonical header alone (held out later by test_fraction)."""
    tr = synth.split(40, seed=1)
    synth.write_csv(tmp_path / "user" / "train.csv", tr, zero_based=True)
    params = synth.write_params(
        tmp_path / "p.yaml", data={"dataset": "csv", "train_csv": "user/train.csv", "test_csv": None}
    )
    proc = synth.run_stage(
        "csv",
        "--params",
        params,
        "--raw",
        "nonexistent",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/train.csv").read_bytes() == synth.csv_bytes(tr)
    assert (tmp_path / "out/test.csv").read_bytes() == HEADER_LINE
    assert "csv: test: none (data.test_csv is null)" in proc.stdout


def test_stage_user_csv_test_labels_must_be_of_the_train_kind(tmp_path):
    user = tmp_path / "user"
    synth.write_csv(user / "train.csv", synth.split(10))
    names = (
        b"\n".join(
            b"cat" + line[line.index(b",") :] if i else line
            for i, line in enumerate(synth.csv_bytes(synth.split(5)).rstrip(b"\n").split(b"\n"))
        )
        + b"\n"
    )
    (user / "test.csv").write_bytes(names)
    params = synth.write_params(
        tmp_path / "p.yaml",
        data={"dataset": "csv", "train_csv": str(user / "train.csv"), "test_csv": str(user / "test.csv")},
    )
    proc = synth.run_stage(
        "csv",
        "--params",
        params,
        "--raw",
        "raw",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: {user / 'test.csv'}: labels are names but {user / 'train.csv'}'s are ints; "
        f"labels must not mix integers and names\n"
    )


@pytest.mark.parametrize("problem", ["directory", "missing", "empty", "wrong-header"])
def test_stage_user_csv_errors(tmp_path, problem):
    user = tmp_path / "user"
    user.mkdir()
    train = user / "train.csv"
    if problem == "directory":
        train.mkdir()
        expected = f"error: {train}: expected a CSV file, found a directory or special file\n"
    elif problem == "missing":
        expected = (
            f"error: {train}: file not found (data.dataset is csv; set data.train_csv / data.test_csv to "
            "your files, or data.test_csv to null to hold the test split out of train)\n"
        )
    elif problem == "empty":
        train.write_bytes(b"")
        expected = f"error: {train}: file is empty; expected a header line label,pixel1..pixelN\n"
    else:
        train.write_bytes(b"label,a,b\n1,2,3\n")
        expected = (
            f"error: {train}: line 1 (header): 2 pixel columns are not a square grey image; "
            f"set data.image_shape to [C, H, W] in params.yaml\n"
        )
    synth.write_csv(user / "test.csv", synth.split(10))
    params = synth.write_params(
        tmp_path / "p.yaml",
        data={"dataset": "csv", "train_csv": str(train), "test_csv": str(user / "test.csv")},
    )
    proc = synth.run_stage(
        "csv",
        "--params",
        params,
        "--raw",
        "raw",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == expected
    [threads] = proc.stdout.splitlines()  # the stage's first line, and nothing after it
    assert threads.startswith("csv: prep.workers null: ")
    assert synth.leftovers(tmp_path / "out") == []


def test_stage_bad_test_csv_leaves_no_test_output(tmp_path):
    user = tmp_path / "user"
    synth.write_csv(user / "train.csv", synth.split(10))
    params = synth.write_params(
        tmp_path / "p.yaml",
        data={"dataset": "csv", "train_csv": str(user / "train.csv"), "test_csv": str(user / "nope.csv")},
    )
    proc = synth.run_stage(
        "csv",
        "--params",
        params,
        "--raw",
        "raw",
        "--train",
        "out/train.csv",
        "--test",
        "out/test.csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and f"{user / 'nope.csv'}: file not found" in proc.stderr
    assert not (tmp_path / "out" / "test.csv").exists()
    assert synth.leftovers(tmp_path / "out") in ([], ["train.csv"])  # at most the complete train file


def test_stage_40_million_column_header_bounded_memory(tmp_path):
    """The 80 MB header is refused after reading MAX_HEADER_BYTES of it: the stage's peak stays within
    three such reads of the same stage refusing a short header. readline with a limit holds the
    line twice (its chunks, then their join), which measured 16.5-16.8 MB of the 16.8 MB that two
    reads allow, so two failed in CI by 24 KB; reading the header whole would add 80 MB or more."""
    short = tmp_path / "short.csv"
    short.write_bytes(b"lbl,x\n1,2\n")
    src = synth.write_wide_header(tmp_path / "wide.csv", 40_000_000)
    synth.write_csv(tmp_path / "test.csv", synth.split(5))

    def run(train: Path) -> tuple[subprocess.CompletedProcess, int]:
        params = synth.write_params(
            tmp_path / "p.yaml",
            data={"dataset": "csv", "train_csv": str(train), "test_csv": str(tmp_path / "test.csv")},
        )
        args = ("--params", params, "--raw", "raw", "--train", "out/train.csv", "--test", "out/test.csv")
        return synth.run_stage_measured("csv", *args, cwd=tmp_path)

    baseline, base_peak = run(short)
    assert baseline.returncode == 2 and "column 1: expected 'label'" in baseline.stderr, baseline.stderr
    start = time.monotonic()
    proc, peak = run(src)
    assert time.monotonic() - start < 20
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"error: {src}: line 1 (header) is longer than {MAX_HEADER_BYTES} bytes; "
        "expected label and one column per pixel\n"
    )
    assert peak - base_peak < 3 * MAX_HEADER_BYTES, f"peak RSS {base_peak / MB:.0f} -> {peak / MB:.0f} MB"
    assert synth.leftovers(tmp_path / "out") == []


def test_stage_help():
    proc = synth.run_stage("csv", "--help", cwd=synth.REPO)
    assert proc.returncode == 0 and "--raw" in proc.stdout and "--train" in proc.stdout
