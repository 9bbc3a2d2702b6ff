"""Fetch a dataset's IDX files from a list of sources, verifying every byte.

A source is a base URL (``http(s)://``) or a local folder; a folder may hold a
file gunzipped (``train-images-idx3-ubyte``, as ``gunzip`` leaves it), which is
verified as it is and gzipped here. For each file the
sources are tried in order; a 404, time-out, reset, truncated or oversized
body, bad gzip, wrong SHA-256 or wrong IDX header moves on to the next one.
If every source fails, one error lists each source and what went wrong.

Two limits bound a slow source (``data.timeout_s``, ``data.min_rate_kbps``):
no single network operation may block longer than ``timeout_s``, and over any
``timeout_s``-second window of a transfer at least ``min_rate_kbps`` kilobits
per second must arrive. Reads use ``read1``, which returns whatever has
arrived, so a server dripping a byte at a time is measured (and cut off)
after at most about twice ``timeout_s``; a link that is slow but steady above
the rate may take as long as it needs. A drip inside a read that never returns
(the status line and headers, or a chunked body's size lines, each read up to
its end) is caught by the same check run on a timer (``SIGALRM``, in the main
thread, where the stages run).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import signal
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from pipeline.atomic import atomic_dir
from pipeline.errors import DataError, DownloadError
from pipeline.idx import parse_idx_header
from pipeline.sources import DatasetSpec, IdxFile

CHUNK = 1 << 16
GZIP_BLOCK = 1 << 16  # compressed bytes fed to zlib at a time
SOURCE_RECORD = "source.json"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MIN_RATE_KBPS = 64.0


class FetchError(Exception):
    """One source failed for one file; the reason is collected, then the next source is tried."""


GZIP_LEVEL = 6  # for a file a folder holds uncompressed: zlib's default, seconds for MNIST's largest


@dataclass(frozen=True)
class Fetched:
    data: bytes  # the .gz bytes as received, or as gzipped here from an uncompressed file
    source: str
    uncompressed: str | None = None  # the file's name in a folder that held it uncompressed


class _NoDowngradeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and never from https down to plain http."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        old, new = urlparse(req.full_url).scheme, urlparse(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise FetchError(f"refused redirect from {req.full_url} to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def max_compressed_size(file: IdxFile) -> int:
    """gzip never grows data by more than a few bytes per 16 KiB block; anything larger is refused."""
    return file.size + file.size // 500 + 4096


class RateGuard:
    """Refuse a transfer whose last ``window_s`` seconds brought fewer than ``min_rate_kbps`` kilobits/s.

    Nothing is judged before the first full window has passed; after that every
    read is checked against the bytes received since ``window_s`` seconds ago.
    """

    def __init__(self, window_s: float, min_rate_kbps: float, clock=time.monotonic) -> None:
        self.window_s = window_s
        self.min_bytes = min_rate_kbps * 1000 / 8 * window_s
        self.clock = clock
        self.start = clock()
        self.received = 0
        self._marks: deque[tuple[float, int]] = deque([(self.start, 0)])  # (time, bytes received by then)

    def update(self, nbytes: int) -> None:
        now = self.clock()
        self.received += nbytes
        self._marks.append((now, self.received))
        # Keep the newest mark at or before the window's start: the reference to count from.
        while len(self._marks) > 1 and self._marks[1][0] <= now - self.window_s:
            self._marks.popleft()
        self.check(now)

    def check(self, now: float | None = None) -> None:
        """Raise :class:`FetchError` if the last window brought too few bytes; changes nothing (a timer
        may call it between any two steps of :meth:`update`)."""
        now = self.clock() if now is None else now
        if self.min_bytes <= 0 or now - self.start < self.window_s:
            return
        reference = 0
        for at, received in list(self._marks):  # the newest mark at or before the window's start
            if at > now - self.window_s:
                break
            reference = received
        got = self.received - reference
        if got < self.min_bytes:
            raise FetchError(
                f"transfer too slow: {got} bytes in the last {self.window_s:g} s, below the minimum of "
                f"{self.min_bytes * 8 / 1000 / self.window_s:g} kbit/s (data.min_rate_kbps)"
            )


@contextlib.contextmanager
def _checked_on_a_timer(guard: RateGuard) -> Iterator[None]:
    """Run ``guard.check`` every quarter window (at most every second) while the block runs, even
    inside a read that never returns: the signal interrupts it and the check's FetchError ends it.
    Only in the main thread (where Python runs signal handlers); elsewhere reads alone are checked."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    every = min(1.0, max(0.05, guard.window_s / 4))

    def on_alarm(_signum: int, _frame: object) -> None:
        guard.check()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # The first check a little after one window: a server silent from the start meets the socket's
    # own time-out first, which says so ("timed out").
    signal.setitimer(signal.ITIMER_REAL, guard.window_s + every, every)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _http_get(
    url: str,
    limit: int,
    timeout: float,
    min_rate_kbps: float,
    progress: bool,
    opener: urllib.request.OpenerDirector,
) -> bytes:
    guard = RateGuard(timeout, min_rate_kbps)
    try:
        with _checked_on_a_timer(guard), opener.open(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise FetchError(f"Content-Length {length} exceeds the largest valid file ({limit} bytes)")
            parts: list[bytes] = []
            received = 0
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=url.rsplit("/", 1)[-1],
                disable=None if progress else True,
                file=sys.stderr,
                leave=False,
            ) as bar:
                # read1 returns as soon as any bytes arrive: a drip cannot hold one call for a whole chunk.
                while chunk := resp.read1(CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise FetchError(f"body exceeds the largest valid file ({limit} bytes)")
                    guard.update(len(chunk))
                    parts.append(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise FetchError(f"truncated body: {received} of {total} bytes")
            return b"".join(parts)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        raise FetchError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, FetchError):
            raise reason from None
        raise FetchError(f"cannot connect: {reason}") from None
    except http.client.IncompleteRead as exc:
        raise FetchError(f"truncated body: {len(exc.partial)} bytes, {exc.expected} more expected") from None
    except (http.client.HTTPException, OSError) as exc:  # resets, time-outs, protocol errors
        raise FetchError(f"{type(exc).__name__}: {exc or 'no detail'}") from None
    except ValueError as exc:  # urllib on a malformed URL, e.g. a redirect to "http://[::1"
        raise FetchError(f"malformed URL: {exc}") from None


def _read_folder(folder: Path, name: str, limit: int, nor: str = "") -> bytes:
    """The bytes of ``folder / name``, at most ``limit``; ``nor`` ends the not-found reason."""
    path = folder / name
    try:
        st = path.stat()
        # a FIFO would block forever, /dev/zero (or a file still growing) would be read without end
        if not stat.S_ISREG(st.st_mode):
            raise FetchError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise FetchError(
                f"{path} is {st.st_size} bytes, more than the largest valid file ({limit} bytes)"
            )
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FetchError(f"{path} is more than the largest valid file ({limit} bytes)")
        return data
    except FileNotFoundError:
        raise FetchError(f"{path} not found{nor}") from None
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc}") from None


