"""train.augment: flip and translate on hand-made tensors, seeding by (seed, epoch, global batch), rank
slices, loader settings and a mid-epoch resume that cannot change the augmented batches, and the empty
default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pipeline.params import LoaderParams, TrainParams
from tests.test_resume import EVERY_STEP, _checkpoint, _short_run
from tests.test_train_stage import (
    MODEL_METRICS,
    history,
    run_train,
    run_until_killed,
    write_params,
)
from trainer.augment import Augmenter, BatchDraw, apply, augmenter, draw, flip, translate
from trainer.loop import train_one_epoch
from trainer.model import SimpleCNN
from trainer.rank_split import rank_range

AUGMENT = ["flip", "translate"]


def _grid(c: int = 1, h: int = 4, w: int = 4, n: int = 1) -> torch.Tensor:
    """Sample i, channel k, pixel (y, x) holds 1000 i + 100 k + 10 y + x: every value names its origin."""
    i, k, y, x = torch.meshgrid(
        torch.arange(n), torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij"
    )
    return (1000 * i + 100 * k + 10 * y + x).float()


def test_flip_mirrors_exactly_the_chosen_samples() -> None:
    x = _grid(c=2, h=2, w=3, n=2)
    out = flip(x, torch.tensor([True, False]))
    assert out[0].tolist() == [[[2, 1, 0], [12, 11, 10]], [[102, 101, 100], [112, 111, 110]]]
    assert torch.equal(out[1], x[1])


def test_translate_shifts_with_two_reflected_pixels_of_border() -> None:
    x = _grid(h=4, w=4, n=3)
    out = translate(x, torch.tensor([[1, -2], [0, 0], [-2, 2]]))
    # dy 1: rows 1, 2, 3, then 2 (reflected at the bottom); dx -2: columns 2, 1 (reflected at the left), 0, 1.
    assert out[0, 0].tolist() == [[12, 11, 10, 11], [22, 21, 20, 21], [32, 31, 30, 31], [22, 21, 20, 21]]
    assert torch.equal(out[1], x[1])
    # dy -2: rows 2, 1 (reflected at the top), 0, 1; dx 2: columns 2, 3, 2, 1 (reflected at the right).
    assert out[2, 0].tolist() == [
        [v + 2000 for v in row]
        for row in [[22, 23, 22, 21], [12, 13, 12, 11], [2, 3, 2, 1], [12, 13, 12, 11]]
    ]


def test_both_transforms_run_flip_then_translate_whatever_the_listed_order() -> None:
    x = _grid(c=3, h=5, w=6, n=2)
    params = BatchDraw(torch.tensor([True, True]), torch.tensor([[0, 1], [1, -1]]))
    expected = translate(flip(x, params.flips), params.shifts)
    assert not torch.equal(
        expected, flip(translate(x, params.shifts), params.flips)
    )  # the order is observable
    assert torch.equal(apply(x, ("translate", "flip"), params), expected)
    assert torch.equal(apply(x, ("flip", "translate"), params), expected)
    assert torch.equal(apply(x, ("flip",), params), flip(x, params.flips))
    assert torch.equal(apply(x, ("translate",), params), translate(x, params.shifts))


def test_draw_is_a_function_of_seed_epoch_and_global_batch() -> None:
    a = draw(10_000, seed=42, epoch=3, step=7)
    again = draw(10_000, seed=42, epoch=3, step=7)
    assert torch.equal(a.flips, again.flips) and torch.equal(a.shifts, again.shifts)
    for other in (draw(10_000, 43, 3, 7), draw(10_000, 42, 4, 7), draw(10_000, 42, 3, 8)):
        assert not torch.equal(a.shifts, other.shifts) and not torch.equal(a.flips, other.flips)
    assert 0.45 < a.flips.float().mean().item() < 0.55
    assert {tuple(s) for s in a.shifts.tolist()} == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    # The global RNG is neither used nor disturbed.
    state = torch.get_rng_state()
    draw(64, 42, 0, 0)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_draws_of_a_seed_stay_those_of_the_committed_results() -> None:
    """Fixed values: a change in how the generator is seeded or drawn from (flips before shifts)
    changes every augmented result, which must then be a deliberate change, not a silent one."""
    d = draw(8, seed=42, epoch=1, step=3)
    assert d.flips.tolist() == [True, True, False, False, False, False, True, True]
    assert d.shifts.tolist() == [[2, 0], [0, -2], [0, 2], [-2, 0], [-1, 2], [-2, 0], [0, -1], [-2, -2]]


def test_the_trainer_draws_each_epoch_from_train_seed_and_that_epoch(
    data: Path, tmp_path: Path, monkeypatch
) -> None:
    import trainer.epoch as epoch_module

    made = []

    def spy(names, **kwargs):
        made.append((tuple(names), kwargs["seed"], kwargs["epoch"]))
        return augmenter(names, **kwargs)

    monkeypatch.setattr(epoch_module, "augmenter", spy)
    monkeypatch.chdir(tmp_path)
    train = TrainParams(epochs=2, device="cpu", seed=7, augment=tuple(AUGMENT))
    _short_run(data, tmp_path / "w", LoaderParams(batch_size=64, num_workers=0), train)
    assert [m[:2] for m in made] == [(tuple(AUGMENT), 7)] * 2
    assert [m[2] for m in made] == sorted({m[2] for m in made}) and len(made) == 2  # one per epoch


@pytest.mark.parametrize("n", [64, 7, 2])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_together_are_the_one_process_augmented_batch(n: int, world: int) -> None:
    x = _grid(c=2, h=6, w=6, n=n)
    whole = Augmenter(tuple(AUGMENT), seed=5, epoch=1)(x, 4, n)
    assert not torch.equal(whole, x)
    parts = []
    for rank in range(world):
        start, stop = rank_range(n, rank, world)  # how trainer.rank_split slices every global batch
        parts.append(Augmenter(tuple(AUGMENT), seed=5, epoch=1, rank=rank, world=world)(x[start:stop], 4, n))
    assert torch.equal(torch.cat(parts), whole)


def test_empty_augment_and_fp32_are_the_plain_training_step() -> None:
    """train.augment [] builds no augmenter; the loop with none (and default fp32) is the plain step, bit for
    bit."""
    assert augmenter((), seed=42, epoch=0) is None
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(16, 1, 8, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(3)
    ]
    torch.manual_seed(0)
    looped = SimpleCNN(1, 8, 8, 3)
    plain = SimpleCNN(1, 8, 8, 3)
    plain.load_state_dict(looped.state_dict())
    train_one_epoch(
        looped,
        batches,
        torch.optim.Adam(looped.parameters()),
        torch.device("cpu"),
        non_blocking=False,
        free_graph=True,
        progress=False,
        augment=None,
    )
    optimizer = torch.optim.Adam(plain.parameters())
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        (F.cross_entropy(plain(images), labels, reduction="sum") / labels.shape[0]).backward()
        optimizer.step()
    for a, b in zip(looped.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_loader_settings_cannot_change_augmented_training(data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    train = TrainParams(epochs=1, device="cpu", augment=tuple(AUGMENT))
    expected, model = _short_run(data, tmp_path / "w0", LoaderParams(batch_size=64, num_workers=0), train)
    for name, loader in [
        ("w2", LoaderParams(batch_size=64, num_workers=2)),
        ("resident", LoaderParams(batch_size=64, num_workers=0, device_resident=True)),
    ]:
        got, got_model = _short_run(data, tmp_path / name, loader, train)
        assert got == expected and got_model == model, name
    _plain, plain_model = _short_run(
        data,
        tmp_path / "plain",
        LoaderParams(batch_size=64, num_workers=0),
        TrainParams(epochs=1, device="cpu"),
    )
    assert plain_model != model  # the augmentation did something


@pytest.mark.slow
def test_killed_mid_epoch_with_augment_resumes_bit_identically(data: Path, tmp_path: Path) -> None:
    """Killed at epoch 2, step 2: the resumed run must seed the rest of epoch 2 by its global batch
    indices."""
    base = tmp_path / "base"
    res = run_train(data, base, write_params(tmp_path / "base.yaml", train={"augment": AUGMENT}))
    assert res.returncode == 0, res.stderr
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(tmp_path / "params.yaml", train={"augment": AUGMENT, **EVERY_STEP})
    run_until_killed(
        data,
        work,
        params,
        "trainer.epoch.write_checkpoint",
        6,
        inspect=lambda: _checkpoint(work)["step"] == 2 or pytest.fail(str(_checkpoint(work))),
    )
    res = run_train(data, work, params)
    assert res.returncode == 0, res.stderr
    assert "resuming in epoch 2, step 2" in res.stderr
    a, b = history(base), history(work)
    for name in MODEL_METRICS:
        assert a[name] == b[name], name
    assert (base / "models" / "model.safetensors").read_bytes() == (
        work / "models" / "model.safetensors"
    ).read_bytes()
