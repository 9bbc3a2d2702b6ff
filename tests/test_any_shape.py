"""Any image shape, class names and held-out splits: CSV -> Parquet -> shards -> model, on generated data."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import synth
import torch

from pipeline import params
from pipeline.csvdata import import_user_csv
from pipeline.errors import DataError, ParamsError
from pipeline.parquet import csv_to_parquet
from pipeline.splits import TEST, VAL, assign, hash_unit
from pipeline.tensorize import tensorize
from trainer import model
from trainer.model import NUM_PARAMETERS, SimpleCNN, count_parameters

CODEC = {"compression": "zstd", "compression_level": None, "row_group_size": 64}


def shaped_csv(
    path: Path,
    n: int,
    shape: tuple[int, int, int],
    *,
    labels: list | None = None,
    seed: int = 0,
    names: list[str] | None = None,
) -> tuple[np.ndarray, list]:
    """A CSV of ``n`` random images of ``shape`` (pixel columns named ``names``, default p0..); returns
    pixels, labels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, int(np.prod(shape))), dtype=np.uint8)
    labels = labels if labels is not None else rng.integers(0, 5, n).tolist()
    names = names or [f"p{i}" for i in range(pixels.shape[1])]
    lines = [",".join(["label", *names])]
    lines += [",".join([str(lab), *map(str, row)]) for lab, row in zip(labels, pixels.tolist())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return pixels, labels


def to_parquet(tmp: Path, train_csv: Path, test_csv: Path | None, shape=None) -> tuple[Path, Path]:
    """The csv and parquet stages' library calls; ``test_csv`` None: an empty test split."""
    out = {}
    for split, src in (("train", train_csv), ("test", test_csv)):
        canonical = tmp / "csv" / f"{split}.csv"
        if src is None:
            canonical.write_text("label," + ",".join(f"pixel{i}" for i in range(1, 1 + out["n"])) + "\n")
        else:
            got_shape, _ = import_user_csv(src, canonical, image_shape=shape, check_values=True)
            out["n"] = int(np.prod(got_shape))
        out[split] = tmp / "pq" / f"{split}.parquet"
        csv_to_parquet(canonical, out[split], allow_empty=split == "test", **CODEC)
    return out["train"], out["test"]


def load(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [safetensors.numpy.load_file(folder / s["file"]) for s in manifest["shards"]]
    if not parts:
        return np.zeros((0, *manifest["image_shape"]), np.float32), np.zeros(0, np.int64), manifest
    return (
        np.concatenate([p["images"] for p in parts]),
        np.concatenate([p["labels"] for p in parts]),
        manifest,
    )


# ============================================================================ splits


def test_split_of_a_sample_never_moves_when_samples_are_added():
    keys = [f"img/{i}.png".encode() for i in range(3000)]
    before = assign(hash_unit(keys), test_fraction=0.1, val_fraction=0.2)
    more = keys + [f"new/{i}.png".encode() for i in range(2000)]
    after = assign(hash_unit(more), test_fraction=0.1, val_fraction=0.2)
    assert np.array_equal(after[:3000], before)
    # and shares are near the fractions (3000 samples: binomial sd ~0.5-0.7 points)
    assert abs((before == TEST).mean() - 0.1) < 0.025 and abs((before == VAL).mean() - 0.2) < 0.03
    # changing val_fraction never moves a test sample
    other = assign(hash_unit(keys), test_fraction=0.1, val_fraction=0.05)
    assert np.array_equal(other == TEST, before == TEST)


def test_held_out_test_and_val_are_stratified_and_stable(tmp_path):
    n = 2000
    labels = [i % 4 for i in range(n)]  # four balanced classes
    _pixels, _ = shaped_csv(tmp_path / "train.csv", n, (1, 4, 4), labels=labels, seed=1)
    pq = to_parquet(tmp_path / "a", tmp_path / "train.csv", None)
    out = tmp_path / "t"
    manifests = tensorize(
        *pq,
        out / "train",
        out / "test",
        out / "val",
        dataset="csv",
        shard_size=300,
        normalize_kind="unit",
        test_fraction=0.1,
        val_fraction=0.15,
    )
    counts = {s: np.array(m.class_counts) for s, m in manifests.items()}
    assert sum(int(c.sum()) for c in counts.values()) == n
    for split, frac in (("test", 0.1), ("val", 0.15)):
        share = counts[split] / (n // 4)
        assert np.all(np.abs(share - frac) < 0.06), (split, share)  # every class keeps its share
    # the same rows plus 500 new ones: every old row stays in its split
    more_pixels = np.random.default_rng(9).integers(0, 256, (500, 16), dtype=np.uint8)
    rows = (tmp_path / "train.csv").read_text()
    rows += "".join(",".join(map(str, [i % 4, *p])) + "\n" for i, p in enumerate(more_pixels.tolist()))
    (tmp_path / "train2.csv").write_text(rows)
    pq2 = to_parquet(tmp_path / "b", tmp_path / "train2.csv", None)
    out2 = tmp_path / "t2"
    tensorize(
        *pq2,
        out2 / "train",
        out2 / "test",
        out2 / "val",
        dataset="csv",
        shard_size=300,
        normalize_kind="unit",
        test_fraction=0.1,
        val_fraction=0.15,
    )
    for split in ("train", "val", "test"):
        old = {bytes(x.tobytes()) for x in (load(out / split)[0] * 255).round().astype(np.uint8)}
        new = {bytes(x.tobytes()) for x in (load(out2 / split)[0] * 255).round().astype(np.uint8)}
        assert old <= new, split


@pytest.mark.parametrize("workers", [1, 2])  # the serial path and the parallel one
def test_empty_train_or_held_out_split_refused(tmp_path, workers):
    shaped_csv(tmp_path / "train.csv", 3, (1, 4, 4), labels=[0, 1, 0])
    pq = to_parquet(tmp_path, tmp_path / "train.csv", None)
    with pytest.raises(DataError, match="the test split would be empty"):
        tensorize(
            *pq,
            tmp_path / "o/train",
            tmp_path / "o/test",
            dataset="csv",
            shard_size=8,
            normalize_kind="unit",
            test_fraction=0.01,
            workers=workers,
        )
    assert not (tmp_path / "o").exists() or synth.leftovers(tmp_path / "o") == []


# ============================================================================ shapes and classes


def test_rgb_17x23_named_classes_per_channel_standard(tmp_path):
    shape = (3, 17, 23)
    names = ["zebra", "ant", "cat, wild", "bee"]
    labels = [names[i % 4] for i in range(60)]
    pixels, _ = shaped_csv(tmp_path / "train.csv", 60, shape, labels=[f'"{x}"' for x in labels], seed=2)
    _test_pixels, _ = shaped_csv(tmp_path / "test.csv", 12, shape, labels=["ant", "bee"] * 6, seed=3)
    pq = to_parquet(tmp_path, tmp_path / "train.csv", tmp_path / "test.csv", shape=shape)
    out = tmp_path / "t"
    m = tensorize(
        *pq,
        out / "train",
        out / "test",
        out / "val",
        dataset="csv",
        shard_size=25,
        normalize_kind="standard",
        image_shape=shape,
    )
    assert m["train"].class_names == ("ant", "bee", "cat, wild", "zebra")  # sorted names; indices follow
    assert m["train"].image_shape == shape and m["test"].class_counts == (6, 6, 0, 0)
    images, got, manifest = load(out / "train")
    assert images.shape == (60, *shape) and [len(s) for s in [manifest["shards"]]] == [3]
    assert got.tolist() == [sorted(names).index(x) for x in labels]
    planes = pixels.reshape(60, 3, -1).astype(np.float64) / 255
    for c in range(3):  # each channel normalised with its own train statistics, exactly as the table says
        mean, std = np.float32(planes[:, c].mean()), np.float32(planes[:, c].std())
        assert m["train"].normalization.mean[c] == pytest.approx(float(mean), abs=1e-6)
        assert m["train"].normalization.std[c] == pytest.approx(float(std), abs=1e-6)
        table = (
            np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(m["train"].normalization.mean[c])
        ) / np.float32(m["train"].normalization.std[c])
        expected = table[pixels.reshape(60, 3, -1)[:, c]]
        assert np.array_equal(images.reshape(60, 3, -1)[:, c].view(np.uint32), expected.view(np.uint32))
    test_images, _, _ = load(out / "test")
    assert test_images.shape == (12, *shape)


@pytest.mark.parametrize("workers", [1, 2])  # the serial path and the parallel one
def test_integer_labels_make_classes_up_to_the_largest_with_a_notice(tmp_path, caplog, workers):
    shaped_csv(tmp_path / "train.csv", 30, (1, 8, 8), labels=[0, 1, 2, 3, 5] * 6)  # no 4
    shaped_csv(tmp_path / "test.csv", 5, (1, 8, 8), labels=[0, 1, 2, 3, 5], seed=4)
    pq = to_parquet(tmp_path, tmp_path / "train.csv", tmp_path / "test.csv")
    caplog.set_level(logging.INFO, logger="pipeline")
    m = tensorize(
        *pq,
        tmp_path / "o/train",
        tmp_path / "o/test",
        dataset="csv",
        shard_size=8,
        normalize_kind="unit",
        workers=workers,
    )
    assert m["train"].class_names == ("0", "1", "2", "3", "4", "5") and m["train"].class_counts[4] == 0
    assert caplog.record_tuples == [
        ("pipeline.tensorize", logging.INFO, "1 class(es) have no train samples: 4")
    ]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("labels", [["cat"] * 6, [3] * 6], ids=["one-name", "one-integer"])
def test_a_train_split_of_one_class_is_refused(tmp_path, workers, labels):
    """A classifier of one class learns nothing and its test accuracy reads 1.0: refused, nothing left.
    Integer labels 3 make classes 0..3, of which one has samples."""
    shaped_csv(tmp_path / "train.csv", 6, (1, 4, 4), labels=labels)
    shaped_csv(tmp_path / "test.csv", 2, (1, 4, 4), labels=labels[:2], seed=4)
    pq = to_parquet(tmp_path, tmp_path / "train.csv", tmp_path / "test.csv")
    with pytest.raises(DataError) as err:
        tensorize(
            *pq,
            tmp_path / "o/train",
            tmp_path / "o/test",
            dataset="csv",
            shard_size=2,
            normalize_kind="unit",
            workers=workers,
        )
    assert str(err.value) == (
        f"{pq[0]}: the train split holds samples of 1 class ({labels[0]}); expected at least 2 classes"
    )
    assert synth.leftovers(tmp_path / "o") == []


def test_test_class_unknown_to_train_is_refused(tmp_path):
    shaped_csv(tmp_path / "train.csv", 6, (1, 4, 4), labels=["a", "b"] * 3)
    shaped_csv(tmp_path / "test.csv", 3, (1, 4, 4), labels=["a", "c", "b"])
    pq = to_parquet(tmp_path, tmp_path / "train.csv", tmp_path / "test.csv")
    with pytest.raises(DataError) as err:
        tensorize(
            *pq, tmp_path / "o/train", tmp_path / "o/test", dataset="csv", shard_size=8, normalize_kind="unit"
        )
    assert str(err.value) == (
        f"{pq[1]}: row 2, column 'label': class 'c' has no train samples; the train split's classes are a, b"
    )
    assert synth.leftovers(tmp_path / "o") == []


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: shaped_csv(p, 3, (1, 4, 5)),
            "{p}: line 1 (header): 20 pixel columns are not a square grey image; "
            "set data.image_shape to [C, H, W] in params.yaml",
        ),
        (
            lambda p: p.write_text("label,a,b,c,d\n1,2,3,4,5\n,1,2,3,4\n"),
            "{p}: row 2 (line 3), column 1 (label): expected an integer 0..65535, found an empty cell",
        ),
        (
            lambda p: p.write_text("label,a,b,c,d\ncat,2,3,4,5\n ,1,2,3,4\n"),
            "{p}: row 2 (line 3), column 1 (label): expected a class name, found an empty cell",
        ),
        (
            lambda p: p.write_text("label,a,b,c,d\n1,2,3,4,5\ncat,1,2,3,4\n"),
            "{p}: row 2 (line 3), column 1 (label): expected an integer 0..65535 like the first row's, "
            "found 'cat' (labels must not mix integers and names)",
        ),
        (
            lambda p: p.write_text("label,a,b,c,d\ncat,2,3,4,5\n7,1,2,3,4\n"),
            "{p}: row 2 (line 3), column 1 (label): expected a class name like the first row's, "
            "found the integer '7' (labels must not mix integers and names)",
        ),
        (
            lambda p: p.write_text("label,a,b,c,d\n1,2,3,4,5\n1,2,3,4\n"),
            "{p}: row 2 (line 3): expected 5 values, found 4",
        ),
        (
            lambda p: p.write_text("label,a,b,c,d\n1,2,3,4,5\n65536,1,2,3,4\n"),
            "{p}: row 2 (line 3), column 1 (label): expected an integer 0..65535, found 65536",
        ),
        (
            lambda p: p.write_text("label,a,b,c,d\n1,2,3,4,5\n1,2,3,4,256\n"),
            "{p}: row 2 (line 3), column 5 (d): expected an integer 0..255, found 256",
        ),
    ],
    ids=[
        "not-square",
        "empty-int-label",
        "empty-name",
        "name-after-ints",
        "int-after-names",
        "short-row",
        "label-too-large",
        "pixel-256",
    ],
)
def test_hostile_csv_refused_in_one_line_with_nothing_written(tmp_path, make, message):
    src = tmp_path / "user.csv"
    make(src)
    with pytest.raises(DataError) as err:
        import_user_csv(src, tmp_path / "out" / "train.csv", check_values=True)
    assert str(err.value) == message.format(p=src)
    assert synth.leftovers(tmp_path / "out") == []


