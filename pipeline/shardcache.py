"""A bounded, verified, least-recently-used cache of shard files on local disk.

Files are named by the SHA-256 the manifest records (``<sha256>.safetensors``),
so a name says what its content is, any split or run of any repository can
share the folder, and a warm cache survives a killed run. A shard enters the
cache only through :meth:`ShardCache.put`: the bytes are copied into a
temporary beside the target (``pipeline.atomic``), their size and SHA-256 are
checked against the manifest while they are written, and only then is the file
renamed into place, so no reader ever opens a partial or unverified file. A
corrupt or truncated copy is fetched once more, then refused in one line.

The bound: before a copy starts, least-recently-used files are deleted until
the files present plus the new shard fit in ``limit_bytes``; files the caller
still needs (``protected``) are never deleted, and when they alone leave no
room, :meth:`put` fetches nothing and returns None (the caller waits for
training to move on). Recency is each file's access time, set on every use.
Every change happens under an exclusive ``flock`` of ``<folder>/.lock``, so
the processes of one machine (DDP ranks) share one folder safely: one copies a
shard while the others wait and then find it present. Nothing lives in shared
memory and no daemon runs; a killed process leaves at most a temporary, which
the next holder of the lock deletes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.atomic import atomic_file
from pipeline.errors import OutputError, ShardError
from pipeline.manifest import ShardEntry

SUFFIX = ".safetensors"
LOCK_NAME = ".lock"

# copy(entry, sink, max_bytes) -> bytes the source had (at most max_bytes are written to sink)
Copy = Callable[[ShardEntry, BinaryIO, int], int]


class _HashingSink:
    """A file object that hashes what is written through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)


class _Mismatch(Exception):
    pass


@dataclass
class CacheStats:
    fetches: int = 0  # copies started (a refetch counts twice)
    fetched_bytes: int = 0  # bytes read from the source
    hits: int = 0  # put() found the shard already present (another rank fetched it, or a warm cache)
    evictions: int = 0
    peak_bytes: int = 0  # the most the folder held (measured on disk), counting a copy's reserved size


class ShardCache:
    """``<folder>/<sha256>.safetensors`` files, at most ``limit_bytes`` together (None: no bound)."""

    def __init__(
        self,
        folder: Path | str,
        limit_bytes: int | None,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.folder = Path(folder).absolute()
        self.limit = limit_bytes
        self.on_change = on_change  # called with the bytes on disk after every change (tests, benchmarks)
        self.stats = CacheStats()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"{self.folder}: cannot create the shard cache ({exc.strerror or exc})"
            ) from None

    def path(self, entry: ShardEntry) -> Path:
        return self.folder / f"{entry.sha256}{SUFFIX}"

    def lookup(self, entry: ShardEntry) -> Path | None:
        """The cached file, marked as just used; None when absent (or of the wrong size)."""
        path = self.path(entry)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_size != entry.bytes:
            return None
        with contextlib.suppress(FileNotFoundError):  # evicted by another process a moment ago
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
            return path
        return None

    def disk_bytes(self) -> int:
        """Bytes of every file in the folder (cached shards and any temporary), as the disk holds them now."""
        total = 0
        for item in os.scandir(self.folder):
            if item.name != LOCK_NAME:
                with contextlib.suppress(FileNotFoundError):
                    total += item.stat(follow_symlinks=False).st_size
        return total

    def _changed(self, reserved: int = 0) -> None:
        now = self.disk_bytes() + reserved
        self.stats.peak_bytes = max(self.stats.peak_bytes, now)
        if self.on_change is not None:
            self.on_change(now)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK_NAME, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                # Under the lock nobody else is copying: any temporary is a killed writer's.
                for stale in self.folder.glob(".*.tmp-*"):
                    stale.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _make_room(self, need: int, protected: set[str]) -> bool:
        if self.limit is None:
            return True
        files = []
        for item in os.scandir(self.folder):
            if item.name.endswith(SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    st = item.stat(follow_symlinks=False)
                    files.append((st.st_atime_ns, item.name, st.st_size))
        used = sum(size for _, _, size in files)
        for _, name, size in sorted(files):
            if used + need <= self.limit:
                break
            if name[: -len(SUFFIX)] in protected:
                continue
            (self.folder / name).unlink(missing_ok=True)
            used -= size
            self.stats.evictions += 1
            self._changed()
        return used + need <= self.limit

    def put(self, entry: ShardEntry, copy: Copy, where: str, protected: Iterable[str] = ()) -> Path | None:
        """The shard in the cache, copied and verified if absent; None if it cannot fit beside ``protected``.

        ``where`` names the shard and its source in messages. A copy whose size
        or SHA-256 differs from the manifest is fetched once more, then refused.
        """
        with self._locked():
            found = self.lookup(entry)
            if found is not None:
                self.stats.hits += 1
                return found
            if self.limit is not None and entry.bytes > self.limit:
                raise ShardError(
                    f"{where}: {entry.bytes} bytes, more than the whole cache limit {self.limit}"
                )
            if not self._make_room(entry.bytes, set(protected) - {entry.sha256}):
                return None
            self._changed(reserved=entry.bytes)
            problem = ""
            for _attempt in range(2):
                try:
                    self._copy_verified(entry, copy)
                except _Mismatch as exc:
                    problem = str(exc)
                    continue
                self._changed()
                return self.lookup(entry) or self.path(entry)
            raise ShardError(f"{where}: {problem} (fetched twice); the remote copy is corrupt")

    def _copy_verified(self, entry: ShardEntry, copy: Copy) -> None:
        with atomic_file(self.path(entry)) as tmp:
            self.stats.fetches += 1
            with open(tmp, "wb") as f:
                sink = _HashingSink(f)
                seen = copy(entry, sink, entry.bytes)  # type: ignore[arg-type]
            self.stats.fetched_bytes += seen
            if seen != entry.bytes:
                longer = "or more " if seen > entry.bytes else ""
                raise _Mismatch(f"{seen} {longer}bytes, the manifest says {entry.bytes}")
            found = sink.digest.hexdigest()
            if found != entry.sha256:
                raise _Mismatch(f"SHA-256 {found}, the manifest says {entry.sha256}")
