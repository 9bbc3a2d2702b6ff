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
import sys
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
        main(argv)
    except PipelineError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
