"""Several training processes (DDP): launch through torchrun, join the group, reduce the figures.

With ``train.processes > 1`` the stage starts itself again under PyTorch's own
elastic launcher (``python -m torch.distributed.run --standalone``), which
starts one process per rank, and restarts the whole group up to
``train.max_restarts`` times when one of them dies. A process started by a
launcher (ours, or the user's own ``torchrun`` across machines) finds its rank
and the rendezvous in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``...) and joins the group from there.

The agent runs as ``python -m trainer.distributed`` (torchrun's own entry point,
after one step of its own): torchrun starts each rank in a session of its own,
so ranks outlive a SIGKILLed agent, and the agent outlives a SIGKILLed stage;
the kernel would then free the stage's checkpoint lock while its ranks still
train and write. So on Linux the agent asks the kernel for SIGTERM when the
stage ends (it then stops its ranks), and each rank for SIGKILL when the agent
ends (``PR_SET_PDEATHSIG``), however either ends.

Only tensor collectives are used (``all_reduce``, ``broadcast``): the
``*_object`` collectives pickle, and this project never unpickles anything.
"""

from __future__ import annotations

import ctypes
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import ParamsError
from pipeline.pool import cpu_count  # the affinity mask's cores, as the data stages count them

# Set by torchrun (and torch.distributed.run) in every process it starts.
LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# The pid each process of our own launch ends with: the stage's for the agent, the agent's for a rank.
STAGE_PID_ENV = "TRAINER_STAGE_PID"
AGENT_PID_ENV = "TRAINER_AGENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (rank 0 of 1 when there is no launcher)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    launched: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    return any(name in environ for name in LAUNCHER_ENV)


def run_rank(entry: Callable[[], None]) -> NoReturn:
    """Run a launched rank's ``entry``, then end the process without the interpreter's finalization.

    The process group of a run that wrapped its model in DDP outlives ``destroy_process_group``
    (DDP's C++ side keeps it), and so do Gloo's worker threads. A worker that drops its last
    collective as the interpreter finalizes must take the GIL to free the tensor's Python object,
    and a thread cannot take it then: Python ends the thread, C++ calls ``std::terminate``, and
    the rank, its work all done, aborts (SIGABRT) and torchrun restarts the group (seen under
    load, a few runs in a hundred; the backtrace is in docs/distributed.md). So a rank flushes its
    output and logs, and leaves with ``os._exit``: exit code 0, a ``SystemExit``'s code, or 1
    after an uncaught exception's traceback, as Python itself would give.
    """
    end_with_parent(os.environ.get(AGENT_PID_ENV), signal.SIGKILL)  # ours: never outlive the agent
    code = 0
    try:
        entry()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # reported as Python would report it, then the process ends
        traceback.print_exc()
        code = 1
    logging.shutdown()  # flushes every handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_with_parent(parent: str | None, signum: int) -> None:
    """Linux: the kernel sends this process ``signum`` when its parent ends, however the parent ends.

    ``parent`` is the pid the parent announced (None: not launched by us, nothing to do); a parent
    that ended before the request was made is no longer this process's parent, and the process
    ends at once. Where ``prctl`` is missing (not Linux) nothing is done.
    """
    if parent is None or not sys.platform.startswith("linux"):
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signum)


def agent_main() -> None:
    """``python -m trainer.distributed ARGS``: torchrun's agent with ARGS, ending with the stage."""
    end_with_parent(os.environ.get(STAGE_PID_ENV), signal.SIGTERM)  # the agent then stops its ranks
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # inherited by the ranks (run_rank)
    sys.argv[0] = "torch.distributed.run"
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


