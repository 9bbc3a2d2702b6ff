"""What every stage entry point shares: argument parsing and turning errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import PipelineError

EXIT_USER_ERROR = 2


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the ``--params`` option every stage takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run_stage(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main``; a PipelineError becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
