"""Loader workers prefetch pages; the main process gathers: the same batches for any worker count."""

from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.workers import uint8_twin
from pipeline.errors import PipelineError, ShardError
from pipeline.params import LoaderParams
from tests.test_trainer import make_split
from tests.test_uint8 import write_both
from trainer import prefetch
from trainer.data import ShardDataset, page_points
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings, unwrap_worker_error
from trainer.prefetch import PrefetchedBatches, chunk_bounds
from trainer.rank_split import RankBatches
from trainer.verify import validate_split

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


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


def test_chunks_are_runs_of_whole_batches(splits) -> None:
    """Rank 1 of 2 over 256 samples in batches of 51: sizes 25 x 5 and an empty last batch, 3 per chunk."""
    dataset = splits["uint8"]
    sampler = RankBatches(EpochBatchSampler(len(dataset), 51, shuffle=True, seed=1), rank=1, world=2)
    assert [len(b) for b in sampler] == [25] * 5 + [0]
    assert chunk_bounds([len(b) for b in sampler], 60) == [(0, 3), (3, 6)]
    assert chunk_bounds([10, 50, 70, 1], 60) == [(0, 2), (2, 3), (3, 4)]
    assert chunk_bounds([], 60) == []
    loader = PrefetchedBatches(
        dataset,
        sampler,
        num_workers=2,
        persistent_workers=False,
        prefetch_factor=2,
        pin_memory=False,
        samples_per_chunk=60,
    )
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)


class _StalledPrefetch(ShardDataset):
    """The workers' prefetch sets ``entered``, then waits until ``go`` is set."""

    def __init__(self, split, go) -> None:
        super().__init__(split)
        self.go = go
        self.entered = multiprocessing.Event()

    def stalled(self) -> bool:
        """Whether a worker is in its prefetch: it took its first chunk before the consumer passed it."""
        return self.entered.wait(10)

    def prefetch(self, indices) -> int:
        self.entered.set()
        self.go.wait()
        return super().prefetch(indices)


class _FailingPrefetch(ShardDataset):
    """The workers' prefetch fails, and says so in ``failed``."""

    def __init__(self, split) -> None:
        super().__init__(split)
        self.failed = multiprocessing.Event()

    def prefetch(self, indices) -> int:
        self.failed.set()
        raise ShardError(f"{self.split.shards[0].path}: shard changed after it was validated (test)")


class _CountedPrefetch(ShardDataset):
    """Records, across processes, the first sample of each chunk the workers prefetch, slowly."""

    def __init__(self, split, started, seconds: float = 0.0) -> None:
        super().__init__(split)
        self.started = started  # a shared int64 array: [count, first sample of each chunk...]
        self.seconds = seconds

    def prefetch(self, indices) -> int:
        with self.started.get_lock():
            self.started[0] += 1
            self.started[self.started[0]] = int(np.asarray(indices)[0])
        time.sleep(self.seconds)
        return super().prefetch(indices)


def _prefetched(dataset: ShardDataset, batch: int, *, persistent: bool = True, per_chunk: int = 48):
    sampler = EpochBatchSampler(len(dataset), batch, shuffle=True, seed=3)
    loader = PrefetchedBatches(
        dataset,
        sampler,
        num_workers=1,
        persistent_workers=persistent,
        prefetch_factor=2,
        pin_memory=False,
        samples_per_chunk=per_chunk,
    )
    return loader, sampler


