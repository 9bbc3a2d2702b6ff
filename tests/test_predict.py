"""trainer.predict: a trained model folder classifies image files from their bytes, with the input
its training rows had."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import synth
import torch
from PIL import Image

from pipeline.errors import DataError
from pipeline.images import scan_splits, write_listing
from pipeline.params import TrainParams
from pipeline.parquet import images_to_parquet
from pipeline.tensorize import tensorize
from trainer.export import save_model
from trainer.model import SimpleCNN
from trainer.predict import BATCH, Classifier, read_images

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (3, 8, 10)
CLASSES = ("bird", "cat", "dog")
# Each class's images in other formats, sizes and modes: all of them converted and resized to SHAPE.
FILES = [
    ("a.png", (12, 15, 3)),
    ("b.jpg", (8, 10, 3)),
    ("c.webp", (20, 9, 3)),
    ("d.bmp", (8, 10)),
    ("e.tif", (5, 7, 3)),
]


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, name in enumerate(CLASSES):
            for file, shape in FILES:
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                pixels[..., :4] = 60 * k  # something for the model to tell the classes by
                path = root / split / name / file
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An image folder through the data stages' library calls, and a model folder of a seeded model."""
    tmp = tmp_path_factory.mktemp("predict")
    images = tmp / "images"
    make_folder(images)
    splits = dict(zip(("train", "test"), scan_splits(images)))
    parquet = {}
    for split, entries in splits.items():
        write_listing(entries, tmp / f"{split}.csv")
        parquet[split] = tmp / f"{split}.parquet"
        images_to_parquet(
            tmp / f"{split}.csv",
            images,
            parquet[split],
            image_shape=SHAPE,
            compression="zstd",
            compression_level=None,
            row_group_size=64,
        )
    manifests = tensorize(
        parquet["train"],
        parquet["test"],
        tmp / "t/train",
        tmp / "t/test",
        dataset="images",
        shard_size=100,
        normalize_kind="standard",
        image_shape=SHAPE,
    )
    torch.manual_seed(0)
    model = SimpleCNN(*SHAPE, len(CLASSES)).eval()
    save_model(tmp / "models", model, manifest=manifests["train"], train=TrainParams())
    shard = safetensors.numpy.load_file(tmp / "t/train" / manifests["train"].shards[0].file)
    files = pq.read_table(parquet["train"], columns=["file"]).column("file").to_pylist()
    assert len(files) == len(shard["images"]) == len(FILES) * len(CLASSES)  # every train row, in order
    return {
        "tmp": tmp,
        "model": model,
        "shard": shard,
        "files": [images / f for f in files],
        "manifest": manifests["train"],
    }


def test_an_image_file_reaches_the_model_as_its_shard_row_did(trained: dict) -> None:
    classifier = Classifier(trained["tmp"] / "models")
    assert classifier.input_shape == SHAPE and classifier.class_names == CLASSES
    inputs = classifier.inputs(read_images(trained["files"], classifier.input_shape))
    rows = trained["shard"]["images"]
    assert inputs.dtype == torch.float32 and rows.dtype == np.float32
    assert np.array_equal(inputs.numpy().view(np.uint32), rows.view(np.uint32))  # bit for bit
    with torch.inference_mode():
        logits = trained["model"](torch.from_numpy(rows))
    index = logits.argmax(dim=1).tolist()  # as test_acc counts a prediction
    probabilities = torch.softmax(logits, dim=1)
    predictions = classifier(read_images(trained["files"], classifier.input_shape))
    assert [p.index for p in predictions] == index
    assert [p.label for p in predictions] == [CLASSES[i] for i in index]
    assert [p.probability for p in predictions] == [probabilities[n, i].item() for n, i in enumerate(index)]
    assert len(set(index)) > 1  # the seeded model tells the classes apart, so a mix-up of rows would show


