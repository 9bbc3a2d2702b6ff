"""Loader workers prefetch pages; the main process gathers: the same batches for any worker count."""

from __future__ import annotations

import json
import mmap
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.workers import uint8_twin
from pipeline.errors import ShardError
from pipeline.params import LoaderParams
from tests.test_trainer import make_split
from tests.test_uint8 import write_both
from trainer.data import ShardDataset, page_points
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings, unwrap_worker_error
from trainer.prefetch import PrefetchedBatches
from trainer.rank_split import RankBatches
from trainer.verify import validate_split

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, ShardDataset]:
    f32, u8 = write_both(tmp_path_factory.mktemp("workers"))
    return {
        name: ShardDataset(validate_split(root / "train", expected_split="train"))
        for name, root in (("float32", f32), ("uint8", u8))
    }


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@pytest.mark.parametrize("workers", [1, 2])
def test_prefetched_batches_are_the_main_process_gather_in_sampler_order(
    splits, dtype: str, workers: int
) -> None:
    dataset = splits[dtype]
    sampler = EpochBatchSampler(
        len(dataset), 48, shuffle=True, seed=5, shard_sizes=[64] * 4, shuffle_window=2
    )
    settings = resolve_settings(
        LoaderParams(
            batch_size=48, num_workers=workers, persistent_workers=True, prefetch_factor=2, pin_memory=False
        ),
        CPU,
    )
    loader = make_loader(dataset, sampler, settings)
    assert isinstance(loader, PrefetchedBatches)
    for epoch, start in ((0, 0), (1, 2), (1, 0)):  # a mid-epoch start as a resume sets it
        sampler.set_epoch(epoch, start)
        _same_batches(loader, [dataset[batch] for batch in sampler], getattr(torch, dtype))


def _same_batches(loader: PrefetchedBatches, expected: list, dtype: torch.dtype) -> None:
    got = list(loader)
    assert len(loader) == len(expected) == len(got)
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        assert images.dtype == want_images.dtype == dtype
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_batches_are_sent_together_and_split_back(splits) -> None:
    """Rank 1 of 2 over 256 samples in batches of 51: sizes 25 x 5 and an empty last batch, 3 per message."""
    dataset = splits["uint8"]
    sampler = RankBatches(EpochBatchSampler(len(dataset), 51, shuffle=True, seed=1), rank=1, world=2)
    loader = PrefetchedBatches(
        dataset,
        sampler,
        num_workers=2,
        persistent_workers=False,
        prefetch_factor=2,
        pin_memory=False,
        samples_per_message=60,
    )
    groups = loader.plan_epoch()
    assert [[len(batch) for batch in group] for group in groups] == [[25, 25, 25], [25, 25, 0]]
    sent = loader.pages.sampler.chunks  # what crosses to the workers: index arrays only
    assert all(type(a) is np.ndarray and a.dtype == np.int64 for a in sent)
    assert np.array_equal(np.concatenate(sent), torch.cat(list(sampler)).numpy())
    assert [type(ack) for ack in loader.pages] == [int, int]  # what comes back: a count per chunk
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)


class _StalledPrefetch(ShardDataset):
    """The workers' prefetch waits until ``go`` is set."""

    def __init__(self, split, go) -> None:
        super().__init__(split)
        self.go = go

    def prefetch(self, indices) -> int:
        self.go.wait()
        return super().prefetch(indices)


class _FailingPrefetch(ShardDataset):
    """The workers' prefetch fails on the chunk that holds sample ``bad``."""

    def __init__(self, split, bad: int) -> None:
        super().__init__(split)
        self.bad = bad

    def prefetch(self, indices) -> int:
        if self.bad in np.asarray(indices):
            raise ShardError(f"{self.split.shards[0].path}: shard changed after it was validated (test)")
        return super().prefetch(indices)


