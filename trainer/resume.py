"""Resume on every rank: rank 0 restores the checkpoint that matches this run, the others receive it.

Before anything is restored, every rank checks that it trains what rank 0
trains (:func:`check_same_run_everywhere`): the same params, data, code and
torch version, compared through the run fingerprint.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from pipeline.errors import PipelineError
from trainer import distributed
from trainer.checkpoint import empty_state, load_checkpoint, restore_state, state_tensors
from trainer.epoch import Run
from trainer.position import Position

log = logging.getLogger(__name__)


def check_same_run_everywhere(run: Run) -> None:
    """Every rank trains what rank 0 trains: the same params, data, code and torch version (the fingerprint).

    Each rank reads its own params.yaml, code and shards; on another machine one that was not pulled
    would otherwise train its old shards into the shared model without a word.
    """
    unlike = distributed.ranks_unlike_rank_0(bytes.fromhex(run.fingerprint), run.group)
    if unlike:
        raise PipelineError(
            f"rank {run.group.rank} on {socket.gethostname()}: rank(s) {', '.join(map(str, unlike))} of "
            f"{run.group.world_size} have other params, data, code or torch version than rank 0; give "
            f"every machine the same commit, params.yaml and shards (git pull && dvc pull)"
        )


def resume_everywhere(
    run: Run, history_names: Sequence[str], max_epoch: int
) -> tuple[Position, list[dict[str, float]]]:
    """Rank 0 restores the checkpoint, every other rank receives it; the position and history so far.

    The history is rank 0's (it alone logs); elsewhere only its length, the
    epochs done, is meaningful. Each rank gets its own partial sums back
    (:meth:`Position.for_rank` maps them on an elastic resume).
    """
    group, batches = run.group, run.train_batches.sampler.batches_per_epoch
    resumed = None
    if group.is_main:
        resumed = load_checkpoint(
            run.checkpoint_dir,
            model=run.model,
            optimizer=run.optimizer,
            device=run.device,
            scaler=run.precision.scaler,
            run_fingerprint=run.fingerprint,
            shape=run.shape,
            max_epoch=max_epoch,
            batches_per_epoch=batches,
            metrics=history_names,
        )
    p = resumed.position if resumed else Position(0)
    world = group.world_size
    sums = p.loss_sums if len(p.loss_sums) == world else [p.for_rank(r, world).loss_sum for r in range(world)]
    found, epoch, step, samples, seconds, wait, *sums = distributed.broadcast_floats(
        [resumed is not None, p.epoch, p.step, p.samples, p.seconds, p.wait_seconds, *sums], group
    )
    if found and world > 1:
        scaler = run.precision.scaler
        tensors = (
            state_tensors(run.model, run.optimizer, run.device, scaler)
            if group.is_main
            else empty_state(run.model, run.optimizer, run.device, scaler)
        )
        distributed.broadcast_tensors(tensors, group)
        if not group.is_main:
            restore_state(tensors, model=run.model, optimizer=run.optimizer, device=run.device, scaler=scaler)
    position = Position(int(epoch), int(step), int(samples), tuple(sums), seconds, wait)
    if resumed is None:
        return position, [{}] * position.epoch
    if resumed.machine and resumed.machine != run.shape.machine:
        log.info(
            "resuming on another machine: the checkpoint was made on %s, this run is on %s; its kernels may "
            "round differently, so the results will agree with an uninterrupted run closely, not bit for bit",
            resumed.machine,
            run.shape.machine,
        )
    if resumed.processes != world:
        log.info(
            "elastic resume: the checkpoint was written by %d processes, this run has %d; "
            "the same global batches continue, float sums round differently",
            resumed.processes,
            world,
        )
    at = f"epoch {p.epoch + 1}, step {p.step}" if p.mid_epoch else f"epoch {p.epoch}"
    log.info("resuming %s %s from %s", "in" if p.mid_epoch else "after", at, run.checkpoint_dir)
    return position, list(resumed.history)