def _read_folder_source(folder: Path, file: IdxFile) -> tuple[bytes, str | None]:
    """``file`` (a ``.gz``) from a folder, or its uncompressed twin gzipped here; the twin's name if so.

    The checksums are of the decompressed content, so a file gunzipped by its owner verifies as
    well as the original; the ``.gz`` wins when both are there.
    """
    if folder.is_file():  # data.mirrors naming one of the files rather than their folder
        raise FetchError(f"{folder} is a file; expected the folder that holds {file.name}: {folder.parent}")
    if not folder.exists():
        raise FetchError(f"{folder}: no such folder")
    twin = file.name.removesuffix(".gz")
    if not (folder / file.name).exists() and (folder / twin).exists():
        raw = _read_folder(folder, twin, file.size)
        return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0), twin
    nor = f", nor {twin} (uncompressed)"
    if any((folder / "raw" / name).exists() for name in (file.name, twin)):
        nor += f"; torchvision keeps them in raw/: use {folder / 'raw'}"
    return _read_folder(folder, file.name, max_compressed_size(file), nor), None


def read_source(
    source: str,
    file: IdxFile,
    *,
    timeout: float,
    progress: bool,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
    opener: urllib.request.OpenerDirector | None = None,
) -> tuple[bytes, str | None]:
    """The ``.gz`` bytes of ``file`` from one source (URL base or folder), size-bounded.

    Returns the bytes and, where a folder held the file uncompressed (gzipped here), that file's name.
    """
    try:
        scheme = urlparse(source).scheme
    except ValueError as exc:  # e.g. "http://[::1" in data.mirrors
        raise FetchError(f"malformed URL: {exc}") from None
    if scheme in ("http", "https"):
        url = source.rstrip("/") + "/" + file.name
        limit = max_compressed_size(file)
        return _http_get(url, limit, timeout, min_rate_kbps, progress, opener or build_opener()), None
    if "://" in source:
        raise FetchError(f"unsupported source scheme {scheme!r}: use http(s) URLs or plain folder paths")
    return _read_folder_source(Path(source).expanduser(), file)  # "~/datasets/mnist" as a shell reads it