class _CountedPrefetch(ShardDataset):
    """Counts, across processes, the chunks the workers started to prefetch."""

    def __init__(self, split, started) -> None:
        super().__init__(split)
        self.started = started

    def prefetch(self, indices) -> int:
        with self.started.get_lock():
            self.started.value += 1
        return super().prefetch(indices)


def _prefetched(dataset: ShardDataset, batch: int, *, persistent: bool = True, per_message: int = 48):
    sampler = EpochBatchSampler(len(dataset), batch, shuffle=True, seed=3)
    loader = PrefetchedBatches(
        dataset,
        sampler,
        num_workers=1,
        persistent_workers=persistent,
        prefetch_factor=2,
        pin_memory=False,
        samples_per_message=per_message,
    )
    return loader, sampler


def _alive() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


def _settles(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _page_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "page-prefetch"]


def test_batches_come_out_while_the_workers_are_stalled(splits) -> None:
    go = multiprocessing.Event()
    loader, sampler = _prefetched(_StalledPrefetch(splits["uint8"].split, go), 16)
    expected = [splits["uint8"][batch] for batch in sampler]
    release = threading.Timer(20, go.set)  # a loader that waits for the workers gets its batches late
    release.start()
    try:
        batches, started = iter(loader), time.monotonic()
        got = [next(batches) for _ in expected]  # every batch of the epoch, no acknowledgement yet
        assert not go.is_set(), f"batches waited for the stalled workers ({time.monotonic() - started:.1f} s)"
        go.set()
        assert next(batches, None) is None  # the epoch's end takes the acknowledgements
    finally:
        release.cancel()
        go.set()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    assert not _page_threads()


@pytest.mark.parametrize("persistent", [True, False])
def test_an_error_in_a_worker_prefetch_reaches_the_consumer(splits, persistent: bool) -> None:
    dataset = _FailingPrefetch(splits["uint8"].split, bad=0)
    loader, sampler = _prefetched(dataset, 16, persistent=persistent)
    for epoch in range(2):  # and again, the next epoch
        sampler.set_epoch(epoch)
        with pytest.raises(ShardError) as exc:
            for _ in loader:
                pass
        assert "DataLoader worker" in str(exc.value)  # raised as DataLoader raises it, ...
        clean = unwrap_worker_error(exc.value)  # ... so the trainer's one-line report still applies
        assert "Traceback" not in str(clean) and str(clean).endswith(
            "shard changed after it was validated (test)"
        )
        assert not _page_threads()


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("how", ["break", "close", "raise", "drop"])
def test_a_consumer_that_stops_early_joins_the_thread(splits, persistent: bool, how: str) -> None:
    dataset = splits["uint8"]
    loader, sampler = _prefetched(dataset, 16, persistent=persistent, per_message=16)
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)  # persistent workers start
    before, children = _alive(), set(multiprocessing.active_children())  # feeder threads, persistent workers
    if how == "break":
        for _ in loader:
            break
    elif how == "raise":
        with pytest.raises(RuntimeError, match="training step"):
            for _ in loader:
                raise RuntimeError("training step")
    else:
        batches = iter(loader)
        next(batches)
        if how == "close":
            batches.close()
        else:
            del batches  # garbage: the generator's cleanup runs
    assert not _page_threads()  # joined, not just told to stop
    assert _settles(lambda: _alive() <= before)  # a queue's feeder thread ends soon after its queue closes
    assert _settles(lambda: set(multiprocessing.active_children()) <= children)  # non-persistent: ended
    sampler.set_epoch(1, 3)  # the next epoch, resumed mid-way, is whole
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)
    assert not _page_threads() and _settles(lambda: _alive() <= before)


