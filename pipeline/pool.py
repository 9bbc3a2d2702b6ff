"""Independent pieces of a data stage on every core, results in submission order.

The data stages split their work into pieces that read their own slice of the input
and write their own output file (a shard, a row group's bytes), so a worker receives
a few small arguments and returns a small summary: no data crosses the process
boundary. Workers are started with the "forkserver" context (never a fork of a
process that already runs Polars' and Arrow's threads), and at most ``2 x workers``
pieces are in flight, so memory stays bounded by the piece size whatever the data
size. Results come back in the order the pieces were given, whatever order they
finish in, so the stage's output never depends on scheduling.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """``prep.workers``: a count >= 1, or None for every core."""
    return cpu_count() if workers is None else workers


def ordered_map(fn: Callable[[T], R], pieces: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``pieces`` in ``workers`` processes (1: in this process), yielding results in order.

    ``fn`` must be a module-level function; its arguments and results should be small. An
    exception in a piece is raised here, when its turn in the order comes.
    """
    if workers <= 1:
        yield from map(fn, pieces)
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for piece in pieces:
                pending.append(pool.submit(fn, piece))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # a failure (or an abandoned generator) stops the pieces not yet started
                future.cancel()
