"""One training per checkpoint folder at a time.

The checkpoint folder itself is replaced atomically (``pipeline.atomic.atomic_dir``),
so the lock cannot live inside it: it is an empty file beside it,
``.<folder>.lock``, held with ``flock`` for the whole run. The kernel drops the
lock when its holder dies, however it dies, so a SIGKILLed run never leaves a
stale lock behind. A second training on the same folder is refused at once
with one line instead of racing the first for the folder.

When the stage launches its own process group it takes the lock itself and
tells its ranks so through :data:`LOCK_HELD_ENV`; it then stays held across
the elastic agent's restarts of the group.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError

LOCK_HELD_ENV = "TRAINER_CHECKPOINT_LOCK_HELD"


class CheckpointBusy(PipelineError):
    """Another training holds the checkpoint folder."""


def lock_path(checkpoint_dir: Path | str) -> Path:
    directory = Path(checkpoint_dir)
    return directory.parent / f".{directory.name}.lock"


@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir: Path | str) -> Iterator[None]:
    """Hold the folder's lock for the ``with`` body; :class:`CheckpointBusy` if another process holds it."""
    path = lock_path(checkpoint_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointBusy(
                f"{checkpoint_dir}: another training is running on this checkpoint folder (lock {path} is held); "
                "wait for it to finish or stop it"
            ) from None
        yield
    finally:
        os.close(fd)
