"""A team shares DVC's cache over a real SSH remote and experiments through a git remote.

One sshd (tests/sshd.py) and one producer repository serve every test: the
producer runs the pipeline on tiny generated CSVs, pushes its cache to
``ssh://…`` and its commits to a local bare git repo ``origin``, runs one
experiment and pushes it with ``dvc exp push``. Each test then works in a
fresh ``git clone`` of origin, as a colleague would.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import shlex
import shutil
import struct
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sshd import Sshd, free_port, keygen, start_sshd

from tests.repo_copy import ROOT, dvc, make_csv_repo, run

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
EXP = "lr-high"
CACHED = ("data/csv", "data/parquet", "data/tensors", "models")  # the expensive outputs


@dataclass
class World:
    sshd: Sshd
    producer: Path
    origin: Path  # bare git repo
    storage: Path  # the DVC remote's folder, served over SSH
    baseline: dict[str, str]  # hashes of the committed run's cached outputs
    exp_model: bytes  # models/model.safetensors of experiment EXP
    exp_metrics: dict
    tmp: Path


def files(repo: Path, *tops: str) -> dict[str, str]:
    """relative path -> SHA-256 of every file under ``tops`` (the whole work tree if none)."""
    out = {}
    for top in tops or (".",):
        for p in sorted((repo / top).rglob("*")):
            rel = p.relative_to(repo).as_posix()
            if p.is_file() and not rel.startswith((".git/", ".dvc/tmp/", ".dvc/cache/")):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("team")
    server = start_sshd(tmp / "sshd")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(server.home))  # DVC's SSH client reads ~/.ssh/known_hosts from here
            yield _produce(server, tmp)
    finally:
        server.stop()


def _produce(server: Sshd, tmp: Path) -> World:
    repo = make_csv_repo(tmp, n_train=256, n_test=64)
    # The user's CSVs are the pipeline's input: a teammate gets them through git (they are gitignored
    # by default so nobody commits a large file by accident).
    run([*GIT, "add", "-f", "data/user/train.csv", "data/user/test.csv"], repo)
    storage = tmp / "storage"
    dvc(repo, "remote", "add", "-d", "storage", server.url(storage))
    # hash what `dvc pull` downloads (docs/sharing.md)
    dvc(repo, "remote", "modify", "storage", "verify", "true")
    dvc(repo, "remote", "modify", "--local", "storage", "keyfile", str(server.key))
    dvc(repo, "repro")
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "pipeline run, SSH remote"], repo)
    dvc(repo, "push")
    baseline = files(repo, *CACHED)
    origin = tmp / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    run(["git", "push", "-q", "origin", "HEAD:main"], repo)
    dvc(repo, "exp", "run", "-n", EXP, "-S", "train.lr=0.01")
    dvc(repo, "exp", "push", "origin", EXP)
    return World(
        server,
        repo,
        origin,
        storage,
        baseline,
        (repo / "models/model.safetensors").read_bytes(),
        json.loads((repo / "dvclive/metrics.json").read_text()),
        tmp,
    )


def clone(world: World, name: str, key: Path | None = None) -> Path:
    dest = world.tmp / name
    run(["git", "clone", "-q", str(world.origin), str(dest)], world.tmp)
    dvc(dest, "remote", "modify", "--local", "storage", "keyfile", str(key or world.sshd.key))
    return dest


@pytest.fixture(scope="module")
def pulled(world: World) -> Path:
    repo = clone(world, "pulled")
    dvc(repo, "pull")
    return repo


def test_pull_restores_every_cached_output_and_repro_runs_nothing(world: World, pulled: Path) -> None:
    assert any(k.startswith("data/tensors/train/shard-") for k in world.baseline)
    assert files(pulled, *CACHED) == world.baseline  # shards, Parquet, CSV and model byte-identical
    res = dvc(pulled, "repro")
    assert ran_stages(res.stdout) == [], res.stdout
    assert "Data and pipelines are up to date" in res.stdout
    status = dvc(pulled, "status", "-c")
    assert "Cache and remote 'storage' are in sync" in status.stdout, status.stdout


def test_after_pull_a_loader_experiment_runs_only_train(world: World, pulled: Path) -> None:
    res = dvc(pulled, "exp", "run", "-S", "loader.num_workers=2")
    assert ran_stages(res.stdout) == ["train"], res.stdout


def test_experiment_shared_through_git(world: World) -> None:
    repo = clone(world, "colleague")
    assert EXP not in dvc(repo, "exp", "list", "--all-commits", "--name-only").stdout
    dvc(repo, "exp", "pull", "origin", EXP)  # git refs from origin, its cache from the SSH remote
    table = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = {e["name"]: e for row in table for e in row.get("experiments") or []}
    assert EXP in exps, table
    data = exps[EXP]["revs"][0]["data"]
    assert data["metrics"]["dvclive/metrics.json"]["data"]["test_acc"] == world.exp_metrics["test_acc"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.01
    assert not (repo / "models").exists()  # nothing pulled besides the experiment
    check_readme_exp_show_in_80_columns(repo, world.exp_metrics)
    dvc(repo, "exp", "apply", EXP)
    dvc(repo, "checkout")
    assert (repo / "models/model.safetensors").read_bytes() == world.exp_model
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0.01


@pytest.mark.parametrize("problem", ["unreachable", "refused-key"])
def test_failed_pull_says_why_and_leaves_the_workspace_as_it_was(world: World, problem: str) -> None:
    if problem == "refused-key":
        repo = clone(world, problem, key=keygen(world.tmp / "stranger_ed25519"))
    else:
        repo = clone(world, problem)
        closed = world.sshd.url(world.storage).replace(
            f":{world.sshd.port}/", f":{free_port()}/"
        )  # nobody listens
        dvc(repo, "remote", "modify", "--local", "storage", "url", closed)
    before = files(repo)
    res = dvc(repo, "pull", check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "ERROR" in out and ("failed to" in out or "Connection refused" in out), out
    assert files(repo) == before


def test_corrupted_remote_file_is_detected_and_not_checked_out(world: World) -> None:
    repo = clone(world, "corrupt")
    storage = world.tmp / "storage-corrupt"
    shutil.copytree(world.storage, storage)
    dvc(repo, "remote", "modify", "--local", "storage", "url", world.sshd.url(storage))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models")
    assert md5.endswith(".dir")
    listing = json.loads((storage / "files/md5" / md5[:2] / md5[2:]).read_text())
    entry = next(e for e in listing if e["relpath"] == "model.safetensors")
    blob = storage / "files/md5" / entry["md5"][:2] / entry["md5"][2:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    res = dvc(repo, "pull", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    model = repo / "models/model.safetensors"
    assert not model.exists() or model.read_bytes() != bytes(data)
    assert "failed to pull data from the cloud" in out and "models" in out, out


def readme_exp_show_command() -> list[str]:
    """The readable `dvc exp show` line docs/experiments.md's "80-column terminal" section gives."""
    page = (ROOT / "docs/experiments.md").read_text()
    section = page.split("## Comparing experiments in an 80-column terminal", 1)[1].split("\n##", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("dvc exp show ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def in_terminal(cmd: list[str], cwd: Path, columns: int = 80) -> str:
    """Run ``cmd`` on a pseudo-terminal ``columns`` wide (as a person at a narrow terminal would)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: only exec or exit
        try:
            os.chdir(cwd)
            os.environ.update(COLUMNS=str(columns), LINES="40", TERM="xterm-256color")
            os.execvp(sys.executable, [sys.executable, "-m", *cmd])
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


def check_readme_exp_show_in_80_columns(repo: Path, metrics: dict) -> None:
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", in_terminal(readme_exp_show_command(), repo))
    row = next((ln for ln in text.splitlines() if f"[{EXP}]" in ln), None)
    assert row is not None, text
    assert "…" not in text, text
    cells = row.split()
    for metric in ("test_loss", "test_acc"):
        assert f"{metrics[metric]:.5g}" in cells, (metric, text)  # DVC prints 5 significant digits
    assert "0.01" in cells, text  # the changed param, train.lr
    assert max(len(ln) for ln in text.splitlines()) <= 80, text