def test_workers_stay_a_bounded_number_of_chunks_ahead(splits) -> None:
    """One batch per chunk, 1 worker, prefetch_factor 2: the workers are handed at most 2 chunks beyond the
    one being gathered, and the thread takes no acknowledgement beyond it, however slow the consumer."""
    started = multiprocessing.Value("i", 0)
    loader, _ = _prefetched(_CountedPrefetch(splits["uint8"].split, started), 16, per_message=16)
    for position, _ in enumerate(loader):
        time.sleep(0.02)  # a slow training step: unbounded workers would have touched every chunk by now
        assert started.value <= position + 1 + 2
        assert loader._read_ahead.acked <= position + 1
    assert started.value == position + 1 == len(loader)


def test_the_sampler_is_iterated_once_per_epoch(splits) -> None:
    class Counted(EpochBatchSampler):
        iterations = 0

        def __iter__(self):
            Counted.iterations += 1
            return super().__iter__()

    dataset = splits["float32"]
    sampler = Counted(len(dataset), 40, shuffle=True, seed=9)
    loader = PrefetchedBatches(
        dataset, sampler, num_workers=2, persistent_workers=True, prefetch_factor=1, pin_memory=False
    )
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert len(list(loader)) == len(sampler) and Counted.iterations == epoch + 1


def test_prefetch_reads_every_page_the_samples_lie_on(tmp_path: Path) -> None:
    for size in (
        8,
        3136,
        3 * 32 * 32 * 4,
        2 * mmap.PAGESIZE,
    ):  # labels, 1x28x28 and 3x32x32 floats, page-sized
        for offset in (0, 8, mmap.PAGESIZE - 8):
            local = np.array([0, 1, 5, 4, 1000])
            points = page_points(offset, size, local)
            wanted = {
                page
                for i in local
                for page in range(
                    (offset + i * size) // mmap.PAGESIZE, (offset + (i + 1) * size - 1) // mmap.PAGESIZE + 1
                )
            }
            assert {p // mmap.PAGESIZE for p in points} == wanted, (size, offset)
            starts, ends = offset + local * size, offset + (local + 1) * size
            assert all(
                any(s <= p < e for s, e in zip(starts, ends)) for p in points
            )  # nothing outside the items
    make_split(tmp_path / "train", 250, split="train", shard_size=100)
    dataset = ShardDataset(validate_split(tmp_path / "train", expected_split="train"))
    assert dataset.prefetch(np.array([0, 1, 2, 99, 100, 249])) == 6 * (
        2 + 2
    )  # 3136 and 8 bytes: 2 points each
    with pytest.raises(IndexError, match="out of range"):
        dataset.prefetch(np.array([250]))


def test_workers_benchmark_writes_both_dtypes_and_the_goal(tmp_path: Path) -> None:
    """benchmarks.workers on a tiny split (no timing asserts): the uint8 twin it makes holds the same
    samples."""
    f32, _ = write_both(tmp_path / "data")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.workers",
            "--tensors",
            str(f32),
            "--repeats",
            "1",
            "--out",
            str(tmp_path / "bench"),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "bench" / "workers.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == [
        f"{d}-{w}"
        for d in ("float32", "uint8")
        for w in ("workers0", "workers1", "workers2", "workers4", "gather-in-worker2")
    ]
    assert all(row["loader_epoch_s"] > 0 for row in result["rows"])
    assert set(result["workers2_over_workers0"]) == {"float32", "uint8"} and result["goal"] == 1.5
    assert "| uint8 |" in (tmp_path / "bench" / "workers.md").read_text()


def test_uint8_twin_normalises_to_the_float32_split(tmp_path: Path) -> None:
    f32, u8 = write_both(tmp_path / "data")
    twin = ShardDataset(validate_split(uint8_twin(f32 / "train", tmp_path / "twin"), expected_split="train"))
    expected = ShardDataset(validate_split(u8 / "train", expected_split="train"))
    assert twin.split.manifest.image_dtype == "uint8"
    assert [s.num_samples for s in twin.split.shards] == [s.num_samples for s in expected.split.shards]
    every = torch.arange(len(expected))
    assert all(torch.equal(a, b) for a, b in zip(twin[every], expected[every]))
