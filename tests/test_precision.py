"""train.precision: bf16 autocast on the CPU, fp16 refused there, the gradient scaler's state in checkpoints,
a checkpoint of another precision not resumed, and the notice where bf16 is emulated."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import pytest
import torch

from pipeline.cli import run_stage
from pipeline.cpuinfo import cpu_flags, cpu_model
from pipeline.errors import ParamsError
from stages.train import main
from tests.test_train_stage import run_train, run_until_killed, train_argv, write_params
from trainer.checkpoint import SPEED_ONLY, RunShape, load_checkpoint, save_checkpoint
from trainer.loop import evaluate
from trainer.model import SimpleCNN
from trainer.position import Position
from trainer.precision import (
    BF16_GAIN,
    Precision,
    bf16_cpu_notice,
    machine,
    make_precision,
    matmul_rates,
    native_bf16,
)

CPU = torch.device("cpu")


def test_fp16_on_the_cpu_is_refused_in_one_line_before_any_work(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    with pytest.raises(
        ParamsError, match=r"^train\.precision: fp16 needs a CUDA device, found cpu; use bf16 or fp32$"
    ):
        make_precision("fp16", CPU)
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params.yaml", train={"device": "cpu", "precision": "fp16"})
    with pytest.raises(SystemExit) as exc:
        run_stage(main, train_argv(data, tmp_path, params))
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err == "error: train.precision: fp16 needs a CUDA device, found cpu; use bf16 or fp32\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_bf16_autocasts_forward_and_evaluation_and_keeps_the_loss_float32() -> None:
    torch.manual_seed(0)
    model = SimpleCNN(1, 8, 8, 3)
    images, labels = torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))
    bf16 = make_precision("bf16", CPU)
    with bf16.autocast():
        assert model(images).dtype == torch.bfloat16
    with make_precision("fp32", CPU).autocast():
        assert model(images).dtype == torch.float32
    plain = evaluate(model, [(images, labels)], CPU, non_blocking=False)
    autocast = evaluate(model, [(images, labels)], CPU, non_blocking=False, precision=bf16)
    assert (
        plain.loss_sum != autocast.loss_sum
        and abs(plain.loss_sum - autocast.loss_sum) < 0.05 * plain.loss_sum
    )


def test_bf16_training_differs_from_fp32_and_a_checkpoint_of_another_precision_is_not_resumed(
    data: Path, tmp_path: Path
) -> None:
    assert "train.precision" not in SPEED_ONLY
    params = write_params(tmp_path / "fp32.yaml", train={"checkpoint_every": 1})
    run_until_killed(data, tmp_path, params, "trainer.epoch.save_checkpoint", 1)
    assert json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["epoch"] == 1
    res = run_train(
        data,
        tmp_path,
        write_params(tmp_path / "bf16.yaml", train={"checkpoint_every": 1, "precision": "bf16"}),
    )
    assert res.returncode == 0, res.stderr
    notices = [line for line in res.stderr.splitlines() if "not resuming" in line]
    assert len(notices) == 1 and "other params" in notices[0], res.stderr
    assert res.stdout.count("epoch 1/2") == 1 and res.stdout.count("epoch 2/2") == 1
    fp32 = (tmp_path / "killed.log").read_text()  # the killed fp32 run reported epoch 1 before its checkpoint
    first = [line.split("  ")[0] for line in (res.stdout + fp32).splitlines() if line.startswith("epoch 1/2")]
    assert len(first) == 2 and first[0] != first[1]  # bf16's train loss is not fp32's


def _stepped_scaler() -> torch.amp.GradScaler:
    """A CPU GradScaler moved off its initial state: one backoff (inf gradient), then two good steps."""
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=5)
    for value in (float("inf"), 1.0, 1.0):
        optimizer.zero_grad()
        scaler.scale(model(torch.full((1, 3), value)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return scaler


def test_the_gradient_scaler_state_is_checkpointed_and_restored(tmp_path: Path, caplog) -> None:
    scaler = _stepped_scaler()
    assert scaler.get_scale() == 512.0 and scaler._get_growth_tracker() == 2
    torch.manual_seed(0)
    model = SimpleCNN(1, 8, 8, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()  # a checkpoint holds Adam's state, which exists after the first step
    shape = RunShape(1, torch.get_num_threads())
    save_checkpoint(
        tmp_path,
        model=model,
        optimizer=optimizer,
        device=CPU,
        scaler=scaler,
        position=Position(1, 0, 0, (0.0,)),
        run_fingerprint="f",
        shape=shape,
        history=[{"m": 1.0}],
    )
    restored = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=5)
    resumed = load_checkpoint(
        tmp_path,
        model=model,
        optimizer=optimizer,
        device=CPU,
        scaler=restored,
        run_fingerprint="f",
        shape=shape,
        max_epoch=2,
        batches_per_epoch=4,
        metrics=["m"],
    )
    assert resumed is not None
    assert restored.get_scale() == 512.0 and restored._get_growth_tracker() == 2
    caplog.set_level(logging.INFO, logger="trainer")  # a run without a scaler cannot take this checkpoint
    assert (
        load_checkpoint(
            tmp_path,
            model=model,
            optimizer=optimizer,
            device=CPU,
            run_fingerprint="f",
            shape=shape,
            max_epoch=2,
            batches_per_epoch=4,
            metrics=["m"],
        )
        is None
    )
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "tensor names" in notices[0]


def test_the_fp16_step_goes_through_the_scaler() -> None:
    precision = Precision("fp16", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters())
    before = model.weight.detach().clone()
    precision.backward_step(model(torch.full((1, 3), float("inf"))).sum(), optimizer)
    assert torch.equal(model.weight, before) and precision.scaler.get_scale() == 512.0  # skipped, backed off


def test_bf16_no_faster_than_fp32_is_noticed_from_a_measured_matmul() -> None:
    """Measured, not read from the flags: two CPUs with avx512_bf16 and no AMX differ (bench/)."""
    notice = bf16_cpu_notice("bf16", CPU, (200.0, 110.0))
    assert notice == (
        "train.precision bf16: this CPU multiplies bfloat16 matrices at 110 GFLOP/s against 200 in float32 "
        "(512 x 512, measured now): bf16 runs, likely no faster than fp32 here"
    )
    assert bf16_cpu_notice("bf16", CPU, (200.0, 200.0 * BF16_GAIN - 1)) is not None
    assert bf16_cpu_notice("bf16", CPU, (200.0, 200.0 * BF16_GAIN)) is None
    assert bf16_cpu_notice("bf16", CPU, (200.0, 850.0)) is None
    assert bf16_cpu_notice("fp32", CPU, (200.0, 110.0)) is None
    assert bf16_cpu_notice("bf16", torch.device("cuda"), (200.0, 110.0)) is None
    fp32, bf16 = matmul_rates(size=64, repeats=2)  # the real measurement runs
    assert fp32 > 0 and bf16 > 0


def test_a_bf16_run_where_the_matmuls_say_bf16_is_slow_gives_the_notice_once(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The rates are float32's then bfloat16's, each timed in its own dtype within the budget, and
    a bf16 training run on such a CPU says so (this CPU's own rates would decide otherwise)."""
    import trainer.precision as precision_module

    timed = []

    def rate(device, n, repeats, dtype, budget_s):  # a CPU on which bfloat16 is emulated
        timed.append((dtype, budget_s))
        return {torch.float32: 200.0, torch.bfloat16: 110.0}[dtype]

    monkeypatch.setattr(precision_module, "matmul_gflops", rate)
    assert matmul_rates(budget_s=0.05) == (200.0, 110.0)
    assert timed == [(torch.float32, 0.05), (torch.bfloat16, 0.05)]
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params.yaml", train={"device": "cpu", "precision": "bf16", "epochs": 1})
    run_stage(main, train_argv(data, tmp_path, params))
    err = capsys.readouterr().err
    assert err.count("train.precision bf16: this CPU multiplies bfloat16 matrices at 110 GFLOP/s") == 1, err
    timed.clear()
    fp32 = write_params(tmp_path / "fp32.yaml", train={"device": "cpu", "epochs": 1})
    run_stage(main, train_argv(data, tmp_path / "fp32", fp32))
    assert "GFLOP/s" not in capsys.readouterr().err and timed == []  # fp32 runs measure nothing


def test_matrix_units_are_read_from_the_cpu_flags(tmp_path: Path) -> None:
    """What the benchmarks judge the bf16 goal by (a CPU with AMX, or Arm's BFMMLA)."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags = cpu_flags(info)
    assert flags == {"fpu", "sse2", "avx2", "avx512f"}
    assert native_bf16(flags) is False and native_bf16(flags | {"avx512_bf16"}) is False  # vector only
    assert native_bf16(flags | {"amx_bf16", "amx_tile"}) is True
    arm = tmp_path / "cpuinfo-arm"  # an Arm CPU lists "Features"; bf16 there includes BFMMLA (matrices)
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert native_bf16(cpu_flags(arm)) is True
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd crc32\n")
    assert native_bf16(cpu_flags(arm)) is False
    assert cpu_flags(tmp_path / "missing") is None


def test_the_machine_is_the_cpu_model_and_pytorchs_isa_level(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU 9000\n\nmodel name\t: Other\n")
    assert cpu_model(info) == "Some CPU 9000"
    assert machine(CPU, info) == f"Some CPU 9000, {torch.backends.cpu.get_cpu_capability()}"
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine() or "unknown CPU")
