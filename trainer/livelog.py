"""DVCLive for the train stage: replay the history, log one row per epoch, every failure one line.

DVCLive is always opened with ``resume=False`` and the history replayed: DVC
deletes a stage's metrics and plots before rerunning it, and a killed run may
have logged epochs past its last checkpoint, so the checkpoint (not whatever
is left in ``dvclive/``) is the record the logs must agree with. The result has
exactly one row per epoch in every ``dvclive/plots/metrics/*.tsv``. At the end the
final model's confusion matrix on the test split is written beside them, in
``dvclive/plots/custom/confusion_matrix.json``.

A folder that cannot be written (read-only, disk full, a file in the way) is
an :class:`~pipeline.errors.OutputError` naming it, not DVCLive's traceback;
it is found when the folder is opened, before the first step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.errors import OutputError

CONFUSION = "confusion_matrix"  # <live_dir>/plots/custom/confusion_matrix.json, a DVCLive custom plot


@contextlib.contextmanager
def _writing(live_dir: Path | str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{live_dir}: could not write the DVCLive logs ({exc.strerror or exc})") from None


class LiveLog:
    """Rank 0's DVCLive folder, rebuilt from ``history`` (entries with exactly ``metrics``)."""

    def __init__(
        self, live_dir: Path | str, metrics: Sequence[str], history: Sequence[dict[str, float]]
    ) -> None:
        # Imported here, by rank 0 once it logs: DVCLive brings DVC and pandas (0.4 s of imports), which
        # the other ranks, and a run refused before its first epoch, never need.
        from dvclive import Live

        self.live_dir = live_dir
        self.metrics = tuple(metrics)
        with _writing(live_dir):
            self.live = Live(dir=str(live_dir), resume=False, dvcyaml=False, save_dvc_exp=False, report=None)
        for entry in history:
            self.log(entry)

    def log(self, entry: dict[str, float]) -> None:
        with _writing(self.live_dir):
            for name in self.metrics:
                value = entry[name]
                self.live.log_metric(
                    name, int(value) if name == "processes" else value
                )  # a count, also resumed
            self.live.next_step()

    def confusion(self, counts: Sequence[Sequence[int]] | None, class_names: Sequence[str]) -> None:
        """Write the test split's confusion matrix (:data:`CONFUSION`): one row per cell, ``{actual,
        predicted, count}`` by class name, every pair of classes in class order, so the file grows
        with the classes, not the test split, and depends on the counts alone, never on the loader.
        ``.dvc/plots/confusion_counts.json``, DVC's ``confusion`` template made to sum ``count``,
        draws it. ``None`` (too many classes to draw) writes no rows: the file is a declared output
        of the stage, so it is written either way."""
        rows = [
            {"actual": name, "predicted": as_name, "count": n}
            for row, name in zip(counts or [], class_names)
            for n, as_name in zip(row, class_names)
        ]
        with _writing(self.live_dir):
            self.live.log_plot(CONFUSION, rows, x="actual", y="predicted", template="confusion_counts")

    def end(self) -> None:
        with _writing(self.live_dir):
            self.live.end()
