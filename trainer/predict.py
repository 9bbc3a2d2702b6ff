"""Classify images with a trained model folder (``models/``): the class name of each, and its probability.

An image gets exactly the input its training images got: decoded by the function the image-folder
source decodes its files with, :func:`pipeline.imagefile.decode_image` (converted to the model's
mode, resized with the same filter) and normalised through the same lookup table, with the
statistics ``model.json`` recorded. So a training image, classified from its file, reaches the
model bit for bit as its shard row did.

From Python::

    from trainer.predict import Classifier, read_images

    classifier = Classifier("models")
    for p in classifier(read_images(["cat.jpg"], classifier.input_shape)):
        print(p.label, p.probability)

From the shell, one line per file (``file<TAB>class<TAB>probability``)::

    python -m trainer.predict --model models cat.jpg dog.png

No stage runs this, so it is no dependency of any stage in ``dvc.yaml``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cli import run_stage
from pipeline.errors import DataError, PipelineError
from pipeline.imagefile import PillowWarnings, decode_image, own_images
from pipeline.manifest import read_normalization
from pipeline.normalize import normalize
from trainer.export import CONFIG, load_model

BATCH = 256  # images through the model at once: memory stays bounded for any number of files


@dataclass(frozen=True)
class Prediction:
    label: str  # the class name, as model.json's class_names holds it
    index: int  # the model's output index: class_names[index] is label
    probability: float  # softmax of the model's output


def read_images(
    paths: Sequence[Path | str], input_shape: Sequence[int], pillow_warnings: PillowWarnings | None = None
) -> np.ndarray:
    """Decode image files into uint8 [N, C, H, W] as the data stages did with ``data.image_shape``
    set to ``input_shape``: any format they accept, converted and resized (a file already of that
    size and mode is taken as it is, as it was without ``data.image_shape``). Pillow's warnings
    about a file name it, ten files per text, counted over the calls given one ``pillow_warnings``."""
    c, h, w = (int(n) for n in input_shape)
    _check_files(paths)
    pixels = np.empty((len(paths), c, h, w), dtype=np.uint8)
    with own_images(pillow_warnings):  # as in the stages: a photo past the bomb warning decodes quietly
        for i, path in enumerate(paths):
            pixels[i] = decode_image(Path(path), (c, h, w))
    return pixels


def _check_files(paths: Sequence[Path | str]) -> None:
    for path in map(Path, paths):
        if not path.is_file():
            found = "a folder" if path.is_dir() else "nothing"
            raise DataError(f"{path}: expected an image file, found {found}")


class Classifier:
    """A model folder written by the ``train`` stage, ready to classify uint8 images on the CPU."""

    def __init__(self, model_dir: Path | str) -> None:
        self.model, config = load_model(model_dir)  # checks input_shape and builds the model from it
        self.model.eval()
        self.input_shape: tuple[int, int, int] = self.model.input_shape
        where = str(Path(model_dir) / CONFIG)
        self.normalization = read_normalization(config, self.input_shape[0], where)  # as a manifest's
        try:
            self.class_names: tuple[str, ...] = tuple(config["class_names"])
        except (KeyError, TypeError) as exc:
            raise PipelineError(f"{where}: expected class_names: {exc!r}") from None

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [N, C, H, W] -> the normalised float32 the model takes, as the shards held it."""
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.input_shape:
            raise DataError(
                f"pixels: expected uint8 [N, {', '.join(map(str, self.input_shape))}], the model's input, "
                f"found {pixels.dtype} {list(pixels.shape)}"
            )
        rows = np.ascontiguousarray(pixels).reshape(len(pixels), -1)
        return torch.from_numpy(normalize(rows, self.normalization, self.input_shape))

    def __call__(self, pixels: np.ndarray) -> list[Prediction]:
        """The most probable class of each image of uint8 [N, C, H, W]."""
        predictions = []
        with torch.inference_mode():
            for start in range(0, len(pixels), BATCH):
                logits = self.model(self.inputs(pixels[start : start + BATCH]))
                # The class is the logits' argmax, as test_acc counts it: two logits a hair apart may
                # round to one softmax probability, whose max would then name the first of the two.
                index = logits.argmax(dim=1)
                best = torch.softmax(logits, dim=1).gather(1, index[:, None])[:, 0]
                predictions += [
                    Prediction(self.class_names[i], i, p) for i, p in zip(index.tolist(), best.tolist())
                ]
        return predictions


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Classify image files with a trained model folder.")
    p.add_argument("--model", type=Path, default=Path("models"), help="the train stage's model folder")
    p.add_argument("files", type=Path, nargs="+", help="image files (PNG, JPEG, BMP, PPM/PGM, TIFF, WebP)")
    args = p.parse_args(argv)
    classifier = Classifier(args.model)
    _check_files(args.files)  # every file, before the first line is printed
    pillow_warnings = PillowWarnings()  # counted over every batch, as the parquet stage counts them
    for start in range(0, len(args.files), BATCH):
        files = args.files[start : start + BATCH]
        pixels = read_images(files, classifier.input_shape, pillow_warnings)
        for file, prediction in zip(files, classifier(pixels)):
            print(f"{file}\t{prediction.label}\t{prediction.probability:.4f}", flush=True)


if __name__ == "__main__":
    run_stage(main)
