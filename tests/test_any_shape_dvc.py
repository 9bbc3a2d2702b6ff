"""`dvc repro` on data of several shapes and sources in one temporary repo: the pipeline follows the data."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.repo_copy import copy_repo, dvc, run, set_params

pytestmark = pytest.mark.slow


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def write_csv(
    path: Path, n: int, shape: tuple[int, int, int], labels: list, names: list[str], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, int(np.prod(shape))))
    lines = [",".join(["label", *names])] + [
        ",".join(map(str, [lab, *row])) for lab, row in zip(labels, pixels.tolist())
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_images(root: Path, per_class: int) -> None:
    """PNG and JPEG files, grey and RGB, of two sizes: data.image_shape converts them all."""
    rng = np.random.default_rng(5)
    for split, count in (("train", per_class), ("test", 3)):
        for k, name in enumerate(["cat", "dog", "hot dog"]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = (12, 10) if i % 2 else (16, 16)
                array = np.clip(rng.normal(60 + 70 * k, 20, (*size[::-1], 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(array, "RGB")
                if i % 3 == 0:
                    image.convert("L").save(folder / f"{i:03d}.png")
                else:
                    image.save(folder / f"{i:03d}.jpg", quality=90)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return _new_repo(tmp_path_factory.mktemp("shapes"))


@pytest.fixture
def fresh_repo(tmp_path) -> Path:
    """A repository of the test's own: no outputs and no run-cache entries of other tests."""
    return _new_repo(tmp_path)


def _new_repo(tmp: Path) -> Path:
    repo = copy_repo(tmp / "repo")
    set_params(repo, **{"train.epochs": 1, "loader.batch_size": 64, "prep.shard_size": 128})
    run(["git", "init", "-q"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    return repo


def outputs(repo: Path) -> tuple[dict, dict, dict]:
    model = json.loads((repo / "models/model.json").read_text())
    metrics = json.loads((repo / "dvclive/metrics.json").read_text())
    manifest = json.loads((repo / "data/tensors/train/manifest.json").read_text())
    return model, metrics, manifest


CASES = [
    # name, shape, image_shape param, labels, column names, test file?, val_fraction
    ("1x8x8-kaggle-names", (1, 8, 8), None, "int", [f"pixel{i}" for i in range(64)], True, 0.0),
    (
        "3x32x32-held-out-test-and-val",
        (3, 32, 32),
        [3, 32, 32],
        "int",
        [f"c{i}" for i in range(3072)],
        False,
        0.2,
    ),
    ("3x17x23", (3, 17, 23), [3, 17, 23], "int", [f"v{i}" for i in range(1173)], True, 0.0),
    ("1x28x28-class-names", (1, 28, 28), None, "name", [f"pixel{i}" for i in range(1, 785)], True, 0.0),
]


@pytest.mark.parametrize("name, shape, param, kind, columns, has_test, val", CASES, ids=[c[0] for c in CASES])
def test_csv_of_any_shape_through_dvc_repro(repo, name, shape, param, kind, columns, has_test, val):
    classes = ["trouser", "bag", "coat"] if kind == "name" else [0, 1, 2, 3]
    labels = [classes[i % len(classes)] for i in range(240)]
    write_csv(repo / "data/user/train.csv", 240, shape, labels, columns, seed=len(name))
    if has_test:
        write_csv(repo / "data/user/test.csv", 60, shape, labels[:60], columns, seed=len(name) + 1)
    set_params(
        repo,
        **{
            "data.dataset": "csv",
            "data.image_shape": param,
            "data.test_csv": "data/user/test.csv" if has_test else None,
            "data.val_fraction": val,
        },
    )
    dvc(repo, "repro")
    model, metrics, manifest = outputs(repo)
    assert model["input_shape"] == list(shape) and manifest["image_shape"] == list(shape)
    names = sorted(classes) if kind == "name" else [str(c) for c in classes]
    assert model["class_names"] == names == manifest["class_names"]
    assert ("val_acc" in metrics) == (val > 0) and 0 <= metrics["test_acc"] <= 1
    test = json.loads((repo / "data/tensors/test/manifest.json").read_text())
    assert test["num_samples"] == (60 if has_test else pytest.approx(24, abs=14))


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "dvc-add"])
def test_image_folder_through_dvc_repro_and_an_added_image_reruns_only_data_stages(fresh_repo, tracked):
    """Also with the folder tracked by `dvc add` (docs/data.md, sharing your data): it is gitignored."""
    repo = fresh_repo
    write_images(repo / "data/user/images", per_class=20)
    assert run(["git", "check-ignore", "-q", "data/user/images"], repo).returncode == 0
    if tracked:
        dvc(repo, "add", "data/user/images")
    set_params(
        repo,
        **{
            "data.dataset": "images",
            "data.image_shape": [3, 16, 16],
            "data.val_fraction": 0.0,
            "data.test_csv": "data/user/test.csv",
        },
    )
    dvc(repo, "repro")
    model, metrics, manifest = outputs(repo)
    assert model["class_names"] == ["cat", "dog", "hot dog"] and model["input_shape"] == [3, 16, 16]
    assert manifest["class_counts"] == [20, 20, 20] and "test_acc" in metrics
    assert dvc(repo, "status", "--json").stdout.strip() in ("{}", "")
    # DVC does not see an empty folder: an empty class folder reruns nothing (docs/data.md)
    (repo / "data/user/images/train/empty").mkdir()
    assert dvc(repo, "status", "--json").stdout.strip() in ("{}", "")
    (repo / "data/user/images/train/empty").rmdir()

    shutil.copy(repo / "data/user/images/train/dog/001.jpg", repo / "data/user/images/train/dog/new.jpg")
    if tracked:
        dvc(repo, "add", "data/user/images")
    again = dvc(repo, "repro")
    assert {"csv", "parquet", "tensorize"} <= ran(again.stdout) and "download" not in ran(again.stdout)
    assert json.loads((repo / "data/tensors/train/manifest.json").read_text())["class_counts"] == [20, 21, 20]
