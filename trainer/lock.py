"""One training per checkpoint folder at a time.

The checkpoint folder itself is replaced atomically (``pipeline.atomic.atomic_dir``),
so the lock cannot live inside it: it is an empty file beside it,
``.<folder>.lock``, held with ``flock`` for the whole run. The path is
resolved first, so a folder reached through a symbolic link takes the same
lock as the folder itself. The kernel drops the lock when its holder dies,
however it dies, so a SIGKILLed run never leaves a stale lock behind (its
forked DataLoader workers close their copies at once, see :func:`_close_in_child`). A
second training on the same folder is refused at once with one line instead
of racing the first for the folder.

When the stage launches its own process group it takes the lock itself,
writes a fresh random token into the lock file and hands the token to its
ranks in :data:`LOCK_HELD_ENV`; the lock then stays held across the elastic
agent's restarts of the group. A rank trusts the variable only if the lock is
held right now and the file holds that token: a variable set by hand (or left
over in an environment) cannot let a second training past a held lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import OutputError, PipelineError

LOCK_HELD_ENV = "TRAINER_CHECKPOINT_LOCK_HELD"
_HELD: set[int] = set()  # this process's lock descriptors


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) drops its copies of the lock: a flock lasts while any copy
    is open, so a worker outliving its SIGKILLed parent by a few seconds would otherwise hold it."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class CheckpointBusy(PipelineError):
    """Another training holds the checkpoint folder."""


def lock_path(checkpoint_dir: Path | str) -> Path:
    directory = Path(os.path.realpath(checkpoint_dir))
    return directory.parent / f".{directory.name}.lock"


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot create the checkpoint lock ({exc.strerror or exc}); "
            "the folder holding --checkpoints must be writable"
        ) from None


def _busy(checkpoint_dir: Path | str, path: Path) -> CheckpointBusy:
    return CheckpointBusy(
        f"{checkpoint_dir}: another training is running on this checkpoint folder (lock {path} is held); "
        "wait for it to finish or stop it"
    )


@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir: Path | str, *, token: str | None = None) -> Iterator[str]:
    """Hold the folder's lock for the ``with`` body; :class:`CheckpointBusy` if another process holds it.

    Yields a fresh token, written into the lock file, for the launched ranks (:data:`LOCK_HELD_ENV`).
    With ``token`` (a rank's, from its launcher) a lock already held under that token counts as ours.
    """
    path = lock_path(checkpoint_dir)
    fd = _open(path)
    _HELD.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if token is not None and os.pread(fd, 64, 0).decode("ascii", "replace") == token:
                yield token  # our launcher holds it
                return
            raise _busy(checkpoint_dir, path) from None
        fresh = secrets.token_hex(16)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, fresh.encode("ascii"), 0)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the checkpoint lock ({exc.strerror or exc})") from None
        yield fresh
    finally:
        _HELD.discard(fd)
        os.close(fd)
