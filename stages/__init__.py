"""The DVC stages' entry points, run as ``python -m stages.<name>`` (``dvc.yaml`` names each).

A stage's own modules import Polars, pydantic or PyTorch before ``pipeline.cli.run_stage`` takes
over, and Ctrl-C during those imports (up to a second or two for PyTorch) would print a traceback
of whatever module was loading. Run as a stage, this package is imported first, and until
``run_stage`` restores Python's own handler, Ctrl-C ends the process with the same one line
(``error: interrupted``, exit 130). Nothing has been written by then. Imported any other way (the
tests import the stages' ``main``), it changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(_signum: int, _frame: object) -> None:
    os.write(2, b"error: interrupted\n")
    os._exit(130)


def _run_as_a_stage() -> bool:
    """Whether this interpreter was started as ``python [options] -m stages.<name>``."""
    argv = sys.orig_argv
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith(f"{__name__}.")


if _run_as_a_stage() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored
    signal.signal(signal.SIGINT, _interrupted_while_starting)