def default_threads(local_processes: int, cores: int | None = None) -> int:
    """Intra-op threads per training process on the CPU: the cores shared out, so N processes never
    oversubscribe them (an explicit thread count, where one is configured, wins over this)."""
    return max(1, (cores if cores is not None else cpu_count()) // max(1, local_processes))


def check_gpus(device: torch.device, local_processes: int) -> None:
    """One GPU per process: more processes on this machine than GPUs is refused."""
    if device.type != "cuda":
        return
    gpus = torch.cuda.device_count()
    if local_processes > gpus:
        raise ParamsError(
            f"train.processes: expected at most {gpus} processes on this machine (one per CUDA device), "
            f"found {local_processes}"
        )


def launch_command(module: str, args: Sequence[str], *, processes: int, max_restarts: int) -> list[str]:
    """torchrun's command line, through :func:`agent_main` (set :data:`STAGE_PID_ENV` to the caller's pid)."""
    return [
        sys.executable,
        "-m",
        "trainer.distributed",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "--max-restarts",
        str(max_restarts),
        "-m",
        module,
        *args,
    ]


def run_torchrun(
    module: str,
    args: Sequence[str],
    *,
    processes: int,
    max_restarts: int,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run ``python -m module args`` as ``processes`` ranks under the elastic agent; its exit code."""
    child_env = {**os.environ, **(env or {}), STAGE_PID_ENV: str(os.getpid())}
    # torchrun would otherwise set 1 with a warning; each rank sets its own count anyway (see threads()).
    child_env.setdefault("OMP_NUM_THREADS", str(default_threads(processes)))
    agent = subprocess.Popen(
        launch_command(module, args, processes=processes, max_restarts=max_restarts), env=child_env
    )
    # A SIGTERM for the stage (dvc, a scheduler) must reach the agent, which stops its ranks; Ctrl-C
    # reaches the agent through the terminal's process group (the ranks have sessions of their own).
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: agent.send_signal(signum))
    try:
        return agent.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def join(device: torch.device, environ: Mapping[str, str] = os.environ) -> Group:
    """Join the process group the launcher describes; without a launcher, a group of one (nothing started)."""
    if not under_launcher(environ):
        return Group(0, 1, 0, 1, device, launched=False)
    rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    local_rank = int(environ["LOCAL_RANK"])
    local_world = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        check_gpus(device, local_world)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # The elastic agent keeps one TCP store across its restarts of the group, and the process
        # group's keys carry no attempt number: a restarted rank could read a dead peer's address
        # and fail to connect. Each attempt therefore gets its own key prefix.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
        attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"attempt-{attempt}/", store), rank=rank, world_size=world
        )
    return Group(rank, world, local_rank, local_world, device, launched=True)


def leave(group: Group) -> None:
    if group.launched and dist.is_initialized():
        dist.destroy_process_group()


def threads(group: Group, explicit: int | None = None) -> int | None:
    """The intra-op thread count to set, or None to keep PyTorch's own choice (one plain process)."""
    if explicit is not None:
        return explicit
    if group.device.type == "cpu" and group.launched:
        return default_threads(group.local_world_size)
    return None


# The DDP wrappers of this process, kept until it ends with os._exit (run_rank): see wrap.
_HELD_UNTIL_EXIT: list[nn.Module] = []


def wrap(model: nn.Module, group: Group) -> nn.Module:
    """DDP around ``model`` when there is more than one process (its gradients are averaged over ranks).

    The wrapper is held until the rank ends (:func:`run_rank` ends it with ``os._exit``), never
    freed. Freeing it frees the process group DDP holds, and in PyTorch 2.4 Gloo's destructor joins
    its worker threads while the freeing thread holds the GIL; a worker that frees a tensor's Python
    object needs that GIL, so both wait forever: a two-process run hung after its last epoch, its
    outputs written (one run in six; the backtrace is in docs/distributed.md). Later releases free
    the group without the GIL (pytorch#154976); nothing is lost by holding it either way.
    """
    if group.world_size == 1:
        return model
    ids = [group.device.index] if group.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids)
    _HELD_UNTIL_EXIT.append(ddp)
    return ddp


def _reduce(values: Sequence[float], group: Group, op: dist.ReduceOp) -> list[float]:
    if group.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=group.device)
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_sum(values: Sequence[float], group: Group) -> list[float]:
    return _reduce(values, group, dist.ReduceOp.SUM)


def all_max(values: Sequence[float], group: Group) -> list[float]:
    return _reduce(values, group, dist.ReduceOp.MAX)


def gather_floats(value: float, group: Group) -> list[float]:
    """Every rank's ``value``, in rank order, on every rank (bit-exact: each slot adds zeros to one value)."""
    if group.world_size == 1:
        return [float(value)]
    t = torch.zeros(group.world_size, dtype=torch.float64, device=group.device)
    t[group.rank] = value
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_floats(values: Sequence[float], group: Group) -> list[float]:
    """Rank 0's ``values`` on every rank (the same length everywhere; integers below 2**53 stay exact)."""
    if group.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=group.device)
    dist.broadcast(t, src=0)
    return t.cpu().tolist()


def ranks_unlike_rank_0(digest: bytes, group: Group) -> list[int]:
    """The ranks whose ``digest`` differs from rank 0's; the same list on every rank, so all stop alike."""
    if group.world_size == 1:
        return []
    mine = [float(b) for b in digest]
    theirs = broadcast_floats(mine, group)
    return [r for r, d in enumerate(gather_floats(float(theirs != mine), group)) if d]


def broadcast_int(value: int, group: Group) -> int:
    """Rank 0's ``value`` on every rank."""
    if group.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=group.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_tensors(tensors: Mapping[str, torch.Tensor], group: Group) -> None:
    """Overwrite every rank's tensors, in place, with rank 0's (same names, dtypes and shapes everywhere)."""
    if group.world_size == 1:
        return
    for name in sorted(tensors):
        local = tensors[name]
        on_device = local.to(group.device).contiguous()
        dist.broadcast(on_device, src=0)
        if on_device.data_ptr() != local.data_ptr():
            local.copy_(on_device)


if __name__ == "__main__":
    agent_main()
