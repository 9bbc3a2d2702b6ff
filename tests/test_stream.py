"""Training streamed from the DVC remote (issue 19): same results as pulled shards, a bounded cache.

One producer repository (tiny generated CSVs, 8 train shards) runs the pipeline
with ``dvc repro`` and pushes to a local-folder remote; its ``models/`` is the
reference trained on pulled shards. Each test trains in a fresh ``git clone``
of it, without ``dvc pull``: the shards come from the remote through
``.shardcache``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from sshd import Sshd, start_sshd

from pipeline.errors import ParamsError, ShardError
from pipeline.manifest import ShardEntry, read_manifest
from pipeline.params import load_section
from pipeline.shardcache import ShardCache
from tests.repo_copy import dvc, make_csv_repo, run, set_params
from tests.test_train_stage import run_until_killed, stage_env, train_argv
from trainer import stream
from trainer.data import ShardDataset
from trainer.run import train
from trainer.stream import Fetcher, StreamedDataset, open_split, start_fetcher
from trainer.verify import validate_split

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


@dataclass
class World:
    producer: Path
    storage: Path
    model: bytes  # models/model.safetensors trained on the pulled shards
    shard_bytes: list[int]  # train shard sizes
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("stream")
    repo = make_csv_repo(tmp, n_train=512, n_test=64)
    set_params(
        repo,
        **{
            "prep.shard_size": 64,
            "loader.shuffle_window": 2,
            "train.epochs": 2,
            "train.threads": 1,
            "train.device": "cpu",
            "train.checkpoint_seconds": None,
        },
    )
    storage = tmp / "storage"
    dvc(repo, "remote", "add", "-d", "storage", str(storage))
    dvc(repo, "repro")
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "pipeline run"], repo)
    dvc(repo, "push")
    sizes = [s.bytes for s in read_manifest(repo / "data/tensors/train").shards]
    assert len(sizes) == 8
    return World(repo, storage, (repo / "models/model.safetensors").read_bytes(), sizes, tmp)


def clone(world: World, name: str) -> Path:
    dest = world.tmp / name
    run(["git", "clone", "-q", str(world.producer), str(dest)], world.tmp)
    assert not (dest / "data/tensors").exists()
    return dest


def train_in(repo: Path, hook=None, **loader: object) -> Path:
    """Train in ``repo`` with its params.yaml (loader fields overridden); the model file."""
    params = repo / "params.yaml"
    loader_params = dataclasses.replace(load_section("loader", params), **loader)
    train(
        train_dir=repo / "data/tensors/train",
        test_dir=repo / "data/tensors/test",
        val_dir=repo / "data/tensors/val",
        model_dir=repo / "models",
        checkpoint_dir=repo / "checkpoints",
        live_dir=repo / "dvclive",
        loader=loader_params,
        train=load_section("train", params),
        cache_hook=hook,
    )
    return repo / "models/model.safetensors"


class DiskWatch:
    """The cache folder's bytes, sampled by a thread every millisecond and by the cache after each change."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def hook(self, now: int) -> None:
        self.peak = max(self.peak, now)

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            total = 0
            if self.folder.is_dir():
                for p in self.folder.iterdir():
                    with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                        total += p.stat().st_size
            self.peak = max(self.peak, total)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def streamed(world: World) -> Path:
    return clone(world, "streamed")


@pytest.mark.parametrize(("windows", "prefetch"), [(None, None), (1, None), (2, None), (2, 1), (3, 5)])
def test_streamed_training_is_bit_identical_and_the_cache_stays_under_its_limit(
    world: World, streamed: Path, windows: int | None, prefetch: int | None
) -> None:
    """``loader.cache_limit_mb`` and ``loader.prefetch_shards`` (None: one window of 2 shards) change
    when shards are fetched, never what is trained."""
    cache = streamed / ".shardcache"
    shutil.rmtree(cache, ignore_errors=True)
    limit_mb = None if windows is None else windows * 2 * max(world.shard_bytes) / 2**20
    with DiskWatch(cache) as watch:
        model = train_in(streamed, hook=watch.hook, cache_limit_mb=limit_mb, prefetch_shards=prefetch)
    assert model.read_bytes() == world.model
    assert not (streamed / "data/tensors").exists() and not (streamed / ".dvc/cache").exists()
    if limit_mb is not None:
        assert 0 < watch.peak <= limit_mb * 2**20, (watch.peak, limit_mb)
    else:
        assert watch.peak >= sum(world.shard_bytes)