def _settles(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _workers(loader: PrefetchedBatches) -> list[int]:
    return [] if loader._pool is None else list(loader._pool._processes)


def test_batches_come_out_while_the_workers_are_stalled(splits) -> None:
    go = multiprocessing.Event()
    dataset = _StalledPrefetch(splits["uint8"].split, go)
    loader, sampler = _prefetched(dataset, 16)
    expected = [splits["uint8"][batch] for batch in sampler]
    release = threading.Timer(20, go.set)  # a loader that waits for the workers gets its batches late
    release.start()
    try:
        batches, started = iter(loader), time.monotonic()
        got = [next(batches)]
        assert dataset.stalled()
        got += [next(batches) for _ in expected[1:]]  # every batch of the epoch, no prefetch done yet
        assert not go.is_set(), f"batches waited for the stalled workers ({time.monotonic() - started:.1f} s)"
        go.set()
        assert next(batches, None) is None  # the epoch's end collects the workers' tasks
    finally:
        release.cancel()
        go.set()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    assert loader._tasks == []


@pytest.mark.parametrize("persistent", [True, False])
def test_an_error_in_a_worker_prefetch_reaches_the_consumer(splits, persistent: bool) -> None:
    dataset = _FailingPrefetch(splits["uint8"].split)
    loader, sampler = _prefetched(dataset, 16, persistent=persistent)
    for epoch in range(2):  # and again, the next epoch
        sampler.set_epoch(epoch)
        dataset.failed.clear()
        with pytest.raises(ShardError) as exc:
            batches = iter(loader)
            next(batches)
            assert dataset.failed.wait(10)  # a worker took a chunk before the consumer passed it, and failed
            for _ in batches:
                pass
        clean = unwrap_worker_error(exc.value)  # the trainer's one-line report
        assert "Traceback" not in str(clean) and str(clean).endswith(
            "shard changed after it was validated (test)"
        )
        assert loader._tasks == []


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("how", ["break", "close", "raise", "drop"])
def test_a_consumer_that_stops_early_collects_the_workers_epoch(splits, persistent: bool, how: str) -> None:
    dataset = splits["uint8"]
    loader, sampler = _prefetched(dataset, 16, persistent=persistent, per_chunk=16)
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)  # persistent workers start
    workers = _workers(loader)
    assert len(workers) == (1 if persistent else 0)
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
    assert loader._tasks == []  # collected, not just told to stop
    parent = os.getpriority(os.PRIO_PROCESS, 0)
    assert all(os.getpriority(os.PRIO_PROCESS, pid) == min(19, parent + 19) for pid in workers)  # yield
    assert _workers(loader) == workers  # persistent: the same process; otherwise ended
    sampler.set_epoch(1, 3)  # the next epoch, resumed mid-way, is whole
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)
    assert loader._tasks == [] and _workers(loader) == workers


class _Interrupted(Exception):
    """What the test's signal handler raises (as a KeyboardInterrupt would)."""


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted


def test_an_exception_while_the_epoch_end_waits_leaves_the_next_epoch_whole(splits) -> None:
    """The epoch's end waits for the workers' tasks; a signal handler that raises there must not let the
    next epoch start while a task of the last one still runs on the shared order."""
    go = multiprocessing.Event()
    dataset = _StalledPrefetch(splits["uint8"].split, go)
    loader, sampler = _prefetched(dataset, 16)
    main = threading.main_thread().ident
    previous = signal.signal(signal.SIGUSR1, _raise_interrupted)
    interrupt = threading.Timer(1.0, signal.pthread_kill, (main, signal.SIGUSR1))  # while the end waits
    release = threading.Timer(3.0, go.set)
    try:
        interrupt.start()
        release.start()
        with pytest.raises(_Interrupted):
            batches = iter(loader)
            next(batches)
            assert dataset.stalled()
            for _ in batches:
                pass
        interrupted = loader._tasks[:]
        assert not go.is_set() and not any(task.done() for task in interrupted)  # still in its prefetch
        sampler.set_epoch(1)
        expected = [splits["uint8"][batch] for batch in sampler]
        batches = iter(loader)
        got = [next(batches)]
        assert go.is_set() and all(task.done() for task in interrupted)  # collected before the epoch began
        got += list(batches)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        interrupt.cancel()
        release.cancel()
        go.set()
    assert len(got) == len(expected)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))


def test_workers_stay_a_bounded_number_of_chunks_ahead(splits) -> None:
    """One batch per chunk, 1 worker, prefetch_factor 2: a worker takes at most 2 chunks beyond the one
    being gathered, however slow the consumer."""
    started = multiprocessing.Array("q", 64)
    loader, _ = _prefetched(_CountedPrefetch(splits["uint8"].split, started), 16, per_chunk=16)
    for position, _ in enumerate(loader):
        time.sleep(0.02)  # a slow training step: unbounded workers would have touched every chunk by now
        assert started[0] <= position + 1 + 2
    assert started[0] <= position + 1 == len(loader)


def test_a_slow_worker_skips_the_chunks_already_gathered(splits) -> None:
    """A worker taking 50 ms per chunk behind a consumer taking 20 ms: each chunk it takes is one the
    consumer has not reached, so it jumps over chunks where a worker taking them in turn would not."""
    started = multiprocessing.Array("q", 64)
    dataset = splits["uint8"]
    loader, sampler = _prefetched(_CountedPrefetch(dataset.split, started, 0.05), 16, per_chunk=16)
    sampler.set_epoch(0)
    firsts = [int(batch[0]) for batch in sampler]
    for _ in loader:
        time.sleep(0.02)
    touched = [firsts.index(first) for first in started[1 : started[0] + 1]]
    assert touched == sorted(set(touched)) and touched != list(range(len(touched))), touched


