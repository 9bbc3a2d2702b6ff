"""Where each dataset's four IDX files come from, and what they must contain.

Checksums are SHA-256 of the *decompressed* IDX bytes, so a mirror that
re-compressed the archives (Debian's ``dataset-fashion-mnist`` did) verifies too.
Built-in sources are tried in this order: user mirrors (``data.mirrors``),
local folders, then the public HTTPS mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdxFile:
    """One file of a dataset: its name on mirrors (``.gz``) and its expected content."""

    name: str  # e.g. "train-images-idx3-ubyte.gz"
    sha256: str  # of the decompressed content
    size: int  # decompressed bytes
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SplitFiles:
    images: IdxFile
    labels: IdxFile


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    train: SplitFiles
    test: SplitFiles
    sources: tuple[str, ...]  # base URLs (https://...) or local folders
    class_names: tuple[str, ...] = tuple(str(d) for d in range(10))  # label i is class_names[i]

    @property
    def files(self) -> tuple[IdxFile, ...]:
        return (self.train.images, self.train.labels, self.test.images, self.test.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image: one grey channel, the IDX file's height and width."""
        _count, height, width = self.train.images.shape
        return (1, height, width)


def _files(train_img: str, train_lbl: str, test_img: str, test_lbl: str) -> tuple[SplitFiles, SplitFiles]:
    return (
        SplitFiles(
            IdxFile("train-images-idx3-ubyte.gz", train_img, 47040016, (60000, 28, 28)),
            IdxFile("train-labels-idx1-ubyte.gz", train_lbl, 60008, (60000,)),
        ),
        SplitFiles(
            IdxFile("t10k-images-idx3-ubyte.gz", test_img, 7840016, (10000, 28, 28)),
            IdxFile("t10k-labels-idx1-ubyte.gz", test_lbl, 10008, (10000,)),
        ),
    )


_FASHION = _files(
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
)
_MNIST = _files(
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
)

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        *_FASHION,
        sources=(
            "/usr/share/datasets/fashion-mnist",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion",
        ),
        class_names=(
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
        ),
    ),
    "mnist": DatasetSpec(
        "mnist",
        *_MNIST,
        sources=(
            "/usr/share/datasets/mnist",
            "https://ossci-datasets.s3.amazonaws.com/mnist",
            "https://storage.googleapis.com/cvdf-datasets/mnist",
        ),
    ),
}
