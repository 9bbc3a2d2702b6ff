"""Independent pieces of a data stage on every core, results in submission order.

Two tools: :class:`Workers` runs pieces in the stage's own process and in worker
processes (started once for every pass of a stage), and
:func:`read_ahead` runs a producer (a parser) in a thread beside its consumer (an
encoder), both spending their time in native code that releases the GIL.

The data stages split their work into pieces that read their own slice of the input
and write their own output file (a shard, a row group's bytes), so a worker receives
a few small arguments and returns a small summary: no data crosses the process
boundary. Workers are started with the "forkserver" context (never a fork of a
process that already runs Polars' and Arrow's threads), and a few pieces per process
at most are drawn ahead of the results taken, so memory stays bounded by the piece
size whatever the data size. Results come back in the order the pieces were given,
whatever order they finish in, so the stage's output never depends on scheduling.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from multiprocessing import util as mp_util
from typing import TypeVar

from pipeline.errors import PipelineError

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


def use_cores(workers: int | None, pieces_here: bool = False) -> None:
    """Keep a stage run with ``prep.workers: 1`` on one core, Polars' and Arrow's own threads included.

    Without this, "one worker" still parsed CSV and decoded Parquet on Polars' thread pool, one
    thread per core, and a serial run was not serial. Polars sizes its pool once, from
    ``POLARS_MAX_THREADS``, when it is first imported, so a stage calls this before importing the
    modules that use Polars (in a process that already imported it, Polars' pool stays as it is).
    More workers, or ``None``, leave both libraries' defaults, unless ``pieces_here``: a stage
    whose own process runs pieces beside its workers (:class:`Workers`) keeps one thread in
    every process whatever the count, since the processes already fill the cores. A value the
    user set is kept.
    """
    if resolve_workers(workers) != 1 and not pieces_here:
        return
    if "polars" not in sys.modules:
        _one_polars_thread()
    if os.environ.get("POLARS_MAX_THREADS") == "1":  # a user's own value holds for both libraries
        import pyarrow  # Arrow's pool, unlike Polars', can be resized at any time

        pyarrow.set_cpu_count(1)


def library_threads(workers: int | None) -> str:
    """``prep.workers`` as the user wrote it, what it resolves to, and Polars' and Arrow's thread
    counts in this process, as a stage reports them."""
    import polars as pl  # imported here so that use_cores can run before Polars is first imported
    import pyarrow as pa

    cores = f"{resolve_workers(workers)} core(s)" + (", all this process may use" if workers is None else "")
    return (
        f"prep.workers {'null' if workers is None else workers}: {cores}; in this process Polars "
        f"{pl.thread_pool_size()} thread(s), Arrow {pa.cpu_count()}"
    )


def _one_polars_thread() -> None:
    """Polars, imported after this, runs one thread; a value the user set is kept.

    The one home of this setting: a stage run with ``prep.workers: 1`` (:func:`use_cores`), and
    each pool worker before any piece (:func:`_start_worker`: the pool already puts one worker on
    each core; each worker's own Polars pool would put several threads on every core).
    """
    os.environ.setdefault("POLARS_MAX_THREADS", "1")


def _exit_quietly(_signum: int, _frame: object) -> None:
    os._exit(1)


def end_quietly_on_ctrl_c() -> None:
    """In a worker process: Ctrl-C (SIGINT) ends it at once and without a word.

    Ctrl-C reaches the whole process group. The stage says so in one line (``error: interrupted``);
    a worker printing its own KeyboardInterrupt traceback would bury that line, and one that caught
    it would go on serving pieces while its parent waits. The data stages' pool workers and the
    trainer's prefetch workers (``trainer.prefetch``) call this first thing.
    """
    signal.signal(signal.SIGINT, _exit_quietly)


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C held back until the block ends, then raised as usual: for a process pool's bookkeeping.

    Python raises KeyboardInterrupt in the main thread at whatever bytecode it is running, and
    ``concurrent.futures`` is not safe against that: cut just after it takes a future's lock (in
    ``threading.Condition.__enter__``, or between the locks ``wait`` takes one by one), the main
    thread keeps the lock, the pool's own thread then waits for it forever, and a stage told to stop
    hangs instead. In the main thread this block swaps Python's SIGINT handler for one that only
    notes the signal, and blocks SIGINT in this thread, so that a process forked here starts with it
    blocked until its initializer sets its own handler (as do the pool's threads started here, for
    good). At the end both are restored and a noted Ctrl-C goes to the handler that was there: a
    KeyboardInterrupt, by default. Elsewhere it does nothing: only the main thread runs handlers.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # None: a handler set outside Python, which could not be put back
        return
    noted: list[object] = []
    signal.signal(signal.SIGINT, lambda _signum, frame: noted.append(frame))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGINT held by the mask reaches ``previous``
        if noted and callable(previous):
            previous(signal.SIGINT, noted[0])
        elif noted and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


# A forkserver listens on a Unix socket, <multiprocessing's folder>/listener-XXXXXXXX, that folder being
# <the temporary folder>/pymp-XXXXXXXX, and a socket's path holds at most 103 bytes (macOS; 107 on Linux).
SOCKET_PATH_MAX = 103
_LISTENER = len("/listener-XXXXXXXX")
_SOCKET_FOLDER = len("/pymp-XXXXXXXX") + _LISTENER
SHORT_TEMP_FOLDERS = ("/tmp", "/var/tmp", "/usr/tmp")  # as CPython 3.14 falls back, in its order


def short_socket_folder() -> None:
    """Keep the forkserver's socket path short enough to bind, whatever ``TMPDIR`` says.

    Multiprocessing puts its socket under ``TMPDIR``; from 76 characters or so (a job's folder on a
    cluster, a CI workspace) binding it fails with ``OSError: AF_UNIX path too long``, a traceback
    at the stage's first worker. Python 3.14 falls back to ``/tmp`` then; here the same is done for
    every Python: multiprocessing's own folder (only its socket; the pieces' files stay in
    ``TMPDIR``) is made once per process in the first writable one of :data:`SHORT_TEMP_FOLDERS`.
    With none writable, or a long folder made already, one line says what to set.
    """
    base = os.path.abspath(tempfile.gettempdir())
    saved = tempfile.tempdir
    if len(base) + _SOCKET_FOLDER > SOCKET_PATH_MAX:
        writable = (d for d in SHORT_TEMP_FOLDERS if os.access(d, os.W_OK | os.X_OK))
        tempfile.tempdir = next(writable, saved)
    try:
        folder = mp_util.get_temp_dir()  # made now (unless made already) and kept for this process
    finally:
        tempfile.tempdir = saved
    if len(os.path.abspath(folder)) + _LISTENER > SOCKET_PATH_MAX:
        raise PipelineError(
            f"the temporary folder {base} ({len(base)} characters) leaves no room for the worker "
            f"processes' socket path, and none of {', '.join(SHORT_TEMP_FOLDERS)} could be used instead: "
            f"set TMPDIR to a folder of at most {SOCKET_PATH_MAX - _SOCKET_FOLDER} characters, "
            "or prep.workers: 1"
        )


def _start_worker(preload: tuple[str, ...]) -> None:
    """Each pool worker, before any piece: a quiet end on Ctrl-C, one Polars thread, and the
    modules its pieces need."""
    end_quietly_on_ctrl_c()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked from its start (Workers.__enter__)
    _one_polars_thread()
    for name in preload:
        importlib.import_module(name)


def _ready() -> None:
    """A piece that does nothing: one for each worker starts them all when the pool opens."""


_END = object()  # the end of a map's pieces


def _run_into(future: Future[R], fn: Callable[[T], R], piece: T) -> None:
    """``fn(piece)`` in this process, its result (or the exception it raised) set on ``future``."""
    try:
        future.set_result(fn(piece))
    except Exception as exc:  # raised by the map in the piece's turn, as a worker's would be
        future.set_exception(exc)


class Workers:
    """The processes that run one stage's pieces, kept for each of its passes (a context manager).

    ``workers`` processes run pieces: this one and ``workers - 1`` started workers. This process
    takes the next piece itself whenever it would otherwise wait for a worker, so it works
    instead of sitting idle, and one interpreter fewer is started and held in memory. A stage
    with two passes (tensorize routes the rows, then writes the shards) starts its workers
    once: each start is an interpreter importing Polars and Arrow, seconds of CPU on a small
    machine. They all start when the pool opens and import ``preload`` (the modules of the
    pieces) at once, so a stage that opens its pool first has them ready by the time it has
    read its inputs' metadata. With ``workers`` <= 1 every piece runs in this process.
    """

    def __init__(self, workers: int, preload: tuple[str, ...] = ()) -> None:
        self.workers, self.preload = workers, preload
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Workers:
        if self.workers > 1:
            # Each process started here is a new interpreter (the forkserver, then the workers it
            # forks), and one that Ctrl-C reaches before its handler is set prints a traceback of its
            # imports. So they start with SIGINT blocked, a mask they inherit, and each worker's
            # initializer unblocks it once its quiet handler is set. The resource tracker comes first:
            # it blocks SIGINT while it starts and unblocks it after, which inside the block below
            # would unblock it for the forkserver too.
            short_socket_folder()
            resource_tracker.ensure_running()
            try:
                with ctrl_c_deferred():
                    self._pool = ProcessPoolExecutor(
                        max_workers=self.workers - 1,
                        mp_context=multiprocessing.get_context("forkserver"),
                        initializer=_start_worker,
                        initargs=(self.preload,),
                    )
                    for _ in range(self.workers - 1):  # each submit while none is idle starts one more worker
                        self._pool.submit(_ready)
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers once their running pieces end (pieces not started are dropped)."""
        if self._pool is not None:
            with ctrl_c_deferred():
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[[T], R], pieces: Iterable[T]) -> Iterator[R]:
        """``fn`` over ``pieces``, on the workers and in this process, yielding results in order.

        The workers are given at most two pieces each at a time (on average: the one a worker
        runs, and its next, given just before this process runs one of its own), and this
        process takes a piece only while fewer than ``2 x workers`` wait to be taken, and no
        worker is given one past that either, so the pieces drawn ahead of the results taken,
        and with them the memory, stay bounded by the number of processes, not by the number
        of pieces. ``fn`` must be a module-level function; its arguments and results should be
        small, well under the 64 KiB a pipe holds: a worker stopped (Ctrl-C, out of memory)
        while it sends a larger result leaves ``concurrent.futures`` waiting for the rest of it
        forever, so data goes through files (:mod:`pipeline.imagedecode`). An exception in a
        piece is raised here, when its turn in the order comes (after one in this process, no
        further piece is started); a worker that dies (killed, out of memory) is one
        :class:`PipelineError` line.
        """
        if self._pool is None:
            yield from map(fn, pieces)
            return
        todo = iter(pieces)
        pending: deque[Future[R]] = deque()  # in the pieces' order: the workers' and this process's
        given: list[Future[R]] = []  # the workers' pieces not finished yet
        more = True

        def give_next() -> None:
            """The next piece to the workers, if there is one."""
            nonlocal more
            if (piece := next(todo, _END)) is _END:
                more = False
            else:
                given.append(self._pool.submit(fn, piece))
                pending.append(given[-1])

        try:
            while True:
                with ctrl_c_deferred():  # the pool's bookkeeping, never cut midway (a piece here is)
                    given[:] = [f for f in given if not f.done()]
                    while more and len(given) < self.workers - 1 and len(pending) < 2 * self.workers:
                        give_next()
                    if not pending:
                        return
                    take = not more or pending[0].done() or len(pending) >= 2 * self.workers
                    if take:
                        result = pending.popleft().result()
                if take:
                    yield result
                    del result
                    continue
                # Rather than wait, this process takes the next piece, after giving each worker
                # its next one, so that no worker waits for this process to finish its piece.
                if (mine := next(todo, _END)) is _END:
                    more = False
                    continue
                here: Future[R] = Future()
                pending.append(here)
                with ctrl_c_deferred():
                    while more and len(given) < 2 * (self.workers - 1):
                        give_next()
                _run_into(here, fn, mine)
                more = more and here.exception() is None
        except BrokenProcessPool as exc:
            raise PipelineError(
                f"a worker process of this stage died ({exc}); rerun with prep.workers: 1 "
                f"to run every piece in the stage's own process"
            ) from None
        finally:
            with ctrl_c_deferred():  # a failure (or an abandoned generator) stops the pieces not yet started
                for future in pending:
                    future.cancel()


