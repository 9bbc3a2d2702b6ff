"""Hostile tensor splits are refused before training: ShardError naming the file, exit 2, no traceback.

Each case starts from a valid split (3 shards of 50/50/20 samples) and damages
one thing. Where the damage would already be caught by the manifest's byte
count or hash, the manifest is updated to match, so the deeper check is the
one under test (an attacker who can write shards can write the manifest too).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import run_stage
from pipeline.errors import ShardError
from pipeline.manifest import PixelStats
from pipeline.normalize import make_normalization
from pipeline.tensorize import write_split
from stages.train import main
from tests.test_trainer import make_split
from trainer.data import ShardDataset
from trainer.loader import unwrap_worker_error
from trainer.verify import check_compatible, validate_split

ROOT = Path(__file__).resolve().parent.parent
SHARD = "shard-00000.safetensors"


@pytest.fixture
def split(tmp_path: Path) -> Path:
    make_split(tmp_path / "train", 120, split="train", shard_size=50)
    return tmp_path / "train"


def manifest_of(split: Path) -> dict:
    return json.loads((split / "manifest.json").read_text())


def save_manifest(split: Path, doc: dict) -> None:
    (split / "manifest.json").write_text(json.dumps(doc))


def put_shard(split: Path, blob: bytes, *, fix_manifest: bool = True, name: str = SHARD) -> None:
    """Replace a shard; with ``fix_manifest`` its size and hash in the manifest follow."""
    (split / name).write_bytes(blob)
    if fix_manifest:
        doc = manifest_of(split)
        for entry in doc["shards"]:
            if entry["file"] == name:
                entry["bytes"] = len(blob)
                entry["sha256"] = hashlib.sha256(blob).hexdigest()
        save_manifest(split, doc)


def raw_shard(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def tensors(n: int = 50, **override: np.ndarray) -> dict[str, np.ndarray]:
    out = {"images": np.zeros((n, 1, 28, 28), np.float32), "labels": np.zeros(n, np.int64)}
    out.update(override)
    return {k: v for k, v in out.items() if v is not None}


def original(split: Path) -> bytes:
    return (split / SHARD).read_bytes()


def layout(split: Path) -> tuple[dict, bytes]:
    blob = original(split)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _offsets(split: Path, images: list[int], labels: list[int]) -> None:
    header, data = layout(split)
    header["images"]["data_offsets"], header["labels"]["data_offsets"] = images, labels
    put_shard(split, raw_shard(header, data))


def _with_pixel(sample: int, value: float) -> np.ndarray:
    """Valid images (within a train split's [0, 1]) with one pixel of ``sample`` set to ``value``."""
    images = np.full((50, 1, 28, 28), 0.5, np.float32)
    images[sample, 0, 27, 3] = value
    return images


IMG = 50 * 784 * 4
LAB = 50 * 8


def _emptied(doc: dict) -> dict:
    """``doc`` as a consistent manifest of a split without samples."""
    return {**doc, "shards": [], "num_samples": 0, "class_counts": [0] * doc["num_classes"]}


def _first_shard_one_short(doc: dict) -> dict:
    """The first shard's entry says 49 samples and the totals agree, so only the shard itself disagrees."""
    counts = list(doc["class_counts"])
    counts[next(i for i, c in enumerate(counts) if c)] -= 1
    return {
        **doc,
        "num_samples": doc["num_samples"] - 1,
        "class_counts": counts,
        "shards": [{**doc["shards"][0], "num_samples": 49}, *doc["shards"][1:]],
    }


# (id, damage, words the message must contain)
CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    (
        "truncated",
        lambda s: put_shard(s, original(s)[:-100], fix_manifest=False),
        ("bytes, the manifest says",),
    ),
    ("truncated-manifest-updated", lambda s: put_shard(s, original(s)[:-8]), ("data buffer is",)),
    ("appended-bytes", lambda s: put_shard(s, original(s) + b"\0" * 8), ("data buffer is",)),
    ("empty-file", lambda s: put_shard(s, b"", fix_manifest=False), ("0 bytes",)),
    (
        "shorter-than-length-prefix",
        lambda s: put_shard(s, b"\x01\x02\x03\x04\x05\x06\x07\x08"),
        ("header length",),
    ),
    (
        "header-length-past-eof",
        lambda s: put_shard(s, struct.pack("<Q", 2**63) + original(s)[8:]),
        ("runs past the end",),
    ),
    (
        "header-length-over-limit",
        lambda s: put_shard(s, raw_shard({}, b"\0" * (2 << 20), length=(1 << 20) + 8)),
        ("exceeds the limit",),
    ),
    (
        "header-not-json",
        lambda s: put_shard(s, raw_shard(b"{not json", original(s)[-100:])),
        ("not valid UTF-8 JSON",),
    ),
    ("header-not-utf8", lambda s: put_shard(s, raw_shard(b'{"\xff": 1}', b"")), ("not valid UTF-8 JSON",)),
    ("header-a-list", lambda s: put_shard(s, raw_shard([1, 2], b"")), ("must be a JSON object",)),
    (
        "header-duplicate-key",
        lambda s: put_shard(s, raw_shard(b'{"labels": {}, "labels": {}}', b"")),
        ("duplicate key",),
    ),
    (
        "header-deep-nesting",
        lambda s: put_shard(s, raw_shard(b"[" * 100_000 + b"]" * 100_000, b"")),
        ("JSON",),
    ),
    (
        "unknown-dtype",
        lambda s: put_shard(
            s, raw_shard({"images": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
        ),
        ("unsupported dtype",),
    ),
    (
        "negative-dim",
        lambda s: put_shard(
            s, raw_shard({"labels": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"")
        ),
        ("shape must be",),
    ),
    (
        "shape-overflow",
        lambda s: put_shard(
            s,
            raw_shard(
                {"labels": {"dtype": "I64", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
        ),
        ("needs",),
    ),
    ("overlapping-offsets", lambda s: _offsets(s, [0, IMG], [IMG - 8, IMG + LAB - 8]), ("overlaps",)),
    ("gap-between-tensors", lambda s: _offsets(s, [0, IMG], [IMG + 8, IMG + LAB + 8]), ("gap",)),
    (
        "tensor-moved-out-of-its-slot",
        lambda s: _offsets(s, [LAB, LAB + IMG], [IMG + LAB, IMG + 2 * LAB]),
        ("gap",),
    ),
    (
        "misaligned-tensor",
        lambda s: put_shard(
            s,
            raw_shard(
                {
                    "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                    "labels": {"dtype": "I64", "shape": [1], "data_offsets": [1, 9]},
                },
                b"\0" * 9,
            ),
        ),
        ("not aligned",),
    ),
    (
        "images-float64",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(images=np.zeros((50, 1, 28, 28), np.float64)))),
        ("'images'", "float32 [50, 1, 28, 28]", "float64"),
    ),
    (
        "images-flat",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(images=np.zeros((50, 784), np.float32)))),
        ("'images'", "[50, 784]"),
    ),
    (
        "labels-int32",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(labels=np.zeros(50, np.int32)))),
        ("'labels'", "int32"),
    ),
    (
        "fewer-samples-than-manifest",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(49))),
        ("[50, 1, 28, 28]", "[49, 1, 28, 28]"),
    ),
    (
        "labels-missing",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(labels=None))),
        ("'labels' is missing",),
    ),
    (
        "extra-tensor",
        lambda s: put_shard(s, safetensors.numpy.save({**tensors(), "payload": np.zeros(3, np.uint8)})),
        ("unexpected tensor 'payload'",),
    ),
    (
        "label-too-large",
        lambda s: put_shard(
            s, safetensors.numpy.save(tensors(labels=np.r_[np.zeros(49), 10].astype(np.int64)))
        ),
        ("labels[49]", "0..9", "found 10"),
    ),
    (
        "label-negative",
        lambda s: put_shard(
            s, safetensors.numpy.save(tensors(labels=np.r_[-1, np.zeros(49)].astype(np.int64)))
        ),
        ("labels[0]", "found -1"),
    ),
    (
        "images-nan",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(images=_with_pixel(7, np.nan)))),
        ("images[7]", "expected finite pixel values"),
    ),
    (
        "images-infinite",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(images=_with_pixel(49, -np.inf)))),
        ("images[49]", "expected finite pixel values"),
    ),
    (
        "metadata-other-split",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(), metadata={"split": "test"})),
        ("metadata split", "'test'"),
    ),
    (
        "metadata-other-dataset",
        lambda s: put_shard(s, safetensors.numpy.save(tensors(), metadata={"dataset": "mnist"})),
        ("metadata dataset",),
    ),
    (
        "manifest-count-mismatch",
        lambda s: save_manifest(s, {**manifest_of(s), "num_samples": 121}),
        ("num_samples",),
    ),
    (
        "manifest-shard-count-mismatch",
        lambda s: save_manifest(s, _first_shard_one_short(manifest_of(s))),
        ("[49, 1, 28, 28]", "[50, 1, 28, 28]"),
    ),
    # only the val split may be empty (data.val_fraction 0)
    (
        "manifest-empty",
        lambda s: ([p.unlink() for p in s.glob("*.safetensors")], save_manifest(s, _emptied(manifest_of(s)))),
        ("expected at least one sample in the train split, found none",),
    ),
    (
        "manifest-empty-shards-listed",
        lambda s: save_manifest(s, _emptied(manifest_of(s))),
        ("shard-00000.safetensors", "not listed in the manifest"),
    ),
    (
        "manifest-num-samples-zero",
        lambda s: save_manifest(s, {**manifest_of(s), "num_samples": 0}),
        ("num_samples is 0 but the shards hold 120 and class_counts add up to 120",),
    ),
    (
        "manifest-class-counts-sum",
        lambda s: save_manifest(
            s, {**(d := manifest_of(s)), "class_counts": [c + 1 for c in d["class_counts"]]}
        ),
        ("num_samples is 120 but the shards hold 120 and class_counts add up to 130",),
    ),
    (
        "manifest-class-counts-length",
        lambda s: save_manifest(s, {**(d := manifest_of(s)), "class_counts": d["class_counts"][:9]}),
        ("class_counts: expected 10 integers >= 0",),
    ),
    (
        "manifest-class-names-duplicate",
        lambda s: save_manifest(s, {**manifest_of(s), "class_names": ["a"] * 10}),
        ("class_names: expected 10 distinct non-empty names",),
    ),
    (
        "manifest-image-shape-other",
        lambda s: save_manifest(s, {**manifest_of(s), "image_shape": [1, 14, 56]}),
        ("'images'", "float32 [50, 1, 14, 56]", "[50, 1, 28, 28]"),
    ),
    (
        "manifest-image-shape-zero",
        lambda s: save_manifest(s, {**manifest_of(s), "image_shape": [0, 28, 28]}),
        ("image_shape: expected [C, H, W] of integers 1..65536",),
    ),
    (
        "manifest-normalization-scalar",
        lambda s: save_manifest(
            s, {**(d := manifest_of(s)), "normalization": {**d["normalization"], "mean": 0.0}}
        ),
        ("normalization: mean: expected list, found 0.0",),
    ),
    (
        "manifest-train-stats-per-channel",
        lambda s: save_manifest(
            s, {**manifest_of(s), "train_stats": {"mean": [0.5, 0.5, 0.5], "std": [0.3, 0.3, 0.3]}}
        ),
        ("train_stats: mean: expected 1 finite numbers",),
    ),
    ("manifest-missing", lambda s: (s / "manifest.json").unlink(), ("manifest not found",)),
    ("manifest-not-json", lambda s: (s / "manifest.json").write_text("{"), ("not valid JSON",)),
    ("manifest-a-list", lambda s: (s / "manifest.json").write_text("[]"), ("expected a JSON object",)),
    (
        "manifest-wrong-version",
        lambda s: save_manifest(s, {**manifest_of(s), "schema_version": 1}),
        (
            "manifest.json: schema_version 1 is not this pipeline's 2; "
            "rerun `dvc repro tensorize` to rebuild the shards",
        ),
    ),
    (
        "manifest-future-version",
        lambda s: save_manifest(s, {**manifest_of(s), "schema_version": 3}),
        ("schema_version 3 is not this pipeline's 2",),
    ),
    (
        "manifest-unknown-key",
        lambda s: save_manifest(s, {**manifest_of(s), "exec": "rm -rf /"}),
        ("unknown key 'exec'",),
    ),
    (
        "manifest-path-traversal",
        lambda s: save_manifest(
            s,
            {
                **(d := manifest_of(s)),
                "shards": [{**d["shards"][0], "file": "../train/" + SHARD}, *d["shards"][1:]],
            },
        ),
        ("plain file name",),
    ),
    (
        "manifest-other-split",
        lambda s: save_manifest(s, {**manifest_of(s), "split": "test"}),
        ("split: expected 'train'",),
    ),
    (
        "manifest-float64-images",
        lambda s: save_manifest(s, {**manifest_of(s), "image_dtype": "float64"}),
        ("float32",),
    ),
    (
        "shard-missing",
        lambda s: (s / "shard-00001.safetensors").unlink(),
        ("shard-00001.safetensors", "missing"),
    ),
    (
        "shard-extra",
        lambda s: (s / "shard-00009.safetensors").write_bytes(original(s)),
        ("shard-00009.safetensors", "not listed"),
    ),
    ("shard-is-a-folder", lambda s: ((s / SHARD).unlink(), (s / SHARD).mkdir()), ("regular file",)),
]


