"""Atomic outputs: write beside the target, then ``os.replace`` it into place.

A reader (or DVC) therefore sees either the old complete output or the new
complete one, never a half-written file, even if the writer is SIGKILLed.
Temporaries left behind by a killed writer are named ``.<name>.tmp-*`` in the
target's folder and are removed by the next writer of the same target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import OutputError

_TMP_MARK = ".tmp-"


def _tmp_name(target: Path) -> Path:
    return target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries a killed writer of ``target`` left in its folder."""
    if not target.parent.is_dir():
        return
    for stale in target.parent.glob(f".{target.name}{_TMP_MARK}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk so a crash after ``os.replace`` cannot expose an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_as_output_error(target: Path, exc: BaseException) -> None:
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
        _raise_as_output_error(target, exc)
        raise


def _prepare(target: Path | str) -> Path:
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
    except OSError as exc:
        _raise_as_output_error(target, exc)
    return target


@contextlib.contextmanager
def atomic_file(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success it replaces ``target``.

    The caller writes the whole file to the yielded path (by any means: our own
    ``open``, Polars' ``sink_parquet``, safetensors' ``save_file``). On an
    exception the temporary is removed and ``target`` is left as it was.
    """
    target = _prepare(target)
    tmp = _tmp_name(target)
    with _discard_on_failure(target, tmp):
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``.

    ``rename(2)`` cannot replace a non-empty folder, so an existing ``target`` is
    first renamed aside and deleted only after the new folder is in place.
    """
    target = _prepare(target)
    tmp = _tmp_name(target)
    try:
        tmp.mkdir()
    except OSError as exc:
        _raise_as_output_error(target, exc)
    with _discard_on_failure(target, tmp):
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                fsync_path(child)
        if target.exists() or target.is_symlink():
            old = _tmp_name(target)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)


def write_bytes_atomic(target: Path | str, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
