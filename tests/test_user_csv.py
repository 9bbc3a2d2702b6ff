"""The user's own CSV (data.dataset: csv) is never used stale, and its errors point into the user's file.

dvc.yaml's `csv` stage depends on the folder data/user; the stage refuses a
data.train_csv / data.test_csv outside it (an edit there would go unseen by
DVC), and checks every cell of the user's file itself, so a bad value is
reported against the user's path, line and column name, not against the
canonical copy in data/csv/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import synth

from tests.repo_copy import dvc, make_csv_repo, set_params

ARGS = ("--raw", "raw", "--user", "data/user", "--train", "out/train.csv", "--test", "out/test.csv")


def _stage(tmp_path: Path, train: str, test: str = "data/user/test.csv"):
    if not (tmp_path / "data/user/test.csv").exists():
        synth.write_csv(tmp_path / "data/user/test.csv", synth.split(5, seed=3))
    params = synth.write_params(
        tmp_path / "p.yaml", data={"dataset": "csv", "train_csv": train, "test_csv": test}
    )
    return synth.run_stage("csv", "--params", params, *ARGS, cwd=tmp_path)


def _bad_train(tmp_path: Path, row: int, col: int, cell: str, **kw) -> Path:
    """data/user/train.csv of 6 rows whose data row ``row``, column ``col`` (1-based) reads ``cell``."""
    path = synth.write_csv(tmp_path / "data/user/train.csv", synth.split(6, seed=1), **kw)
    newline = kw.get("newline", "\n").encode()
    lines = path.read_bytes().split(newline)
    cells = lines[row].split(b",")
    cells[col - 1] = cell.encode()
    lines[row] = b",".join(cells)
    path.write_bytes(newline.join(lines))
    return path


@pytest.mark.parametrize(
    "row, col, cell, kw, expected",
    [
        (
            3,
            6,
            "256",
            dict(zero_based=True, newline="\r\n", bom=True),
            "row 3 (line 4), column 6 (pixel4): expected an integer 0..255, found 256",
        ),
        (2, 6, "256", dict(), "row 2 (line 3), column 6 (pixel5): expected an integer 0..255, found 256"),
        (
            5,
            1,
            "65536",
            dict(zero_based=True),
            "row 5 (line 6), column 1 (label): expected an integer 0..65535, found 65536",
        ),
        (
            5,
            1,
            "cat",
            dict(),
            "row 5 (line 6), column 1 (label): expected an integer 0..65535 like the first "
            "row's, found 'cat' (labels must not mix integers and names)",
        ),
        (
            1,
            785,
            "x",
            dict(zero_based=True),
            "row 1 (line 2), column 785 (pixel783): expected an integer 0..255, found 'x'",
        ),
        (
            4,
            300,
            "",
            dict(),
            "row 4 (line 5), column 300 (pixel299): expected an integer 0..255, found an empty cell",
        ),
        (
            6,
            2,
            "-1",
            dict(zero_based=True),
            "row 6 (line 7), column 2 (pixel0): expected an integer 0..255, found -1",
        ),
        (2, 785, "0,0", dict(), "row 2 (line 3): expected 785 values, found 786"),
    ],
    ids=[
        "zero-based-crlf-bom",
        "canonical",
        "label",
        "mixed-label",
        "not-a-number",
        "empty-cell",
        "negative",
        "extra-cell",
    ],
)
def test_bad_cell_is_reported_in_the_users_file_and_words(tmp_path, row, col, cell, kw, expected):
    src = _bad_train(tmp_path, row, col, cell, **kw)
    proc = _stage(tmp_path, "data/user/train.csv")
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr == f"error: data/user/train.csv: {expected}\n"
    assert synth.leftovers(tmp_path / "out") == []
    assert src.exists()


def test_valid_user_csv_passes_the_value_check(tmp_path):
    tr = synth.split(40, seed=4)
    synth.write_csv(tmp_path / "data/user/train.csv", tr, zero_based=True, newline="\r\n")
    proc = _stage(tmp_path, "data/user/train.csv")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/train.csv").read_bytes() == synth.csv_bytes(tr)


def test_labels_past_9_pass_the_value_check(tmp_path):
    """Integer labels are 0..65535 now (a built-in dataset's 0..9 is checked by tensorize)."""
    src = _bad_train(tmp_path, 5, 1, "65535", zero_based=True)
    proc = _stage(tmp_path, "data/user/train.csv")
    assert proc.returncode == 0, proc.stderr
    out = (tmp_path / "out/train.csv").read_bytes()
    assert out.split(b"\n")[5].startswith(b"65535,")
    assert out.split(b"\n", 1)[1] == src.read_bytes().split(b"\n", 1)[1]


def _named(path: Path, names: list[bytes]) -> bytes:
    """``path``'s rows with their labels replaced by ``names``; returns the new content."""
    head, *rows = path.read_bytes().rstrip(b"\n").split(b"\n")
    rows = [name + row[row.index(b",") :] for name, row in zip(names, rows)]
    path.write_bytes(b"\n".join([head, *rows]) + b"\n")
    return path.read_bytes()


def test_class_name_labels_pass_and_an_integer_among_them_is_reported(tmp_path):
    src = synth.write_csv(tmp_path / "data/user/train.csv", synth.split(6, seed=1))
    names = [
        b"Ankle boot",
        b'"boot, ankle"',
        b"cat",
        b"Ankle boot",
        b"dog",
        b"cat",
    ]  # a quoted name may hold a comma
    body = _named(src, names)
    test = synth.write_csv(tmp_path / "data/user/test.csv", synth.split(2, seed=3))
    _named(test, [b"cat", b"dog"])
    proc = _stage(tmp_path, "data/user/train.csv")
    assert proc.returncode == 0, proc.stderr
    assert "(name labels, images [1, 28, 28])" in proc.stdout
    assert (tmp_path / "out/train.csv").read_bytes().split(b"\n", 1)[1] == body.split(b"\n", 1)[1]
    synth.write_csv(src, synth.split(6, seed=1))
    _named(src, [*names[:3], b"4", *names[4:]])
    proc = _stage(tmp_path, "data/user/train.csv")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: data/user/train.csv: row 4 (line 5), column 1 (label): expected a class name "
        "like the first row's, found the integer '4' (labels must not mix integers and names)\n"
    )


