"""The project's own error types.

Every problem a user can fix (bad params, bad input files, unreachable mirrors,
tampered shards) is raised as a ``PipelineError`` whose message says what was
wrong and where; the stage runner prints it without a traceback and exits 2.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem in configuration, input data or environment, explained for a person."""


class ParamsError(PipelineError):
    """A params.yaml key is unknown, of the wrong type or out of range."""


class DataError(PipelineError):
    """Input data (IDX, CSV, Parquet) does not match the expected format."""


class DownloadError(PipelineError):
    """No source could deliver a verified file."""


class ShardError(PipelineError):
    """A tensor shard or its manifest is malformed, tampered with or inconsistent."""


class OutputError(PipelineError):
    """An output could not be written (disk full, permissions); nothing partial was left."""