def test_a_dead_worker_is_one_line(splits) -> None:
    go = multiprocessing.Event()
    dataset = _StalledPrefetch(splits["uint8"].split, go)
    loader, _ = _prefetched(dataset, 16)
    batches = iter(loader)
    next(batches)
    assert dataset.stalled()
    os.kill(_workers(loader)[0], signal.SIGKILL)  # in its prefetch: the task can only end by the death
    with pytest.raises(PipelineError, match=r"^a loader worker process died .*loader.num_workers: 0"):
        for _ in batches:
            time.sleep(0.05)
    # go is never set: the killed worker was waiting on it, and an Event's set waits for its waiters


def test_a_worker_that_cannot_stop_is_killed_when_the_loader_closes(splits, monkeypatch) -> None:
    """A worker that never reads its stop (here stopped by SIGSTOP; in life, one waiting for a queue lock
    that a sibling killed by Ctrl-C still held) is killed WORKER_STOP_S after being told to stop, so
    closing the loader, as a run ending on Ctrl-C does, cannot hang; the next epoch starts new workers."""
    monkeypatch.setattr(prefetch, "WORKER_STOP_S", 0.5)
    dataset = splits["uint8"]
    loader, sampler = _prefetched(dataset, 16, per_chunk=16)
    batches = iter(loader)
    next(batches)
    (worker,) = _workers(loader)
    os.kill(worker, signal.SIGSTOP)
    closing = threading.Thread(target=loader.close)  # a thread, so that a hang fails the test instead
    try:
        closing.start()
        closing.join(20)
        assert not closing.is_alive(), "closing the loader waited for a worker that cannot stop"
        assert _settles(lambda: not _exists(worker)) and loader._tasks == [] and loader._pool is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        closing.join(20)
    batches.close()
    _same_batches(loader, [dataset[batch] for batch in sampler], torch.uint8)
    assert _workers(loader) not in ([], [worker])
    loader.close()


def test_a_worker_takes_ctrl_c_in_its_own_main_thread(splits) -> None:
    """In a worker, only the main thread takes SIGINT: a worker whose parent-watch thread took it
    would only note it, and live on while its main thread waited for a lock."""
    loader, _ = _prefetched(splits["uint8"], 16)
    next(iter(loader))
    (worker,) = _workers(loader)
    try:
        threads = {}
        for status in Path(f"/proc/{worker}/task").glob("*/status"):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            threads[int(status.parent.name)] = bool(int(fields["SigBlk"], 16) & (1 << (signal.SIGINT - 1)))
        assert len(threads) >= 2 and threads.pop(worker) is False, threads  # the main thread, and the watch
        assert all(threads.values()), threads  # every other thread blocks SIGINT
    finally:
        loader.close()


def test_workers_end_with_a_killed_training_process(tmp_path: Path, splits) -> None:
    """SIGKILL leaves the training process no cleanup to run: its workers notice and exit on their own."""
    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys, time\n"
        "from trainer.data import ShardDataset\n"
        "from trainer.loader import EpochBatchSampler\n"
        "from trainer.prefetch import PrefetchedBatches\n"
        "from trainer.verify import validate_split\n"
        "dataset = ShardDataset(validate_split(sys.argv[1], expected_split='train'))\n"
        "sampler = EpochBatchSampler(len(dataset), 16, shuffle=True, seed=0)\n"
        "loader = PrefetchedBatches(dataset, sampler, num_workers=2, persistent_workers=True,\n"
        "                           prefetch_factor=2, pin_memory=False, samples_per_chunk=16)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "print(*loader._pool._processes, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(splits["uint8"].split.directory)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_exists(pid) for pid in pids)
        proc.kill()
        proc.wait(10)
        assert _settles(lambda: not any(_exists(pid) for pid in pids)), "workers outlived their parent"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # exited and reaped between the two looks
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


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


def test_a_finished_run_leaves_no_loader_worker_behind(data: Path, tmp_path: Path, monkeypatch) -> None:
    """Persistent workers outlive every epoch; the run joins them when it ends (returned or failed),
    instead of leaving their pools to the interpreter's exit, whose shutdown can race them."""
    from pipeline.params import TrainParams
    from tests.test_resume import _short_run

    monkeypatch.chdir(tmp_path)
    before = {p.pid for p in multiprocessing.active_children()}
    loader = LoaderParams(batch_size=64, num_workers=2, persistent_workers=True)
    _short_run(data, tmp_path / "w", loader, TrainParams(epochs=2, device="cpu"))
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert left == [], left
