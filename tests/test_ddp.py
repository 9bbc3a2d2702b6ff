"""Several training processes (DDP over gloo on 127.0.0.1), as real torchrun process groups.

The runs are shared by the assertions (module-scoped): one plain process, two
processes launched by the stage itself (twice), two one-process "machines"
joined by a c10d rendezvous, and a two-process run whose rank 1 is SIGKILLed
mid-run while a second training tries the same checkpoint folder.

The data are chosen so the split is uneven: 257 train samples in batches of 64
end with a global batch of 1 sample (rank 1 gets none), and 131 test samples
end with a batch of 3.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.errors import ParamsError
from pipeline.normalize import make_normalization
from pipeline.tensorize import write_split
from tests.repo_copy import dvc, make_csv_repo, set_params
from tests.test_train_stage import (
    MODEL_METRICS,
    children,
    history,
    read_tsv,
    run_train,
    run_until_killed,
    stage_cmd,
    stage_env,
    start_logged,
    train_argv,
    wait_for_output,
)
from trainer import distributed
from trainer.distributed import check_gpus, default_threads
from trainer.loader import EpochBatchSampler
from trainer.lock import CheckpointBusy, checkpoint_lock, lock_path
from trainer.loop import scaled_loss
from trainer.model import SimpleCNN
from trainer.rank_split import RankBatches, rank_range
from trainer.run import METRICS

EPOCHS = 3
N_TEST = 131
PARAMS = {"loader": {"batch_size": 64}, "train": {"epochs": EPOCHS, "lr": 0.005, "device": "cpu"}}


def _params(path: Path, processes: int, train: dict | None = None, **loader: object) -> Path:
    doc = {
        "loader": {**PARAMS["loader"], **loader},
        "train": {**PARAMS["train"], "processes": processes, **(train or {})},
    }
    path.write_text(json.dumps(doc))
    return path


# Every process a test here starts carries this variable, set to a token of its own launch (see _reaped).
_LAUNCH_MARK = "TEST_DDP_LAUNCH"


def _marked(token: str) -> list[int]:
    """The processes whose environment holds ``_LAUNCH_MARK=token`` (ended ones read as empty)."""
    needle = f"{_LAUNCH_MARK}={token}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


@contextlib.contextmanager
def _reaped() -> Iterator[None]:
    """Whatever the block starts (launcher, agent, ranks, their loader workers) is SIGKILLed when it is
    left, passed, failed or timed out, so no hung rank outlives its test.

    torchrun starts each rank in a session of its own, and the ranks of an agent killed first are
    reparented, so neither killpg nor a walk down from the launcher reaches them all. Each process
    inherits its parent's environment, so a fresh token set there while the block starts them finds
    every one.
    """
    token = secrets.token_hex(8)
    before = os.environ.get(_LAUNCH_MARK)
    os.environ[_LAUNCH_MARK] = token
    try:
        yield
    finally:
        if before is None:
            del os.environ[_LAUNCH_MARK]
        else:
            os.environ[_LAUNCH_MARK] = before
        for _ in range(100):  # again until none is left: an agent may start a rank between two sweeps
            pids = _marked(token)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


def _run(data: Path, work: Path, processes: int, train: dict | None = None) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    with _reaped():
        res = run_train(data, work, _params(work / "params.yaml", processes, train))
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _learnable_split(directory: Path, n: int, *, split: str, seed: int) -> None:
    """Every pixel carries the label (plus noise): a few steps already learn it, so accuracies move."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = (labels[:, None] * 20 + rng.integers(0, 60, (n, 784))).astype(np.uint8)
    write_split(
        [(pixels, labels)],
        directory,
        dataset="fashion-mnist",
        split=split,
        shard_size=100,
        normalization=make_normalization("unit", None),
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    _learnable_split(root / "train", 257, split="train", seed=1)
    _learnable_split(root / "test", N_TEST, split="test", seed=2)
    return root


@pytest.fixture(scope="module")
def one(data: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("one")
    _run(data, work, 1)
    return work


@pytest.fixture(scope="module")
def two(data: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("two")
    res = _run(data, work, 2)
    assert res.stderr.count("loader.pin_memory ignored") == 1, res.stderr  # rank 0 alone speaks
    assert res.stdout.count(f"epoch {EPOCHS}/{EPOCHS}") == 1, res.stdout
    return work


def _model_bytes(work: Path) -> bytes:
    return (work / "models" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------- the split itself (no processes)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64])
def test_rank_slices_tile_the_batch_in_order(n: int, world: int) -> None:
    ranges = [rank_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_rank_batches_cover_the_global_batches_exactly() -> None:
    sampler = EpochBatchSampler(257, 64, shuffle=True, seed=3)
    sampler.set_epoch(2)
    parts = [list(RankBatches(sampler, r, 3)) for r in range(3)]
    for step, batch in enumerate(sampler):
        assert torch.equal(torch.cat([p[step] for p in parts]), batch)
        assert RankBatches(sampler, 0, 3).global_size(step) == len(batch)
    assert [len(p[-1]) for p in parts] == [1, 0, 0]
    with pytest.raises(ValueError):
        RankBatches(sampler, 2, 2)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [64, 7, 2])
def test_scaled_rank_losses_average_to_the_global_gradient(n: int, world: int) -> None:
    """What DDP computes (the mean over ranks of each rank's gradient of sum/(n/world)) is the
    gradient of the global batch's mean loss, also for uneven and empty slices."""
    torch.manual_seed(0)
    model = SimpleCNN()
    x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
    F.cross_entropy(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(world):
        model.zero_grad()
        start, stop = rank_range(n, rank, world)
        summed = F.cross_entropy(model(x[start:stop]), y[start:stop], reduction="sum")
        scaled_loss(summed, n, world).backward()  # the loop's own scaling, not a copy of its formula
        for t, p in zip(total, model.parameters()):
            t += p.grad
    for t, e in zip(total, expected):
        torch.testing.assert_close(t / world, e, rtol=1e-5, atol=1e-7)


def test_checkpoint_lock_refuses_a_second_holder_and_is_released(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    with (
        checkpoint_lock(folder),
        pytest.raises(CheckpointBusy, match="another training is running on this checkpoint folder"),
        checkpoint_lock(folder),
    ):
        pass
    with checkpoint_lock(folder):  # released on exit
        pass
    assert lock_path(folder) == tmp_path / ".checkpoints.lock" and not folder.exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs for 2 processes")
def test_more_processes_than_gpus_is_refused() -> None:
    with pytest.raises(ParamsError, match=r"^train\.processes: expected at most \d+ processes"):
        check_gpus(torch.device("cuda"), 2)
    check_gpus(torch.device("cpu"), 64)  # no such limit on the CPU


def test_a_ranks_ddp_wrapper_is_held_until_the_process_ends(tmp_path: Path) -> None:
    """Freeing the wrapper frees its process group, and under PyTorch 2.4 Gloo's destructor then
    waited, holding the GIL, on a worker thread that needed it: a finished two-process run hung.
    A rank ends with os._exit, so the wrapper is kept to the end and never freed."""
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        launched = distributed.Group(0, 2, 0, 2, torch.device("cpu"), launched=True)
        held = weakref.ref(distributed.wrap(torch.nn.Linear(2, 2), launched))
        gc.collect()
        assert held() is not None and held() in distributed._HELD_UNTIL_EXIT
    finally:
        distributed._HELD_UNTIL_EXIT.clear()
        torch.distributed.destroy_process_group()


def test_threads_share_the_cores() -> None:
    assert default_threads(2, cores=2) == 1 and default_threads(2, cores=16) == 8
    assert default_threads(3, cores=2) == 1 and default_threads(1, cores=4) == 4


_RANK_SCRIPT = """
import atexit, logging, sys
from trainer.distributed import run_rank
logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
atexit.register(lambda: print("finalized", flush=True))

def entry():
    print("written", end="")  # still in sys.stdout's buffer when the process ends
    logging.getLogger("x").info("logged")
    outcome = sys.argv[1]
    if outcome == "raise":
        raise RuntimeError("broken")
    if outcome != "return":
        sys.exit(int(outcome) if outcome.isdigit() else outcome)

run_rank(entry)
print("after run_rank")
"""


@pytest.mark.parametrize(
    ("outcome", "code", "stderr"),
    [
        ("return", 0, "logged\n"),
        ("3", 3, "logged\n"),
        ("raise", 1, "RuntimeError: broken"),
        ("why", 1, "why"),
    ],
)
def test_a_rank_ends_with_its_exit_code_and_output_but_without_finalizing(
    outcome: str, code: int, stderr: str
) -> None:
    """A rank skips the interpreter's finalization (trainer.distributed.run_rank): no atexit
    handler runs (so none of the finalization where Gloo's threads abort the process), yet the
    exit code, the buffered output and the log lines are those of a normal exit."""
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-c", _RANK_SCRIPT, outcome], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == code, res.stderr
    assert res.stdout == "written", res.stdout
    assert stderr in res.stderr and "finalized" not in res.stdout + res.stderr


# ----------------------------------------------------------------------------- real process groups


def test_two_processes_match_one(one: Path, two: Path) -> None:
    a, b = history(one), history(two)
    _match(a, b)
    # The same global batches, but float sums in another order: a test sample whose two best
    # logits are within rounding of each other may flip, so allow one sample, no more.
    for (_, va), (_, vb) in zip(a["test_acc"], b["test_acc"], strict=True):
        assert abs(va - vb) * N_TEST <= 1 + 1e-9, (va, vb)
    assert [v for _, v in a["processes"]] == [1] * EPOCHS and [v for _, v in b["processes"]] == [2] * EPOCHS
    assert a["test_acc"][-1][1] > 0.2, "the model must learn something for the comparison to mean anything"
    assert sorted(p.name for p in (two / "dvclive").iterdir()) == ["metrics.json", "plots"]
    assert not (two / "checkpoints").exists()
    # The confusion matrix sums both ranks' slices of the test split: every sample once, its
    # diagonal the logged test_acc, and within the one sample that may flip of the one-process run.
    confusion = {}
    for work in (one, two):
        cells = json.loads((work / "dvclive/plots/custom/confusion_matrix.json").read_text())
        confusion[work] = Counter({(c["actual"], c["predicted"]): c["count"] for c in cells})
        assert confusion[work].total() == N_TEST
        diagonal = sum(n for (actual, predicted), n in confusion[work].items() if actual == predicted)
        assert diagonal == round(history(work)["test_acc"][-1][1] * N_TEST)
    moved = (confusion[one] - confusion[two]) + (confusion[two] - confusion[one])
    assert sum(moved.values()) <= 2


def _match(a: dict, b: dict) -> None:
    """The same run on 1 and on 2 processes: the same global batches, float sums in another order."""
    for name in ("train_loss", "test_loss"):
        for (sa, va), (sb, vb) in zip(a[name], b[name], strict=True):
            assert sa == sb and abs(va - vb) <= 1e-4 * abs(va), (name, va, vb)


def test_two_processes_augment_the_one_process_batches(data: Path, one: Path, tmp_path: Path) -> None:
    """Each rank augments its slice of the global batch as one process augments the whole: the draws
    follow the global sample index, not the rank's (trainer.augment)."""
    augment = {"augment": ["flip", "translate"]}
    _run(data, tmp_path / "one", 1, augment)
    _run(data, tmp_path / "two", 2, augment)
    a, b = history(tmp_path / "one"), history(tmp_path / "two")
    _match(a, b)
    assert [v for _, v in b["processes"]] == [2] * EPOCHS
    plain = history(one)
    assert all(x != y for (_, x), (_, y) in zip(a["train_loss"], plain["train_loss"])), (
        "augment had no effect"
    )


@pytest.mark.parametrize("max_restarts", [None, 0])
def test_two_processes_are_bit_identical_run_to_run(
    data: Path, two: Path, tmp_path: Path, max_restarts: int | None
) -> None:
    """Also with another ``train.max_restarts`` (speed-only: it acts only on the launch of a group)."""
    _run(data, tmp_path, 2, None if max_restarts is None else {"max_restarts": max_restarts})
    a, b = history(two), history(tmp_path)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    assert _model_bytes(two) == _model_bytes(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_agents(tmp_path: Path, params: Path, data_per_node: list[Path]) -> tuple[list[int], list[str]]:
    """Two torchrun agents, one process each, meet at a c10d rendezvous as two machines would; node k
    reads ``data_per_node[k]``. Their exit codes and outputs.

    Each "machine" gets half of this machine's cores, as each of the two
    local processes does, so every rank runs the same number of threads.
    """
    port = _free_port()
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    agents = []
    with _reaped():
        for node, data in enumerate(data_per_node):
            share = set(cores[node * half : (node + 1) * half]) or set(cores)
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "test-ddp",
                "--max-restarts",
                "0",
                "-m",
                "stages.train",
                *train_argv(data, tmp_path, params),
            ]
            agents.append(
                subprocess.Popen(
                    cmd,
                    cwd=tmp_path,
                    env=stage_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    preexec_fn=lambda share=share: os.sched_setaffinity(0, share),
                )
            )
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    return [a.returncode for a in agents], outputs


def test_two_machines_match_two_local_processes(data: Path, two: Path, tmp_path: Path) -> None:
    codes, outputs = _two_agents(tmp_path, _params(tmp_path / "params.yaml", 2), [data, data])
    assert codes == [0, 0], outputs
    assert sum(out.count(f"epoch {EPOCHS}/{EPOCHS}") for out in outputs) == 1, outputs  # one writer
    a, b = history(two), history(tmp_path)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    assert _model_bytes(two) == _model_bytes(tmp_path)


def test_a_machine_with_other_shards_is_refused_before_training(data: Path, tmp_path: Path) -> None:
    """Machine B did not pull the latest test split: every rank stops in one line, nothing is trained."""
    other = tmp_path / "other-shards"
    shutil.copytree(data / "train", other / "train")
    _learnable_split(other / "test", N_TEST, split="test", seed=3)
    work = tmp_path / "work"
    work.mkdir()
    codes, outputs = _two_agents(work, _params(work / "params.yaml", 2), [data, other])
    assert all(code != 0 for code in codes), outputs
    ranks = []
    for out in outputs:  # each agent runs one rank; the rendezvous, not --node-rank, numbers them
        found = re.search(
            r"error: rank ([01]) on \S+: rank\(s\) 1 of 2 have other params, data, code or torch version "
            r"than rank 0; give every machine the same commit, params.yaml and shards "
            r"\(git pull && dvc pull\)",
            out,
        )
        assert found, out
        ranks.append(found.group(1))
        assert "epoch 1/" not in out, out
    assert sorted(ranks) == ["0", "1"]
    assert not (work / "models").exists()


def _rank_pid(root: int, rank: int) -> int | None:
    """The process under ``root`` whose environment says RANK=rank (a torchrun worker)."""
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            env = []
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
        todo += children(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid in /proc")
def test_killed_rank_restarts_the_group_and_ends_like_an_uninterrupted_run(
    data: Path, two: Path, tmp_path: Path
) -> None:
    """Also with other loader settings than the uninterrupted run: with a fixed number of processes
    they change speed only, so the results must still be bit-identical. Checkpoints come every step
    (speed-only too) and the rank is killed at the first, so the restarted group does nearly the
    whole run."""
    params = _params(
        tmp_path / "params.yaml",
        2,
        train=EVERY_STEP,
        num_workers=1,
        persistent_workers=True,
        prefetch_factor=2,
    )
    log = tmp_path / "first.log"
    with _reaped():  # a failure or timeout below leaves no launcher, agent, rank or worker behind
        with open(log, "w") as out:
            first = subprocess.Popen(
                stage_cmd(data, tmp_path, params),
                cwd=tmp_path,
                env=stage_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 240
        victim = None
        while victim is None:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            victim = _rank_pid(first.pid, 1)
            time.sleep(0.05)
        # The first run's launcher holds the lock from before its ranks start until they are done.
        # The first run is paused while the second tries, so the second meets the held lock however
        # slowly it starts on a loaded machine: its whole tree, since torchrun starts the ranks in
        # sessions of their own. Pausing only the stage's session let the ranks train on, and when
        # the second run took longer than the whole training, the run ended before a rank was killed.
        _signal_tree(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(
                stage_cmd(data, tmp_path, params),
                cwd=tmp_path,
                env=stage_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            _signal_tree(first.pid, signal.SIGCONT)
        while not (tmp_path / "checkpoints" / "checkpoint.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        assert first.wait(timeout=240) == 0, log.read_text()
    refused_out, refused_err = second.stdout, second.stderr
    assert second.returncode == 2, refused_out + refused_err
    assert refused_err.startswith("error: ") and refused_err.count("\n") == 1, refused_err
    assert "another training is running on this checkpoint folder" in refused_err

    text = log.read_text()
    assert re.search(r"resuming (in epoch \d, step \d|after epoch \d)", text), text
    a, b = history(two), history(tmp_path)
    for name in METRICS:
        assert [s for s, _ in b[name]] == list(range(EPOCHS)), name  # exactly one row per epoch
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    assert _model_bytes(two) == _model_bytes(tmp_path)
    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert summary["step"] == EPOCHS - 1 and summary["test_acc"] == a["test_acc"][-1][1]
    assert not (tmp_path / "checkpoints").exists()
    for tsv in (tmp_path / "dvclive" / "plots" / "metrics").glob("*.tsv"):
        assert len(read_tsv(tsv)) == EPOCHS, tsv


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the processes in /proc")
@pytest.mark.parametrize("victim", ["stage", "agent"])
def test_a_killed_stage_or_agent_takes_the_ranks_with_it(data: Path, tmp_path: Path, victim: str) -> None:
    """SIGKILL for the stage alone (kill -9, the OOM killer) frees its checkpoint lock; for the agent
    alone, the stage ends and frees it. torchrun's ranks have sessions of their own and used to train
    on, writing into a folder a rerun could then lock: now every process of the run ends in seconds."""
    params = tmp_path / "params.yaml"
    train = {**PARAMS["train"], "processes": 2, "epochs": 10_000, "checkpoint_every": 0}
    params.write_text(
        json.dumps({"loader": PARAMS["loader"], "train": {**train, "checkpoint_seconds": None}})
    )
    log = tmp_path / "run.log"
    with _reaped():
        token = os.environ[_LAUNCH_MARK]  # every process the block starts carries it
        stage = start_logged(data, tmp_path, params, log)
        wait_for_output(stage, log, "epoch 2/")  # both ranks are training
        (agent,) = children(stage.pid)
        os.kill(stage.pid if victim == "stage" else agent, signal.SIGKILL)
        stage.wait(timeout=60)
        deadline = time.monotonic() + 30  # the run itself would take minutes more
        while _marked(token):
            assert time.monotonic() < deadline, (_marked(token), log.read_text())
            time.sleep(0.05)
    with checkpoint_lock(tmp_path / "checkpoints"):  # free: a rerun owns the folder alone
        pass
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_dvc_exp_run_with_two_processes_reruns_only_train(tmp_path: Path) -> None:
    repo = make_csv_repo(tmp_path, n_train=257, n_test=100)
    set_params(repo, **{"train.device": "cpu"})
    dvc(repo, "repro")
    baseline = json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert baseline["processes"] == 1
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    with _reaped():  # dvc's stage starts torchrun
        exp = dvc(repo, "exp", "run", "-S", "train.processes=2")
    assert re.findall(r"Running stage '([^']+)'", exp.stdout) == ["train"], exp.stdout
    metrics = json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert abs(metrics["train_loss"] - baseline["train_loss"]) <= 1e-4 * baseline["train_loss"]
    assert abs(metrics["test_acc"] - baseline["test_acc"]) * 100 <= 1 + 1e-9


# ----------------------------------------------------------------------------- resume mid-epoch, elastic

EVERY_STEP = {"checkpoint_every": 0, "checkpoint_seconds": 0.001}  # speed-only: same fingerprint as PARAMS


def _every_step_params(path: Path, processes: int) -> Path:
    path.write_text(
        json.dumps(
            {"loader": PARAMS["loader"], "train": {**PARAMS["train"], **EVERY_STEP, "processes": processes}}
        )
    )
    return path


def _position(work: Path) -> tuple[int, int, int]:
    meta = json.loads((work / "checkpoints" / "checkpoint.json").read_text())
    return meta["epoch"], meta["step"], meta["processes"]


def _kill_two_mid_epoch(data: Path, work: Path) -> tuple[int, int, int]:
    """A 2-process run, stopped (SIGSTOP, then SIGKILL) once it has checkpointed inside epoch 2."""
    work.mkdir(parents=True, exist_ok=True)
    params = _every_step_params(work / "params.yaml", 2)
    with _reaped():  # then SIGKILLed, launcher, agent and ranks, however the block ends
        proc = subprocess.Popen(
            stage_cmd(data, work, params),
            cwd=work,
            env=stage_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (
                "the run ended before it could be killed"
            )
            with contextlib.suppress(OSError, ValueError, KeyError):
                if _position(work)[:2] in ((1, 1), (1, 2)):
                    break
            time.sleep(0.002)
        _signal_tree(proc.pid, signal.SIGSTOP)  # launcher, agent and ranks: nothing moves while we look
        position = _position(work)
    proc.wait()
    return position


def _signal_tree(root: int, signum: int) -> None:
    """``root`` and every descendant (torchrun starts its ranks in sessions of their own, so killpg misses
    them)."""
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children(pid)
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _resume(data: Path, work: Path, processes: int) -> str:
    res = _run(data, work, processes)
    assert "resuming in epoch 2, step" in res.stderr, res.stderr
    return res.stderr


def _max_relative_difference(a: Path, b: Path) -> float:
    ha, hb = history(a), history(b)
    return max(
        abs(va - vb) / abs(va)
        for name in ("train_loss", "test_loss")
        for (_, va), (_, vb) in zip(ha[name], hb[name], strict=True)
    )


ELASTIC_TOLERANCE = 1e-4  # relative, per-epoch losses: float sums in another order, far inside this bound


@pytest.fixture(scope="module")
def killed_two(data: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("killed-two")
    epoch, step, processes = _kill_two_mid_epoch(data, work)
    assert (epoch, processes) == (1, 2) and 0 < step < 5, (
        epoch,
        step,
    )  # inside epoch 2 of 3 (5 batches each)
    return work


def test_two_processes_killed_mid_epoch_resume_bit_identically(
    data: Path, two: Path, killed_two: Path, tmp_path: Path
) -> None:
    shutil.copytree(killed_two / "checkpoints", tmp_path / "checkpoints")
    stderr = _resume(data, tmp_path, 2)
    assert "elastic" not in stderr, stderr
    a, b = history(two), history(tmp_path)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    assert _model_bytes(two) == _model_bytes(tmp_path)


def test_two_processes_killed_mid_epoch_resume_on_one(
    data: Path, one: Path, two: Path, killed_two: Path, tmp_path: Path
) -> None:
    shutil.copytree(killed_two / "checkpoints", tmp_path / "checkpoints")
    stderr = _resume(data, tmp_path, 1)
    notices = [line for line in stderr.splitlines() if "elastic resume" in line]
    assert len(notices) == 1 and "written by 2 processes, this run has 1" in notices[0], stderr
    got = history(tmp_path)
    assert [s for s, _ in got["train_loss"]] == list(range(EPOCHS))
    assert [v for _, v in got["processes"]] == [2, 1, 1]
    differences = (_max_relative_difference(two, tmp_path), _max_relative_difference(one, tmp_path))
    print(
        f"elastic 2 -> 1: max relative loss difference {differences[0]:.2e} vs 2 processes, "
        f"{differences[1]:.2e} vs 1 process"
    )
    assert max(differences) <= ELASTIC_TOLERANCE, differences


def test_one_process_killed_mid_epoch_resumes_on_two(data: Path, one: Path, tmp_path: Path) -> None:
    # 5 batches an epoch: writes 1-4 are epoch 1's steps, 5 its end, 7 is epoch 2 step 2.
    run_until_killed(
        data, tmp_path, _every_step_params(tmp_path / "params.yaml", 1), "trainer.epoch.write_checkpoint", 7
    )
    assert _position(tmp_path) == (1, 2, 1)
    stderr = _resume(data, tmp_path, 2)
    assert "elastic resume: the checkpoint was written by 1 processes, this run has 2" in stderr
    difference = _max_relative_difference(one, tmp_path)
    print(f"elastic 1 -> 2: max relative loss difference {difference:.2e} vs 1 process")
    assert difference <= ELASTIC_TOLERANCE


def test_non_finite_loss_stops_every_process_with_one_line_and_no_restart(data: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps({"loader": PARAMS["loader"], "train": {**PARAMS["train"], "lr": 1.0e8, "processes": 2}})
    )
    with _reaped():
        res = run_train(data, tmp_path, params)
    assert res.returncode == 2, res.stdout + res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("error: epoch 1/3, step ") and "the training loss is not finite" in last, (
        res.stderr
    )
    assert res.stderr.count("error: ") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "resuming" not in res.stderr, "a restart would only fail again at the same step"
    assert not (tmp_path / "models").exists()
