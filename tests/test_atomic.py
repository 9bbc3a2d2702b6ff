"""atomic_dir: a writer SIGKILLed at any step leaves the old or the new folder complete; the next writer
cleans up.

The kill points are injected by the test into a child process (it wraps the
module's rename steps so the process kills itself right after the k-th one);
the product has no hook for this. Both the RENAME_EXCHANGE swap and the
two-rename fallback (forced in the child) are exercised.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.atomic as atomic
from pipeline.atomic import atomic_dir, exchange
from pipeline.errors import OutputError

ROOT = Path(__file__).resolve().parent.parent
OLD = {"a.bin": b"old a" * 1000, "b.bin": b"old b"}
NEW = {"a.bin": b"new a" * 900, "c.bin": b"new c"}

# Child: write NEW into the target with atomic_dir; die by SIGKILL right after rename step `kill_after`
# (0: before the first step). mode "exchange" uses renameat2; "fallback" pretends it is unsupported.
_CHILD = """
import os, signal, sys
import pipeline.atomic as atomic
target, mode, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = []

def step(fn):
    def wrapped(*args):
        if kill_after == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        result = fn(*args)
        steps.append(fn)
        if len(steps) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if mode == "fallback":
    atomic.exchange = lambda a, b: False
    os.replace = step(os.replace)
else:
    atomic.exchange = step(atomic.exchange)
with atomic.atomic_dir(target) as tmp:
    for name, data in {new!r}.items():
        (tmp / name).write_bytes(data)
print("finished")
"""


def write_folder(path: Path, files: dict[str, bytes]) -> None:
    with atomic_dir(path) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def contents(path: Path) -> dict[str, bytes] | None:
    if not path.is_dir():
        return None
    return {p.name: p.read_bytes() for p in path.iterdir()}


def killed_writer(target: Path, mode: str, kill_after: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CHILD.format(new=NEW), str(target), mode, str(kill_after)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


# (mode, kill after step k, what the target holds right after the kill)
KILLS = [
    ("exchange", 0, OLD),
    ("exchange", 1, NEW),  # swapped; the old folder is left under a temporary name
    ("fallback", 0, OLD),
    ("fallback", 1, None),  # old set aside, new not yet in: no target until the next writer restores it
    ("fallback", 2, NEW),  # new in place; old not yet deleted
]


@pytest.mark.parametrize(
    ("mode", "kill_after", "right_after"), KILLS, ids=[f"{m}-after-step-{k}" for m, k, _ in KILLS]
)
def test_killed_between_the_steps_leaves_old_or_new_and_the_next_writer_cleans_up(
    tmp_path: Path, mode: str, kill_after: int, right_after
) -> None:
    target = tmp_path / "out" / "train"
    write_folder(target, OLD)
    res = killed_writer(target, mode, kill_after)
    assert res.returncode == -signal.SIGKILL and "finished" not in res.stdout, res.stderr
    assert contents(target) == right_after
    leftovers = sorted(p.name for p in target.parent.iterdir() if p.name != "train")
    assert leftovers, "a killed writer leaves its temporary (or the set-aside old folder) behind"
    if right_after is None:  # the old output survives complete beside the target
        assert [contents(target.parent / n) for n in leftovers if ".old-" in n] == [OLD]

    atomic.remove_stale_temporaries(target)  # what the next writer does first
    assert contents(target) == (OLD if right_after is None else right_after)
    assert sorted(p.name for p in target.parent.iterdir()) == ["train"]
    write_folder(target, {"z.bin": b"z"})
    assert contents(target) == {"z.bin": b"z"} and sorted(p.name for p in target.parent.iterdir()) == [
        "train"
    ]


def test_a_completed_writer_swaps_in_the_new_folder_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "train"
    write_folder(target, OLD)
    res = killed_writer(target, "exchange", -1)  # never killed
    assert res.returncode == 0 and "finished" in res.stdout, res.stderr
    assert contents(target) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_rename_exchange_works_on_this_filesystem(tmp_path: Path) -> None:
    """Proves the atomic path, not the fallback, is what runs here (ext4/tmpfs on Linux >= 3.15)."""
    if atomic._renameat2 is None:
        pytest.skip("the C library has no renameat2 (glibc < 2.28): the fallback runs")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_bytes(b"from a")
    b.mkdir()
    (b / "y").write_bytes(b"from b")
    assert exchange(a, b) is True
    assert contents(a) == {"y": b"from b"} and contents(b) == {"x": b"from a"}
    with pytest.raises(FileNotFoundError):
        exchange(a, tmp_path / "missing")


def test_parent_folder_is_fsynced_after_the_swap(tmp_path: Path, monkeypatch) -> None:
    synced: list[Path] = []
    real = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda folder: (synced.append(Path(folder)), real(folder)))
    write_folder(tmp_path / "t", OLD)
    write_folder(tmp_path / "t", NEW)
    assert synced == [tmp_path, tmp_path]
    assert contents(tmp_path / "t") == NEW


# -------------------------------------------------------------------------- atomic_file (CSV, Parquet, plots)

OLD_FILE, NEW_FILE = b"old,csv\n" * 5000, b"new,csv\n" * 4000

# Child: write NEW_FILE into the target with atomic_file, SIGKILLed at `point`.
_FILE_CHILD = """
import os, signal, sys
import pipeline.atomic as atomic
target, point = sys.argv[1], sys.argv[2]
data = {new!r}
real_replace = os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(a, b):
    if point == "before-rename":
        die()
    real_replace(a, b)
    if point == "after-rename":
        die()

