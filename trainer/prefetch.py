"""Loader workers that prefetch pages; the main process gathers every batch and never waits for them.

A batch gathered in a worker reaches the main process through shared memory:
the worker copies it into a fresh shared-memory segment, and the main process
receives a file descriptor over a socket and faults the segment's pages in.
For a memory-mapped gather, which is itself a few memcpys from the page cache,
that transport costs many times the gather (bench/workers.md). So here the
main process gathers each batch straight from its own mapping of the shards,
exactly as with ``loader.num_workers`` 0, and the workers run ahead of it
reading one byte of every page the coming batches lie on
(:meth:`trainer.data.ShardDataset.prefetch`): whatever has to come from disk
is read by a worker, not waited for by the training loop.

The prefetch is a hint, so the main process never waits for it, and nothing
crosses a pipe per batch. At the start of an epoch the main process writes the
epoch's sample order into a shared array and hands each worker one task for
the whole epoch (a ``ProcessPoolExecutor``, so a worker's error comes back as
its exception and a dead worker as one line). The order is cut into chunks of
whole batches (:data:`SAMPLES_PER_CHUNK`); workers take chunks in turn from a
shared counter, never more than ``prefetch_factor x num_workers`` chunks beyond
the one being gathered, and skip chunks the main process has already reached.
Per chunk the main process stores its position and posts a semaphore, which
wakes a worker waiting for room: no message, no thread of ours, no lock shared
with a worker. At the epoch's end (or when the consumer stops early) it tells
the workers to stop and collects their tasks, which end within one chunk; when
the consumer stopped early, or the pool is shut, a worker still running
:data:`WORKER_STOP_S` later is killed (it may be waiting for a lock that a
sibling, killed by Ctrl-C, held). The pool's bookkeeping in the main process
holds Ctrl-C back until it is done (:func:`pipeline.pool.ctrl_c_deferred`).

Workers are forked, like DataLoader's on Linux, run at the lowest priority
(:data:`WORKER_NICENESS`: they use the CPU the training process leaves, and
when they get none the main process reads its pages itself, as with 0
workers), and end with their parent: each watches its parent and exits when
it is gone (a training process killed with SIGKILL leaves no worker behind).

Batches are the dataset's own gather in the sampler's order, so results are
bit-identical for any number of workers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from pipeline.errors import PipelineError
from pipeline.pool import ctrl_c_deferred, end_quietly_on_ctrl_c
from trainer.data import ShardDataset

log = logging.getLogger(__name__)

# Whole batches are joined into one chunk, the unit a worker takes, until it holds this many samples.
SAMPLES_PER_CHUNK = 4096
PARENT_CHECK_S = 0.5  # how often a worker looks for its parent
# Added to each worker's niceness: a prefetch is a hint, so a worker woken for the next chunk must not
# preempt the training process on its core (on 2 cores that preemption cost as much as the gather).
WORKER_NICENESS = 19
# A worker told to stop and still running after this long is killed: it may wait for a lock that a
# sibling, killed by Ctrl-C or the OOM killer, still held (a prefetch worker holds nothing worth a wait).
WORKER_STOP_S = 5.0


@dataclasses.dataclass
class _Shared:
    """What the main process and its workers share for the life of the pool (inherited at fork)."""

    order: Any  # multiprocessing Array of int64: the epoch's sample indices, written before each epoch
    bounds: Any  # multiprocessing Array of int64: chunk c is order[bounds[c]:bounds[c + 1]]
    chunks: Any  # Value: the epoch's number of chunks
    next_chunk: Any  # Value with a lock: the next chunk a worker may take
    reached: Any  # Value: the chunk the main process is gathering
    ahead: int  # chunks a worker may take beyond ``reached``
    stop: Any  # Value: the epoch is over for the workers
    room: Any  # Semaphore: posted when ``reached`` moves or ``stop`` is set

    @classmethod
    def make(cls, capacity: int, ahead: int) -> _Shared:
        ctx = multiprocessing.get_context("fork")
        return cls(
            order=ctx.Array("q", max(capacity, 1), lock=False),
            bounds=ctx.Array("q", max(capacity, 1) + 1, lock=False),
            chunks=ctx.Value("q", 0, lock=False),
            next_chunk=ctx.Value("q", 0),
            reached=ctx.Value("q", 0, lock=False),
            ahead=ahead,
            stop=ctx.Value("b", 0, lock=False),
            room=ctx.Semaphore(0),
        )


_worker: tuple[ShardDataset, _Shared] | None = None  # set in each worker process


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _start_worker(dataset: ShardDataset, shared: _Shared, parent: int) -> None:
    global _worker
    _worker = (dataset, shared)
    # Ctrl-C: this worker ends quietly, which frees the training process's pool. SIGINT was blocked
    # across the fork (ctrl_c_deferred), so one that came meanwhile is handled here. The watch thread
    # starts before it is unblocked and keeps it blocked: a SIGINT taken by that thread would only
    # be noted, never acted on while this thread waits for a lock, and the worker would live on.
    end_quietly_on_ctrl_c()
    os.nice(WORKER_NICENESS)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _take(shared: _Shared) -> int | None:
    """The next chunk to prefetch (skipping those already reached), -1 to wait for room, None when done."""
    with shared.next_chunk.get_lock():
        if shared.stop.value:
            return None
        chunk = max(shared.next_chunk.value, shared.reached.value + 1)
        if chunk >= shared.chunks.value:
            return None
        if chunk > shared.reached.value + shared.ahead:
            return -1
        shared.next_chunk.value = chunk + 1
        return chunk


def _prefetch_epoch() -> int:
    """A worker's task for one epoch: prefetch chunks until none is left or the epoch ends; pages read."""
    assert _worker is not None, "a prefetch task runs in a worker started by PrefetchedBatches"
    dataset, shared = _worker
    order = np.frombuffer(shared.order, dtype=np.int64)
    bounds = np.frombuffer(shared.bounds, dtype=np.int64)
    read = 0
    while (chunk := _take(shared)) is not None:
        if chunk < 0:
            shared.room.acquire()  # until the main process moves on (or stops the epoch)
            continue
        read += dataset.prefetch(order[bounds[chunk] : bounds[chunk + 1]])
    return read