def test_a_global_shuffle_with_a_cache_smaller_than_the_data_is_refused(world: World, streamed: Path) -> None:
    with pytest.raises(ParamsError, match=r"global shuffle .*set loader\.shuffle_window") as err:
        train_in(streamed, shuffle_window=None, cache_limit_mb=sum(world.shard_bytes) / 2 / 2**20)
    assert "\n" not in str(err.value)


def test_a_cache_limit_below_one_window_is_refused(world: World, streamed: Path) -> None:
    with pytest.raises(ParamsError, match=r"less than one loader\.shuffle_window of 2 train shards"):
        train_in(streamed, cache_limit_mb=max(world.shard_bytes) * 1.5 / 2**20)


def test_a_cache_limit_below_a_test_shard_is_refused_before_training(world: World, streamed: Path) -> None:
    """The window check covers train shards; a larger test (or val) shard would only fail at evaluation,
    after a whole epoch of training."""
    loader = dataclasses.replace(
        load_section("loader", streamed / "params.yaml"), cache_limit_mb=3 * max(world.shard_bytes) / 2**20
    )
    train_split = open_split(streamed / "data/tensors/train", expected_split="train", verify="header")
    test_split = open_split(streamed / "data/tensors/test", expected_split="test", verify="header")
    fetcher = start_fetcher([train_split, test_split], loader, streamed / ".cache-a", None)
    assert fetcher is not None
    fetcher.close()
    big = dataclasses.replace(test_split.manifest.shards[0], bytes=4 * max(world.shard_bytes))
    bigger = dataclasses.replace(test_split, manifest=dataclasses.replace(test_split.manifest, shards=(big,)))
    with pytest.raises(ParamsError, match=rf"less than the test split's shard {big.file} \("):
        start_fetcher([train_split, bigger], loader, streamed / ".cache-b", None)


def _remote_object(storage: Path, repo: Path, split: str, name: str) -> Path:
    outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["tensorize"]["outs"]
    dir_md5 = next(o["md5"] for o in outs if o["path"] == f"data/tensors/{split}")
    listing = json.loads((storage / "files/md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    md5 = next(e["md5"] for e in listing if e["relpath"] == name)
    return storage / "files/md5" / md5[:2] / md5[2:]


def test_a_corrupt_remote_shard_is_fetched_twice_then_refused(world: World) -> None:
    repo = clone(world, "corrupt")
    storage = world.tmp / "storage-corrupt"
    shutil.copytree(world.storage, storage)
    dvc(repo, "remote", "modify", "--local", "storage", "url", str(storage))
    victim = _remote_object(storage, repo, "train", "shard-00003.safetensors")
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    fetched = []
    with pytest.raises(ShardError) as err:
        train_in(repo, hook=fetched.append)
    message = str(err.value)
    assert "\n" not in message
    assert "data/tensors/train/shard-00003.safetensors" in message and str(storage) in message
    assert "fetched twice" in message and "the manifest says" in message
    manifest = read_manifest(world.producer / "data/tensors/train")
    assert not (repo / ".shardcache" / f"{manifest.shards[3].sha256}.safetensors").exists()


def test_an_unreachable_remote_is_one_line_and_exit_2(world: World, tmp_path: Path) -> None:
    repo = clone(world, "unreachable")
    gone = world.tmp / "no-such-remote"
    dvc(repo, "remote", "modify", "--local", "storage", "url", str(gone))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train",
            *train_argv(repo / "data/tensors", tmp_path, repo / "params.yaml"),
        ],
        cwd=repo,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "DVC remote 'storage'" in lines[0] and str(gone) in lines[0]


def _cache_files(repo: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (repo / ".shardcache").glob("*.safetensors")
    }


def test_a_killed_run_resumes_with_its_warm_cache(world: World) -> None:
    repo = clone(world, "killed")
    work = repo / "work"
    work.mkdir()
    run_until_killed(repo / "data/tensors", work, repo / "params.yaml", "trainer.epoch.write_checkpoint", 1)
    warm = _cache_files(repo)
    assert len(warm) == 9  # 8 train shards and the test shard, fetched before the kill
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train",
            *train_argv(repo / "data/tensors", work, repo / "params.yaml"),
        ],
        cwd=work,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "notice: resuming after epoch 1" in res.stderr
    assert _cache_files(repo) == warm  # the same files: nothing fetched again
    assert (work / "models/model.safetensors").read_bytes() == world.model
    run(["git", "diff", "--exit-code", "dvc.lock", "dvc.yaml"], repo)  # DVC's record names the same data


