"""``python -m stages.train`` end to end on tiny generated shards, as real processes.

One baseline run (num_workers 0; the ``baseline`` fixture in conftest.py) is
shared: the loader-settings run, the killed-and-resumed run must reproduce its
results bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import run_stage
from pipeline.normalize import make_normalization
from pipeline.tensorize import write_split
from stages.train import main
from tests.test_trainer import make_split
from trainer.data import ShardDataset
from trainer.export import load_model
from trainer.loop import evaluate
from trainer.run import MACHINE_METRICS, METRICS, VAL_METRICS
from trainer.verify import validate_split

ROOT = Path(__file__).resolve().parent.parent
MODEL_METRICS = [m for m in METRICS if m not in MACHINE_METRICS]


def write_params(path: Path, loader: dict | None = None, train: dict | None = None) -> Path:
    doc = {"loader": {"batch_size": 64, **(loader or {})}, "train": {"epochs": 2, **(train or {})}}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def train_argv(data: Path, work: Path, params: Path) -> list[str]:
    return [
        "--params",
        str(params),
        "--train",
        str(data / "train"),
        "--test",
        str(data / "test"),
        "--model",
        str(work / "models"),
        "--checkpoints",
        str(work / "checkpoints"),
        "--live",
        str(work / "dvclive"),
    ]


def stage_cmd(data: Path, work: Path, params: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train", *train_argv(data, work, params)]


def stage_env(root: Path = ROOT) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "DVC_NO_ANALYTICS": "1"}


def start_logged(data: Path, work: Path, params: Path, log: Path, **popen: object) -> subprocess.Popen:
    """The train stage started in ``work`` with all its output in ``log`` (read it while it runs)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            stage_cmd(data, work, params), cwd=work, env=stage_env(), stdout=out, stderr=out, **popen
        )


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def wait_for_output(proc: subprocess.Popen, log: Path, text: str, seconds: float = 240) -> None:
    """Until ``text`` appears in ``log``; fails if ``proc`` ends first or it takes ``seconds``."""
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


# The real stage, with one trainer function (``module.name``) wrapped *by the test*: after its n-th
# call the process stops itself (SIGSTOP), so the test can inspect it and SIGKILL it at a known point.
# The product has no hook for this. The function is replaced in its module, so only the calls made
# through that module's globals are counted: the module that calls it, not the one that defines it.
_STOPPER = """
import importlib, os, signal, sys
from pipeline.cli import run_stage
from stages.train import main
function, after = sys.argv[1], int(sys.argv[2])
module_name, name = function.rsplit(".", 1)
module = importlib.import_module(module_name)
real = getattr(module, name)
calls = []
def stop_after(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == after:
        print(f"stopped after {function} #{after}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return result
setattr(module, name, stop_after)
run_stage(main, sys.argv[3:])
"""


def run_until_killed(
    data: Path, work: Path, params: Path, function: str, calls: int, root: Path = ROOT, inspect=lambda: None
) -> None:
    """Run the stage from ``root``'s code; SIGKILL it once ``function`` (``module.name``, e.g.
    ``trainer.epoch.write_checkpoint``) returned ``calls`` times."""
    log = work / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _STOPPER, function, str(calls), *train_argv(data, work, params)],
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=stage_env(root),
        )
    try:
        deadline = time.monotonic() + 240
        while f"stopped after {function} #{calls}" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        inspect()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def run_train(data: Path, work: Path, params: Path) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    # cwd outside any git repo: DVCLive would otherwise look for (or create) a DVC repo there.
    return subprocess.run(
        stage_cmd(data, work, params), cwd=work, env=stage_env(), capture_output=True, text=True, timeout=300
    )


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def history(work: Path, names: tuple[str, ...] = METRICS) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for name in names:
        rows = read_tsv(work / "dvclive" / "plots" / "metrics" / f"{name}.tsv")
        out[name] = [(int(r["step"]), float(r[name])) for r in rows]
    return out