def chunk_bounds(sizes: list[int], samples_per_chunk: int) -> list[tuple[int, int]]:
    """Runs ``[first, end)`` of consecutive batches, each joined until it holds ``samples_per_chunk``."""
    bounds, first, held = [], 0, 0
    for i, size in enumerate(sizes):
        held += size
        if held >= samples_per_chunk:
            bounds.append((first, i + 1))
            first, held = i + 1, 0
    if first < len(sizes):
        bounds.append((first, len(sizes)))
    return bounds


class PrefetchedBatches:
    """Yields ``dataset[batch]`` for each batch of ``sampler``, gathered here while workers prefetch."""

    def __init__(
        self,
        dataset: ShardDataset,
        sampler: Sampler[torch.Tensor],
        *,
        num_workers: int,
        persistent_workers: bool,
        prefetch_factor: int | None,
        pin_memory: bool,
        samples_per_chunk: int = SAMPLES_PER_CHUNK,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"need num_workers >= 1, got {num_workers}")
        self.dataset = dataset
        self.sampler = sampler
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.samples_per_chunk = samples_per_chunk
        # Chunks a worker may take beyond the one being gathered; 2 per worker is DataLoader's default.
        self.ahead = (2 if prefetch_factor is None else prefetch_factor) * num_workers
        self._pool: ProcessPoolExecutor | None = None
        self._shared: _Shared | None = None
        self._tasks: list[Future[int]] = []  # the running epoch's, until collected

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def _start(self, samples: int) -> _Shared:
        """The pool and what it shares, started (forked here, from the consumer's thread) if need be."""
        if self._pool is not None and self._shared is not None and samples <= len(self._shared.order):
            return self._shared
        self._shut()
        shared = _Shared.make(max(samples, len(self.dataset)), self.ahead)
        self._pool = ProcessPoolExecutor(
            max_workers=self.num_workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_worker,
            initargs=(self.dataset, shared, os.getpid()),
        )
        self._shared = shared
        return shared

    def _shut(self) -> None:
        """Stop the workers and join them; one still running :data:`WORKER_STOP_S` later is killed."""
        pool, self._pool, self._shared = self._pool, None, None
        if pool is None:
            return
        with ctrl_c_deferred():
            workers = list(pool._processes.values())  # Python 3.14 has this as pool.kill_workers()
            killer = threading.Timer(WORKER_STOP_S, lambda: [w.kill() for w in workers])
            killer.start()
            try:
                pool.shutdown(wait=True, cancel_futures=True)
            finally:
                killer.cancel()

    def close(self) -> None:
        """Stop and join the workers now: persistent ones outlive every epoch, and a pool left to the
        interpreter's exit can race its own shutdown (a traceback after a finished run)."""
        self._collect(raise_errors=False)
        self._shut()

    def _plan(self, batches: list[np.ndarray]) -> list[tuple[int, int]]:
        """Write the epoch's order and chunks where the workers read them; each chunk's run of batches."""
        runs = chunk_bounds([len(b) for b in batches], self.samples_per_chunk)
        order = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
        shared = self._start(len(order))
        starts = np.cumsum([0, *(len(b) for b in batches)])
        np.frombuffer(shared.order, dtype=np.int64)[: len(order)] = order
        chunk_starts = [starts[first] for first, _ in runs] + [len(order)]
        np.frombuffer(shared.bounds, dtype=np.int64)[: len(runs) + 1] = chunk_starts
        shared.chunks.value = len(runs)
        shared.next_chunk.value = 0
        shared.reached.value = 0
        shared.stop.value = 0
        while shared.room.acquire(False):  # posts left over from the last epoch
            pass
        return runs

    def _check(self) -> None:
        """Raise a finished task's error here, in the consumer."""
        with ctrl_c_deferred():
            errors = [task.exception() for task in self._tasks if task.done()]
        for error in errors:
            if error is not None:
                _raise(error)

    def _collect(self, *, raise_errors: bool) -> None:
        """Stop the workers' epoch and wait for their tasks (idempotent); errors raised or logged.

        Without ``raise_errors`` (the consumer stopped early, or the run is ending on an error or
        Ctrl-C), tasks still running :data:`WORKER_STOP_S` after the stop end with the pool.
        """
        tasks, shared = self._tasks, self._shared
        if not tasks or shared is None:
            return
        with ctrl_c_deferred():
            shared.stop.value = 1
            for _ in tasks:
                shared.room.release()
            late = concurrent.futures.wait(tasks, timeout=None if raise_errors else WORKER_STOP_S).not_done
            self._tasks = []
            errors = [] if late else [task.exception() for task in tasks]
        if late:
            self._shut()
            return
        for error in errors:
            if error is not None:
                if raise_errors:
                    _raise(error)
                if not isinstance(error, BrokenProcessPool):  # a worker ended, e.g. by Ctrl-C
                    log.warning("page prefetch failed after the consumer stopped: %s", error)

    def _gather(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.dataset[torch.from_numpy(batch)]
        if self.pin_memory:  # what DataLoader's pin-memory thread would do, here in one copy
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with ctrl_c_deferred():  # the pool's bookkeeping, never cut midway; its workers fork here
            self._collect(raise_errors=False)  # an earlier epoch left unfinished (or interrupted)
            batches = [batch.numpy() for batch in self.sampler]  # the epoch's order, drawn once
            runs = self._plan(batches)
            shared, pool = self._shared, self._pool
            assert shared is not None and pool is not None
            try:
                self._tasks = [pool.submit(_prefetch_epoch) for _ in range(self.num_workers)]
            except BrokenProcessPool as exc:
                self._shut()
                raise _died(exc) from None
        finished = False
        try:
            for chunk, (first, end) in enumerate(runs):
                if chunk:
                    shared.reached.value = chunk
                    shared.room.release()  # room for one more chunk ahead
                    self._check()
                for batch in batches[first:end]:
                    yield self._gather(batch)
            finished = True
        finally:
            try:
                self._collect(raise_errors=finished)
            finally:
                if not self.persistent_workers:
                    self._shut()


def _died(exc: BrokenProcessPool) -> PipelineError:
    return PipelineError(
        f"a loader worker process died ({exc}); rerun with loader.num_workers: 0 to load in the "
        "training process"
    )


def _raise(error: BaseException) -> None:
    """A task's error, raised in the consumer: a dead worker as one line."""
    if isinstance(error, BrokenProcessPool):
        raise _died(error) from None
    raise error