def test_set_shape_must_match_the_column_count(tmp_path):
    shaped_csv(tmp_path / "u.csv", 2, (3, 4, 4))
    with pytest.raises(DataError) as err:
        import_user_csv(tmp_path / "u.csv", tmp_path / "o.csv", image_shape=(3, 4, 5))
    assert str(err.value) == (
        f"{tmp_path / 'u.csv'}: line 1 (header): expected 3x4x5 = 60 pixel columns as "
        f"data.image_shape says, found 48"
    )


# ============================================================================ model


@pytest.mark.parametrize(
    "shape, classes, features",
    [
        ((1, 8, 8), 3, 32 * 2 * 2),
        ((3, 17, 23), 24, 32 * 4 * 5),
        ((3, 32, 32), 10, 32 * 8 * 8),
        ((1, 4, 4), 2, 32),
    ],
)
def test_model_follows_the_data(shape, classes, features):
    model = SimpleCNN(*shape, classes)
    assert model.classifier[1].in_features == features
    assert model(torch.zeros(2, *shape)).shape == (2, classes)


def test_model_for_28x28_grey_keeps_its_names_and_size():
    model = SimpleCNN(1, 28, 28, 10)
    assert count_parameters(model) == NUM_PARAMETERS == 206_922
    assert list(model.state_dict()) == [
        "features.0.weight",
        "features.0.bias",
        "features.3.weight",
        "features.3.bias",
        "classifier.1.weight",
        "classifier.1.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    ]


def test_model_declares_its_layers_in_the_order_forward_runs_them():
    """``print(model)`` lists the layers in the order they run (the reference layout is the exception)."""
    model = SimpleCNN(1, 8, 8, 3)
    leaves = [m for m in model.modules() if not list(m.children())]
    called: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: called.append(m)) for m in leaves]
    model(torch.zeros(2, 1, 8, 8))
    for hook in hooks:
        hook.remove()
    assert [type(m).__name__ for m in called] == [type(m).__name__ for m in leaves]
    assert called == leaves  # each declared layer runs once, where it is declared
    printed = re.findall(r"\(\d+\): (\w+)\(", str(model))  # the leaves, in print order
    assert printed == [type(m).__name__ for m in called]
    assert printed[:6] == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU"]