os.replace = replace
with atomic.atomic_file(target) as tmp:
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        if point == "mid-write":
            die()
        f.write(data[len(data) // 2 :])
print("finished")
"""

# (kill point, what the target holds right after the kill, whether the temporary is left behind)
FILE_KILLS = [
    ("mid-write", OLD_FILE, True),
    ("before-rename", OLD_FILE, True),
    ("after-rename", NEW_FILE, False),
    ("never", NEW_FILE, False),
]


@pytest.mark.parametrize(("point", "right_after", "leaves_tmp"), FILE_KILLS, ids=[k[0] for k in FILE_KILLS])
def test_atomic_file_killed_at_any_point_leaves_old_or_new_and_the_next_writer_cleans_up(
    tmp_path: Path, point: str, right_after: bytes, leaves_tmp: bool
) -> None:
    target = tmp_path / "csv" / "train.csv"
    atomic.write_bytes_atomic(target, OLD_FILE)
    res = subprocess.run(
        [sys.executable, "-c", _FILE_CHILD.format(new=NEW_FILE), str(target), point],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if point == "never":
        assert res.returncode == 0 and "finished" in res.stdout, res.stderr
    else:
        assert res.returncode == -signal.SIGKILL and "finished" not in res.stdout, res.stderr
    assert target.read_bytes() == right_after
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert bool(leftovers) == leaves_tmp and all(p.name.startswith(".train.csv.tmp-") for p in leftovers)

    atomic.write_bytes_atomic(target, b"z")  # the next writer removes the killed one's temporary first
    assert target.read_bytes() == b"z" and [p.name for p in target.parent.iterdir()] == ["train.csv"]


def test_atomic_file_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "plot.html"
    atomic.write_bytes_atomic(target, OLD_FILE)
    with (
        pytest.raises(OutputError, match=f"^{target}: could not write output"),
        atomic.atomic_file(target) as tmp,
    ):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert target.read_bytes() == OLD_FILE and [p.name for p in tmp_path.iterdir()] == ["plot.html"]


def test_write_behind_starts_writeback_of_a_real_file_and_skips_a_buffer(tmp_path):
    """write_behind (used by write_shard for every chunk) reaches Linux's sync_file_range for a real
    file, and does nothing, without failing, for an in-memory buffer; the bytes are unchanged."""
    import io
    import sys

    from pipeline.atomic import write_behind

    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 100_000)
        started = write_behind(f, 0, 100_000)
    assert started == sys.platform.startswith("linux")
    assert (tmp_path / "f").read_bytes() == b"x" * 100_000
    assert write_behind(io.BytesIO(b"y"), 0, 1) is False