def test_a_test_class_name_that_train_lacks_is_refused_at_the_users_line(tmp_path):
    """A class name exists only if train has it; the csv stage names the user's test.csv line,
    not the Parquet row that tensorize would name later. A quoted name is the name it quotes."""
    src = synth.write_csv(tmp_path / "data/user/train.csv", synth.split(4, seed=1))
    _named(src, [b"cat", b'"boot, ankle"', b"dog", b"cat"])
    test = synth.write_csv(tmp_path / "data/user/test.csv", synth.split(4, seed=3))
    _named(test, [b'"cat"', b'"boot, ankle"', b"dog", b"bird"])
    proc = _stage(tmp_path, "data/user/train.csv")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: data/user/test.csv: row 4 (line 5), column 1 (label): class 'bird' has no samples in "
        "data/user/train.csv, whose classes are boot, ankle, cat, dog\n"
    )
    synth.write_csv(test, synth.split(4, seed=3))
    _named(test, [b'"cat"', b'"boot, ankle"', b" dog", b"cat "])  # blanks around a name are not part of it
    proc = _stage(tmp_path, "data/user/train.csv")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("where", ["elsewhere/train.csv", "data/user/../train.csv", "absolute"])
def test_csv_outside_the_tracked_folder_is_refused(tmp_path, where):
    path = tmp_path / "train.csv" if where == "absolute" else tmp_path / where
    synth.write_csv(path, synth.split(4))
    given = str(path) if where == "absolute" else where
    proc = _stage(tmp_path, given)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: {tmp_path / 'p.yaml'}: data.train_csv: {given} is outside data/user/, the folder dvc.yaml "
        "tracks, so dvc repro would not notice when the file changes: copy it to data/user/train.csv and "
        "set data.train_csv: data/user/train.csv\n"
    )
    assert synth.leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("link", ["file", "folder"])