def read_ahead(items: Iterable[T], weight: Callable[[T], int], budget: int) -> Iterator[T]:
    """``items`` produced in a thread, at most ``budget`` (in ``weight`` units) ahead of the consumer.

    One item is always allowed ahead, so an item heavier than the budget still flows. An
    exception in the producer is raised here, after the items before it; a consumer that
    stops early stops the producer at its next item.
    """
    ready: deque[tuple[T, int]] = deque()
    state = {"held": 0, "done": False, "error": None, "stop": False}
    changed = threading.Condition()

    def produce() -> None:
        try:
            for item in items:
                w = weight(item)
                with changed:
                    # w bound here (B023), so the predicate weighs this item whenever it runs
                    changed.wait_for(lambda w=w: state["stop"] or not ready or state["held"] + w <= budget)
                    if state["stop"]:
                        return
                    ready.append((item, w))
                    state["held"] += w
                    changed.notify_all()
        except BaseException as exc:  # handed to the consumer, which raises it in order
            state["error"] = exc
        finally:
            if hasattr(items, "close"):  # a generator stopped early closes its file here, in its own thread
                items.close()
            with changed:
                state["done"] = True
                changed.notify_all()

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            with changed:
                changed.wait_for(lambda: ready or state["done"])
                if not ready:
                    break
                item, w = ready.popleft()
                state["held"] -= w
                changed.notify_all()
            yield item
            del item
        if state["error"] is not None:
            raise state["error"]
    finally:
        with changed:
            state["stop"] = True
            changed.notify_all()
        thread.join()