def test_two_ddp_processes_stream_into_one_cache(world: World) -> None:
    repo = clone(world, "ddp")
    set_params(repo, **{"train.processes": 2})
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train",
            *train_argv(repo / "data/tensors", repo, repo / "params.yaml"),
            "--shard-cache",
            str(repo / "cache"),
        ],
        cwd=repo,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    expected = {
        f"{s.sha256}.safetensors" for split in ("train", "test") for s in _manifest(world, split).shards
    }
    assert {p.name for p in (repo / "cache").iterdir() if not p.name.startswith(".")} == expected
    assert (repo / "models/model.safetensors").is_file()


def _manifest(world: World, split: str):
    return read_manifest(world.producer / f"data/tensors/{split}")


@dataclass
class SshRemote:
    server: Sshd
    storage: Path  # the remote's folder on the server

    def clone(self, world: World, name: str) -> Path:
        """A fresh clone whose default remote is this one."""
        repo = clone(world, name)
        dvc(repo, "remote", "add", "--local", "-d", "ssh", self.server.url(self.storage))
        dvc(repo, "remote", "modify", "--local", "ssh", "keyfile", str(self.server.key))
        return repo


@pytest.fixture(scope="module")
def ssh_remote(world: World) -> Iterator[SshRemote]:
    """A real sshd on 127.0.0.1 holding the producer's pushed cache."""
    server = start_sshd(world.tmp / "sshd")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(server.home))  # DVC's SSH client reads ~/.ssh/known_hosts from here
            storage = world.tmp / "ssh-storage"
            dvc(world.producer, "remote", "add", "--local", "ssh", server.url(storage))
            dvc(world.producer, "remote", "modify", "--local", "ssh", "keyfile", str(server.key))
            dvc(world.producer, "push", "-r", "ssh")
            yield SshRemote(server, storage)
    finally:
        server.stop()


def test_streaming_over_ssh_is_bit_identical(world: World, ssh_remote: SshRemote) -> None:
    repo = ssh_remote.clone(world, "over-ssh")
    model = train_in(repo, cache_limit_mb=2 * 2 * max(world.shard_bytes) / 2**20)  # HOME: the fixture's
    assert model.read_bytes() == world.model
    assert not os.path.exists(repo / "data/tensors")


