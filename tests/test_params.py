"""params.yaml: every key checked for type and range; unknown keys and sections refused by name.

The type cases are derived from each dataclass field's annotation, so a key
added to :data:`pipeline.params.SECTIONS` is covered without editing this file;
numeric keys must also appear in :data:`RANGES` (a test fails until they do).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
import types
import typing
from typing import Any, Literal

import pytest
import synth
from ruamel.yaml import YAML

from pipeline.errors import ParamsError
from pipeline.params import SECTIONS, load_section, parse_section, read_params_file

FIELDS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
HINTS = {(s, k): typing.get_type_hints(SECTIONS[s])[k] for s, k in FIELDS}


def _args(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def wrong_types(tp: Any) -> list[Any]:
    """Values no field of annotation ``tp`` may accept."""
    options = _args(tp)
    candidates = ["a string", 3, 2.5, True, None, ["x"], {"k": 1}, [1]]
    out = []
    for v in candidates:
        accepted = False
        for o in options:
            origin = typing.get_origin(o)
            if origin is Literal:
                accepted |= v in typing.get_args(o) and type(v) is str
            elif origin is tuple:
                accepted |= isinstance(v, list) and all(isinstance(i, str) for i in v)
            elif o is type(None):
                accepted |= v is None
            elif o is float:
                accepted |= type(v) in (int, float)
            else:
                accepted |= type(v) is o
        if not accepted:
            out.append(v)
    if any(typing.get_origin(o) is Literal for o in options):
        out.append("not-one-of-the-choices")
    if int in options:
        out.append(5.0)  # a float with an integer value is still not an integer
    return out


TYPE_CASES = [(s, k, v) for s, k in FIELDS for v in wrong_types(HINTS[(s, k)])]


def test_all_sections_and_keys_are_covered():
    assert set(SECTIONS) == {"data", "prep", "loader", "train"}
    assert {k for _, k in FIELDS} >= {
        "dataset",
        "mirrors",
        "train_csv",
        "test_csv",
        "compression",
        "row_group_size",
        "shard_size",
        "normalize",
        "num_workers",
        "batch_size",
        "epochs",
        "verify",
    }
    assert len(TYPE_CASES) >= 4 * len(FIELDS)  # every key gets several wrong-type values


@pytest.mark.parametrize("section, key, value", TYPE_CASES, ids=[f"{s}.{k}={v!r}" for s, k, v in TYPE_CASES])
def test_wrong_type_refused_with_key_name(section, key, value):
    with pytest.raises(ParamsError) as err:
        parse_section(SECTIONS[section], section, {key: value}, where="p.yaml")
    message = str(err.value)
    assert message.startswith(f"p.yaml: {section}.{key}: expected ")
    assert "found" in message


# Out-of-range values for every numeric or free-text key; (section, key) -> (bad values, good boundary values)
RANGES: dict[tuple[str, str], tuple[list, list]] = {
    ("data", "mirrors"): ([[""], ["ok", "   "]], [[], ["http://127.0.0.1/x", "/a/folder"]]),
    ("data", "train_csv"): (["", "  "], ["a.csv"]),
    ("data", "test_csv"): (["", "\t"], ["b.csv", None]),
    ("data", "images_dir"): (["", " "], ["data/user/images"]),
    ("data", "image_shape"): (
        [[0, 8, 8], [1, 0, 8], [65, 4, 4], [1, 8, 70000], [1, 3, 8], [3, 8, 3]],
        [None, [1, 4, 4], [1, 8, 8], [3, 32, 32]],
    ),
    ("data", "test_fraction"): ([-0.1, 1, 1.5, math.nan, math.inf], [0, 0.1, 0.5]),
    ("data", "val_fraction"): ([-0.1, 1, math.nan], [0, 0.2]),
    ("data", "timeout_s"): ([0, -1, math.inf, math.nan, 86400.001, 1.0e10], [0.001, 30, 86400]),
    ("data", "min_rate_kbps"): ([-1, math.inf, math.nan], [0, 64.0]),
    ("prep", "row_group_size"): ([0, -1], [1, 65536]),
    ("prep", "shard_size"): ([0, -10], [1, 10000]),
    ("prep", "workers"): ([0, -1], [None, 1, 16]),
    ("prep", "compression_level"): ([0, 23, -1], [None, 1, 22]),  # with the default codec, zstd
    ("loader", "batch_size"): ([0, -512], [1]),
    ("loader", "num_workers"): ([-1], [0, 4]),
    ("loader", "prefetch_factor"): ([0, -2], [None, 1]),
    ("loader", "shuffle_window"): ([0, -1], [None, 1, 64]),
    ("loader", "cache_limit_mb"): ([0, -1, math.inf, math.nan], [None, 0.5, 1024]),
    ("loader", "prefetch_shards"): ([0, -1], [None, 1, 8]),
    ("train", "epochs"): ([0, -1], [1]),
    ("train", "lr"): ([0, -0.001, 0.0, math.inf, -math.inf, math.nan, 1.1e37, 1e38], [1e-9, 1, 0.5, 1e37]),
    ("train", "seed"): ([-1, 2**63, 2**64, 10**30], [0, 2**63 - 1]),
    ("train", "checkpoint_every"): ([-1], [0, 3]),
    ("train", "checkpoint_seconds"): ([0, -1, math.inf, math.nan, 1.0e10], [None, 0.001, 300, 86400]),
    ("train", "processes"): ([0, -1], [1, 2]),
    ("train", "max_restarts"): ([-1], [0, 3]),
    ("train", "threads"): ([0, -1], [None, 1, 2]),
}


def test_every_numeric_key_has_a_range_case():
    numeric = {(s, k) for s, k in FIELDS if any(o in (int, float) for o in _args(HINTS[(s, k)]))}
    assert numeric <= set(RANGES), f"add range cases for {sorted(numeric - set(RANGES))}"
    assert set(RANGES) <= set(FIELDS)


# Keys whose accepted values depend on another key: the image shape is the user's data's to choose.
CONTEXT = {("data", "image_shape"): {"dataset": "csv"}}
RANGE_CASES = [(s, k, v) for (s, k), (bad, _) in RANGES.items() for v in bad]
GOOD_CASES = [(s, k, v) for (s, k), (_, good) in RANGES.items() for v in good]


@pytest.mark.parametrize(
    "section, key, value", RANGE_CASES, ids=[f"{s}.{k}={v!r}" for s, k, v in RANGE_CASES]
)
def test_out_of_range_refused_with_key_name(section, key, value):
    with pytest.raises(ParamsError) as err:
        parse_section(SECTIONS[section], section, {key: value}, where="p.yaml")
    message = str(err.value)
    assert message.startswith(f"p.yaml: {section}.{key}"), message
    assert "expected" in message and "found" in message


@pytest.mark.parametrize("section, key, value", GOOD_CASES, ids=[f"{s}.{k}={v!r}" for s, k, v in GOOD_CASES])
def test_boundary_values_accepted(section, key, value):
    context = CONTEXT.get((section, key), {})
    obj = parse_section(SECTIONS[section], section, {**context, key: value})
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(obj, key) == expected


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_a_built_in_dataset_keeps_its_own_image_shape(dataset):
    """MNIST's images are not resized: a shape meant for the user's own data is refused by the first
    stage that reads it, not by tensorize after two stages ran."""
    for shape in (None, [1, 28, 28]):
        assert parse_section(SECTIONS["data"], "data", {"dataset": dataset, "image_shape": shape})
    for shape in ([3, 28, 28], [1, 32, 32], [3, 32, 32]):
        with pytest.raises(ParamsError) as err:
            parse_section(
                SECTIONS["data"], "data", {"dataset": dataset, "image_shape": shape}, where="p.yaml"
            )
        assert str(err.value) == (
            f"p.yaml: data.image_shape: expected null or [1, 28, 28] for {dataset}, whose images are not "
            f"resized, found {shape} (data.image_shape shapes data.dataset csv and images)"
        )
    for own in ("csv", "images"):
        assert parse_section(SECTIONS["data"], "data", {"dataset": own, "image_shape": [3, 32, 32]})


@pytest.mark.parametrize(
    "test_csv", ["data/user/train.csv", "./data/user/train.csv", "data/user/x/../train.csv"]
)
def test_the_train_csv_as_the_test_csv_is_refused(test_csv):
    """Testing on the train rows reports memorisation as accuracy, without a word."""
    with pytest.raises(ParamsError) as err:
        parse_section(
            SECTIONS["data"],
            "data",
            {"dataset": "csv", "train_csv": "data/user/train.csv", "test_csv": test_csv},
            where="p.yaml",
        )
    assert str(err.value) == (
        "p.yaml: data.test_csv: expected another file than data.train_csv, found the same file, "
        "data/user/train.csv, for both (a test on the train rows measures memory, not accuracy); set "
        "data.test_csv: null and a test split is held out of train (data.test_fraction)"
    )
    for dataset in ("fashion-mnist", "images"):  # the CSV paths are not read then
        assert parse_section(
            SECTIONS["data"], "data", {"dataset": dataset, "train_csv": "a.csv", "test_csv": "a.csv"}
        )
    assert parse_section(SECTIONS["data"], "data", {"dataset": "csv", "test_csv": None})


def test_int_accepted_where_a_float_is_expected():
    lr = parse_section(SECTIONS["train"], "train", {"lr": 1}).lr
    assert lr == 1.0 and type(lr) is float


@pytest.mark.parametrize(
    "compression, level, ok",
    [
        ("zstd", 1, True),
        ("zstd", 22, True),
        ("zstd", 23, False),
        ("gzip", 0, True),
        ("gzip", 9, True),
        ("gzip", 10, False),
        ("brotli", 11, True),
        ("brotli", 12, False),
        ("snappy", 1, False),
        ("lz4", 1, False),
        ("uncompressed", 0, False),
        ("snappy", None, True),
    ],
)
def test_compression_level_depends_on_codec(compression, level, ok):
    values = {"compression": compression, "compression_level": level}
    if ok:
        assert parse_section(SECTIONS["prep"], "prep", values).compression_level == level
    else:
        with pytest.raises(ParamsError, match=r"^p: prep\.compression_level: "):
            parse_section(SECTIONS["prep"], "prep", values, where="p")


@pytest.mark.parametrize("section", list(SECTIONS))
def test_unknown_key_refused_with_its_name(section):
    with pytest.raises(ParamsError) as err:
        parse_section(SECTIONS[section], section, {"no_such_key": 1}, where="p.yaml")
    known = ", ".join(sorted(f.name for f in dataclasses.fields(SECTIONS[section])))
    assert (
        str(err.value) == f"p.yaml: {section}.no_such_key: unknown key; known keys of '{section}' are {known}"
    )


@pytest.mark.parametrize(
    "section, typo", [("prep", "shardsize"), ("loader", "num_worker"), ("train", "epoch"), ("data", "mirror")]
)
def test_typos_are_refused_not_ignored(tmp_path, section, typo):
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {typo}: 1\n")
    with pytest.raises(ParamsError, match=f"^{path}: {section}.{typo}: unknown key"):
        load_section(section, path)


def test_unknown_section_refused(tmp_path):
    path = synth.write_params(tmp_path / "params.yaml", data={}, trian={"epochs": 1})
    with pytest.raises(ParamsError) as err:
        load_section("data", path)
    assert str(err.value) == f"{path}: trian: unknown section; known sections are data, prep, loader, train"


# ============================================================================ the file itself


def test_repository_params_yaml_is_valid_and_complete():
    doc = read_params_file(synth.REPO / "params.yaml")
    for section, cls in SECTIONS.items():
        load_section(section, synth.REPO / "params.yaml")
        assert set(doc[section]) == {f.name for f in dataclasses.fields(cls)}, f"params.yaml {section} keys"


def test_defaults_when_sections_are_missing_or_empty(tmp_path):
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "b.yaml").write_text("prep:\n")
    for section, cls in SECTIONS.items():
        assert load_section(section, tmp_path / "a.yaml") == cls()
        assert load_section(section, tmp_path / "b.yaml") == cls()


def test_yaml_1_2_semantics(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert load_section("train", path).lr == 0.001  # YAML 1.1 would read a string here
    path.write_text("loader:\n  shuffle: yes\n")  # 'yes' is a string in YAML 1.2, not true
    with pytest.raises(ParamsError, match=r"loader\.shuffle: expected true or false, found 'yes'"):
        load_section("loader", path)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("- data\n- prep\n", "expected a mapping of sections at top level, found list"),
        ("just a string\n", "expected a mapping of sections at top level, found str"),
        ("prep: 5\n", "prep: expected a mapping of keys, found int"),
        ("prep: [shard_size, 5]\n", "prep: expected a mapping of keys, found list"),
        ("prep: {shard_size: 5\n", "not valid YAML"),
        ("prep:\n  shard_size: 5\n  shard_size: 6\n", "not valid YAML"),  # duplicate key: ambiguous
        ("prep:\n\tshard_size: 5\n", "not valid YAML"),
        ("prep:\n  shard_size: 1" + "0" * 5000 + "\n", "not valid YAML"),  # int() refuses > 4300 digits
        ("data:\n  mirrors: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),  # recursion
    ],
    ids=[
        "list",
        "scalar",
        "section-int",
        "section-list",
        "unclosed",
        "duplicate-key",
        "tab",
        "5000-digits",
        "deep-nesting",
    ],
)
def test_malformed_files(tmp_path, text, fragment):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_section("prep", path)
    assert str(err.value).startswith(f"{path}: ")
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "train:\n  epochs: 2\n\tlr: 0.1\n",
            "line 3, column 1: not valid YAML: found character '\\t' that cannot "
            "start any token (YAML indents with spaces, never tabs)",
        ),
        (
            "train:\n  epochs: 2\n  epochs: 3\n",
            'line 3, column 3: not valid YAML: found duplicate key "epochs" with '
            'value "3" (original value: "2")',
        ),
    ],
    ids=["tab", "duplicate-key"],
)
def test_yaml_errors_are_one_line_naming_file_line_and_column(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_section("train", path)
    assert str(err.value) == f"{path}: {expected}"  # no '<unicode string>', no link, one line


def test_a_huge_timeout_is_refused_not_an_overflow_later(tmp_path):
    """1e10 s passed validation and then failed in socket code with OverflowError: timestamp out of range."""
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  timeout_s: 1.0e+10\n")
    with pytest.raises(
        ParamsError, match=r"data\.timeout_s: expected a number of seconds > 0 and <= 86400, found"
    ):
        load_section("data", path)


def test_yaml_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "params.yaml"
    path.write_text(f'prep: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_section("prep", path)
    path.write_text(f"data:\n  train_csv: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_section("data", path)
    assert not marker.exists()


def test_billion_laughs_is_refused_quickly_with_a_short_message(tmp_path):
    """Nine levels of aliases make a value with 10**9 leaves; its full repr would never finish.

    Run in a child with a memory cap and a time limit, so a regression fails instead of
    taking the machine down.
    """
    path = tmp_path / "params.yaml"
    path.write_text(_bomb_yaml())
    code = (
        f"import resource, sys; sys.path.insert(0, {str(synth.REPO)!r})\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from pipeline.params import load_section\n"
        "from pipeline.errors import ParamsError\n"
        "try:\n"
        f"    load_section('data', {str(path)!r})\n"
        "except ParamsError as exc:\n"
        "    print(exc)\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"{path}: data.mirrors: expected a list of strings, found [[")
    assert len(proc.stdout) < 500


def _bomb_yaml() -> str:
    inner = "&a1 [x, x, x, x, x, x, x, x, x, x]"
    value = inner
    for i in range(2, 10):
        value = f"&a{i} [{value}" + f", *a{i - 1}" * 9 + "]"
    return f"data:\n  mirrors: {value}\n"


def test_bomb_yaml_really_is_a_bomb():
    """Control for the test above: the document does expand to 10**9 leaves."""
    doc = YAML(typ="safe", pure=True).load(_bomb_yaml())
    v, leaves = doc["data"]["mirrors"], 1
    while isinstance(v, list):
        leaves *= len(v)
        v = v[0]
    assert leaves == 10**9


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_params_file(tmp_path, kind):
    path = tmp_path / "params.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"prep:\n  compression: \xff\xfe\n")
    with pytest.raises(ParamsError) as err:
        load_section("prep", path)
    expected = f"{path}: params file not found" if kind == "missing" else f"{path}: cannot read params file: "
    assert str(err.value).startswith(expected)


def test_frozen_dataclasses():
    obj = load_section("prep", synth.REPO / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.shard_size = 1  # type: ignore[misc]


# ============================================================================ through a stage process


def test_stage_reports_a_bad_param_without_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  dataset: fashion-mnist\nprep:\n  normalize: zscore\n")
    proc = synth.run_stage(
        "tensorize",
        "--params",
        params,
        "--train-parquet",
        "a",
        "--test-parquet",
        "b",
        "--train",
        "out/train",
        "--test",
        "out/test",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"error: {params}: prep.normalize: expected one of 'unit', 'standard', found 'zscore'\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_bad_value_in_any_section_stops_the_first_stage_that_runs(tmp_path):
    """`dvc exp run -S data.val_fraction=0.05 -S train.lr=abc` stops in `tensorize`, before its work,
    not in `train` after `tensorize` has run."""
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  val_fraction: 0.05\ntrain:\n  lr: abc\n")
    with pytest.raises(ParamsError) as refused:
        load_section("prep", params)
    assert str(refused.value) == f"{params}: train.lr: expected a number, found 'abc'"
    params.write_text("data:\n  val_fraction: 0.05\ntrain:\n  lr: 0.01\n")
    assert load_section("data", params).val_fraction == 0.05


def test_stage_reports_an_unknown_section(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data: {}\nextra: {}\n")
    proc = synth.run_stage(
        "csv", "--params", params, "--raw", "r", "--train", "o/a.csv", "--test", "o/b.csv", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"error: {params}: extra: unknown section; known sections are data, prep, loader, train\n"
    )


def test_stage_params_path_missing(tmp_path):
    proc = synth.run_stage("download", "--params", tmp_path / "nope.yaml", "--out", "raw", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nope.yaml'}: params file not found\n"
    assert not (tmp_path / "raw").exists()


def test_params_path_default_is_the_working_directory(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  dataset: csv\n")
    proc = synth.run_stage("download", "--out", "raw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "raw" / "source.json").exists()


def test_augment_names_each_transform_at_most_once(tmp_path):
    params = synth.write_params(tmp_path / "params.yaml", train={"augment": ["flip", "translate", "flip"]})
    with pytest.raises(ParamsError) as err:
        load_section("train", params)
    assert (
        str(err.value)
        == f"{params}: train.augment: expected each of 'flip', 'translate' at most once, found 'flip' twice"
    )
    ok = synth.write_params(tmp_path / "ok.yaml", train={"augment": ["translate", "flip"]})
    assert load_section("train", ok).augment == ("translate", "flip")


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("train:\n  precision: null\n", "found null"),
        ("train:\n  augment: true\n", "found true"),
        ("data:\n  mirrors: [a, null, false]\n", "found ['a', null, false]"),
    ],
)
def test_a_refused_value_is_shown_as_yaml_writes_it(tmp_path, text, found):
    """null, true and false as the user wrote them, not Python's None, True and False."""
    params = tmp_path / "params.yaml"
    params.write_text(text)
    section = text.split(":")[0]
    with pytest.raises(ParamsError) as err:
        load_section(section, params)
    assert str(err.value).endswith(found), str(err.value)