def test_too_small_for_two_poolings_is_refused():
    with pytest.raises(
        DataError,
        match=r"images of 1x3x9 are too small for SimpleCNN's two 2x2 poolings; "
        r"expected at least 4x4 \(set data.image_shape to resize an image folder's images; "
        r"a CSV's rows need more pixels\)$",
    ):
        SimpleCNN(1, 3, 9, 2)


def test_params_refuse_every_image_side_the_model_refuses():
    """data.image_shape's bound is the model's, so a shape that cannot train stops the first stage."""
    assert params.MIN_SIDE == model.MIN_SIDE
    SimpleCNN(1, params.MIN_SIDE, params.MIN_SIDE, 2)  # the smallest accepted shape trains
    with pytest.raises(
        ParamsError,
        match=r"^params.yaml: data.image_shape\[2\]: expected an integer 4..65536 "
        r"\(the model halves it twice\), found 3$",
    ):
        params.parse_section(params.DataParams, "data", {"image_shape": [1, 8, params.MIN_SIDE - 1]})


# ============================================================================ manifest and params


def test_a_manifest_of_the_previous_schema_is_refused_with_the_way_forward(tmp_path):
    from pipeline.manifest import read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "dataset": "fashion-mnist"}))
    with pytest.raises(Exception) as err:
        read_manifest(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'manifest.json'}: schema_version 1 is not this pipeline's 2; "
        f"rerun `dvc repro tensorize` to rebuild the shards"
    )


