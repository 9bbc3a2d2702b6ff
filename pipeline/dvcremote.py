"""A DVC-tracked tensor split read straight from the repository's DVC remote, through DVC's own API.

When a split folder (``data/tensors/train``) is absent from the workspace (a
fresh ``git clone``, no ``dvc pull``) but the repository has a default DVC
remote, :func:`open_remote_split` resolves the folder through
``dvc.api.DVCFileSystem``: DVC reads ``dvc.lock`` from git, the folder's
``.dir`` listing from the remote (``files/md5/xx/…​.dir``) and serves every
file by its DVC hash from the remote, without filling ``.dvc/cache``. The
manifest therefore comes from the same committed run as the shards, and the
shards it lists are fetched one at a time (:meth:`RemoteSplit.copy_to`) into
the trainer's bounded cache (``pipeline.shardcache``), which verifies them
against the manifest. Any remote filesystem DVC supports works (local folder,
SSH, HTTP, S3 with the ``dvc-s3`` extra). Every failure to reach or read the
remote is a :class:`RemoteError`: one line naming the path and the remote.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import PipelineError
from pipeline.manifest import MANIFEST_NAME, Manifest, ShardEntry, parse_manifest

_COPY_CHUNK = 1 << 20


class RemoteError(PipelineError):
    """The DVC remote cannot be reached or does not hold what ``dvc.lock`` names."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def find_repo_root(path: Path) -> Path | None:
    """The DVC repository holding ``path`` (which need not exist): the nearest folder with ``.dvc/``."""
    path = Path(os.path.abspath(path))  # ".." folded away, as DVC names paths inside the repository
    for folder in [path, *path.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


@dataclass(frozen=True)
class RemoteSplit:
    """One split folder as the DVC remote holds it: its manifest, and a way to copy each shard."""

    directory: Path  # the absent workspace folder, absolute
    relative: str  # the folder relative to the repository root, as DVC names it
    manifest: Manifest
    remote: str  # "name (url)", for messages
    _fs: Any  # dvc.api.DVCFileSystem, shared by the splits of one repository
    _lock: threading.Lock  # DVCFileSystem is not documented as thread-safe: one reader at a time

    def where(self, entry: ShardEntry) -> str:
        return f"{self.relative}/{entry.file} from DVC remote {self.remote}"

    def copy_to(self, entry: ShardEntry, sink: BinaryIO, max_bytes: int) -> int:
        """Copy the shard's bytes into ``sink``, at most ``max_bytes``; the bytes the remote had (≤ max + 1).

        Never writing more than the manifest's size keeps the cache bound honest
        even when the remote holds a longer (corrupt) file.
        """
        seen = 0
        try:
            # "/…": from the repository root (a relative path would be taken from the working folder)
            with self._lock, self._fs.open(f"/{self.relative}/{entry.file}", "rb") as src:
                while seen <= max_bytes:
                    chunk = src.read(min(_COPY_CHUNK, max_bytes + 1 - seen))
                    if not chunk:
                        break
                    keep = chunk[: max(0, max_bytes - seen)]
                    sink.write(keep)
                    seen += len(chunk)
        except (OSError, ValueError, RuntimeError) as exc:
            raise RemoteError(f"{self.where(entry)}: cannot read: {_reason(exc)}") from None
        except Exception as exc:  # DVC's own errors (DvcException and friends) carry no common base
            raise RemoteError(f"{self.where(entry)}: cannot read: {_reason(exc)}") from None
        return seen


_FILESYSTEMS: dict[Path, tuple[Any, str, threading.Lock]] = {}


def _filesystem(root: Path) -> tuple[Any, str, threading.Lock] | None:
    """``DVCFileSystem`` of the repository and its default remote's "name (url)"; None without a remote."""
    if root in _FILESYSTEMS:
        return _FILESYSTEMS[root]
    from dvc.api import DVCFileSystem  # DVC is imported only when a split has to be streamed
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return None
        url = repo.config["remote"].get(name, {}).get("url", "?")
    fs = DVCFileSystem(str(root))
    _FILESYSTEMS[root] = (fs, f"'{name}' ({url})", threading.Lock())
    return _FILESYSTEMS[root]


def open_remote_split(split_dir: Path | str) -> RemoteSplit | None:
    """The split from the DVC remote; None when it is in the workspace or there is no remote to stream from.

    "In the workspace" means its manifest is there: a pulled split, or one a
    stage just wrote. None leaves the usual "manifest not found" error to the
    local validation.
    """
    directory = Path(os.path.abspath(split_dir))
    if (directory / MANIFEST_NAME).exists():
        return None
    root = find_repo_root(directory)
    if root is None:
        return None
    found = _filesystem(root)
    if found is None:
        return None
    fs, remote, lock = found
    relative = directory.relative_to(root).as_posix()
    path = f"{relative}/{MANIFEST_NAME}"
    try:
        with lock:
            if not fs.isdvc(f"/{relative}"):
                return None  # not a DVC-tracked output either: the local error applies
            text = fs.read_bytes(f"/{path}").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteError(f"{path} from DVC remote {remote}: not UTF-8 text: {exc}") from None
    except Exception as exc:  # DVC and fsspec raise many types for an unreachable remote
        raise RemoteError(f"{path}: cannot read from DVC remote {remote}: {_reason(exc)}") from None
    manifest = parse_manifest(text, f"{path} (DVC remote {remote})")
    return RemoteSplit(directory, relative, manifest, remote, fs, lock)