def test_a_symlink_inside_the_tracked_folder_is_named_as_one(tmp_path, link):
    """It used to say "copy it to data/user/link.csv", which is what the user had done (or thought so)."""
    elsewhere = tmp_path / "elsewhere"
    synth.write_csv(elsewhere / "link.csv", synth.split(4))
    (tmp_path / "data/user").mkdir(parents=True)
    if link == "file":
        os.symlink(elsewhere / "link.csv", tmp_path / "data/user/link.csv")
        given, target = "data/user/link.csv", elsewhere / "link.csv"
        fix = f"replace the link by a copy (cp --remove-destination {target} {given})"
    else:
        os.symlink(elsewhere, tmp_path / "data/user/sub")
        given, target = "data/user/sub/link.csv", elsewhere / "link.csv"
        fix = "a folder on its way is a link: make it a real folder under data/user/ holding a copy"
    proc = _stage(tmp_path, given)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: {tmp_path / 'p.yaml'}: data.train_csv: {given} is a symbolic link to {target}, "
        "outside data/user/, "
        f"the folder dvc.yaml tracks, so dvc repro would not notice when that file changes: {fix}\n"
    )
    assert synth.leftovers(tmp_path / "out") == []


def test_an_image_folder_of_one_class_is_refused_by_the_csv_stage(tmp_path):
    """train/all/*.png is a layout mistake: the first stage says so, before any image is decoded."""
    from PIL import Image

    (tmp_path / "data/user/images/train/all").mkdir(parents=True)
    for n in range(3):
        Image.new("L", (8, 8), n).save(tmp_path / f"data/user/images/train/all/{n}.png")
    params = synth.write_params(
        tmp_path / "p.yaml", data={"dataset": "images", "images_dir": "data/user/images"}
    )
    proc = synth.run_stage("csv", "--params", params, *ARGS, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: data/user/images/train: holds one class folder, 'all'; expected a folder per class, "
        "at least 2 (train/<class>/<image>)\n"
    )
    assert synth.leftovers(tmp_path / "out") == []
    (tmp_path / "data/user/images/train/other").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "data/user/images/train/other/0.png")
    proc = synth.run_stage("csv", "--params", params, *ARGS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("where", ["elsewhere", "data/user/link"])
def test_an_image_folder_outside_the_tracked_folder_is_refused(tmp_path, where):
    """dvc.yaml tracks data/user: images added elsewhere would not rerun the data stages."""
    from PIL import Image

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "train" / "cat").mkdir(parents=True)
    Image.new("L", (8, 8)).save(elsewhere / "train" / "cat" / "a.png")
    if where != "elsewhere":
        (tmp_path / "data/user").mkdir(parents=True)
        os.symlink(elsewhere, tmp_path / where)
    params = synth.write_params(tmp_path / "p.yaml", data={"dataset": "images", "images_dir": where})
    proc = synth.run_stage("csv", "--params", params, *ARGS, cwd=tmp_path)
    assert proc.returncode == 2
    head = f"error: {params}: data.images_dir: {where} is "
    if where == "elsewhere":
        expected = (
            f"{head}outside data/user/, the folder dvc.yaml tracks, so dvc repro would not notice when "
            "the folder changes: copy it to data/user/elsewhere and set "
            "data.images_dir: data/user/elsewhere\n"
        )
    else:
        expected = (
            f"{head}a symbolic link to {elsewhere}, outside data/user/, the folder dvc.yaml tracks, so dvc "
            f"repro would not notice when that folder changes: replace the link by a copy "
            f"(rm {where} && cp -r {elsewhere} {where})\n"
        )
    assert proc.stderr == expected
    assert synth.leftovers(tmp_path / "out") == []


def test_dvc_reruns_csv_when_the_user_edits_the_file_and_refuses_one_elsewhere(tmp_path):
    repo = make_csv_repo(tmp_path, n_train=20, n_test=10)
    dvc(repo, "repro", "csv")
    before = (repo / "data/csv/train.csv").read_bytes()
    user = repo / "data/user/train.csv"
    user.write_bytes(user.read_bytes() + synth.row_line(7, [9] * 784).encode() + b"\n")
    res = dvc(repo, "repro", "csv")
    assert "Running stage 'csv'" in res.stdout
    after = (repo / "data/csv/train.csv").read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1

    outside = tmp_path / "mine.csv"
    outside.write_bytes(user.read_bytes())
    set_params(repo, **{"data.train_csv": str(outside)})
    res = dvc(repo, "repro", "csv", check=False)
    assert res.returncode != 0
    assert f"data.train_csv: {outside} is outside data/user/" in res.stdout + res.stderr