def test_held_out_fractions_must_leave_a_train_split(tmp_path):
    from pipeline.errors import ParamsError
    from pipeline.params import load_section

    params = synth.write_params(tmp_path / "params.yaml", data={"test_fraction": 0.5, "val_fraction": 0.5})
    with pytest.raises(ParamsError) as err:
        load_section("data", params)
    assert str(err.value) == (
        f"{params}: data.val_fraction: expected test_fraction + val_fraction < 1, found 0.5 + 0.5"
    )


@pytest.mark.parametrize("shape, n", [((1, 28, 28), 5), ((3, 5, 7), 3), ((2, 4, 4), 1)])
def test_streamed_shard_is_safetensors_own_bytes_with_sorted_header(tmp_path, shape, n):
    """write_shard streams the images; the file is what safetensors writes, header keys sorted."""
    import io
    import struct

    from pipeline.shards import write_shard

    rng = np.random.default_rng(n)
    images = rng.random((n, *shape), dtype=np.float32)
    labels = rng.integers(0, 9, n).astype(np.int64)
    out = io.BytesIO()
    chunks = (images[i : i + 2] for i in range(0, n, 2))
    size, sha = write_shard(out, chunks, labels, shape, {"split": "train", "dataset": "d"})
    blob = safetensors.numpy.save(
        {"images": images, "labels": labels}, metadata={"split": "train", "dataset": "d"}
    )
    header_len = struct.unpack("<Q", blob[:8])[0]
    ours = out.getvalue()
    assert size == len(ours) == len(blob) and ours[8 + header_len :] == blob[8 + header_len :]
    assert json.loads(ours[8 : 8 + header_len]) == json.loads(blob[8 : 8 + header_len])
    assert list(json.loads(ours[8 : 8 + header_len])) == sorted(json.loads(blob[8 : 8 + header_len]))
    import hashlib

    assert sha == hashlib.sha256(ours).hexdigest()
    loaded = safetensors.numpy.load(ours)
    assert np.array_equal(loaded["images"], images) and np.array_equal(loaded["labels"], labels)


