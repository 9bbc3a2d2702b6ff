"""Sharing the cache over SSH: ``python -m benchmarks.remote`` -> ``bench/remote.json``.

Copies this repository into a scratch folder, runs the real pipeline there
(``dvc repro``, FashionMNIST from the local mirror, ``train.epochs`` 1 by
default: the outputs' sizes do not depend on it), starts the tests' OpenSSH
server on 127.0.0.1 (tests/sshd.py: Debian's sshd, generated keys) as the DVC
remote, and times ``dvc push``, ``dvc status -c``, ``dvc pull`` into a fresh
``git clone`` (with the remote's ``verify true``, as docs/sharing.md recommends, and
without it), and ``dvc repro`` after the pull (it must run nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.prep import path_bytes
from benchmarks.report import run_conditions
from pipeline.atomic import write_bytes_atomic
from pipeline.cpuinfo import cpu_model
from tests.repo_copy import copy_repo, dvc, run, set_params
from tests.sshd import start_sshd

ROOT = Path(__file__).resolve().parent.parent
GIT = ["git", "-c", "user.email=b@b", "-c", "user.name=bench"]
OUTPUTS = ("data/raw", "data/csv", "data/parquet", "data/tensors", "models")


def _timed(repo: Path, *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    res = dvc(repo, *args)
    return time.perf_counter() - start, res.stdout.strip()


def measure(work: Path, epochs: int) -> dict:
    before = run_conditions()  # the machine's load before this run adds its own
    server = start_sshd(work / "sshd")
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(server.home)  # DVC's SSH client trusts the host key from ~/.ssh/known_hosts
    try:
        repo = copy_repo(work / "repo")
        set_params(repo, **{"train.epochs": epochs})
        run(["git", "init", "-q"], repo)
        run([*GIT, "add", "-A"], repo)
        run([*GIT, "commit", "-qm", "bench"], repo)
        repro_s, _ = _timed(repo, "repro")
        storage = work / "storage"
        dvc(repo, "remote", "add", "-d", "storage", server.url(storage))
        dvc(repo, "remote", "modify", "storage", "verify", "true")
        dvc(repo, "remote", "modify", "--local", "storage", "keyfile", str(server.key))
        run([*GIT, "add", "-A"], repo)
        run([*GIT, "commit", "-qm", "remote"], repo)
        push_s, push_out = _timed(repo, "push")
        push_again_s, _ = _timed(repo, "push")
        status_s, status_out = _timed(repo, "status", "-c")
        pulls = {}
        for name, verify in (("pull_verify", "true"), ("pull_no_verify", "false")):
            clone = work / name
            run(["git", "clone", "-q", str(repo), str(clone)], work)
            dvc(clone, "remote", "modify", "--local", "storage", "keyfile", str(server.key))
            dvc(clone, "remote", "modify", "--local", "storage", "verify", verify)
            pulls[name] = _timed(clone, "pull")
        repro_after_s, repro_after_out = _timed(work / "pull_verify", "repro")
        return {
            "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
            "conditions_at_start": before,
            "train_epochs": epochs,
            "repro_s": round(repro_s, 2),
            "push_s": round(push_s, 2),
            "push_out": push_out.splitlines()[-1],
            "push_again_s": round(push_again_s, 2),
            "status_c_s": round(status_s, 2),
            "status_c_out": status_out,
            **{f"{k}_s": round(v[0], 2) for k, v in pulls.items()},
            "pull_out": pulls["pull_verify"][1].splitlines()[-1],
            "repro_after_pull_s": round(repro_after_s, 2),
            "repro_after_pull_ran_nothing": "Running stage" not in repro_after_out,
            "remote_bytes": path_bytes(storage),
            "remote_files": sum(1 for p in storage.rglob("*") if p.is_file()),
            "output_bytes": {d: path_bytes(repo / d) for d in OUTPUTS},
        }
    finally:
        server.stop()
        if home is not None:
            os.environ["HOME"] = home


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1, help="train.epochs for the run (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "remote.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        result = measure(work, args.epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2) + "\n"
    write_bytes_atomic(args.out, text.encode())
    print(text, end="")


if __name__ == "__main__":
    main()
