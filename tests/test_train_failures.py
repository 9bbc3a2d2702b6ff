"""Every failure to write in the train stage is one line and exit 2, naming the path, nothing half-written.

Real failures, no mocks: ``RLIMIT_FSIZE`` makes every write past 1 MiB fail
with EFBIG, as a full disk fails (the checkpoint, about 2.5 MB, cannot be
written; the model, 0.8 MB, can; at 512 KiB neither can); a regular file
where a folder's parent should be makes creating it fail with ENOTDIR (which,
unlike a read-only folder, also fails for root).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_train_stage import (
    MODEL_METRICS,
    children,
    confusion_file,
    history,
    run_train,
    run_until_killed,
    same_as_baseline,
    stage_cmd,
    stage_env,
    start_logged,
    wait_for_output,
    write_params,
)
from trainer.lock import LOCK_HELD_ENV, CheckpointBusy, checkpoint_lock, lock_path


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _stage(
    data: Path, work: Path, params: Path, *, limit: int | None = None, env: dict | None = None, **paths: Path
) -> subprocess.CompletedProcess:
    cmd = stage_cmd(data, work, params)
    for option, path in paths.items():
        cmd[cmd.index(f"--{option}") + 1] = str(path)
    return subprocess.run(
        cmd,
        cwd=work,
        env={**stage_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(limit) if limit else None,
    )


def _one_error_line(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and res.stderr.endswith(errors[0] + "\n"), res.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_checkpoints_that_cannot_be_written_are_warnings_and_training_goes_on(
    data: Path, baseline, tmp_path: Path
) -> None:
    work0, _ = baseline
    res = _stage(data, tmp_path, write_params(tmp_path / "params.yaml"), limit=1 << 20)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert (
        len(warnings) == 1
        and warnings[0].startswith(f"warning: {tmp_path / 'checkpoints'}: checkpoint not written (")
        and "File too large" in warnings[0]
    ), res.stderr
    assert warnings[0].endswith("); training goes on"), res.stderr
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.glob(".checkpoints.tmp-*"))
    same_as_baseline(work0, tmp_path)


def test_model_on_a_full_disk_is_one_line_and_nothing_half_written(data: Path, tmp_path: Path) -> None:
    res = _stage(data, tmp_path, write_params(tmp_path / "params.yaml"), limit=512 << 10)
    _one_error_line(res, f"{tmp_path / 'models'}: could not write the model (", "nothing was left behind")
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".models") or p.name == "models") == []
    )


def test_model_folder_that_cannot_be_made_keeps_the_trained_state(
    data: Path, baseline, tmp_path: Path
) -> None:
    """With one epoch the whole run was lost; now a rerun resumes at the end and only writes the model."""
    work0, _ = baseline
    params = write_params(tmp_path / "params.yaml")
    (tmp_path / "blocked").write_text("a file where the model's parent folder should be")
    res = _stage(data, tmp_path, params, model=tmp_path / "blocked" / "models")
    _one_error_line(
        res,
        f"{tmp_path / 'blocked' / 'models'}: could not write the model (",
        f"the trained state is in {tmp_path / 'checkpoints'}: a rerun only writes the model",
    )
    assert json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["epoch"] == 2

    (tmp_path / "blocked").unlink()
    rerun = _stage(data, tmp_path, params, model=tmp_path / "blocked" / "models")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming after epoch 2" in rerun.stderr and "epoch 1/2" not in rerun.stdout
    assert (work0 / "models" / "model.safetensors").read_bytes() == (
        tmp_path / "blocked" / "models" / "model.safetensors"
    ).read_bytes()
    a, b = history(work0), history(tmp_path)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    # No epoch ran: the confusion matrix comes from a test pass of its own, as the last epoch's counted it.
    assert confusion_file(work0) == confusion_file(tmp_path)


def test_live_folder_that_cannot_be_written_fails_before_training(data: Path, tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("")
    res = _stage(
        data, tmp_path, write_params(tmp_path / "params.yaml"), live=tmp_path / "blocked" / "dvclive"
    )
    _one_error_line(res, f"{tmp_path / 'blocked' / 'dvclive'}: could not write the DVCLive logs (")
    assert "epoch 1/2" not in res.stdout and not (tmp_path / "models").exists()


def test_checkpoint_lock_that_cannot_be_created_is_one_line(data: Path, tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("")
    res = _stage(
        data,
        tmp_path,
        write_params(tmp_path / "params.yaml"),
        checkpoints=tmp_path / "blocked" / "checkpoints",
    )
    _one_error_line(res, f"{tmp_path / 'blocked'}", "cannot create the checkpoint lock (")
    assert not (tmp_path / "models").exists()


def test_the_lock_cannot_be_bypassed_by_its_environment_variable(data: Path, tmp_path: Path) -> None:
    with checkpoint_lock(tmp_path / "checkpoints") as token:
        # What the variable used to hold: "1" was enough for a second training to skip the lock.
        res = _stage(data, tmp_path, write_params(tmp_path / "params.yaml"), env={LOCK_HELD_ENV: "1"})
        _one_error_line(res, "another training is running on this checkpoint folder")
        for forged in ("0" * 32, token[::-1]):
            with pytest.raises(CheckpointBusy), checkpoint_lock(tmp_path / "checkpoints", token=forged):
                pass
        with checkpoint_lock(
            tmp_path / "checkpoints", token=token
        ) as held:  # a launched rank: its launcher's
            assert held == token
    assert not (tmp_path / "models").exists()
    with checkpoint_lock(
        tmp_path / "checkpoints", token=token
    ) as fresh:  # not held: taken, under a new token
        assert fresh != token


def test_a_symlinked_checkpoint_path_takes_the_same_lock(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert lock_path(tmp_path / "link" / "checkpoints") == lock_path(tmp_path / "real" / "checkpoints")
    with (
        checkpoint_lock(tmp_path / "real" / "checkpoints"),
        pytest.raises(CheckpointBusy),
        checkpoint_lock(tmp_path / "link" / "checkpoints"),
    ):
        pass


def test_a_checkpoint_folder_that_is_a_symbolic_link_stays_one(data: Path, baseline, tmp_path: Path) -> None:
    """Checkpoints put on another disk through a link: each is written where the link points, the link
    stays (replacing the folder used to replace the link, and move the lock with it), the run resumes
    from there and ends as the uninterrupted one."""
    work0, _ = baseline
    scratch = tmp_path / "scratch" / "ck"
    scratch.parent.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(scratch, work / "checkpoints")  # dangling until the first checkpoint
    params = write_params(work / "params.yaml", loader={"num_workers": 0})
    run_until_killed(data, work, params, "trainer.epoch.write_checkpoint", 1)
    assert (work / "checkpoints").is_symlink() and (scratch / "checkpoint.json").exists()
    with checkpoint_lock(scratch), pytest.raises(CheckpointBusy), checkpoint_lock(work / "checkpoints"):
        pass
    res = run_train(data, work, params)
    assert res.returncode == 0, res.stderr
    assert "resuming after epoch 1" in res.stderr
    assert (work / "checkpoints").is_symlink() and not scratch.exists()  # dropped after the run, link kept
    same_as_baseline(work0, work)


def test_ctrl_c_with_loader_workers_is_one_line_and_exit_130(data: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group, loader workers included: the stage says so in one line;
    each worker used to add a KeyboardInterrupt traceback of its own."""
    params = write_params(
        tmp_path / "params.yaml",
        loader={"num_workers": 2, "persistent_workers": True},  # alive between epochs too
        train={"epochs": 10_000, "checkpoint_every": 0, "checkpoint_seconds": None},
    )
    log = tmp_path / "run.log"
    # In a process group of its own, as a terminal's foreground job is.
    proc = start_logged(data, tmp_path, params, log, start_new_session=True)
    try:
        wait_for_output(proc, log, "epoch 2/")
        deadline = time.monotonic() + 60
        while len(children(proc.pid)) < 2:  # both forked workers are there to receive the SIGINT
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.endswith("error: interrupted\n"), text