@pytest.mark.parametrize(("damage", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_split_is_refused(split: Path, damage, words: tuple[str, ...]) -> None:
    damage(split)
    with pytest.raises(ShardError) as exc:
        validate_split(split, expected_split="train")
    message = str(exc.value)
    assert str(split) in message, message  # names the folder or the file
    for word in words:
        assert word in message, message


def test_tampered_bytes_pass_the_header_check_and_fail_the_full_check(split: Path) -> None:
    blob = bytearray(original(split))
    blob[-LAB - 4] ^= 0x40  # inside the images tensor: the header stays valid
    (split / SHARD).write_bytes(bytes(blob))
    assert validate_split(split, expected_split="train", verify="header").num_samples == 120
    with pytest.raises(ShardError, match=f"{SHARD}: SHA-256 is [0-9a-f]{{64}}, the manifest says"):
        validate_split(split, expected_split="train", verify="full")


FASHION = (
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
)


@pytest.mark.parametrize(
    "key, overrides, found",
    [
        ("dataset", dict(dataset="mnist"), "'mnist'"),
        (
            "normalization",
            dict(normalization=make_normalization("standard", PixelStats((0.5,), (0.25,)))),
            "Normalization(kind='standard', mean=(0.5,), std=(0.25,), stats_from='train')",
        ),
        ("class_names", dict(class_names=tuple(f"c{i}" for i in range(10))), "('c0', 'c1', "),
        (
            "image_shape",
            dict(image_shape=(3, 28, 28), normalization=make_normalization("unit", None, 3)),
            "(3, 28, 28)",
        ),
    ],
    ids=["dataset", "normalization", "class_names", "image_shape"],
)
def test_train_and_test_must_share_dataset_and_normalization(tmp_path: Path, key, overrides, found) -> None:
    """And their classes and image shape: each test split below is valid on its own but unlike the train
    split."""
    make_split(tmp_path / "train", 60, split="train", shard_size=50)
    train = validate_split(tmp_path / "train", expected_split="train")
    make_split(tmp_path / "same", 20, split="test", shard_size=50, seed=3)
    check_compatible(train, validate_split(tmp_path / "same", expected_split="test"))
    shape = overrides.get("image_shape", (1, 28, 28))
    rng = np.random.default_rng(0)
    kw = {
        "dataset": "fashion-mnist",
        "normalization": make_normalization("unit", None),
        "class_names": FASHION,
        **overrides,
    }
    write_split(
        [(rng.integers(0, 256, (20, int(np.prod(shape))), dtype=np.uint8), rng.integers(0, 10, 20))],
        tmp_path / "test",
        split="test",
        shard_size=50,
        **kw,
    )
    test = validate_split(tmp_path / "test", expected_split="test")
    with pytest.raises(ShardError) as exc:
        check_compatible(train, test)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path / 'test' / 'manifest.json'}: {key}: expected "), message
    assert f" like the train split, found {found}" in message, message


def test_only_the_val_split_may_be_empty(tmp_path: Path) -> None:
    make_split(tmp_path / "val", 60, split="val", shard_size=50)
    doc = manifest_of(tmp_path / "val")
    for p in (tmp_path / "val").glob("*.safetensors"):
        p.unlink()
    save_manifest(tmp_path / "val", _emptied(doc))
    valid = validate_split(tmp_path / "val", expected_split="val", verify="full")
    assert valid.num_samples == 0 and valid.shards == ()
    save_manifest(tmp_path / "val", {**_emptied(doc), "split": "test"})
    with pytest.raises(ShardError) as exc:
        validate_split(tmp_path / "val", expected_split="test")
    assert str(exc.value) == (
        f"{tmp_path / 'val' / 'manifest.json'}: expected at least one sample in the test split, found none"
    )


def test_shard_replaced_after_validation_is_not_mapped(split: Path) -> None:
    dataset = ShardDataset(validate_split(split, expected_split="train"))
    put_shard(split, original(split)[:-8], fix_manifest=False)
    with pytest.raises(ShardError, match="changed after it was validated"):
        dataset[torch.tensor([0])]


@pytest.fixture
def pristine(split: Path) -> tuple[Path, bytes]:
    return split, original(split)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_shard_bytes_raise_only_shard_errors(pristine: tuple[Path, bytes], data) -> None:
    """Random edits of a valid shard (mostly its header) and random whole files: a ShardError or a valid
    split."""
    split, base = pristine
    if data.draw(st.booleans()):
        blob = bytearray(base)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, 300))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        blob = bytes(blob)
    else:
        blob = data.draw(st.binary(max_size=400))
    put_shard(split, blob)
    try:
        validated = validate_split(split, expected_split="train", verify="full")
    except ShardError:
        return
    images, labels = ShardDataset(validated)[torch.arange(120)]
    assert images.shape == (120, 1, 28, 28) and bool(((labels >= 0) & (labels < 10)).all())