@pytest.mark.parametrize(
    "shape, message",
    [
        ([0, 8, 8], "data.image_shape[0]: expected an integer 1..64 (channels), found 0"),
        ([1, 0, 8], "data.image_shape[1]: expected an integer 4..65536 (the model halves it twice), found 0"),
        (
            [3, 8, 70000],
            "data.image_shape[2]: expected an integer 4..65536 (the model halves it twice), found 70000",
        ),
        (
            [28, 28, 1],
            "data.image_shape[2]: expected an integer 4..65536 (the model halves it twice), found 1 "
            "([H, W, C] order? expected [C, H, W], channels first: [1, 28, 28])",
        ),
        (
            [32, 24, 3],
            "data.image_shape[2]: expected an integer 4..65536 (the model halves it twice), found 3 "
            "([H, W, C] order? expected [C, H, W], channels first: [3, 32, 24])",
        ),
        ([1, 8, 3], "data.image_shape[2]: expected an integer 4..65536 (the model halves it twice), found 3"),
    ],
)
def test_an_image_shape_item_out_of_range_gets_that_items_expectation(tmp_path, shape, message):
    """H and W are checked against a side's range, not the channels' (each item its own)."""
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  image_shape: {shape}\n")
    with pytest.raises(ParamsError) as err:
        load_section("data", params)
    assert str(err.value) == f"{params}: {message}"