def test_a_photo_past_pillows_bomb_warning_is_read_quietly(tmp_path: Path, monkeypatch) -> None:
    """As the data stages read the user's own files: no warning, and the filters left as they were."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # a warning from 31 pixels, the error from 61
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "big.png")  # 48 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = list(warnings.filters)
        assert read_images([tmp_path / "big.png"], SHAPE).shape == (1, *SHAPE)
        assert warnings.filters == before


def test_the_class_is_the_logits_argmax_even_where_softmax_rounds_two_alike(
    trained: dict, tmp_path: Path
) -> None:
    """Logits 0 and 1e-8 are two float32 values, but exp() of both rounds to 1.0: a max over the
    softmax would name the first class, where test_acc (an argmax of the logits) counts the second."""
    model = SimpleCNN(*SHAPE, len(CLASSES))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.classifier[3].bias.copy_(torch.tensor([0.0, 1e-8, -30.0]))
    save_model(tmp_path / "models", model, manifest=trained["manifest"], train=TrainParams())
    classifier = Classifier(tmp_path / "models")
    with torch.inference_mode():
        probabilities = torch.softmax(model(classifier.inputs(np.zeros((1, *SHAPE), np.uint8))), dim=1)
    assert probabilities[0, 0] == probabilities[0, 1]  # the tie a softmax max would break the wrong way
    [prediction] = classifier(np.zeros((1, *SHAPE), np.uint8))
    assert (prediction.label, prediction.index) == ("cat", 1)
    assert prediction.probability == probabilities[0, 1].item()


def test_pixels_of_another_shape_or_type_are_refused(trained: dict) -> None:
    classifier = Classifier(trained["tmp"] / "models")
    for pixels, found in [
        (np.zeros((2, 1, 8, 10), np.uint8), "uint8 [2, 1, 8, 10]"),
        (np.zeros((2, *SHAPE), np.float32), "float32 [2, 3, 8, 10]"),
    ]:
        with pytest.raises(DataError) as info:
            classifier(pixels)
        assert str(info.value) == f"pixels: expected uint8 [N, 3, 8, 10], the model's input, found {found}"


def predict(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.predict", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_prints_a_line_per_file(trained: dict) -> None:
    files = trained["files"][:4]
    res = predict("--model", trained["tmp"] / "models", *files)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    classifier = Classifier(trained["tmp"] / "models")
    expected = classifier(read_images(files, SHAPE))
    assert res.stdout.splitlines() == [
        f"{file}\t{p.label}\t{p.probability:.4f}" for file, p in zip(files, expected)
    ]


def test_the_commands_pillow_warnings_name_ten_files_counted_over_its_batches(trained: dict) -> None:
    """Pillow's warnings about damaged files name them, ten files per text and then one line, as in
    the parquet stage: counted over the command's batches, not afresh in each."""
    damaged = [
        synth.damaged_tiff(trained["tmp"] / "damaged" / f"{n:02}.tif", np.full((8, 10), 20 * n, np.uint8))
        for n in range(12)
    ]
    files = [trained["files"][0]] * (BATCH - 6) + damaged  # six damaged files in each of two batches
    res = predict("--model", trained["tmp"] / "models", *files)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == len(files)
    assert res.stderr.splitlines() == [f"warning: {p}: {synth.TIFF_TAG_WARNING}" for p in damaged[:10]] + [
        f"warning: {synth.TIFF_TAG_WARNING}: said of over 10 files, the others not named"
    ]


def test_the_command_refuses_a_bad_file_in_one_line_before_any_output(trained: dict) -> None:
    tmp = trained["tmp"]
    (tmp / "notes.txt").write_text("not an image")
    for bad, message in [
        (tmp / "missing.png", f"{tmp / 'missing.png'}: expected an image file, found nothing"),
        (tmp / "images", f"{tmp / 'images'}: expected an image file, found a folder"),
        (
            tmp / "notes.txt",
            f"{tmp / 'notes.txt'}: Pillow cannot identify an image in this file; expected PNG, JPEG, BMP, "
            "PPM/PGM, TIFF or WebP (.png, .jpg, .jpeg, .bmp, .ppm, .pgm, .tif, .tiff, .webp)",
        ),
    ]:
        res = predict("--model", tmp / "models", trained["files"][0], bad)
        assert (res.returncode, res.stdout, res.stderr) == (2, "", f"error: {message}\n")
    # A missing file is refused before the first batch's lines, however many batches come before it.
    res = predict("--model", tmp / "models", *[trained["files"][0]] * BATCH, tmp / "missing.png")
    assert (res.returncode, res.stdout) == (2, "")
    res = predict("--model", tmp / "t", trained["files"][0])
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(f"error: {tmp / 't'}: cannot load model: ") and res.stderr.count("\n") == 1
