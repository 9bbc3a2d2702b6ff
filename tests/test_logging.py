"""Messages go through ``logging``; a stage run configures one handler that writes them as one line each."""

from __future__ import annotations

import logging
import subprocess
import sys

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
