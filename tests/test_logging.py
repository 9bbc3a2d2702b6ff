"""Messages go through ``logging``; a stage run configures one handler that writes them as one line each."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import configure_logging, run_stage
from pipeline.errors import DataError


@pytest.fixture
def restore_loggers():
    """configure_logging changes process-wide state; put the two package loggers back afterwards."""
    saved = {
        name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers))
        for name in ("pipeline", "trainer")
    }
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_one_handler_writes_one_line_per_record_with_todays_prefixes(restore_loggers, capsys) -> None:
    first = configure_logging()
    assert configure_logging() is first  # idempotent: a second call adds nothing
    for name in ("pipeline", "trainer"):
        assert logging.getLogger(name).handlers.count(first) == 1
    logging.getLogger("trainer.loader").info("loader.pin_memory ignored: %s", "cpu")
    logging.getLogger("trainer.stream").warning("a child module's logger goes through the same handler")
    logging.getLogger("pipeline").error("bad input")
    logging.getLogger("pipeline.tensorize").debug("not shown at the default level")
    assert capsys.readouterr().err == (
        "notice: loader.pin_memory ignored: cpu\n"
        "warning: a child module's logger goes through the same handler\n"
        "error: bad input\n"
    )


def test_run_stage_turns_a_pipeline_error_into_one_error_line(restore_loggers, capsys, caplog) -> None:
    def main(_argv):
        logging.getLogger("pipeline.stage").info("working")
        raise DataError("data.csv: row 3: expected 785 columns, found 2")

    with pytest.raises(SystemExit) as exc:
        run_stage(main, [])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "notice: working\nerror: data.csv: row 3: expected 785 columns, found 2\n"
    )
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.ERROR]  # and they still propagate


def test_a_stage_process_writes_notices_on_stderr() -> None:
    code = (
        "import logging\n"
        "from pipeline.cli import run_stage\n"
        "run_stage(lambda argv: logging.getLogger('trainer.run').info('resuming after epoch 1'), [])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (res.stdout, res.stderr) == ("", "notice: resuming after epoch 1\n")


def _stage_started_with_slow_torch(tmp_path: Path, ignore_ctrl_c: bool = False) -> subprocess.Popen:
    """``python -m stages.train`` whose ``import torch`` (a stand-in on PYTHONPATH) says so on stdout
    and then takes a minute: Ctrl-C during a stage's imports, every time."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "print('importing torch', flush=True)\nimport time\ntime.sleep(60)\n"
    )
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--train", "x", "--test", "y"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_ctrl_c else None,
    )


def test_ctrl_c_while_a_stage_imports_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """Before ``run_stage`` takes over, a stage imports PyTorch or Polars for up to seconds: Ctrl-C there
    used to print the traceback of whatever module was loading (``stages/__init__.py``)."""
    proc = _stage_started_with_slow_torch(tmp_path)
    try:
        assert proc.stdout.readline() == "importing torch\n"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert (proc.returncode, err) == (130, "error: interrupted\n"), err


def test_an_ignored_ctrl_c_stays_ignored_while_a_stage_imports(tmp_path: Path) -> None:
    """A stage started with SIGINT ignored (a background job of a script) is not made to take it."""
    proc = _stage_started_with_slow_torch(tmp_path, ignore_ctrl_c=True)
    try:
        assert proc.stdout.readline() == "importing torch\n"
        os.killpg(proc.pid, signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)  # still importing
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_ctrl_c_raised_inside_an_exec_still_exits_130(tmp_path: Path) -> None:
    """A KeyboardInterrupt out of an ``exec`` of a string (a dataclass being made during an import)
    used to leave ``python -m`` to kill itself with SIGINT at exit: status -2 instead of 130."""
    (tmp_path / "interrupted_stage.py").write_text(
        "from pipeline.cli import run_stage\nrun_stage(lambda argv: exec('raise KeyboardInterrupt'), [])\n"
    )
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-m", "interrupted_stage"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (res.returncode, res.stderr) == (130, "error: interrupted\n"), res.stderr