def confusion_file(work: Path) -> bytes:
    return (work / "dvclive" / "plots" / "custom" / "confusion_matrix.json").read_bytes()


def same_as_baseline(work0: Path, work: Path) -> None:
    """``work``'s run ended as the uninterrupted one in ``work0``: one logged row per epoch, none
    duplicated or missing, every model metric as the same float, the same model file."""
    a, b = history(work0), history(work)
    for name in b:
        epochs = list(range(len(a[name])))
        assert [s for s, _ in b[name]] == [s for s, _ in a[name]] == epochs, name
    for name in MODEL_METRICS:
        assert a[name] == b[name], name  # bit-identical floats
    assert (work0 / "models" / "model.safetensors").read_bytes() == (
        work / "models" / "model.safetensors"
    ).read_bytes()
    assert confusion_file(work0) == confusion_file(work)


def test_train_stage_end_to_end(baseline) -> None:
    work, res = baseline
    assert "Traceback" not in res.stderr
    assert (
        res.stderr.count("loader.pin_memory ignored") == 1
    )  # params default true; CPU has nothing to pin for
    summary = json.loads((work / "dvclive" / "metrics.json").read_text())
    assert set(summary) == {*METRICS, "step"} and summary["step"] == 1
    logged = history(work)
    for name in METRICS:
        assert [step for step, _ in logged[name]] == [0, 1], name
        assert summary[name] == logged[name][-1][1]
    assert 0 <= summary["test_acc"] <= 1 and summary["train_loss"] > 0 and summary["peak_memory_mb"] > 0
    assert 0 <= summary["data_wait_fraction"] <= 1 and summary["samples_per_second"] > 0
    assert sorted(p.name for p in (work / "models").iterdir()) == ["model.json", "model.safetensors"]
    _model, config = load_model(work / "models")
    assert config["parameters"] == 206_922 and config["training"]["epochs"] == 2
    assert config["format"] == 2 and config["input_shape"] == [1, 28, 28]
    assert config["class_names"] == [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    assert not any(name.startswith("val_") for name in summary)  # no --val: no validation metrics
    assert not (work / "checkpoints").exists(), "a finished run leaves no checkpoint behind"
    assert sorted(p.name for p in (work / "dvclive").iterdir()) == ["metrics.json", "plots"]


def test_the_confusion_matrix_is_the_final_model_on_the_test_split(data: Path, baseline) -> None:
    """dvclive/plots/custom/confusion_matrix.json: a row {actual, predicted, count} per pair of
    classes, in class order; its diagonal is the logged test_acc, its rows the test split's
    classes, and its cells the exported model's predictions, evaluated here by hand."""
    work, _ = baseline
    cells = json.loads(confusion_file(work))
    names = load_model(work / "models")[1]["class_names"]
    assert [(c["actual"], c["predicted"]) for c in cells] == [(a, p) for a in names for p in names]
    assert all(set(c) == {"actual", "predicted", "count"} for c in cells)
    counts = torch.tensor([c["count"] for c in cells]).reshape(len(names), len(names))
    model, _ = load_model(work / "models")
    dataset = ShardDataset(validate_split(data / "test", expected_split="test"))
    images, labels = dataset[torch.arange(len(dataset))]
    assert counts.sum(dim=1).tolist() == torch.bincount(labels, minlength=len(names)).tolist()
    summary = json.loads((work / "dvclive" / "metrics.json").read_text())
    assert counts.trace().item() == round(summary["test_acc"] * len(labels))
    by_hand = evaluate(
        model, [(images, labels)], torch.device("cpu"), non_blocking=False, confusion_classes=len(names)
    ).confusion
    assert (counts - by_hand).abs().sum() <= 2  # a near-tie may flip in another batch size: one sample moves


@pytest.mark.parametrize("classes", [100, 101])
def test_past_100_classes_the_confusion_matrix_is_left_empty_with_a_notice(
    tmp_path: Path, classes: int
) -> None:
    """10,000 cells at most (CIFAR-100's): DVC's template draws every pair of classes, and a page of
    more would not load. The file is a declared output, so it is written either way."""
    rng = np.random.default_rng(0)
    names = tuple(f"c{i:03d}" for i in range(classes))
    for split, n in (("train", 2 * classes), ("test", classes)):
        labels = np.arange(n) % classes
        write_split(
            [(rng.integers(0, 256, (n, 64), dtype=np.uint8), labels.astype(np.uint16))],
            tmp_path / "data" / split,
            dataset="csv",
            split=split,
            shard_size=1000,
            normalization=make_normalization("unit", None),
            image_shape=(1, 8, 8),
            class_names=names,
        )
    res = run_train(
        tmp_path / "data", tmp_path / "work", write_params(tmp_path / "p.yaml", train={"epochs": 1})
    )
    assert res.returncode == 0, res.stderr
    cells = json.loads(confusion_file(tmp_path / "work"))
    notice = (
        f"notice: {classes} classes: no confusion matrix (more than 100, too many cells to draw); its file "
        "holds no rows\n"
    )
    if classes == 100:
        assert len(cells) == classes**2 and sum(c["count"] for c in cells) == classes
        assert notice not in res.stderr
    else:
        assert cells == [] and notice in res.stderr


def _empty_val(folder: Path) -> Path:
    """A val split without samples, as tensorize writes it when data.val_fraction is 0."""
    make_split(folder, 10, split="val", shard_size=100)
    doc = json.loads((folder / "manifest.json").read_text())
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    doc.update(shards=[], num_samples=0, class_counts=[0] * doc["num_classes"])
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder


def _run_with_val(data: Path, work: Path, val: Path) -> subprocess.CompletedProcess:
    """The stage with ``--val`` (0 loader workers), in ``work``; it must succeed."""
    work.mkdir()
    params = write_params(work / "params.yaml", loader={"num_workers": 0})
    res = subprocess.run(
        [*stage_cmd(data, work, params), "--val", str(val)],
        cwd=work,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return res


def test_val_split_adds_val_metrics_and_changes_nothing_else(data: Path, baseline, tmp_path: Path) -> None:
    """A val split holding the test split's samples: val_* equal test_* every epoch; training is the
    baseline's."""
    work0, _ = baseline
    val = tmp_path / "val"
    make_split(val, 128, split="val", shard_size=100, seed=2)  # the test split's samples
    work = tmp_path / "work"
    res = _run_with_val(data, work, val)
    summary = json.loads((work / "dvclive" / "metrics.json").read_text())
    assert set(summary) == {*METRICS, *VAL_METRICS, "step"}
    logged = history(work, METRICS + VAL_METRICS)
    assert [s for s, _ in logged["val_loss"]] == [s for s, _ in logged["val_acc"]] == [0, 1]
    assert logged["val_loss"] == [(s, v) for s, v in logged["test_loss"]]
    assert logged["val_acc"] == [(s, v) for s, v in logged["test_acc"]]
    assert summary["val_acc"] == logged["val_acc"][-1][1] and 0 <= summary["val_acc"] <= 1
    assert res.stdout.count("val_loss ") == 2 and res.stdout.count("val_acc ") == 2
    a = history(work0)
    for name in MODEL_METRICS:
        assert a[name] == logged[name], name
    assert (work0 / "models" / "model.safetensors").read_bytes() == (
        work / "models" / "model.safetensors"
    ).read_bytes()


def test_val_metrics_are_the_trained_model_on_the_val_split(data: Path, tmp_path: Path) -> None:
    """With a val split of samples of its own, val_* are the exported model evaluated on it by hand, not
    the test split's figures (the test above cannot tell the two apart: its val split is the test's)."""
    val = tmp_path / "val"
    make_split(val, 96, split="val", shard_size=100, seed=3)
    work = tmp_path / "work"
    _run_with_val(data, work, val)
    summary = json.loads((work / "dvclive" / "metrics.json").read_text())
    model, _ = load_model(work / "models")
    dataset = ShardDataset(validate_split(val, expected_split="val"))
    by_hand = evaluate(model, [dataset[torch.arange(len(dataset))]], torch.device("cpu"), non_blocking=False)
    assert by_hand.samples == 96
    assert summary["val_loss"] == pytest.approx(by_hand.loss_sum / 96, rel=1e-5)
    assert abs(summary["val_acc"] * 96 - by_hand.correct) <= 1  # a near-tie may flip in another batch size
    assert summary["val_loss"] != summary["test_loss"]


def test_empty_val_split_logs_no_val_metrics(data: Path, tmp_path: Path) -> None:
    val = _empty_val(tmp_path / "val")
    params = write_params(tmp_path / "params.yaml", train={"epochs": 1})
    res = subprocess.run(
        [*stage_cmd(data, tmp_path, params), "--val", str(val)],
        cwd=tmp_path,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert set(json.loads((tmp_path / "dvclive" / "metrics.json").read_text())) == {*METRICS, "step"}
    assert not list((tmp_path / "dvclive").rglob("val_*")) and "val_loss" not in res.stdout


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda d: d.update(class_names=[f"c{i}" for i in range(10)]), "class_names"),
        (
            lambda d: d.update(
                normalization={"kind": "standard", "mean": [0.5], "std": [0.25], "stats_from": "train"}
            ),
            "normalization",
        ),
    ],
)
def test_val_split_unlike_train_is_refused_before_any_work(
    data: Path, tmp_path: Path, monkeypatch, capsys, change, key
) -> None:
    val = _empty_val(tmp_path / "val")
    doc = json.loads((val / "manifest.json").read_text())
    change(doc)
    (val / "manifest.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exc:
        run_stage(main, [*train_argv(data, tmp_path, params), "--val", str(val)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {val.absolute() / 'manifest.json'}: {key}: expected ")
        and err.count("\n") == 1
    ), err
    assert not any((tmp_path / p).exists() for p in ("models", "checkpoints", "dvclive"))


@pytest.mark.slow
def test_loader_settings_change_speed_never_results(data: Path, baseline, tmp_path: Path) -> None:
    work0, _ = baseline
    loader = {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 3, "pin_memory": True}
    res = run_train(data, tmp_path, write_params(tmp_path / "params.yaml", loader=loader))
    assert res.returncode == 0, res.stderr
    a, b = history(work0), history(tmp_path)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name  # bit-identical floats, every epoch
    assert (work0 / "models" / "model.safetensors").read_bytes() == (
        tmp_path / "models" / "model.safetensors"
    ).read_bytes()
    assert (work0 / "models" / "model.json").read_bytes() == (tmp_path / "models" / "model.json").read_bytes()
    assert confusion_file(work0) == confusion_file(tmp_path)  # ordered by class, never by the loader


@pytest.mark.slow
def test_device_resident_gives_bit_identical_results(data: Path, baseline, tmp_path: Path) -> None:
    work0, _ = baseline
    threads = int(history(work0)["threads"][0][1])  # what the baseline's train.threads null resolved to
    res = run_train(
        data,
        tmp_path,
        write_params(tmp_path / "params.yaml", loader={"device_resident": True}, train={"threads": threads}),
    )
    assert res.returncode == 0, res.stderr
    a, b = history(work0), history(tmp_path)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    assert a["threads"] == b["threads"] == [(0, threads), (1, threads)]  # recorded, every epoch
    assert (work0 / "models" / "model.safetensors").read_bytes() == (
        tmp_path / "models" / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(data: Path, baseline, tmp_path: Path) -> None:
    work0, _ = baseline
    params = write_params(tmp_path / "params.yaml", train={"checkpoint_every": 1})

    def epoch_2_logged_but_checkpoint_is_epoch_1() -> None:
        # The resumed logs must not keep both the logged epoch 2 and the checkpoint's epochs.
        assert json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["epoch"] == 1
        assert [s for s, _ in history(tmp_path)["train_loss"]] == [0, 1]

    run_until_killed(
        data, tmp_path, params, "trainer.run._report", 2, inspect=epoch_2_logged_but_checkpoint_is_epoch_1
    )
    assert not (tmp_path / "models").exists()

    res = run_train(data, tmp_path, params)
    assert res.returncode == 0, res.stderr
    assert "resuming after epoch 1" in res.stderr
    assert res.stdout.count("epoch 2/2") == 1 and "epoch 1/2" not in res.stdout
    a, b = history(work0), history(tmp_path)
    for name in METRICS:
        assert [s for s, _ in b[name]] == [0, 1], name  # no step duplicated or missing
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert summary["step"] == 1 and summary["test_acc"] == a["test_acc"][-1][1]
    assert (work0 / "models" / "model.safetensors").read_bytes() == (
        tmp_path / "models" / "model.safetensors"
    ).read_bytes()
    assert confusion_file(work0) == confusion_file(tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_checkpoint_from_other_code_is_not_resumed(data: Path, baseline, tmp_path: Path) -> None:
    """Killed after epoch 1's checkpoint; one comment added to a train-stage file; the rerun starts at epoch
    1."""
    work0, _ = baseline
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", code / "dvc.yaml")
    for package in ("pipeline", "stages", "trainer"):
        shutil.copytree(ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(work / "params.yaml", train={"checkpoint_every": 1})
    run_until_killed(data, work, params, "trainer.epoch.save_checkpoint", 1, root=code)
    assert json.loads((work / "checkpoints" / "checkpoint.json").read_text())["epoch"] == 1

    with open(code / "trainer" / "loop.py", "a") as f:
        f.write("# a comment is a code change to DVC, so it is one to the checkpoint too\n")
    res = subprocess.run(
        stage_cmd(data, work, params),
        cwd=work,
        env=stage_env(code),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    notices = [line for line in res.stderr.splitlines() if "not resuming" in line]
    assert (
        len(notices) == 1 and "other params, data, code or torch version; training from scratch" in notices[0]
    )
    assert "resuming after" not in res.stderr and "Traceback" not in res.stderr
    assert res.stdout.count("epoch 1/2") == 1 and res.stdout.count("epoch 2/2") == 1
    a, b = history(work0), history(work)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name  # from scratch: the same result as the uninterrupted run


BAD_PARAMS = [
    ({"loader": {"batch_size": 0}}, "loader.batch_size"),
    ({"loader": {"num_workers": -1}}, "loader.num_workers"),
    ({"loader": {"prefetch_factor": 0}}, "loader.prefetch_factor"),
    ({"loader": {"pin_memory": "yes"}}, "loader.pin_memory"),
    ({"loader": {"batchsize": 64}}, "loader.batchsize"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"verify": "maybe"}}, "train.verify"),
    ({"train": {"checkpoint_every": -1}}, "train.checkpoint_every"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"train": {"processes": 0}}, "train.processes"),
    ({"train": {"processes": -1}}, "train.processes"),
    ({"train": {"processes": "two"}}, "train.processes"),
    ({"train": {"max_restarts": -1}}, "train.max_restarts"),
    ({"trian": {"epochs": 1}}, "trian"),
]


@pytest.mark.parametrize(("doc", "key"), BAD_PARAMS, ids=[k for _, k in BAD_PARAMS])
def test_bad_params_are_refused_before_any_work(
    doc: dict, key: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(doc))
    # The data folders do not exist: the params error must come first.
    with pytest.raises(SystemExit) as exc:
        run_stage(main, train_argv(tmp_path / "no-data", tmp_path, params))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_refused(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params.yaml", train={"device": "cuda"})
    with pytest.raises(SystemExit) as exc:
        run_stage(main, train_argv(data, tmp_path, params))
    assert exc.value.code == 2 and "train.device" in capsys.readouterr().err


def test_bad_params_exit_2_without_traceback_as_a_process(data: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("loader:\n  batch_size: 64\ntrain:\n  lr: fast\n")
    res = run_train(data, tmp_path, params)
    assert res.returncode == 2
    assert "train.lr" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "dvclive").exists()
