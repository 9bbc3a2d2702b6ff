"""Property-based fuzzing: hostile bytes never crash a reader with anything but the project's errors.

Each reader gets both arbitrary bytes (shallow: mostly refused at the first
check) and structured inputs (valid files with one part mutated, which reach the
deeper checks). Whatever a reader *accepts* must also satisfy its invariants.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import synth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.csvcheck import check_header, find_problem
from pipeline.download import FetchError, gunzip_bounded, verify
from pipeline.errors import DataError, ParamsError, PipelineError, ShardError
from pipeline.idx import DTYPE_CODES, decode_idx, encode_idx
from pipeline.imagefile import decode_image, own_images
from pipeline.images import check_images, scan_split
from pipeline.manifest import SCHEMA_VERSION, Manifest, parse_manifest
from pipeline.params import SECTIONS, parse_section
from pipeline.shards import DTYPES, ShardLayout, parse_header
from pipeline.tabular import HEADER, HEADER_LINE, INT_CELL, NUMBER_CELL

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


# ============================================================================ IDX


@FUZZ
@given(st.binary(max_size=300))
def test_idx_arbitrary_bytes(data):
    try:
        array = decode_idx(data, "fuzz")
    except DataError as exc:
        assert str(exc).startswith("fuzz: ")
        return
    assert 4 + 4 * array.ndim + array.nbytes == len(data)


@st.composite
def idx_like(draw):
    """A plausible header (right magic most of the time) and a payload of nearly the right size."""
    zero = draw(st.sampled_from([0, 0, 0, 1, 0x1F8B]))
    code = draw(st.sampled_from([*DTYPE_CODES, 0x0A, 0x00, 0xFF]))
    dims = draw(st.lists(st.integers(0, 6) | st.sampled_from([2**32 - 1, 2**31]), min_size=0, max_size=10))
    head = struct.pack(">HBB", zero, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    cut = draw(st.integers(0, len(head)))
    if draw(st.booleans()):
        head = head[:cut]
    itemsize = DTYPE_CODES.get(code, np.dtype("u1")).itemsize
    right = math.prod(dims) * itemsize if dims and max(dims) < 100 else 0
    size = max(0, right + draw(st.integers(-3, 3)))
    return head + draw(st.binary(min_size=size, max_size=size))


@FUZZ
@given(idx_like())
def test_idx_structured(data):
    try:
        array = decode_idx(data)
    except DataError:
        return
    assert array.dtype.isnative
    assert encode_idx(array) == data  # anything accepted round-trips to the same bytes


# ============================================================================ CSV checker

CELLS = st.sampled_from(
    [
        b"0",
        b"9",
        b"255",
        b"256",
        b"-1",
        b" 7",
        b"7 ",
        b"+3",
        b'"4"',
        b'"5',
        b"",
        b"x",
        b"1.5",
        b"3.0",
        b' "2e1"',
        b"9" * 5000,
        b"\x00",
        b"\xff\xfe",
        b"\r",
        b'"1,2"',
    ]
)


@st.composite
def csv_lines(draw):
    header = draw(
        st.sampled_from(
            [
                HEADER_LINE,
                b"\xef\xbb\xbf" + HEADER_LINE,
                HEADER_LINE.replace(b"\n", b"\r\n"),
                b"label,pixel0" + HEADER_LINE[len(b"label,pixel1") :],
                b"",
                b"\n",
                b"a,b\n",
                b"label" + b",x" * 40000 + b"\n",
            ]
        )
    )
    rows = []
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.sampled_from([785, 785, 785, 784, 786, 1, 0]))
        base = [b"1"] + [b"0"] * (n - 1) if n else []
        for _ in range(draw(st.integers(0, 3))):
            if base:
                base[draw(st.integers(0, len(base) - 1))] = draw(CELLS)
        rows.append(b",".join(base) + draw(st.sampled_from([b"\n", b"\r\n", b""])))
    return [header, *rows]


@FUZZ
@given(st.lists(st.binary(max_size=60), max_size=5))
def test_find_problem_arbitrary_lines(lines):
    """Lines of at most 60 bytes can never hold the 785-column header: every input must be reported, not
    raised."""
    problem = find_problem(lines, "fuzz.csv")
    assert isinstance(problem, DataError), f"accepted a CSV whose header is {lines[:1]!r}"
    assert str(problem).startswith("fuzz.csv: ")


@FUZZ
@given(csv_lines())
def test_find_problem_structured(lines):
    problem = find_problem(iter(lines), "fuzz.csv")
    if problem is None:  # accepted: a header, at least one row, 785 cells each, pixels 0..255
        assert len(lines) >= 2
        labels = []
        for line in lines[1:]:
            cells = line.rstrip(b"\r\n").split(b",")
            assert len(cells) == len(HEADER)
            assert all(0 <= int(c.strip(b' \t"')) <= 255 for c in cells[1:])
            labels.append(cells[0])
        # Labels are all integers 0..65535, or all class names (none blank, none a number such as
        # "3.0"): the first row decides.
        if INT_CELL.fullmatch(labels[0]):
            assert all(INT_CELL.fullmatch(v) and 0 <= int(v.strip(b' \t"')) <= 65535 for v in labels)
        else:
            assert all(
                v.strip(b' \t"') and not INT_CELL.fullmatch(v) and not NUMBER_CELL.fullmatch(v.strip(b' \t"'))
                for v in labels
            )
    else:
        assert isinstance(problem, DataError) and str(problem).startswith("fuzz.csv: ")
        assert len(str(problem)) < 400  # a hostile cell is quoted briefly, not echoed in full


@FUZZ
@given(st.binary(max_size=200))
def test_check_header_arbitrary_bytes(line):
    """Accepted only as label and named pixel columns; otherwise a DataError naming the header row, never
    another."""
    try:
        names = check_header(line, "h")
    except DataError as exc:
        assert str(exc).startswith("h: line 1 (header)")
        return
    assert names == _names(line) and names[0] == "label" and len(names) >= 2 and all(names)
    assert not any("\r" in n for n in names)


ZERO_BASED_LINE = (",".join(["label", *(f"pixel{i}" for i in range(784))]) + "\n").encode()


@st.composite
def header_like(draw):
    """A valid header in one of its accepted spellings, then 0..3 byte or column edits."""
    names = draw(st.sampled_from([HEADER_LINE, ZERO_BASED_LINE])).rstrip(b"\n").split(b",")
    quote = draw(st.sampled_from([b"", b'"']))
    pad = draw(st.sampled_from([b"", b" ", b"\t"]))
    line = draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + b",".join(
        pad + quote + n + quote + pad for n in names
    )
    line += draw(st.sampled_from([b"\n", b"\r\n", b""]))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        at = draw(st.integers(0, len(line) - 1))
        edit = draw(st.sampled_from(["set", "delete", "insert", "drop-column", "swap-columns"]))
        byte = bytes([draw(st.sampled_from([*b'0123456789," \t\rx\xff', 0]))])
        if edit == "set":
            line = line[:at] + byte + line[at + 1 :]
        elif edit == "delete":
            line = line[:at] + line[at + 1 :]
        elif edit == "insert":
            line = line[:at] + byte + line[at:]
        else:
            cells = line.split(b",")
            i, j = draw(st.integers(0, len(cells) - 1)), draw(st.integers(0, len(cells) - 1))
            if edit == "drop-column":
                del cells[i]
            else:
                cells[i], cells[j] = cells[j], cells[i]
            line = b",".join(cells)
    return line


def _names(line: bytes) -> list[str]:
    """The header's column names as docs/data.md defines them: BOM, line end, blanks and quotes ignored
    (a name that still holds a CR is refused: CR line ends run the lines together)."""
    text = line.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n").decode("utf-8", "replace")
    return [n.strip().strip('"') for n in text.split(",")]


@FUZZ
@given(header_like())
def test_check_header_structured(line):
    """With 784 pixels expected: accepted exactly when there are 785 names, the first 'label', none empty."""
    names = _names(line)
    valid = len(names) == 785 and names[0] == "label" and all(names) and not any("\r" in n for n in names)
    try:
        check_header(line, "h", num_pixels=784)
    except DataError as exc:
        assert not valid, f"refused a valid header: {exc}"
        assert str(exc).startswith("h: line 1 (header)") and len(str(exc)) < 300
        return
    assert valid, "accepted a header whose names are wrong"


def test_header_fuzz_reaches_both_outcomes():
    """Control for the test above: its inputs include headers that are accepted and headers that are
    refused."""
    accepted = refused = 0

    @settings(max_examples=200, deadline=None, database=None)
    @given(header_like())
    def count(line):
        nonlocal accepted, refused
        try:
            check_header(line, "h", num_pixels=784)
            accepted += 1
        except DataError:
            refused += 1

    count()
    assert accepted >= 20 and refused >= 20, (accepted, refused)


# ============================================================================ shard header


@FUZZ
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2**70))
def test_shard_header_arbitrary_bytes(prefix, file_size):
    try:
        layout = parse_header(prefix, max(file_size, 0), "fuzz")
    except ShardError as exc:
        assert str(exc).startswith("fuzz: ")
        return
    _check_layout(layout, file_size)


def _check_layout(layout: ShardLayout, file_size: int) -> None:
    cursor = layout.data_start
    for t in sorted(layout.tensors.values(), key=lambda t: t.start):
        assert t.start == cursor
        assert t.end - t.start == math.prod(t.shape) * DTYPES[t.dtype].itemsize
        assert t.start % DTYPES[t.dtype].itemsize == 0
        cursor = t.end
    assert cursor == file_size


def _valid_header() -> dict:
    k = 3
    images = k * 784 * 4
    return {
        "__metadata__": {"dataset": "d", "split": "train"},
        "images": {"dtype": "F32", "shape": [k, 1, 28, 28], "data_offsets": [0, images]},
        "labels": {"dtype": "I64", "shape": [k], "data_offsets": [images, images + 8 * k]},
    }


def _encode(header: dict | str) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@st.composite
def mutated_header(draw):
    header = copy.deepcopy(_valid_header())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["images", "labels", "__metadata__", "extra"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = draw(
            JSON
            | st.sampled_from(["F16", "U8", "BOOL", "F64", "I8", "Q4"])
            | st.lists(st.integers(-2, 10**6), max_size=4)
        )
        if field is None or not isinstance(header.get(name, {}), dict):
            header[name] = value
        else:
            header.setdefault(name, {})[field] = value
    blob = _encode(json.dumps(header, allow_nan=True))
    data_len = 3 * 784 * 4 + 3 * 8 + draw(st.sampled_from([0, 0, 0, -8, 8, -1, 4]))
    return blob, len(blob) + max(0, data_len)


@FUZZ
@given(mutated_header())
def test_shard_header_structured(case):
    prefix, file_size = case
    try:
        layout = parse_header(prefix, file_size, "fuzz")
    except ShardError:
        return
    _check_layout(layout, file_size)


def test_the_valid_shard_header_is_accepted():
    """Control for the structured fuzz: unmutated, the header parses."""
    prefix = _encode(_valid_header())
    layout = parse_header(prefix, len(prefix) + 3 * 784 * 4 + 24)
    assert set(layout.tensors) == {"images", "labels"}


# ============================================================================ manifest


def _valid_manifest() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": "d",
        "split": "train",
        "num_samples": 5,
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "class_counts": [2, 0, 3],
        "image_shape": [3, 8, 8],
        "image_dtype": "float32",
        "label_dtype": "int64",
        "normalization": {
            "kind": "standard",
            "mean": [0.28, 0.3, 0.1],
            "std": [0.35, 0.2, 0.25],
            "stats_from": "train",
        },
        "train_stats": {"mean": [0.28, 0.3, 0.1], "std": [0.35, 0.2, 0.25]},
        "shards": [
            {"file": "shard-00000.safetensors", "num_samples": 3, "bytes": 9500, "sha256": "a" * 64},
            {"file": "shard-00001.safetensors", "num_samples": 2, "bytes": 6400, "sha256": "b" * 64},
        ],
    }


@FUZZ
@given(st.text(max_size=300))
def test_manifest_arbitrary_text(text):
    try:
        parse_manifest(text, "fuzz")
    except ShardError as exc:
        assert str(exc).startswith("fuzz")


@FUZZ
@given(JSON)
def test_manifest_arbitrary_json(doc):
    with contextlib.suppress(ShardError):
        parse_manifest(json.dumps(doc), "fuzz")


@st.composite
def mutated_manifest(draw):
    doc = _valid_manifest()
    for _ in range(draw(st.integers(1, 3))):
        targets = {
            "top": doc,
            "normalization": doc.get("normalization"),
            "train_stats": doc.get("train_stats"),
            "shard": doc["shards"][0] if isinstance(doc.get("shards"), list) and doc["shards"] else None,
        }
        obj = targets[draw(st.sampled_from(sorted(targets)))]
        if not isinstance(obj, dict):
            continue
        key = draw(st.sampled_from([*obj, "extra"]))
        if draw(st.integers(0, 4)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = draw(
                JSON
                | st.integers(-5, 10**400)
                | st.sampled_from(
                    ["NaN", "../x.safetensors", ".hidden", "a/b", "shard-00001.safetensors", "A" * 64]
                )
            )
    return json.dumps(doc, allow_nan=True)


@FUZZ
@given(mutated_manifest())
def test_manifest_structured(text):
    try:
        m = parse_manifest(text, "fuzz")
    except ShardError:
        return
    assert isinstance(m, Manifest)
    assert m.num_samples == sum(s.num_samples for s in m.shards)
    assert len({s.file for s in m.shards}) == len(m.shards)
    assert all("/" not in s.file and not s.file.startswith(".") for s in m.shards)
    norm = m.normalization
    assert len(norm.mean) == len(norm.std) == m.image_shape[0]
    assert all(math.isfinite(v) for v in (*norm.mean, *norm.std)) and min(norm.std) > 0
    assert len(m.class_names) == len(m.class_counts) == m.num_classes and sum(m.class_counts) == m.num_samples


def test_the_valid_manifest_is_accepted():
    assert parse_manifest(json.dumps(_valid_manifest()), "m").num_samples == 5


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        (
            json.dumps(
                {
                    **_valid_manifest(),
                    "normalization": {**_valid_manifest()["normalization"], "mean": [0.1, 10**400, 0.2]},
                }
            ),
            "normalization",
        ),
        (
            json.dumps(
                {
                    **_valid_manifest(),
                    "normalization": {**_valid_manifest()["normalization"], "std": [1.0, 1.0, float("inf")]},
                }
            ),
            "normalization",
        ),
        (
            json.dumps(
                {
                    **_valid_manifest(),
                    "normalization": {**_valid_manifest()["normalization"], "mean": [float("nan"), 0.0, 0.0]},
                }
            ),
            "normalization",
        ),
    ],
    ids=["deep-nesting", "huge-int-mean", "infinite-std", "nan-mean"],
)
def test_manifest_hostile_numbers_and_nesting(text, fragment):
    with pytest.raises(ShardError) as err:
        parse_manifest(text, "m.json")
    assert str(err.value).startswith("m.json") and fragment in str(err.value)


# ============================================================================ gzip / download verification


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 1000))
def test_gunzip_arbitrary_bytes(blob, size):
    try:
        out = gunzip_bounded(blob, size)
    except FetchError:
        return
    assert len(out) <= size


@pytest.fixture(scope="module")
def labels_file():
    ds = synth.dataset(n_train=50, n_test=10, seed=4)
    return ds.spec.train.labels, ds.raw[ds.spec.train.labels.name]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_mutated_gzip(labels_file, data):
    spec, raw = labels_file
    blob = bytearray(synth.gz(raw, level=data.draw(st.integers(0, 9))))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "append", "insert"]))
        at = data.draw(st.integers(0, len(blob)))
        if op == "flip" and at < len(blob):
            blob[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del blob[at:]
        elif op == "append":
            blob += data.draw(st.binary(min_size=1, max_size=20))
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=5))
    try:
        verify(spec, bytes(blob))
    except FetchError:
        return
    assert gunzip_bounded(bytes(blob), spec.size) == raw  # accepted only if the content is exactly right


# ============================================================================ images


def _image_seeds() -> dict[str, bytes]:
    """Small valid files of each kind the image-folder source reads: PNG (RGB, L, palette, RGBA,
    interlaced), JPEG (baseline, progressive, grey, CMYK), BMP (RGB, palette), PPM/PGM, TIFF
    (raw, LZW, JPEG inside, CMYK) and WebP (lossy, lossless, with alpha)."""
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    seeds = {}
    for name, fmt, mode, kwargs in [
        ("rgb.png", "PNG", "RGB", {}),
        ("l.png", "PNG", "L", {}),
        ("p.png", "PNG", "P", {}),
        ("rgba.png", "PNG", "RGBA", {}),
        ("interlaced.png", "PNG", "RGB", {"interlace": 1}),
        ("rgb.jpg", "JPEG", "RGB", {}),
        ("progressive.jpg", "JPEG", "RGB", {"progressive": True}),
        ("l.jpg", "JPEG", "L", {}),
        ("cmyk.jpg", "JPEG", "CMYK", {}),
        ("rgb.bmp", "BMP", "RGB", {}),
        ("p.bmp", "BMP", "P", {}),
        ("rgb.ppm", "PPM", "RGB", {}),
        ("l.pgm", "PPM", "L", {}),
        ("rgb.tif", "TIFF", "RGB", {}),
        ("lzw.tiff", "TIFF", "RGB", {"compression": "tiff_lzw"}),
        ("jpeg.tif", "TIFF", "RGB", {"compression": "jpeg"}),
        ("cmyk.tif", "TIFF", "CMYK", {}),
        ("lossy.webp", "WEBP", "RGB", {"quality": 80}),
        ("lossless.webp", "WEBP", "RGB", {"lossless": True}),
        ("rgba.webp", "WEBP", "RGBA", {}),
    ]:
        out = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(out, fmt, **kwargs)
        seeds[name] = out.getvalue()
    return seeds


IMAGE_SEEDS = _image_seeds()


@st.composite
def mutated_image(draw):
    """A valid image file with a few bytes set, inserted or cut off: past the signature, into the
    chunks and the entropy-coded data that only a full decode reaches."""
    name = draw(st.sampled_from(sorted(IMAGE_SEEDS)))
    data = bytearray(IMAGE_SEEDS[name])
    for _ in range(draw(st.integers(1, 6))):
        edit = draw(st.sampled_from(["set", "set", "insert", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if edit == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "truncate":
            del data[at:]
    return name, bytes(data)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-images")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated_image())
def test_image_decode_of_mutated_files(image_folder, case):
    """A damaged image file is refused as a DataError naming the file on one line, with or without
    data.image_shape; whatever is accepted decodes to uint8 (C, H, W) of the asked or found shape.
    A warning Pillow gives while reading it is logged naming the file, never printed bare."""
    name, data = case
    folder = image_folder / "train" / "c"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")
        for shape in (None, (3, 8, 8)):
            try:
                with own_images():  # as the stages and trainer.predict read images
                    found = check_images(image_folder, scan_split(image_folder, "train"), shape)
                    pixels = decode_image(path, shape)
            except DataError as exc:
                assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
                continue
            assert pixels.dtype == np.uint8 and pixels.shape == found and found[0] in (1, 3)
    assert [f"{w.filename}: {w.message}" for w in printed] == []


# ============================================================================ params


@FUZZ
@given(
    st.sampled_from(list(SECTIONS)),
    st.dictionaries(
        st.text(max_size=20)
        | st.sampled_from([f.name for cls in SECTIONS.values() for f in cls.__dataclass_fields__.values()]),
        JSON,
        max_size=4,
    ),
)
def test_params_arbitrary_values(section, values):
    try:
        obj = parse_section(SECTIONS[section], section, values, where="fuzz")
    except ParamsError as exc:
        assert str(exc).startswith(f"fuzz: {section}")
        return
    assert isinstance(obj, SECTIONS[section])


def test_all_project_errors_share_one_base():
    assert all(issubclass(e, PipelineError) for e in (DataError, ParamsError, ShardError))


# ============================================================================ what the fuzzers found, pinned


def test_idx_zero_sized_but_unindexable_shape():
    data = bytes.fromhex("00000803 00000000 ffffffff ffffffff".replace(" ", ""))
    with pytest.raises(DataError, match=r"IDX shape \[0, 4294967295, 4294967295\] cannot be represented"):
        decode_idx(data, "x")


@pytest.mark.parametrize("dtype", [[], {}, 5, None, ["F32"]])
def test_shard_header_non_string_dtype(dtype):
    header = _valid_header()
    header["images"]["dtype"] = dtype
    prefix = _encode(header)
    with pytest.raises(ShardError, match="unsupported dtype"):
        parse_header(prefix, len(prefix) + 3 * 784 * 4 + 24, "s")
