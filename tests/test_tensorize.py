"""The `tensorize` stage: exact shard values for both normalisations, the manifest, atomic folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import safetensors.numpy
import synth

from pipeline import shardjobs
from pipeline.csvdata import idx_to_csv
from pipeline.errors import DataError
from pipeline.manifest import Normalization, read_manifest
from pipeline.normalize import lookup_table, normalize
from pipeline.parquet import csv_to_parquet
from pipeline.shards import read_layout
from pipeline.tabular import HEADER
from pipeline.tensorize import tensorize

N_TRAIN, N_TEST = 150, 40


def write_parquet(path: Path, s: synth.Split, schema: dict | None = None) -> Path:
    table = np.concatenate([s.labels[:, None], s.pixels], axis=1)
    df = pl.DataFrame(table, schema=schema or {c: pl.UInt8 for c in HEADER}, orient="row")
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    return path


@pytest.fixture(scope="module")
def splits() -> tuple[synth.Split, synth.Split]:
    train = synth.split(N_TRAIN, seed=21)
    # the test split has a different distribution, so train-vs-test statistics would differ visibly
    test = synth.Split((synth.images(N_TEST, seed=22) // 4).astype(np.uint8), synth.labels(N_TEST, seed=22))
    return train, test


@pytest.fixture
def parquets(splits, tmp_path) -> tuple[Path, Path]:
    return (
        write_parquet(tmp_path / "pq" / "train.parquet", splits[0]),
        write_parquet(tmp_path / "pq" / "test.parquet", splits[1]),
    )


def run(parquets, out: Path, *, shard_size: int = 64, kind: str = "unit", dataset: str = "fashion-mnist"):
    return tensorize(
        parquets[0],
        parquets[1],
        out / "train",
        out / "test",
        dataset=dataset,
        shard_size=shard_size,
        normalize_kind=kind,
    )


def load_split(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Concatenate the shards in manifest order (independently of pipeline code)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    images, labels = [], []
    for entry in manifest["shards"]:
        t = safetensors.numpy.load_file(folder / entry["file"])
        assert set(t) == {"images", "labels"}
        assert t["images"].dtype == np.float32 and t["labels"].dtype == np.int64
        images.append(t["images"])
        labels.append(t["labels"])
    return np.concatenate(images), np.concatenate(labels), manifest


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def unit_expected(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / np.float32(255)


def standard_stats_float64(train_pixels: np.ndarray) -> tuple[np.float32, np.float32]:
    """Mean and (population) std of x/255 over every train pixel, in float64, then rounded to float32."""
    x = train_pixels.astype(np.float64) / 255.0
    return np.float32(x.mean()), np.float32(x.std())


# ============================================================================ values


def test_unit_values_are_exact(splits, parquets, tmp_path):
    run(parquets, tmp_path / "t", kind="unit")
    for s, name in zip(splits, ("train", "test")):
        images, labels, manifest = load_split(tmp_path / "t" / name)
        assert images.shape == (len(s.labels), 1, 28, 28)
        expected = unit_expected(s.pixels).reshape(-1, 1, 28, 28)
        np.testing.assert_array_equal(bits(images), bits(expected))  # bit for bit
        np.testing.assert_array_equal(labels, s.labels.astype(np.int64))
        assert manifest["normalization"] == {
            "kind": "unit",
            "mean": [0.0],
            "std": [1.0],
            "stats_from": "none",
        }
    assert images.min() == 0.0 and load_split(tmp_path / "t" / "train")[0].max() == 1.0


def test_standard_values_are_exact_and_use_train_statistics(splits, parquets, tmp_path):
    run(parquets, tmp_path / "t", kind="standard")
    mean, std = standard_stats_float64(splits[0].pixels)
    for s, name in zip(splits, ("train", "test")):
        images, labels, manifest = load_split(tmp_path / "t" / name)
        expected = ((s.pixels.astype(np.float32) / np.float32(255) - mean) / std).astype(np.float32)
        np.testing.assert_array_equal(bits(images), bits(expected.reshape(-1, 1, 28, 28)))
        np.testing.assert_array_equal(labels, s.labels.astype(np.int64))
        norm = manifest["normalization"]
        assert norm == {"kind": "standard", "mean": [float(mean)], "std": [float(std)], "stats_from": "train"}
        # every split records the train split's statistics (here the ones the normalisation used)
        assert manifest["train_stats"] == {"mean": [float(mean)], "std": [float(std)]}
    # the test split's own statistics differ: using them would have produced other values
    test_mean, _ = standard_stats_float64(splits[1].pixels)
    assert abs(float(test_mean) - float(mean)) > 0.1
    train_images = load_split(tmp_path / "t" / "train")[0].astype(np.float64)
    assert abs(train_images.mean()) < 1e-3 and abs(train_images.std() - 1) < 1e-3


def test_every_byte_value_maps_through_one_table(tmp_path):
    """All 256 byte values appear; each maps to the same float32 wherever it occurs."""
    s = synth.Split(
        np.arange(256 * 784 // 256 * 8, dtype=np.int64).astype(np.uint8).reshape(8, 28, 28),
        np.arange(8, dtype=np.uint8) % 10,
    )
    pq = write_parquet(tmp_path / "a.parquet", s)
    tensorize(pq, pq, tmp_path / "tr", tmp_path / "te", dataset="d", shard_size=3, normalize_kind="standard")
    images, _, _ = load_split(tmp_path / "tr")
    flat, src = images.reshape(-1), s.pixels.reshape(-1)
    for value in range(256):
        assert len(np.unique(bits(flat[src == value]))) == 1


@pytest.mark.parametrize("kind", ["unit", "standard"])
def test_values_are_exact_when_each_shard_is_made_in_many_chunks(
    splits, parquets, tmp_path, monkeypatch, kind
):
    """A shard's float32 chunks are made in one reused buffer: each must reach the file before the
    next overwrites it. Chunks of 3 images (64 per shard) check what the real, larger chunks do."""
    whole = run(parquets, tmp_path / "whole", kind=kind)
    monkeypatch.setattr(shardjobs, "CHUNK_BYTES", 3 * 784 * 4)
    chunks = list(
        shardjobs.image_chunks(splits[0].pixels[:7], whole["train"].normalization, (1, 28, 28), "float32")
    )
    assert [len(c) for c in chunks] == [3, 3, 1] and np.shares_memory(chunks[0], chunks[1])  # one buffer
    monkeypatch.setattr(shardjobs, "CHUNK_BYTES", 3 * 784)  # uint8: the bytes themselves, as many a chunk
    raw = list(shardjobs.image_chunks(splits[0].pixels[:7], None, (1, 28, 28), "uint8"))
    assert [len(c) for c in raw] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(raw).reshape(7, -1), splits[0].pixels[:7])
    monkeypatch.setattr(shardjobs, "CHUNK_BYTES", 3 * 784 * 4)
    assert run(parquets, tmp_path / "chunked", kind=kind) == whole
    for name in ("train", "test"):
        images, _, _ = load_split(tmp_path / "chunked" / name)
        np.testing.assert_array_equal(bits(images), bits(load_split(tmp_path / "whole" / name)[0]))
    if kind == "unit":
        expected = unit_expected(splits[0].pixels).reshape(-1, 1, 28, 28)
        np.testing.assert_array_equal(bits(load_split(tmp_path / "chunked" / "train")[0]), bits(expected))


@pytest.mark.parametrize("channels", [1, 3])
def test_normalising_into_a_buffer_gives_the_fresh_arrays_values(channels):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (6, channels * 5 * 7), dtype=np.uint8)
    norm = Normalization("standard", (0.25, 0.5, 0.75)[:channels], (0.5, 0.25, 2.0)[:channels], "train")
    fresh = normalize(pixels, norm, (channels, 5, 7))
    buffer = np.full(pixels.size + 9, np.nan, dtype=np.float32)  # larger than needed, and dirty
    into = normalize(pixels, norm, (channels, 5, 7), out=buffer)
    for bad in (buffer[:-10], buffer.astype(np.float64), np.zeros((pixels.size, 2), np.float32)[:, 0]):
        with pytest.raises(ValueError, match=r"^out: expected contiguous float32 of at least"):
            normalize(pixels, norm, (channels, 5, 7), out=bad)  # too small, another dtype, strided
    assert into.shape == fresh.shape == (6, channels, 5, 7) and np.shares_memory(into, buffer)
    np.testing.assert_array_equal(bits(into), bits(fresh))
    table = lookup_table(norm)
    for c in range(channels):  # each value from its own channel's table
        np.testing.assert_array_equal(
            bits(fresh[:, c].reshape(6, -1)), bits(table[c][pixels[:, c * 35 : (c + 1) * 35]])
        )


# ============================================================================ manifest and shards


def test_manifest_content_and_shard_files(splits, parquets, tmp_path):
    run(parquets, tmp_path / "t", shard_size=64, dataset="mnist")
    folder = tmp_path / "t" / "train"
    manifest = json.loads((folder / "manifest.json").read_text())
    mean, std = standard_stats_float64(splits[0].pixels)
    assert {k: v for k, v in manifest.items() if k not in ("shards", "normalization")} == {
        "schema_version": 2,
        "dataset": "mnist",
        "split": "train",
        "num_samples": N_TRAIN,
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
        "class_counts": np.bincount(splits[0].labels, minlength=10).tolist(),
        "image_shape": [1, 28, 28],
        "image_dtype": "float32",
        "label_dtype": "int64",
        # of x/255 over the train split, whatever the normalisation (unit here)
        "train_stats": {"mean": [float(mean)], "std": [float(std)]},
    }
    assert manifest["normalization"] == {"kind": "unit", "mean": [0.0], "std": [1.0], "stats_from": "none"}
    test_manifest = json.loads((tmp_path / "t" / "test" / "manifest.json").read_text())
    assert test_manifest["class_counts"] == np.bincount(splits[1].labels, minlength=10).tolist()
    assert test_manifest["train_stats"] == manifest["train_stats"]  # the train split's, not the test split's
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert [s["num_samples"] for s in manifest["shards"]] == [64, 64, 22]
    for entry in manifest["shards"]:
        blob = (folder / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(blob).hexdigest()
        assert entry["bytes"] == len(blob)
        layout = read_layout(folder / entry["file"])
        k = entry["num_samples"]
        assert {n: (t.dtype, t.shape) for n, t in layout.tensors.items()} == {
            "images": ("F32", (k, 1, 28, 28)),
            "labels": ("I64", (k,)),
        }
        assert layout.metadata == {"dataset": "mnist", "split": "train"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json", *(s["file"] for s in manifest["shards"])]
    )
    parsed = read_manifest(folder)  # the project's own reader accepts it
    assert parsed.num_samples == N_TRAIN and len(parsed.shards) == 3
    assert synth.leftovers(tmp_path / "t") == sorted(
        [
            "test",
            "train",
            *(f"train/{p.name}" for p in folder.iterdir()),
            *(f"test/{p.name}" for p in (tmp_path / "t" / "test").iterdir()),
        ]
    )


def test_builtin_dataset_records_its_class_names(parquets, tmp_path):
    run(parquets, tmp_path / "t", dataset="fashion-mnist")
    for split in ("train", "test"):
        manifest = read_manifest(tmp_path / "t" / split)
        assert manifest.class_names == (
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
        assert manifest.num_classes == 10


def test_shard_order_is_source_order(splits, parquets, tmp_path):
    run(parquets, tmp_path / "t", shard_size=7)
    _, labels, manifest = load_split(tmp_path / "t" / "test")
    np.testing.assert_array_equal(labels, splits[1].labels)
    assert [s["num_samples"] for s in manifest["shards"]] == [7] * 5 + [5]


@pytest.mark.parametrize(
    "shard_size, sizes",
    [(1, [1] * N_TEST), (N_TEST, [N_TEST]), (N_TEST + 1, [N_TEST]), (10, [10] * 4), (10_000, [N_TEST])],
)
def test_shard_sizes(parquets, tmp_path, shard_size, sizes):
    run(parquets, tmp_path / "t", shard_size=shard_size)
    manifest = json.loads((tmp_path / "t" / "test" / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == sizes


def test_shards_are_deterministic(parquets, tmp_path):
    run(parquets, tmp_path / "a", kind="standard")
    run(parquets, tmp_path / "b", kind="standard")
    for split in ("train", "test"):
        a = {p.name: p.read_bytes() for p in (tmp_path / "a" / split).iterdir()}
        b = {p.name: p.read_bytes() for p in (tmp_path / "b" / split).iterdir()}
        assert a == b


def test_shard_headers_are_canonical(parquets, tmp_path):
    """Sorted keys, so identical samples always give identical bytes (and DVC hashes).

    safetensors emits ``__metadata__`` in hash-map order; with 40 one-sample shards an
    unsorted writer passes this by chance with probability 2**-40.
    """
    run(parquets, tmp_path / "t", shard_size=1)
    for shard in sorted((tmp_path / "t" / "test").glob("*.safetensors")):
        blob = shard.read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header = blob[8 : 8 + n]
        assert header == json.dumps(json.loads(header), separators=(",", ":"), sort_keys=True).encode().ljust(
            n
        )


def test_rerun_replaces_the_whole_folder(parquets, tmp_path):
    run(parquets, tmp_path / "t", shard_size=10)
    assert len(list((tmp_path / "t" / "train").glob("*.safetensors"))) == 15
    stale = tmp_path / "t" / ".train.tmp-999-deadbeef"  # what a SIGKILLed run leaves behind
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"half")
    run(parquets, tmp_path / "t", shard_size=100)
    assert sorted(p.name for p in (tmp_path / "t" / "train").iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["test", "train"]


def test_all_stages_chained_on_generated_idx(tmp_path):
    """IDX gz -> CSV -> Parquet -> shards: the shard values are the original bytes, normalised."""
    ds = synth.dataset(n_train=130, n_test=30, seed=31)
    raw = ds.write_folder(tmp_path / "raw")
    pqs = []
    for split, (img, lbl) in synth.IDX_NAMES.items():
        csv = tmp_path / "csv" / f"{split}.csv"
        idx_to_csv(raw / img, raw / lbl, csv)
        pq = tmp_path / "pq" / f"{split}.parquet"
        csv_to_parquet(csv, pq, compression="zstd", compression_level=None, row_group_size=50)
        pqs.append(pq)
    tensorize(
        pqs[0],
        pqs[1],
        tmp_path / "t" / "train",
        tmp_path / "t" / "test",
        dataset="synth",
        shard_size=40,
        normalize_kind="unit",
    )
    for s, split in ((ds.train, "train"), (ds.test, "test")):
        images, labels, _ = load_split(tmp_path / "t" / split)
        np.testing.assert_array_equal(bits(images), bits(unit_expected(s.pixels).reshape(-1, 1, 28, 28)))
        np.testing.assert_array_equal(labels, s.labels)


# ============================================================================ bad input


def _bad(splits, tmp_path, make, dataset: str = "fashion-mnist") -> tuple[str, Path]:
    """``make`` writes the train Parquet; a built-in dataset, so labels must be 0..9."""
    train = make(tmp_path / "pq" / "train.parquet", splits[0])
    test = write_parquet(tmp_path / "pq" / "test.parquet", splits[1])
    out = tmp_path / "tensors"
    with pytest.raises(DataError) as err:
        tensorize(
            train, test, out / "train", out / "test", dataset=dataset, shard_size=64, normalize_kind="unit"
        )
    assert synth.leftovers(out) == [], "no split folder, no temporary"
    return str(err.value), train


def _frame(s: synth.Split) -> pl.DataFrame:
    table = np.concatenate([s.labels[:, None], s.pixels], axis=1)
    return pl.DataFrame(table, schema={c: pl.UInt8 for c in HEADER}, orient="row")


def _write(df: pl.DataFrame):
    def make(path: Path, s: synth.Split) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(path)
        return path

    return make


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda df: df.rename({"pixel5": "pixelX"}), "column 6: expected 'pixel5', found 'pixelX'"),
        (lambda df: df.drop("pixel5"), "column 6: expected 'pixel5', found 'pixel6'"),
        (
            lambda df: df.with_columns(pl.lit(0, pl.UInt8).alias("extra")),
            "column 786: expected 'pixel785', found 'extra'",
        ),
        (
            lambda df: df.select(["pixel1", "label", *HEADER[2:]]),
            "column 1: expected 'label', found 'pixel1'",
        ),
        (
            lambda df: df.with_columns(pl.col("pixel9").cast(pl.Int64)),
            "column 'pixel9': expected UInt8, found int64",
        ),
        (
            lambda df: df.with_columns(pl.col("pixel9").cast(pl.UInt16)),
            "column 'pixel9': expected UInt8, found uint16",
        ),
        (
            lambda df: df.with_columns(pl.col("label").cast(pl.Float32)),
            "column 'label': expected UInt16 or String, found float",
        ),
        (
            lambda df: df.with_columns(pl.col("label").cast(pl.Int64)),
            "column 'label': expected UInt16 or String, found int64",
        ),
        (
            lambda df: df.with_columns(
                pl.when(pl.int_range(pl.len()) == 99)
                .then(10)
                .otherwise(pl.col("label"))
                .cast(pl.UInt8)
                .alias("label")
            ),
            "row 100, column 'label': expected 0..9, found 10",
        ),
        (
            lambda df: df.with_columns(
                pl.when(pl.int_range(pl.len()) == 0)
                .then(255)
                .otherwise(pl.col("label"))
                .cast(pl.UInt8)
                .alias("label")
            ),
            "row 1, column 'label': expected 0..9, found 255",
        ),
        (
            lambda df: df.with_columns(
                pl.when(pl.int_range(pl.len()) == 42)
                .then(65535)
                .otherwise(pl.col("label"))
                .cast(pl.UInt16)
                .alias("label")
            ),
            "row 43, column 'label': expected 0..9, found 65535",
        ),
        (
            lambda df: df.with_columns(
                pl.when(pl.int_range(pl.len()) == 70).then(None).otherwise(pl.col("pixel7")).alias("pixel7")
            ),
            "row 71, column 'pixel7': expected a value, found null",
        ),
        (
            lambda df: df.with_columns(
                pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("label")).alias("label")
            ),
            "row 4, column 'label': expected a value, found null",
        ),
    ],
    ids=[
        "renamed",
        "missing-column",
        "extra-column",
        "reordered",
        "int64-pixel",
        "uint16-pixel",
        "float-label",
        "int64-label",
        "label-10",
        "label-255",
        "uint16-label-65535",
        "null-pixel",
        "null-label",
    ],
)
def test_bad_parquet_refused(splits, tmp_path, change, expected):
    msg, path = _bad(splits, tmp_path, _write(change(_frame(splits[0]))))
    assert msg == f"{path}: {expected}"


@pytest.mark.parametrize("label", [10, 255, 65535])
def test_labels_past_9_make_more_classes_for_other_datasets(splits, tmp_path, label):
    """Only a built-in dataset (10 classes) refuses a label >= 10; otherwise the classes are 0..largest."""
    df = _frame(splits[0]).with_columns(pl.col("label").cast(pl.UInt16))
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 99)
        .then(label)
        .otherwise(pl.col("label"))
        .cast(pl.UInt16)
        .alias("label")
    )
    train = _write(df)(tmp_path / "pq" / "train.parquet", splits[0])
    test = write_parquet(tmp_path / "pq" / "test.parquet", splits[1])
    out = tmp_path / "tensors"
    manifests = tensorize(
        train,
        test,
        out / "train",
        out / "test",
        dataset="d",
        shard_size=64,
        normalize_kind="unit",
    )
    assert manifests["train"].num_classes == label + 1
    assert manifests["train"].class_names == tuple(str(c) for c in range(label + 1))
    assert manifests["train"].class_counts[label] == 1
    _, labels, _ = load_split(out / "train")
    expected = splits[0].labels.astype(np.int64)
    expected[99] = label
    np.testing.assert_array_equal(labels, expected)


def test_empty_parquet_refused(splits, tmp_path):
    msg, path = _bad(splits, tmp_path, _write(_frame(splits[0]).head(0)))
    assert msg == f"{path}: has no rows; the train split needs samples"


def test_train_and_test_pixel_counts_must_agree(splits, tmp_path):
    train = write_parquet(tmp_path / "pq" / "train.parquet", splits[0])
    test = tmp_path / "pq" / "test.parquet"
    _frame(splits[1]).drop("pixel784").write_parquet(test)
    with pytest.raises(DataError) as err:
        tensorize(
            train,
            test,
            tmp_path / "t" / "train",
            tmp_path / "t" / "test",
            dataset="d",
            shard_size=64,
            normalize_kind="unit",
        )
    assert str(err.value) == f"{test}: expected rows of 784 pixels like the train split, found 783"
    assert synth.leftovers(tmp_path / "t") == []


def test_non_square_pixel_count_needs_an_image_shape(splits, tmp_path):
    """783 columns (pixel784 dropped from both splits) are no square grey image; an image_shape makes them
    one."""
    paths = []
    for s, name in zip(splits, ("train", "test")):
        paths.append(tmp_path / "pq" / f"{name}.parquet")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        _frame(s).drop("pixel784").write_parquet(paths[-1])
    out = tmp_path / "t"
    with pytest.raises(DataError) as err:
        tensorize(*paths, out / "train", out / "test", dataset="d", shard_size=64, normalize_kind="unit")
    assert str(err.value) == (
        f"{paths[0]}: 783 pixel columns are not a square grey image; set data.image_shape "
        f"to [C, H, W] in params.yaml"
    )
    assert synth.leftovers(out) == []
    with pytest.raises(DataError) as err:
        tensorize(
            *paths,
            out / "train",
            out / "test",
            dataset="d",
            shard_size=64,
            normalize_kind="unit",
            image_shape=(1, 28, 28),
        )
    assert (
        str(err.value)
        == f"{paths[0]}: expected 1x28x28 = 784 pixel columns as data.image_shape says, found 783"
    )
    manifests = tensorize(
        *paths,
        out / "train",
        out / "test",
        dataset="d",
        shard_size=64,
        normalize_kind="unit",
        image_shape=(3, 1, 261),
    )
    assert manifests["train"].image_shape == (3, 1, 261)
    images, _, _ = load_split(out / "train")
    expected = unit_expected(splits[0].pixels[:, :783]).reshape(-1, 3, 1, 261)
    np.testing.assert_array_equal(bits(images), bits(expected))


@pytest.mark.parametrize(
    "content",
    [None, b"label,pixel1\n1,2\n", b"PAR1" + bytes(100) + b"PAR1"],
    ids=["missing", "csv", "fake-magic"],
)
def test_unreadable_parquet_refused(splits, tmp_path, content):
    def make(path: Path, s):
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            path.write_bytes(content)
        return path

    msg, path = _bad(splits, tmp_path, make)
    assert msg.startswith(f"{path}: cannot read Parquet: ")


def test_bad_test_split_leaves_no_test_folder(splits, tmp_path):
    train = write_parquet(tmp_path / "pq" / "train.parquet", splits[0])
    test = tmp_path / "pq" / "test.parquet"
    _frame(splits[1]).rename({"pixel1": "p1"}).write_parquet(test)
    with pytest.raises(DataError, match="column 2: expected 'pixel1', found 'p1'"):
        tensorize(
            train,
            test,
            tmp_path / "t" / "train",
            tmp_path / "t" / "test",
            dataset="d",
            shard_size=64,
            normalize_kind="unit",
        )
    assert not (tmp_path / "t" / "test").exists()
    # both files are checked before any folder is made: no split folder, no temporary
    assert synth.leftovers(tmp_path / "t") == []


def test_failure_keeps_the_previous_complete_folder(splits, parquets, tmp_path):
    run(parquets, tmp_path / "t")
    before = {p.name: p.read_bytes() for p in (tmp_path / "t" / "train").iterdir()}
    _frame(splits[0]).drop("pixel3").write_parquet(parquets[0])
    with pytest.raises(DataError):
        run(parquets, tmp_path / "t")
    assert {p.name: p.read_bytes() for p in (tmp_path / "t" / "train").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["test", "train"]


# ============================================================================ the stage, as a process


def test_stage_standard(splits, parquets, tmp_path):
    params = synth.write_params(
        tmp_path / "p.yaml", data={"dataset": "mnist"}, prep={"shard_size": 50, "normalize": "standard"}
    )
    proc = synth.run_stage(
        "tensorize",
        "--params",
        params,
        "--train-parquet",
        parquets[0],
        "--test-parquet",
        parquets[1],
        "--train",
        "data/tensors/train",
        "--test",
        "data/tensors/test",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    mean, std = standard_stats_float64(splits[0].pixels)
    for s, split in zip(splits, ("train", "test")):
        images, labels, manifest = load_split(tmp_path / "data" / "tensors" / split)
        expected = (s.pixels.astype(np.float32) / np.float32(255) - mean) / std
        np.testing.assert_array_equal(bits(images), bits(expected.reshape(-1, 1, 28, 28)))
        np.testing.assert_array_equal(labels, s.labels)
        assert manifest["dataset"] == "mnist"
        assert all(e["num_samples"] <= 50 for e in manifest["shards"])
    assert f"tensorize: train: {N_TRAIN} samples of 10 classes, [1, 28, 28], in 3 shards" in proc.stdout
    assert f"tensorize: test: {N_TEST} samples of 10 classes, [1, 28, 28], in 1 shards" in proc.stdout


def test_stage_bad_input_exit_2(splits, tmp_path):
    train = tmp_path / "train.parquet"
    _frame(splits[0]).with_columns(pl.lit(12, pl.UInt8).alias("label")).write_parquet(train)
    test = write_parquet(tmp_path / "test.parquet", splits[1])
    params = synth.write_params(tmp_path / "p.yaml", prep={"shard_size": 50})
    proc = synth.run_stage(
        "tensorize",
        "--params",
        params,
        "--train-parquet",
        train,
        "--test-parquet",
        test,
        "--train",
        "out/train",
        "--test",
        "out/test",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: {train}: row 1, column 'label': expected 0..9, found 12\n"
    assert synth.leftovers(tmp_path / "out") == []


def test_stage_refuses_bad_params(parquets, tmp_path):
    params = synth.write_params(tmp_path / "p.yaml", prep={"shard_size": 0})
    proc = synth.run_stage(
        "tensorize",
        "--params",
        params,
        "--train-parquet",
        parquets[0],
        "--test-parquet",
        parquets[1],
        "--train",
        "out/train",
        "--test",
        "out/test",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: {params}: prep.shard_size: expected an integer >= 1, found 0\n"
    assert not (tmp_path / "out").exists()


def test_stage_help():
    proc = synth.run_stage("tensorize", "--help", cwd=synth.REPO)
    assert proc.returncode == 0 and "--train-parquet" in proc.stdout