@pytest.mark.parametrize(
    "case", ["truncated", "label-too-large", "manifest-wrong-version", "shard-extra", "manifest-empty"]
)
def test_train_stage_reports_shard_errors_in_one_line(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    make_split(tmp_path / "train", 120, split="train", shard_size=50)
    make_split(tmp_path / "test", 60, split="test", shard_size=50)
    dict((c[0], c[1]) for c in CASES)[case](tmp_path / "train")
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    monkeypatch.chdir(tmp_path)
    argv = [
        "--params",
        "params.yaml",
        "--train",
        "train",
        "--test",
        "test",
        "--model",
        "models",
        "--checkpoints",
        "checkpoints",
        "--live",
        "dvclive",
    ]
    with pytest.raises(SystemExit) as exc:
        run_stage(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "train" in err, err
    assert not any((tmp_path / p).exists() for p in ("models", "checkpoints", "dvclive"))


def test_train_stage_process_refuses_a_tampered_shard_with_verify_full(tmp_path: Path) -> None:
    make_split(tmp_path / "train", 120, split="train", shard_size=50)
    make_split(tmp_path / "test", 60, split="test", shard_size=50)
    blob = bytearray((tmp_path / "test" / SHARD).read_bytes())
    blob[-LAB - 4] ^= 0x01
    (tmp_path / "test" / SHARD).write_bytes(bytes(blob))
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n  verify: full\n")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train",
            "--train",
            "train",
            "--test",
            "test",
            "--model",
            "models",
            "--checkpoints",
            "checkpoints",
            "--live",
            "dvclive",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "SHA-256" in res.stderr and SHARD in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()


def test_shard_replaced_under_a_worker_is_reported_without_the_worker_traceback(split: Path) -> None:
    dataset = ShardDataset(validate_split(split, expected_split="train"))
    put_shard(split, original(split)[:-8], fix_manifest=False)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=[torch.tensor([0, 1])], batch_size=None, num_workers=1
    )
    with pytest.raises(ShardError) as exc:
        next(iter(loader))
    assert "Traceback" in str(exc.value)  # what DataLoader makes of a worker's exception
    clean = unwrap_worker_error(exc.value)
    assert isinstance(clean, ShardError) and "Traceback" not in str(clean)
    assert str(clean).startswith(f"{split / SHARD}: shard changed after it was validated (size ")
    # The traceback's frames hold the iterator: cleared, its worker is shut down here, not by a garbage
    # collection at the session's end (where pytest-xdist's teardown can interrupt the shutdown).
    traceback.clear_frames(exc.tb)
