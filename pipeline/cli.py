"""What every stage entry point shares: argument parsing, one-line messages and errors as exit codes.

The library reports through :mod:`logging` (one logger per package, ``pipeline``
and ``trainer``, and ``getLogger(__name__)`` children of them); it never
configures logging itself. A stage run from the command line does, through
:func:`configure_logging`: one handler on both package loggers that writes each
record as one line on stderr, ``notice: …`` (info), ``warning: …`` or
``error: …``, the format scripts and tests match.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from pipeline.errors import PipelineError

EXIT_USER_ERROR = 2
PACKAGES = ("pipeline", "trainer")  # the loggers the stages configure; modules log to children of them
PREFIXES = {logging.DEBUG: "debug", logging.INFO: "notice", logging.WARNING: "warning"}

log = logging.getLogger(__name__)


class OneLineFormatter(logging.Formatter):
    """``notice: message`` for info, ``warning: message``, ``error: message`` for errors and worse."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "error" if record.levelno >= logging.ERROR else PREFIXES.get(record.levelno, "notice")
        return f"{prefix}: {record.getMessage()}"


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (pytest and callers may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # logging's contract: a failing handler reports, never raises into the caller
            self.handleError(record)


_HANDLER = StderrHandler()
_HANDLER.setFormatter(OneLineFormatter())


def configure_logging(level: int = logging.INFO) -> logging.Handler:
    """Give the ``pipeline`` and ``trainer`` loggers the one stderr handler; idempotent.

    Records still propagate, so a handler the caller put on the root logger
    (pytest's ``caplog`` among them) sees them too.

    Args:
        level: the least severe level written (INFO: notices, warnings and errors).

    Returns:
        The handler, shared by both loggers and by every call.
    """
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.setLevel(level)
    return _HANDLER


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the ``--params`` option every stage takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def _take_ctrl_c() -> None:
    """Python's own SIGINT handler from here on, so that Ctrl-C is a KeyboardInterrupt that
    :func:`run_stage` reports (``stages/__init__.py`` sets a plainer one for a stage's imports). An
    ignored SIGINT (a background job's) stays ignored; only the main thread sets handlers."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) != signal.SIG_IGN
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _forget_an_interrupted_exec() -> None:
    """Let the exit status be 130 after a Ctrl-C that was raised inside an ``exec`` of a string.

    CPython (3.11 to 3.13) marks a KeyboardInterrupt that leaves such an ``exec`` (dataclasses and
    namedtuples build their methods so, and a stage imports modules that make them) as unhandled,
    even once it is caught, and a ``python -m`` process so marked kills itself with SIGINT at exit:
    status -2, not 130. Every ``exec`` of a string clears the mark as it starts; this one does only that.
    """
    exec("")  # runs nothing; starting is what clears the mark


def run_stage(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main`` with logging configured; a PipelineError becomes one line and exit code 2.

    Args:
        main: the stage's entry point, called with ``argv``.
        argv: the arguments (None: ``sys.argv[1:]``, as argparse reads them).

    Raises:
        SystemExit: code 2 after a :class:`~pipeline.errors.PipelineError` (the ``error:`` line is
            on stderr), 130 after Ctrl-C.
    """
    configure_logging()
    try:
        _take_ctrl_c()
        main(argv)
    except PipelineError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        log.error("interrupted")
        _forget_an_interrupted_exec()
        sys.exit(130)
