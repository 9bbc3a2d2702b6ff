"""Trainer units: model, memory-mapped dataset, batch order, loader settings, loop, checkpoints, export."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import typing
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.normalize import make_normalization
from pipeline.params import LoaderParams, TrainParams
from pipeline.tensorize import write_split
from trainer.checkpoint import (
    ELASTIC,
    META,
    ROOT,
    SPEED_ONLY,
    TENSORS,
    RunShape,
    code_digest,
    fingerprint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    train_code_files,
)
from trainer.data import ShardDataset
from trainer.export import CONFIG, WEIGHTS, load_model, save_model
from trainer.loader import (
    EpochBatchSampler,
    check_resident_fits,
    epoch_seed,
    make_loader,
    resolve_settings,
)
from trainer.loop import evaluate, train_one_epoch
from trainer.model import ARCHITECTURE, NUM_PARAMETERS, SimpleCNN, count_parameters
from trainer.position import Position
from trainer.verify import validate_split

CPU = torch.device("cpu")
SHAPE = RunShape(processes=1, threads=1)
BATCHES = 4  # 250 samples in batches of 64


def make_split(
    directory: Path, n: int, *, split: str, shard_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shards of random uint8 pixels whose first pixels encode the label (so a model can learn)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 784)).astype(np.uint8)
    pixels[:, :28] = labels[:, None] * 25
    write_split(
        [(pixels, labels)],
        directory,
        dataset="fashion-mnist",
        split=split,
        shard_size=shard_size,
        normalization=make_normalization("unit", None),
    )
    return pixels, labels


@pytest.fixture
def split(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    pixels, labels = make_split(tmp_path / "train", 250, split="train", shard_size=100)
    return tmp_path / "train", pixels, labels


def test_simplecnn_matches_the_reference_architecture() -> None:
    model = SimpleCNN()
    assert count_parameters(model) == NUM_PARAMETERS == 206_922
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    layers = [
        type(m).__name__ for m in model.modules() if not isinstance(m, (SimpleCNN, torch.nn.Sequential))
    ]
    assert layers == [  # in the order forward runs them: each block pools before its ReLU
        "Conv2d",
        "MaxPool2d",
        "ReLU",
        "Conv2d",
        "MaxPool2d",
        "ReLU",
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
    ]


def test_batch_gather_returns_the_source_samples_in_order(split) -> None:
    directory, pixels, labels = split
    dataset = ShardDataset(validate_split(directory, expected_split="train"))
    assert len(dataset) == 250
    # crosses all three shards (100, 100, 50), unsorted, with a repeat
    indices = torch.tensor([249, 0, 150, 99, 100, 7, 249, 199, 200])
    images, got = dataset[indices]
    assert images.dtype == torch.float32 and images.shape == (9, 1, 28, 28)
    assert got.dtype == torch.int64
    idx = indices.numpy()
    assert np.array_equal(got.numpy(), labels[idx].astype(np.int64))
    expected = (np.arange(256, dtype=np.float32) / np.float32(255))[pixels[idx]].reshape(9, 1, 28, 28)
    assert np.array_equal(images.numpy(), expected)
    empty_images, empty_labels = dataset[torch.tensor([], dtype=torch.int64)]
    assert empty_images.shape == (0, 1, 28, 28) and empty_labels.shape == (0,)


def test_gather_rejects_bad_indices(split) -> None:
    dataset = ShardDataset(validate_split(split[0], expected_split="train"))
    with pytest.raises(IndexError):
        dataset[torch.tensor([250])]
    with pytest.raises(IndexError):
        dataset[torch.tensor([-1])]
    with pytest.raises(IndexError):
        dataset[torch.tensor([[1, 2]])]


def _mapping_of(address: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else ""
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_shards_are_memory_mapped_not_copied(split) -> None:
    dataset = ShardDataset(validate_split(split[0], expected_split="train"))
    dataset[torch.tensor([0])]
    for shard, (images, labels) in zip(dataset.split.shards, dataset._maps):
        assert _mapping_of(images.data_ptr()) == str(shard.path)
        assert _mapping_of(labels.data_ptr()) == str(shard.path)


def test_dataset_state_drops_the_maps(split) -> None:
    """What a spawn-started worker receives: paths and offsets, never mapped data."""
    dataset = ShardDataset(validate_split(split[0], expected_split="train"))
    dataset[torch.tensor([0, 150])]
    assert dataset._maps is not None
    state = dataset.__getstate__()
    assert state["_maps"] is None
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 16 for v in state.values())


@pytest.mark.slow
def test_spawned_workers_map_their_own_shards(split) -> None:
    dataset = ShardDataset(validate_split(split[0], expected_split="train"))
    sampler = EpochBatchSampler(len(dataset), 64, shuffle=True, seed=3)
    expected = [dataset[b] for b in sampler]
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    got = list(loader)
    assert len(got) == len(expected) == 4
    for (a, b), (c, d) in zip(got, expected):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    sampler = EpochBatchSampler(10, 4, shuffle=True, seed=7)
    first = list(sampler)
    assert [len(b) for b in first] == [4, 4, 2] == [len(b) for b in first] and len(sampler) == 3
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert all(b.dtype == torch.int64 for b in first)
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, b) for a, b in zip(first, EpochBatchSampler(10, 4, shuffle=True, seed=7)))
    sampler.set_epoch(1)
    assert not torch.equal(torch.cat(first), torch.cat(list(sampler)))
    assert epoch_seed(7, 1) != epoch_seed(7, 0) != epoch_seed(8, 0)
    plain = EpochBatchSampler(10, 4, shuffle=False, seed=7)
    assert torch.cat(list(plain)).tolist() == list(range(10))


def test_invalid_loader_combinations_become_notices(caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    params = LoaderParams(num_workers=0, persistent_workers=True, prefetch_factor=4, pin_memory=True)
    settings = resolve_settings(params, CPU)
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert (settings.persistent_workers, settings.prefetch_factor, settings.pin_memory) == (
        False,
        None,
        False,
    )
    assert len(notices) == 3 and all("\n" not in n for n in notices)
    assert any("loader.persistent_workers" in n for n in notices)
    assert any("loader.prefetch_factor" in n for n in notices)
    assert any("loader.pin_memory" in n for n in notices)
    caplog.clear()
    kept = resolve_settings(
        LoaderParams(num_workers=2, persistent_workers=True, prefetch_factor=4, pin_memory=False), CPU
    )
    assert (kept.num_workers, kept.persistent_workers, kept.prefetch_factor) == (2, True, 4)
    assert not caplog.records


def _tiny_run(
    directory: Path, *, free_graph: bool = True
) -> tuple[SimpleCNN, torch.optim.Optimizer, torch.utils.data.DataLoader]:
    dataset = ShardDataset(validate_split(directory, expected_split="train"))
    settings = resolve_settings(LoaderParams(batch_size=64, pin_memory=False), CPU)
    loader = make_loader(dataset, EpochBatchSampler(len(dataset), 64, shuffle=True, seed=1), settings)
    torch.manual_seed(0)
    model = SimpleCNN()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), loader


@pytest.mark.parametrize("free_graph", [True, False])
def test_free_graph_drops_the_previous_step_before_the_next_forward(split, free_graph: bool) -> None:
    model, optimizer, loader = _tiny_run(split[0])
    previous: list[weakref.ref] = []
    alive_at_forward: list[bool] = []

    def pre_hook(module, args):
        if previous:
            alive_at_forward.append(previous[-1]() is not None)

    def post_hook(module, args, output):
        previous.append(weakref.ref(output))

    model.register_forward_pre_hook(pre_hook)
    model.register_forward_hook(post_hook)
    stats = train_one_epoch(model, loader, optimizer, CPU, non_blocking=False, free_graph=free_graph)
    assert stats.samples == 250 and np.isfinite(stats.loss)
    assert 0 <= stats.data_wait_seconds <= stats.seconds and 0 <= stats.data_wait_fraction <= 1
    assert len(alive_at_forward) == 3
    assert not any(alive_at_forward) if free_graph else all(alive_at_forward)


def test_evaluate_counts_every_sample_without_grad(split) -> None:
    model, _, loader = _tiny_run(split[0])
    result = evaluate(model, loader, CPU, non_blocking=False)
    assert 0 <= result.accuracy <= 1 and result.loss > 0
    assert all(p.grad is None for p in model.parameters())
    assert model.training is False


_PEAK_CHILD = """
import sys, numpy as np, torch
from trainer.memory import PeakMemory
memory = PeakMemory(torch.device("cpu"))
memory.reset()
before = memory.peak_mb()
block = np.ones(64 * 2**20 // 8)  # 64 MB touched
after = memory.peak_mb()
del block
memory.reset()
print(before, after, memory.peak_mb(), int(memory.resettable))
"""


def test_peak_memory_is_reported_in_mb() -> None:
    # A fresh interpreter: its high-water mark before the block is its baseline, whatever this process did.
    res = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    before, after, after_reset, resettable = (float(v) for v in res.stdout.split())
    assert before > 10 and after >= before + 48, (before, after)
    if resettable:  # the next epoch's figure no longer carries this epoch's peak
        assert after_reset <= after - 32, (after, after_reset)
    else:
        assert after_reset >= after


_EPOCH_PEAK_CHILD = """
import sys, numpy as np
from pathlib import Path
from pipeline.params import LoaderParams, TrainParams
from trainer.memory import _vm_hwm_kib
from trainer.run import train
block = np.ones(512 * 2**20 // 8)  # 512 MB touched, then handed back, before training
del block
print(_vm_hwm_kib() / 1024)
data, work = Path(sys.argv[1]), Path(sys.argv[2])
train(train_dir=data / "train", test_dir=data / "test", model_dir=work / "models",
      checkpoint_dir=work / "ck", live_dir=work / "live", loader=LoaderParams(batch_size=64),
      train=TrainParams(epochs=2, device="cpu"))
"""


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="no resettable RSS high-water mark here"
)
def test_peak_memory_is_each_epochs_own(data: Path, tmp_path: Path) -> None:
    """peak_memory_mb is the epoch's high-water mark: a peak from before training (or an earlier epoch)
    used to be repeated in every epoch's figure."""
    res = subprocess.run(
        [sys.executable, "-c", _EPOCH_PEAK_CHILD, str(data), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # DVCLive: outside any git repository
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    before_training = float(res.stdout.split()[0])
    with open(tmp_path / "live/plots/metrics/peak_memory_mb.tsv", newline="") as f:
        peaks = [float(row["peak_memory_mb"]) for row in csv.DictReader(f, delimiter="\t")]
    assert before_training > 512 and len(peaks) == 2
    assert all(0 < peak < before_training - 128 for peak in peaks), (before_training, peaks)


def _params_and_manifests(directory: Path):
    split = validate_split(directory, expected_split="train")
    return TrainParams(), LoaderParams(batch_size=64), split.manifest


def test_checkpoint_round_trip_continues_bit_identically(split, tmp_path: Path) -> None:
    train, loader_params, manifest = _params_and_manifests(split[0])
    fp = fingerprint(train, loader_params, CPU, manifest, manifest, ARCHITECTURE)
    model, optimizer, loader = _tiny_run(split[0])
    train_one_epoch(model, loader, optimizer, CPU, non_blocking=False, free_graph=True)
    history = [{"train_loss": 1.5, "test_acc": 0.25}]
    save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        optimizer=optimizer,
        device=CPU,
        position=Position(1, 0, 0, (0.0,)),
        run_fingerprint=fp,
        shape=SHAPE,
        history=history,
    )
    metrics = ("train_loss", "test_acc")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [META, TENSORS]
    rng_after_save = torch.get_rng_state()
    reference = train_one_epoch(model, loader, optimizer, CPU, non_blocking=False, free_graph=True)

    fresh, fresh_optimizer, loader2 = _tiny_run(split[0])
    torch.manual_seed(999)
    resumed = load_checkpoint(
        tmp_path / "ckpt",
        model=fresh,
        optimizer=fresh_optimizer,
        device=CPU,
        run_fingerprint=fp,
        shape=SHAPE,
        max_epoch=5,
        batches_per_epoch=BATCHES,
        metrics=metrics,
    )
    assert (
        resumed is not None and resumed.position == Position(1, 0, 0, (0.0,)) and resumed.history == history
    )
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    again = train_one_epoch(fresh, loader2, fresh_optimizer, CPU, non_blocking=False, free_graph=True)
    assert again.loss == reference.loss
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    remove_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unusable_checkpoints_are_ignored_with_a_notice(split, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    train, loader_params, manifest = _params_and_manifests(split[0])
    fp = fingerprint(train, loader_params, CPU, manifest, manifest, ARCHITECTURE)
    model, optimizer, loader = _tiny_run(split[0])
    train_one_epoch(model, loader, optimizer, CPU, non_blocking=False, free_graph=True)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(
        ckpt,
        model=model,
        optimizer=optimizer,
        device=CPU,
        position=Position(2, 3, 192, (7.5,), 1.0, 0.1),
        run_fingerprint=fp,
        shape=SHAPE,
        history=[{"a": 1.0}, {"a": 2.0}],
    )

    def attempt(
        run_fp: str = fp,
        max_epoch: int = 5,
        metrics: tuple[str, ...] = ("a",),
        shape: RunShape = SHAPE,
        batches: int = BATCHES,
    ) -> tuple[object, list[str]]:
        fresh, fresh_optimizer, _ = _tiny_run(split[0])
        before = [p.detach().clone() for p in fresh.parameters()]
        caplog.clear()
        out = load_checkpoint(
            ckpt,
            model=fresh,
            optimizer=fresh_optimizer,
            device=CPU,
            run_fingerprint=run_fp,
            shape=shape,
            max_epoch=max_epoch,
            batches_per_epoch=batches,
            metrics=metrics,
        )
        if out is None:  # nothing was touched
            assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))
            assert not fresh_optimizer.state
        notices = [r.getMessage() for r in caplog.records]
        assert all("\n" not in n for n in notices), notices  # each notice is one line
        return out, notices

    resumed = attempt()[0]
    assert resumed is not None and resumed.position == Position(2, 3, 192, (7.5,), 1.0, 0.1)
    # The thread count the run resolved must match when the process count does (train.threads: null).
    out, notices = attempt(shape=RunShape(1, 2))
    assert out is None and "made with 1 intra-op threads per process, this run uses 2" in notices[0]
    out, notices = attempt(shape=RunShape(2, 2))  # elastic: another world size may differ in threads too
    assert out is not None and out.processes == 1 and notices == []
    out, notices = attempt(batches=3)  # mid-epoch step 3 of an epoch of only 3 batches
    assert out is None and "step: expected 0..2, found 3" in notices[0]
    other = fingerprint(TrainParams(lr=0.01), loader_params, CPU, manifest, manifest, ARCHITECTURE)
    assert other != fp
    assert (
        fingerprint(
            train,
            LoaderParams(batch_size=64, num_workers=4, pin_memory=False),
            CPU,
            manifest,
            manifest,
            ARCHITECTURE,
        )
        == fp
    ), "loader speed settings must not invalidate checkpoints"
    out, notices = attempt(other)
    assert out is None and "other params, data, code or torch version" in notices[0]
    out, notices = attempt(max_epoch=1)
    assert out is None and "epoch" in notices[0]
    # History entries must carry exactly the metric names the run logs, no more, no fewer.
    out, notices = attempt(metrics=("a", "b"))
    assert out is None and "history[0]: expected the metrics ['a', 'b'], found ['a']" in notices[0]
    out, notices = attempt(metrics=())
    assert out is None and "history[0]" in notices[0]

    meta = json.loads((ckpt / META).read_text())
    blob = bytearray((ckpt / TENSORS).read_bytes())
    blob[-1] ^= 0xFF
    (ckpt / TENSORS).write_bytes(bytes(blob))
    out, notices = attempt()
    assert out is None and "SHA-256" in notices[0]

    meta["history"] = meta["history"][:1]
    (ckpt / META).write_text(json.dumps(meta))
    out, notices = attempt()
    assert out is None and "history" in notices[0]
    (ckpt / META).write_text("{not json")
    out, notices = attempt()
    assert out is None and len(notices) == 1 and f"cannot read {META}" in notices[0]
    (ckpt / META).write_text("[" * 100_000)  # deeper than the JSON parser's recursion limit
    out, notices = attempt()
    assert out is None and len(notices) == 1 and "RecursionError" in notices[0] and len(notices[0]) < 400


def test_a_checkpoint_made_with_another_seed_is_not_resumed(split, tmp_path: Path, caplog) -> None:
    """Uses the real fingerprint and params: declaring train.seed speed-only would make this resume."""
    train, loader_params, manifest = _params_and_manifests(split[0])
    model, optimizer, _ = _tiny_run(split[0])
    fp = fingerprint(train, loader_params, CPU, manifest, manifest, ARCHITECTURE)
    save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        optimizer=optimizer,
        device=CPU,
        position=Position(1, 0, 0, (0.0,)),
        run_fingerprint=fp,
        shape=SHAPE,
        history=[{"a": 1.0}],
    )
    other_seed = fingerprint(
        dataclasses.replace(train, seed=train.seed + 1), loader_params, CPU, manifest, manifest, ARCHITECTURE
    )
    caplog.set_level(logging.INFO, logger="trainer")
    fresh, fresh_optimizer, _ = _tiny_run(split[0])
    assert (
        load_checkpoint(
            tmp_path / "ckpt",
            model=fresh,
            optimizer=fresh_optimizer,
            device=CPU,
            run_fingerprint=other_seed,
            shape=SHAPE,
            max_epoch=5,
            batches_per_epoch=BATCHES,
            metrics=("a",),
        )
        is None
    )
    assert "other params" in caplog.records[0].getMessage()


def test_model_folder_round_trip(split, tmp_path: Path) -> None:
    manifest = validate_split(split[0], expected_split="train").manifest
    torch.manual_seed(0)
    model = SimpleCNN()
    config = save_model(tmp_path / "models", model, manifest=manifest, train=TrainParams())
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [CONFIG, WEIGHTS]
    on_disk = json.loads((tmp_path / "models" / CONFIG).read_text())
    assert on_disk == config
    assert on_disk["architecture"] == "SimpleCNN" and on_disk["parameters"] == 206_922
    assert on_disk["format"] == 2 and on_disk["input_shape"] == [1, 28, 28] and on_disk["num_classes"] == 10
    assert on_disk["normalization"] == {"kind": "unit", "mean": [0.0], "std": [1.0], "stats_from": "none"}
    assert on_disk["dataset"] == "fashion-mnist" and "classes" not in on_disk
    assert on_disk["class_names"] == [
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
    loaded, _ = load_model(tmp_path / "models")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


def test_model_folder_round_trip_for_another_shape_and_classes(tmp_path: Path) -> None:
    """The model and model.json follow the manifest: 3x12x20 images, 4 named classes."""
    rng = np.random.default_rng(1)
    names = ("bird", "cat", "dog", "fish")
    write_split(
        [(rng.integers(0, 256, (30, 3 * 12 * 20), dtype=np.uint8), rng.integers(0, 4, 30))],
        tmp_path / "train",
        dataset="images",
        split="train",
        shard_size=16,
        normalization=make_normalization("unit", None, 3),
        image_shape=(3, 12, 20),
        class_names=names,
    )
    manifest = validate_split(tmp_path / "train", expected_split="train").manifest
    torch.manual_seed(0)
    model = SimpleCNN(*manifest.image_shape, manifest.num_classes)
    save_model(tmp_path / "models", model, manifest=manifest, train=TrainParams())
    on_disk = json.loads((tmp_path / "models" / CONFIG).read_text())
    assert on_disk["input_shape"] == [3, 12, 20] and on_disk["num_classes"] == 4
    assert on_disk["class_names"] == list(names) and on_disk["dataset"] == "images"
    assert on_disk["normalization"] == {
        "kind": "unit",
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
        "stats_from": "none",
    }
    assert on_disk["parameters"] == count_parameters(model) != NUM_PARAMETERS
    loaded, config = load_model(tmp_path / "models")
    assert config == on_disk and loaded.input_shape == (3, 12, 20)
    x = torch.rand(2, 3, 12, 20)
    assert loaded(x).shape == (2, 4) and torch.equal(loaded(x), model(x))


# ============================================================================ what a checkpoint must match


def _other_value(tp: object, value: object) -> object:
    """A valid value of annotation ``tp`` different from ``value``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in args if a != value)
    if typing.get_origin(tp) is tuple and typing.get_origin(args[0]) is typing.Literal:  # e.g. train.augment
        return () if value else typing.get_args(args[0])[:1]
    if value is None or tp is int or int in args:
        return (value or 0) + 1 if not isinstance(value, bool) else not value
    if tp is bool:
        return not value
    if tp is float or (float in args and value is not None):
        return value * 2
    raise AssertionError(f"add a case for {tp!r}")


@pytest.mark.parametrize("section, cls", [("loader", LoaderParams), ("train", TrainParams)])
def test_every_param_is_in_the_fingerprint_unless_declared_speed_only(split, section: str, cls: type) -> None:
    """Iterates the params classes: a key added later is covered (or must be declared SPEED_ONLY)."""
    _, _, manifest = _params_and_manifests(split[0])
    base = {"loader": LoaderParams(batch_size=64), "train": TrainParams()}
    fp = fingerprint(base["train"], base["loader"], CPU, manifest, manifest, ARCHITECTURE, code="c")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        changed = {
            **base,
            section: dataclasses.replace(
                base[section],
                **{field.name: _other_value(hints[field.name], getattr(base[section], field.name))},
            ),
        }
        other = fingerprint(
            changed["train"], changed["loader"], CPU, manifest, manifest, ARCHITECTURE, code="c"
        )
        assert (other == fp) == (f"{section}.{field.name}" in SPEED_ONLY | ELASTIC), field.name
    assert {k for k in SPEED_ONLY | ELASTIC if k.startswith(section + ".")} <= {
        f"{section}.{f.name}" for f in dataclasses.fields(cls)
    }
    assert {"train.processes"} == ELASTIC  # anything else leaving the fingerprint must be proven speed-only


def test_fingerprint_covers_code_torch_version_device_and_data(split, monkeypatch) -> None:
    train, loader_params, manifest = _params_and_manifests(split[0])
    fp = fingerprint(train, loader_params, CPU, manifest, manifest, ARCHITECTURE)
    assert fingerprint(train, loader_params, CPU, manifest, manifest, ARCHITECTURE, code=code_digest()) == fp
    assert fingerprint(train, loader_params, CPU, manifest, manifest, ARCHITECTURE, code="other") != fp
    assert fingerprint(train, loader_params, torch.device("meta"), manifest, manifest, ARCHITECTURE) != fp
    assert fingerprint(train, loader_params, CPU, manifest, manifest, "OtherNet") != fp
    other_data = dataclasses.replace(manifest, shards=manifest.shards[:-1])
    assert fingerprint(train, loader_params, CPU, manifest, other_data, ARCHITECTURE) != fp
    # Same shards, another normalization: uint8 shards are the same bytes under either.
    norm = manifest.normalization
    shifted = dataclasses.replace(norm, mean=tuple(m + 0.125 for m in norm.mean))
    other_norm = dataclasses.replace(manifest, normalization=shifted)
    assert fingerprint(train, loader_params, CPU, other_norm, manifest, ARCHITECTURE) != fp
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert fingerprint(train, loader_params, CPU, manifest, manifest, ARCHITECTURE) != fp


def test_code_digest_covers_every_train_code_file_in_dvc_yaml(tmp_path: Path) -> None:
    files = train_code_files()
    assert "trainer/loop.py" in files and "stages/train.py" in files and all(f.endswith(".py") for f in files)
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    assert train_code_files(tmp_path) == files
    digest = code_digest(tmp_path)
    assert digest == code_digest(ROOT)
    for rel in files:
        original = (tmp_path / rel).read_bytes()
        (tmp_path / rel).write_bytes(original + b"# a comment\n")
        assert code_digest(tmp_path) != digest, rel
        (tmp_path / rel).unlink()
        assert code_digest(tmp_path) != digest, rel
        (tmp_path / rel).write_bytes(original)
    assert code_digest(tmp_path) == digest
    (tmp_path / "dvc.yaml").unlink()  # no dvc.yaml: every module of the packages counts
    assert set(train_code_files(tmp_path)) == set(files)


def test_pool_before_relu_is_the_same_function_and_gradient_exactly() -> None:
    # The identity the fast layout rests on: ReLU and max-pooling commute, values and gradients bit for bit.
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, :2, :2] = -1.0  # a window with no positive value: no gradient either way
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    pa = torch.nn.functional.relu(torch.nn.functional.max_pool2d(a, 2))
    pb = torch.nn.functional.max_pool2d(torch.nn.functional.relu(b), 2)
    assert torch.equal(pa, pb)
    g = torch.randn_like(pa)
    pa.backward(g)
    pb.backward(g)
    assert torch.equal(a.grad, b.grad) and a.grad[0, 0, :2, :2].eq(0).all()


def test_fast_layout_learns_what_the_reference_layout_learns(tmp_path: Path) -> None:
    torch.manual_seed(3)
    fast = SimpleCNN()
    torch.manual_seed(3)
    reference = SimpleCNN(reference_layout=True)
    assert list(fast.state_dict()) == list(reference.state_dict())  # same names: model.safetensors fits both
    assert all(torch.equal(p, q) for p, q in zip(fast.parameters(), reference.parameters()))  # same init
    assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for model in (fast, reference):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(fast(x), reference(x), atol=1e-5)
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), (
            name
        )  # convolution sums may round differently
    reference.load_state_dict(fast.state_dict())  # and back: weights move freely between layouts
    assert torch.allclose(fast(x), reference(x), atol=1e-5)


def test_epoch_loss_is_the_per_step_item_sum_bit_for_bit(split) -> None:
    model, optimizer, loader = _tiny_run(split[0])
    stats = train_one_epoch(model, loader, optimizer, CPU, non_blocking=False, free_graph=True)
    model, optimizer, loader = _tiny_run(split[0])
    loss_sum, samples = 0.0, 0
    for images, labels in loader:  # the loop's arithmetic before the loss moved to the device
        optimizer.zero_grad(set_to_none=True)
        summed = torch.nn.functional.cross_entropy(model(images), labels, reduction="sum")
        (summed / labels.shape[0]).backward()
        optimizer.step()
        loss_sum += summed.item()  # one host read per step, accumulated in Python floats (float64)
        samples += labels.shape[0]
    assert samples == stats.samples == 250
    assert stats.loss == loss_sum / samples


def test_device_resident_batches_equal_the_memory_mapped_ones(split, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    dataset = ShardDataset(validate_split(split[0], expected_split="train"))
    sampler = EpochBatchSampler(len(dataset), 64, shuffle=True, seed=1)
    resident = resolve_settings(LoaderParams(batch_size=64, num_workers=2, device_resident=True), CPU)
    notices = [r.getMessage() for r in caplog.records]
    assert resident.resident_device == CPU and resident.num_workers == 0
    assert len(notices) == 2 and "loader.num_workers ignored" in notices[1]  # [0]: pin_memory on a CPU
    on_device = make_loader(dataset, sampler, resident)
    mapped = make_loader(
        dataset, sampler, resolve_settings(LoaderParams(batch_size=64, pin_memory=False), CPU)
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        pairs = list(zip(on_device, mapped, strict=True))
        assert len(pairs) == len(on_device) == 4
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_split_larger_than_the_devices_free_memory_is_refused_in_one_line() -> None:
    cuda = torch.device("cuda", 0)
    check_resident_fits("data/tensors/train", 2**30, 2**30, cuda)  # exactly fits
    with pytest.raises(PipelineError) as refused:
        check_resident_fits("data/tensors/train", 2**30 + 1, 2**30, cuda)
    assert str(refused.value) == (
        "loader.device_resident: data/tensors/train (1.00 GiB) does not fit on cuda:0; set "
        "loader.device_resident false to load batches from the memory-mapped shards (1.00 GiB free)"
    )


_FAULTS_SCRIPT = """
import resource, sys, torch
from trainer.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def step():  # a training step's pattern: a large buffer written, then freed
    torch.empty(8 * 2**20).fill_(1.0)  # 32 MiB
for _ in range(20):  # the heap settles within a few steps once freed blocks are kept
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.parametrize("mode", ["retain", "glibc-default"])
def test_retained_memory_stops_per_step_page_faults(mode: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT, mode],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )
    assert res.returncode == 0, res.stderr
    applied, faults = res.stdout.split()
    pages = 32 * 2**20 // 4096
    if mode == "retain":
        assert applied == "True" and float(faults) < pages / 100  # reused: nothing zero-filled again
    else:
        assert float(faults) > pages / 2  # glibc unmaps the block on free; every step faults it back in
