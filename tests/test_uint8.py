"""uint8 shards on the trainer side: validated, gathered as bytes, normalised on the device, bit-identical
runs.

uint8 splits are written here by hand (safetensors + a manifest), each the
byte-for-byte source of a float32 split that ``pipeline.tensorize.write_split``
writes from the same pixels, so every run on one is compared with the same
run on the other: metrics and model bytes must be equal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from pipeline.errors import ShardError
from pipeline.manifest import MANIFEST_NAME
from pipeline.normalize import make_normalization, pixel_histogram, pixel_stats
from pipeline.params import LoaderParams, TrainParams
from pipeline.tensorize import write_split
from tests.test_train_stage import MODEL_METRICS, history, run_train, run_until_killed
from trainer.data import ShardDataset
from trainer.device_norm import DeviceNormalizer
from trainer.run import train as train_model
from trainer.verify import validate_split

CPU = torch.device("cpu")
SPLITS = {"train": (256, 1), "test": (100, 2), "val": (40, 3)}  # samples, seed
SHARD = 64  # 4 train shards: the windowed shuffle has shards to window


def _learnable(n: int, seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, int(np.prod(shape)))).astype(np.uint8)
    pixels[:, : shape[2]] = labels[:, None] * 25
    return pixels, labels


def write_uint8_copy(float_dir: Path, out_dir: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    """The uint8 twin of the float32 split in ``float_dir`` (same shards, rows and manifest but the dtype)."""
    doc = json.loads((float_dir / MANIFEST_NAME).read_text())
    out_dir.mkdir(parents=True)
    shape, first = doc["image_shape"], 0
    for entry in doc["shards"]:
        n = entry["num_samples"]
        path = out_dir / entry["file"]
        save_file(
            {
                "images": np.ascontiguousarray(pixels[first : first + n].reshape(n, *shape)),
                "labels": labels[first : first + n].astype(np.int64),
            },
            str(path),
            metadata={"dataset": doc["dataset"], "split": doc["split"]},
        )
        entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        first += n
    doc["image_dtype"] = "uint8"
    (out_dir / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))


def write_both(root: Path, shape: tuple[int, int, int] = (1, 28, 28)) -> tuple[Path, Path]:
    """``root/f32/{train,test,val}`` and their uint8 twins ``root/u8/...``, standard-normalised."""
    sources = {split: _learnable(n, seed, shape) for split, (n, seed) in SPLITS.items()}
    norm = make_normalization("standard", pixel_stats(pixel_histogram(sources["train"][0], shape[0])))
    for split, (pixels, labels) in sources.items():
        write_split(
            [(pixels, labels)],
            root / "f32" / split,
            dataset="fashion-mnist",
            split=split,
            shard_size=SHARD,
            normalization=norm,
            image_shape=shape,
        )
        write_uint8_copy(root / "f32" / split, root / "u8" / split, pixels, labels)
    return root / "f32", root / "u8"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_both(tmp_path_factory.mktemp("uint8"))


def _all(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ShardDataset(validate_split(directory / split, expected_split=split))
    return dataset[torch.arange(len(dataset))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # compares -0.0 and NaN payloads too


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 8)])
def test_device_normalisation_gives_the_float32_shards_bit_for_bit(tmp_path: Path, shape) -> None:
    f32, u8 = write_both(tmp_path, shape)
    for split in SPLITS:
        floats, labels = _all(f32, split)
        raw, raw_labels = _all(u8, split)
        assert raw.dtype == torch.uint8 and floats.dtype == torch.float32 and torch.equal(labels, raw_labels)
        norm = DeviceNormalizer(validate_split(u8 / split, expected_split=split).manifest.normalization, CPU)
        assert torch.equal(_bits(norm(raw)), _bits(floats)), split
        assert norm(floats) is floats  # float32 batches pass unchanged
    with pytest.raises(ValueError, match="uint8 batch"):
        norm(raw[:, :1] if shape[0] > 1 else raw.expand(-1, 2, -1, -1))


def test_uint8_batches_are_the_source_bytes_in_order(data) -> None:
    _, u8 = data
    pixels, labels = _learnable(*SPLITS["train"], (1, 28, 28))
    dataset = ShardDataset(validate_split(u8 / "train", expected_split="train"))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:100]  # every shard
    images, got = dataset[order]
    assert images.dtype == torch.uint8 and list(images.shape) == [100, 1, 28, 28]
    assert np.array_equal(images.reshape(100, -1).numpy(), pixels[order.numpy()])
    assert np.array_equal(got.numpy(), labels[order.numpy()])
    single, _ = dataset[torch.tensor([3, 1])]  # one shard: the index_select path
    assert np.array_equal(single.reshape(2, -1).numpy(), pixels[[3, 1]])


def test_validation_refuses_a_shard_whose_dtype_disagrees_with_the_manifest(data, tmp_path: Path) -> None:
    f32, u8 = data
    for source, claimed, found in ((f32, "uint8", "float32"), (u8, "float32", "uint8")):
        folder = tmp_path / f"{found}-as-{claimed}"
        folder.mkdir()
        for path in (source / "test").iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        doc = json.loads((folder / MANIFEST_NAME).read_text())
        (folder / MANIFEST_NAME).write_text(json.dumps({**doc, "image_dtype": claimed}))
        with pytest.raises(
            ShardError,
            match=rf"tensor 'images': expected {claimed} \[64, 1, 28, 28\] as the "
            rf"manifest says, found {found} \[64, 1, 28, 28\]",
        ):
            validate_split(folder, expected_split="test")
        (folder / MANIFEST_NAME).write_text(json.dumps({**doc, "image_dtype": "float16"}))
        with pytest.raises(
            ShardError, match="expected images float32 or uint8 and labels int64, found float16"
        ):
            validate_split(folder, expected_split="test")


@pytest.mark.parametrize(
    ("mean", "std"), [(0.5, 1e-50), (1e300, 1.0)], ids=["std-zero-in-float32", "mean-infinite-in-float32"]
)
def test_validation_refuses_a_uint8_normalization_that_is_not_finite_in_float32(
    data, tmp_path: Path, mean: float, std: float
) -> None:
    """The manifest accepts any finite std > 0 as a float64; in float32, as the trainer applies it, such a
    normalization would turn every pixel into infinity, and the run would stop blaming train.lr."""
    _, u8 = data
    shutil.copytree(u8 / "test", tmp_path / "test")
    path = tmp_path / "test" / MANIFEST_NAME
    doc = json.loads(path.read_text())
    validate_split(tmp_path / "test", expected_split="test")  # as written, accepted
    doc["normalization"].update(mean=[mean], std=[std])
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ShardError,
        match=rf"manifest.json: normalization: expected mean and std that map every pixel byte to a finite "
        rf"float32, found mean {re.escape(str([mean]))} and std {re.escape(str([std]))}$",
    ):
        validate_split(tmp_path / "test", expected_split="test")


TWO_EPOCHS = TrainParams(epochs=2, device="cpu")  # frozen: safe to share as a default


def _run(
    root: Path,
    work: Path,
    loader: LoaderParams,
    train: TrainParams = TWO_EPOCHS,
) -> tuple[dict, bytes]:
    train_model(
        train_dir=root / "train",
        test_dir=root / "test",
        val_dir=root / "val",
        model_dir=work / "models",
        checkpoint_dir=work / "checkpoints",
        live_dir=work / "dvclive",
        loader=loader,
        train=train,
    )
    return history(work, (*MODEL_METRICS, "val_loss", "val_acc")), (
        work / "models" / "model.safetensors"
    ).read_bytes()


LOADERS = {
    "workers-0": LoaderParams(batch_size=64, num_workers=0),
    "workers-2": LoaderParams(batch_size=64, num_workers=2, persistent_workers=True, prefetch_factor=3),
    "resident": LoaderParams(batch_size=64, device_resident=True),
    "window-workers-2": LoaderParams(batch_size=64, num_workers=2, shuffle_window=2),
}


@pytest.fixture(scope="module")
def float32_runs(data, tmp_path_factory) -> dict[str, tuple[dict, bytes]]:
    f32, _ = data
    return {
        "global": _run(f32, tmp_path_factory.mktemp("f32-global"), LOADERS["workers-0"]),
        "window": _run(
            f32,
            tmp_path_factory.mktemp("f32-window"),
            dataclasses.replace(LOADERS["workers-0"], shuffle_window=2),
        ),
    }


@pytest.mark.parametrize("name", list(LOADERS))
def test_uint8_runs_are_bit_identical_to_float32(
    data, float32_runs, name: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # DVCLive: outside any git repository
    _, u8 = data
    got = _run(u8, tmp_path, LOADERS[name])
    expected = float32_runs["window" if name.startswith("window") else "global"]
    assert got[0] == expected[0]  # every metric of every epoch, val included, as exact floats
    assert got[1] == expected[1]  # the model's bytes
    assert (
        float32_runs["window"][0]["train_loss"] != float32_runs["global"][0]["train_loss"]
    )  # the window acts


def test_uint8_run_killed_mid_epoch_resumes_to_the_float32_result(data, float32_runs, tmp_path: Path) -> None:
    _, u8 = data
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "loader": {"batch_size": 64, "num_workers": 2},
                "train": {"epochs": 2, "device": "cpu", "checkpoint_every": 0, "checkpoint_seconds": 0.001},
            }
        )
    )
    run_until_killed(u8, tmp_path, params, "trainer.epoch.write_checkpoint", 3)  # epoch 1, step 3
    res = run_train(u8, tmp_path, params)
    assert res.returncode == 0, res.stderr
    assert "resuming in epoch 1, step 3" in res.stderr
    # The validation split only adds metrics: the weights are those of the float32 run with it.
    assert (tmp_path / "models" / "model.safetensors").read_bytes() == float32_runs["global"][1]


def test_a_uint8_checkpoint_is_not_resumed_after_the_normalization_changes(data, tmp_path: Path) -> None:
    """uint8 shards hold the same bytes whatever ``prep.normalize`` is; only the manifests say which
    normalization the trainer applies, so a checkpoint of the other one must not be resumed."""
    _, u8 = data
    root = tmp_path / "u8"
    shutil.copytree(u8, root)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"loader": {"batch_size": 64}, "train": {"epochs": 2, "device": "cpu"}}))
    run_until_killed(root, tmp_path, params, "trainer.epoch.write_checkpoint", 1)  # after epoch 1 (standard)
    unit = dataclasses.asdict(make_normalization("unit", None, 1))
    for split in SPLITS:
        path = root / split / MANIFEST_NAME
        doc = json.loads(path.read_text())
        assert doc["normalization"] != unit
        path.write_text(json.dumps({**doc, "normalization": unit}, indent=2))
    res = run_train(root, tmp_path, params)
    assert res.returncode == 0, res.stderr
    notices = [line for line in res.stderr.splitlines() if "not resuming" in line]
    assert len(notices) == 1 and "other params, data, code or torch version" in notices[0], res.stderr
    assert "resuming after" not in res.stderr


def test_a_run_leaves_the_callers_thread_count_as_it_was(data, tmp_path: Path, monkeypatch) -> None:
    # train.threads is the run's own: a run that changed the caller's count would change every later
    # in-process run with threads null (which reads the count), as seen under pytest-xdist.
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        _run(data[1], tmp_path, LOADERS["workers-0"], TrainParams(epochs=1, device="cpu", threads=1))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_two_processes_on_uint8_match_two_on_float32(data, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps({"loader": {"batch_size": 64}, "train": {"epochs": 1, "device": "cpu", "processes": 2}})
    )
    runs = []
    for root in data:
        work = tmp_path / root.name
        work.mkdir()
        res = run_train(root, work, params)
        assert res.returncode == 0, res.stdout + res.stderr
        runs.append(
            (history(work, tuple(MODEL_METRICS)), (work / "models" / "model.safetensors").read_bytes())
        )
    assert runs[0] == runs[1]
