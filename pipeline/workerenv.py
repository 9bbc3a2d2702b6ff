"""Imported first by the data stages' fork server, before Polars: each worker runs Polars on one thread.

The pool (:mod:`pipeline.pool`) already spreads the pieces over every core, one
worker per core; Polars' own thread pool in each worker would only put several
threads on each core (measured in ``bench/notes.md``). A value the user set is kept.
"""

from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "1")
