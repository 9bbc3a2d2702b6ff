"""Loader workers that prefetch pages; the main process gathers every batch, never waiting for them.

A batch gathered in a worker reaches the main process through shared memory:
the worker copies it into a fresh shared-memory segment, and the main process
receives a file descriptor over a socket and faults the segment's pages in.
For a memory-mapped gather, which is itself a few memcpys from the page cache,
that transport costs many times the gather (bench/workers.md). So here the
main process gathers each batch straight from its own mapping of the shards,
exactly as with ``loader.num_workers`` 0, and the workers run ahead of it
reading one byte of every page the coming batches lie on
(:meth:`trainer.data.ShardDataset.prefetch`): whatever has to come from disk
is read by a worker, not waited for by the training loop. Only index arrays
cross to the workers, several batches' worth in one message
(:data:`SAMPLES_PER_MESSAGE`), and only a count comes back.

The prefetch is a hint, so the main process never waits for it. A thread
(:class:`_ReadAhead`) drives the DataLoader of page touches: it starts the
epoch (DataLoader's handshake with persistent workers) and reads the
workers' acknowledgements, while the main thread gathers batch after batch.
Both follow one list of the epoch's batches, drawn from the sampler once. The
thread takes an acknowledgement only for a chunk the main thread has reached,
so the workers are handed at most ``prefetch_factor`` x ``num_workers``
chunks beyond the one being gathered, as a plain DataLoader would: a slow
training step never lets them run through the page cache ahead of it. An
error in a worker or in the thread is raised in the main thread at its next
batch, or at the end of the epoch at the latest (the epoch's end waits for
the last acknowledgements); a consumer that stops early stops and joins the
thread. Current timings, and the figures behind this design:
bench/workers.md, bench/notes.md.

Batches are the dataset's own gather in the sampler's order, so results are
bit-identical for any number of workers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.data import ShardDataset

log = logging.getLogger(__name__)

# Indices of whole batches are sent to a worker together until they reach this many samples.
SAMPLES_PER_MESSAGE = 4096


def _as_is(ack: int) -> int:
    """The workers' collate function: the acknowledgement goes back unchanged."""
    return ack


class _PageToucher(Dataset):
    """What a worker runs per message: fault the batches' pages in; the number of pages read."""

    def __init__(self, dataset: ShardDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, chunk: np.ndarray) -> int:
        return self.dataset.prefetch(chunk)


def chunk_bounds(sizes: list[int], samples_per_message: int) -> list[tuple[int, int]]:
    """Runs ``[first, end)`` of consecutive batches, each joined until it holds ``samples_per_message``."""
    bounds, first, held = [], 0, 0
    for i, size in enumerate(sizes):
        held += size
        if held >= samples_per_message:
            bounds.append((first, i + 1))
            first, held = i + 1, 0
    if first < len(sizes):
        bounds.append((first, len(sizes)))
    return bounds


class _EpochChunks(Sampler[np.ndarray]):
    """The DataLoader's sampler: the current epoch's chunks, planned by :class:`PrefetchedBatches`."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.chunks)


class _ReadAhead:
    """A thread that iterates ``pages`` one acknowledgement per permit; errors kept for the consumer.

    The consumer calls :meth:`reached` once per chunk it starts gathering,
    :meth:`check` between batches, then :meth:`finish` (all acknowledged) or
    :meth:`stop` (stopped early).
    """

    def __init__(self, pages: DataLoader, iterator: Iterator[int] | None) -> None:
        self.acked = 0  # acknowledgements taken from the workers so far
        self.error: BaseException | None = None
        self._permits = threading.Semaphore(0)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(pages, iterator), name="page-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, pages: DataLoader, iterator: Iterator[int] | None) -> None:
        try:
            if iterator is None:  # persistent workers: the handshake that resumes them for this epoch
                iterator = iter(pages)
            done = object()
            while self._permits.acquire() and not self._stopping.is_set():
                if next(iterator, done) is done:
                    return  # exhausted: non-persistent workers have ended
                self.acked += 1
        except BaseException as exc:  # handed to the consumer, raised there
            self.error = exc
        finally:
            iterator = None  # non-persistent workers end with their iterator

    def reached(self) -> None:
        """The consumer started gathering the next chunk: its acknowledgement may be taken."""
        self._permits.release()

    def check(self) -> None:
        """Raise the thread's error, if any, in the consumer (once)."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def finish(self) -> None:
        """Take the remaining acknowledgements (and the iterator's end), join, raise any error."""
        self._permits.release()
        self._thread.join()
        self.check()

    def stop(self) -> None:
        """Stop asking for acknowledgements and join (idempotent); an unraised error is logged."""
        self._stopping.set()
        self._permits.release()
        self._thread.join()
        if self.error is not None:
            log.warning("page prefetch failed after the consumer stopped: %s", self.error)
            self.error = None


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
        samples_per_message: int = SAMPLES_PER_MESSAGE,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"need num_workers >= 1, got {num_workers}")
        self.dataset = dataset
        self.sampler = sampler
        self.pin_memory = pin_memory
        self.samples_per_message = samples_per_message
        self._chunks = _EpochChunks()
        self._read_ahead: _ReadAhead | None = None
        self._workers_up = False  # persistent workers started (by the main thread, see __iter__)
        self.pages = DataLoader(
            _PageToucher(dataset),
            sampler=self._chunks,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
        )

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def plan_epoch(self) -> list[list[np.ndarray]]:
        """Draw the epoch's batches from the sampler (once) and hand their chunks to the page loader."""
        batches = [batch.numpy() for batch in self.sampler]
        groups = [batches[a:b] for a, b in chunk_bounds([len(b) for b in batches], self.samples_per_message)]
        self._chunks.chunks = [np.concatenate(group) for group in groups]
        return groups

    def _gather(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.dataset[torch.from_numpy(batch)]
        if self.pin_memory:  # what DataLoader's pin-memory thread would do, here in one copy
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._read_ahead is not None:  # an earlier epoch's iterator left unfinished
            self._read_ahead.stop()
        groups = self.plan_epoch()
        iterator = None
        if not self._workers_up:  # workers fork here, from the main thread, not from the thread
            iterator = iter(self.pages)
            self._workers_up = self.pages.persistent_workers
        read_ahead = self._read_ahead = _ReadAhead(self.pages, iterator)
        del iterator  # the thread's alone: non-persistent workers end with it
        try:
            for group in groups:
                read_ahead.reached()
                for batch in group:
                    read_ahead.check()
                    yield self._gather(batch)
            read_ahead.finish()
        finally:
            read_ahead.stop()
            if self._read_ahead is read_ahead:
                self._read_ahead = None