def build_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoDowngradeRedirect, *handlers)


def gunzip_bounded(blob: bytes, size: int) -> bytes:
    """Decompress (possibly multi-member) gzip, refusing output beyond ``size`` bytes."""
    if blob[:2] != b"\x1f\x8b":
        raise FetchError("not a gzip file (bad magic)")
    out = bytearray()
    view, pos = memoryview(blob), 0
    try:
        while pos < len(view):  # one gzip member at a time
            if view[pos : pos + 2] != b"\x1f\x8b":
                raise FetchError("trailing garbage after gzip stream")
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while not d.eof:
                if pos == len(view):
                    raise FetchError("truncated gzip stream")
                # Fed a block at a time: what a member leaves unused (copied by zlib) is at most one
                # block, so a file of many tiny members costs linear, not quadratic, time.
                block = view[pos : pos + GZIP_BLOCK]
                out += d.decompress(block, size + 1 - len(out))
                if len(out) > size:
                    raise FetchError(f"decompresses to more than the expected {size} bytes")
                pos += len(block) - len(d.unused_data)
    except zlib.error as exc:
        raise FetchError(f"corrupt gzip stream: {exc}") from None
    return bytes(out)


def verify(file: IdxFile, blob: bytes) -> None:
    """Check a downloaded ``.gz`` against the expected decompressed SHA-256, size and IDX header."""
    raw = gunzip_bounded(blob, file.size)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != file.sha256:
        raise FetchError(f"SHA-256 of decompressed content is {digest}, expected {file.sha256}")
    try:
        _, shape, _ = parse_idx_header(raw, file.name)
    except DataError as exc:
        raise FetchError(str(exc)) from None
    if shape != file.shape:
        raise FetchError(f"IDX shape {list(shape)}, expected {list(file.shape)}")


def fetch_file(
    file: IdxFile,
    sources: tuple[str, ...],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
    progress: bool = True,
    opener: urllib.request.OpenerDirector | None = None,
) -> Fetched:
    """The first source's bytes that verify; DownloadError listing every failure otherwise."""
    failures = []
    for source in sources:
        try:
            blob, uncompressed = read_source(
                source, file, timeout=timeout, min_rate_kbps=min_rate_kbps, progress=progress, opener=opener
            )
            verify(file, blob)
            return Fetched(blob, source, uncompressed)
        except FetchError as exc:
            failures.append(f"  {source}: {' '.join(str(exc).splitlines())}")  # one line per source
    raise DownloadError(f"could not get {file.name} from any source:\n" + "\n".join(failures))