@pytest.mark.parametrize("block", [1 << 20, 7, 1])  # HISTOGRAM_PIXELS: one block, odd blocks, a row per block
@pytest.mark.parametrize(
    ("rows", "channels", "plane"), [(1, 1, 1), (3, 1, 3), (7, 3, 5), (50, 2, 7), (400, 1, 784)]
)
def test_pixel_histogram_counts_every_pixel_of_its_channel_exactly(monkeypatch, block, rows, channels, plane):
    """Counted in pairs of pixels, block by block: odd planes, odd blocks and non-contiguous rows
    give np.bincount's counts per channel."""
    import pipeline.normalize as normalize

    monkeypatch.setattr(normalize, "HISTOGRAM_PIXELS", block)
    pixels = np.random.default_rng(rows).integers(0, 256, (2 * rows, channels * plane), dtype=np.uint8)[::2]
    planes = pixels.reshape(rows, channels, plane)
    expected = np.stack([np.bincount(planes[:, c].ravel(), minlength=256) for c in range(channels)])
    assert np.array_equal(normalize.pixel_histogram(pixels, channels), expected)


def test_pixel_histogram_of_no_rows_is_zero():
    """A chunk whose rows are all held out contributes nothing to the train statistics (and does not fail)."""
    from pipeline.normalize import pixel_histogram

    empty = pixel_histogram(np.zeros((0, 3 * 4 * 4), dtype=np.uint8), 3)
    assert empty.shape == (3, 256) and not empty.any()
    full = pixel_histogram(np.arange(48, dtype=np.uint8).reshape(1, 48), 3)
    assert full[0, :16].tolist() == [1] * 16 and full[1, 16:32].tolist() == [1] * 16 and full.sum() == 48