def test_a_stalled_remote_is_said_while_training_waits_then_training_goes_on(
    world: World, ssh_remote: SshRemote, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote that stops answering can hold a fetch for long (DVC's SSH ``timeout`` bounds only
    setting up a connection): training says so while it waits rather than look hung. Here the SSH
    server and its sessions are stopped (SIGSTOP) for 4 s once the cache took its first shard; the
    notice comes at 0.5 s and at each doubling, and once the server answers again the run ends with the
    pulled-shards model."""
    monkeypatch.setattr(stream, "WAIT_NOTICE_S", 0.5)
    caplog.set_level(logging.WARNING, logger="trainer.stream")
    repo = ssh_remote.clone(world, "stalled")
    sshd = psutil.Process(ssh_remote.server.proc.pid)
    stopped: list[psutil.Process] = []

    def stall(_cache_bytes: int) -> None:
        if not stopped:
            stopped[:] = [sshd, *sshd.children(recursive=True)]
            for p in stopped:
                p.suspend()
            threading.Timer(4.0, resume).start()

    def resume() -> None:
        for p in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()

    try:
        model = train_in(repo, hook=stall)
    finally:
        resume()
    assert len(stopped) >= 3  # the listener, a session's processes and its sftp server
    assert model.read_bytes() == world.model
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training has waited")]
    assert len(waits) >= 2, waits
    assert all(
        re.fullmatch(
            r"training has waited \d+ s for data/tensors/\w+/shard-\d+\.safetensors from DVC remote 'ssh' "
            r"\(ssh://\S+\): the remote is slow or not answering "
            r"\(Ctrl-C stops the run, and a rerun resumes it\)",
            w,
        )
        for w in waits
    ), waits


class _EvictedOnceFound(Fetcher):
    """The real fetcher, except that each shard, the first time training finds it in the cache, is
    evicted at once: what another rank sharing the folder (or this rank's own fetch-ahead) may do
    between finding a file and mapping it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.evicted: set[str] = set()

    def acquire(self, entry: ShardEntry, *args: object) -> Path:
        path = super().acquire(entry, *args)
        if entry.sha256 not in self.evicted:
            self.evicted.add(entry.sha256)
            path.unlink()
        return path


def test_a_shard_evicted_between_finding_and_mapping_it_is_fetched_again(world: World) -> None:
    repo = clone(world, "evicted")
    split = open_split(repo / "data/tensors/train", expected_split="train", verify="header")
    cache = ShardCache(repo / ".shardcache", limit_bytes=None)
    fetcher = _EvictedOnceFound(cache, 2)
    try:
        dataset = StreamedDataset(split, fetcher, "header")
        everything = torch.arange(len(dataset))
        dataset.plan([everything])
        images, labels = dataset[everything]
    finally:
        fetcher.close()
    pulled = ShardDataset(validate_split(world.producer / "data/tensors/train", expected_split="train"))
    expected_images, expected_labels = pulled[everything]
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    shards = len(split.manifest.shards)
    assert len(fetcher.evicted) == shards and cache.stats.fetches >= 2 * shards  # each fetched again


def test_the_cache_evicts_least_recently_used_never_protected_and_drops_stale_temporaries(
    tmp_path: Path,
) -> None:
    blobs = {name: bytes([i]) * 1000 for i, name in enumerate("abcd")}
    entries = {
        name: ShardEntry(f"{name}.safetensors", 1, len(b), hashlib.sha256(b).hexdigest())
        for name, b in blobs.items()
    }
    by_sha = {e.sha256: blobs[n] for n, e in entries.items()}

    def copy(entry: ShardEntry, sink, max_bytes: int) -> int:
        data = by_sha[entry.sha256]
        sink.write(data[:max_bytes])
        return len(data)

    cache = ShardCache(tmp_path / "cache", limit_bytes=2500)
    stale = tmp_path / "cache" / ".x.safetensors.tmp-1-ab"
    stale.write_bytes(b"left by a killed copy")
    assert cache.put(entries["a"], copy, "a") and cache.put(entries["b"], copy, "b")
    assert not stale.exists()
    time.sleep(0.01)
    assert cache.lookup(entries["a"])  # a used after b: b is the least recently used
    assert cache.put(entries["c"], copy, "c")
    assert cache.lookup(entries["b"]) is None and cache.lookup(entries["a"]) is not None
    # a and c protected: no room for d, nothing fetched or deleted
    protected = {entries["a"].sha256, entries["c"].sha256}
    assert cache.put(entries["d"], copy, "d", protected) is None
    assert cache.stats.fetches == 3 and cache.stats.evictions == 1
    assert cache.disk_bytes() <= 2500 and cache.stats.peak_bytes <= 2500


def test_a_copy_corrupted_in_transit_is_fetched_again_and_then_used(tmp_path: Path) -> None:
    good = b"\x07" * 4096
    entry = ShardEntry("s.safetensors", 1, len(good), hashlib.sha256(good).hexdigest())
    sent = []

    def flaky_source(entry: ShardEntry, sink, max_bytes: int) -> int:
        data = good if sent else good[:100] + b"\x00" + good[101:]  # one flipped byte, the first time
        sent.append(len(data))
        sink.write(data[:max_bytes])
        return len(data)

    cache = ShardCache(tmp_path / "cache", limit_bytes=None)
    path = cache.put(entry, flaky_source, "s from a flaky remote")
    assert path is not None and path.read_bytes() == good and len(sent) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != ".lock"] == [path.name]