def fetch_dataset(
    spec: DatasetSpec,
    out_dir: Path | str,
    *,
    mirrors: tuple[str, ...] = (),
    timeout: float = DEFAULT_TIMEOUT_S,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
    progress: bool = True,
    opener: urllib.request.OpenerDirector | None = None,
) -> dict:
    """Write the four verified ``.gz`` files and ``source.json`` into ``out_dir`` atomically.

    Each file comes from the first source that delivers it verified (size, decompressed SHA-256 and
    IDX shape), trying ``mirrors`` before the dataset's own sources; nothing is left in ``out_dir``
    unless all four verify.

    Args:
        spec: the dataset (:data:`pipeline.sources.DATASETS`): its files, checksums and sources.
        out_dir: the folder to write (``data/raw``); replaced as a whole.
        mirrors: URLs or local folders tried first, in order.
        timeout: seconds a source may stay silent before it is given up.
        min_rate_kbps: a source slower than this over a whole file is given up (a server that
            drips bytes cannot hold the stage forever).
        progress: show a progress bar per file on stderr.
        opener: the urllib opener (tests pass their own).

    Returns:
        What ``source.json`` records: the dataset name and, per file, where it came from and its
        SHA-256.

    Raises:
        DownloadError: a file could not be had verified from any source (each failure listed), or
            ``spec`` is inconsistent.
    """
    sources = tuple(mirrors) + spec.sources
    record: dict = {"dataset": spec.name, "files": {}}
    with atomic_dir(out_dir) as tmp:
        for split in (spec.train, spec.test):
            if split.images.shape[0] != split.labels.shape[0]:
                raise DownloadError(
                    f"{spec.name}: {split.images.name} has {split.images.shape[0]} images but "
                    f"{split.labels.name} has {split.labels.shape[0]} labels"
                )
            for file in (split.images, split.labels):
                got = fetch_file(
                    file,
                    sources,
                    timeout=timeout,
                    min_rate_kbps=min_rate_kbps,
                    progress=progress,
                    opener=opener,
                )
                (tmp / file.name).write_bytes(got.data)
                record["files"][file.name] = {"source": got.source, "sha256_decompressed": file.sha256}
                if got.uncompressed is not None:  # the .gz here is not a copy of a file there
                    record["files"][file.name]["gzipped_here_from"] = got.uncompressed
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def write_skipped(out_dir: Path | str, dataset: str) -> None:
    """With the user's own data (``csv``, ``images``) nothing is downloaded; the output folder records why."""
    with atomic_dir(out_dir) as tmp:
        (tmp / SOURCE_RECORD).write_text(
            json.dumps({"dataset": dataset, "files": {}, "skipped": f"data.dataset is {dataset}"}, indent=2)
            + "\n",
            encoding="utf-8",
        )


def verify_raw(spec: DatasetSpec, raw_dir: Path | str) -> None:
    """Check a ``data/raw`` folder as :func:`fetch_file` checks a download, wherever the folder came from.

    A folder pulled from a DVC remote, restored from a cache or made by hand
    has not been through :func:`verify`: each file must still decompress
    (bounded by its expected size, so a gzip bomb stops there) to the expected
    SHA-256, size and IDX shape, and ``source.json``, if present, must name
    ``spec``'s dataset.

    Args:
        spec: the dataset the folder must hold.
        raw_dir: the folder (``data/raw``).

    Raises:
        DataError: a file is missing or fails a check; the message names it.
    """
    raw_dir = Path(raw_dir)
    fix = f"it must hold what `download` verifies for {spec.name}: rerun `dvc repro download`"
    for file in spec.files:
        path = raw_dir / file.name
        if not path.exists():
            raise DataError(f"{path}: not found; {fix}")
        try:
            verify(file, _read_folder(raw_dir, file.name, max_compressed_size(file)))
        except FetchError as exc:
            raise DataError(f"{path}: {' '.join(str(exc).split())}; {fix}") from None
    record = raw_dir / SOURCE_RECORD
    if record.exists():
        try:
            named = json.loads(record.read_text(encoding="utf-8")).get("dataset")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as exc:
            raise DataError(f"{record}: cannot read it ({type(exc).__name__}); {fix}") from None
        if named != spec.name:
            raise DataError(f"{record}: dataset: expected {spec.name!r}, found {named!r}; {fix}")
