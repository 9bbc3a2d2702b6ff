"""Atomic outputs: write beside the target, then ``os.replace`` it into place.

A reader (or DVC) therefore sees either the old complete output or the new
complete one, never a half-written file, even if the writer is SIGKILLed.
Temporaries left behind by a killed writer are named ``.<name>.tmp-*`` in the
target's folder and are removed by the next writer of the same target.

A folder replaces a folder in one step with ``renameat2(RENAME_EXCHANGE)``
(Linux >= 3.15 on ext4, xfs, btrfs, tmpfs...). Where the C library or the
filesystem lacks it, the old folder is first renamed aside to
``.<name>.old-*`` and the new one moved in: a kill between those two renames
leaves no ``<name>`` for a moment, and the next writer of the same target
moves the complete old folder back before it starts. After every swap the
parent folder is fsynced, so the new name survives a power cut.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import OutputError

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"  # a previous output set aside by the fallback swap: restored, never just deleted
_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
# The kernel (ENOSYS) or the filesystem (EINVAL, EOPNOTSUPP) cannot exchange: use the fallback.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def _tmp_name(target: Path, mark: str = _TMP_MARK) -> Path:
    return target.parent / f".{target.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> None:
    """Clean up after a killed writer of ``target``: restore a set-aside old output, delete temporaries."""
    if not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(f".{target.name}{_OLD_MARK}*"))
    if olds and not (target.exists() or target.is_symlink()):
        os.replace(olds.pop(0), target)  # killed between the fallback's two renames
        fsync_dir(target.parent)
    for stale in [*olds, *target.parent.glob(f".{target.name}{_TMP_MARK}*")]:
        _discard(stale)


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; ``False`` (nothing changed) where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # Linux only
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def write_behind(out: BinaryIO, start: int, length: int) -> bool:
    """Start writing bytes ``start..start+length`` of ``out`` to disk now, without waiting.

    A stage that writes gigabytes and fsyncs each file at its end otherwise leaves them dirty in
    the page cache until that fsync, which then waits for the whole file, and past the kernel's
    dirty limit every write is throttled. Started chunk by chunk (Linux ``sync_file_range``), the
    disk writes while the stage computes the next chunk. Only a hint: the file's closing fsync
    still makes it durable and reports any I/O error. Returns whether writeback was started
    (False: no file descriptor, or no ``sync_file_range`` here).
    """
    if _sync_file_range is None:
        return False
    try:
        fd = out.fileno()
    except (AttributeError, OSError):  # an in-memory buffer (io.UnsupportedOperation is an OSError)
        return False
    out.flush()
    return _sync_file_range(fd, start, length, _SYNC_FILE_RANGE_WRITE) == 0


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk so a crash after ``os.replace`` cannot expose an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raise_as_output_error(target: Path, exc: BaseException) -> None:
    """An OSError while producing an output (disk full, permissions) is the user's to fix: say so plainly."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        raise OutputError(f"{target}: could not write output ({reason}); nothing was left behind") from exc


@contextlib.contextmanager
def _discard_on_failure(target: Path, tmp: Path) -> Iterator[None]:
    """On any exception remove the temporary; report an OSError as an OutputError."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            _remove(tmp)
        raise_as_output_error(target, exc)
        raise


def _prepare(target: Path | str) -> Path:
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
    except OSError as exc:
        raise_as_output_error(target, exc)
    return target


@contextlib.contextmanager
def atomic_file(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success it replaces ``target``.

    The caller writes the whole file to the yielded path (by any means: our own
    ``open``, Arrow's ``ParquetWriter``, safetensors' ``save_file``). On an
    exception the temporary is removed and ``target`` is left as it was.
    """
    target = _prepare(target)
    tmp = _tmp_name(target)
    with _discard_on_failure(target, tmp):
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``.

    ``rename(2)`` cannot replace a non-empty folder: an existing ``target`` is
    exchanged with the new folder in one step (see the module docstring for the
    fallback) and deleted only once the new folder is in place.
    """
    target = _prepare(target)
    tmp = _tmp_name(target)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise_as_output_error(target, exc)
    with _discard_on_failure(target, tmp):
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                fsync_path(child)
        if not (target.exists() or target.is_symlink()):
            os.replace(tmp, target)
            old = None
        elif exchange(tmp, target):
            old = tmp  # the previous output now lives under the temporary name
        else:
            old = _tmp_name(target, _OLD_MARK)
            os.replace(target, old)
            os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            _discard(old)  # best effort: the new output is in place; the next writer retries


def write_bytes_atomic(target: Path | str, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
