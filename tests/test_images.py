"""The image-folder source (pipeline.images: scanning, header checks, the listing CSV, decoding to Parquet)
and the image file it reads (pipeline.imagefile: formats, modes, Pillow's warnings).

Every image is a tiny one this file writes with Pillow into ``tmp_path``; the
expected pixels and messages are spelled out here, not computed by the module.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import synth
from PIL import Image, ImageFile

from pipeline import imagedecode, images
from pipeline.errors import DataError, OutputError
from pipeline.imagedecode import decoded_batches
from pipeline.images import (
    ImageEntry,
    check_images,
    class_names,
    read_listing,
    scan_split,
    write_listing,
)
from pipeline.parquet import images_to_parquet, open_table

ACCEPTED = "PNG, JPEG, BMP, PPM/PGM, TIFF or WebP (.png, .jpg, .jpeg, .bmp, .ppm, .pgm, .tif, .tiff, .webp)"


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path: Path, pixels: np.ndarray | Image.Image, **kwargs) -> Path:
    """Write an image (an HWC/HW uint8 array or a Pillow image); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(path, **kwargs)
    return path


def to_parquet(root: Path, image_shape, *, row_group_size: int = 64) -> tuple[pa.Table, np.ndarray]:
    """Scan train, write listing and Parquet; return the table and its pixels as (N, C, H, W)."""
    entries = scan_split(root, "train")
    write_listing(entries, root.parent / "train.csv")
    rows = images_to_parquet(
        root.parent / "train.csv",
        root,
        root.parent / "train.parquet",
        image_shape=image_shape,
        compression="zstd",
        compression_level=None,
        row_group_size=row_group_size,
    )
    table = pq.read_table(root.parent / "train.parquet")
    assert rows == table.num_rows == len(entries)
    c, h, w = open_table(root.parent / "train.parquet").image_shape
    pixels = np.frombuffer(table.column("pixels").combine_chunks().buffers()[1], dtype=np.uint8)
    return table, pixels[: rows * c * h * w].reshape(rows, c, h, w)


def by_file(table: pa.Table, pixels: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(table.column("file").to_pylist(), pixels))


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def sha_order(files: list[str]) -> list[str]:
    return sorted(files, key=lambda f: hashlib.sha256(f.encode()).hexdigest())


# ============================================================================ decoding


@pytest.mark.parametrize("channels", [1, 3])
def test_png_decodes_exactly_into_channel_planes(tmp_path: Path, channels: int) -> None:
    root = tmp_path / "images"
    shape_hwc = (5, 7, 3) if channels == 3 else (5, 7)  # H != W, so a swapped axis cannot pass
    saved = {
        f"train/{label}/{i}.png": noise(shape_hwc, seed=10 * i + len(label))
        for label in ("cat", "dog")
        for i in range(3)
    }
    for file, array in saved.items():
        save(root / file, array)
    entries = scan_split(root, "train")
    assert check_images(root, entries, None) == (channels, 5, 7)
    table, pixels = to_parquet(root, None)
    assert table.schema.field("pixels").type == pa.binary(channels * 5 * 7)
    assert table.schema.field("label").type == table.schema.field("file").type == pa.string()
    assert json.loads(pq.read_metadata(tmp_path / "train.parquet").metadata[b"image_shape"]) == [
        channels,
        5,
        7,
    ]
    for file, got in by_file(table, pixels).items():
        chw = saved[file][None] if channels == 1 else saved[file].transpose(2, 0, 1)
        np.testing.assert_array_equal(got, chw)
    assert table.column("label").to_pylist() == [f.split("/")[1] for f in table.column("file").to_pylist()]


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_decodes_close_to_what_was_saved(tmp_path: Path, channels: int) -> None:
    y, x = np.mgrid[0:16, 0:24]
    smooth = np.stack([x * 10, y * 15, (x + y) * 6], axis=-1).astype(np.uint8)  # JPEG keeps gradients well
    array = smooth if channels == 3 else smooth[..., 0]
    save(tmp_path / "images/train/a/x.JPG", array, format="JPEG", quality=95)
    save(tmp_path / "images/train/b/y.jpeg", array, quality=95)
    _table, pixels = to_parquet(tmp_path / "images", None)
    assert pixels.shape == (2, channels, 16, 24)
    chw = array[None] if channels == 1 else array.transpose(2, 0, 1)
    for got in pixels:
        assert np.abs(got.astype(int) - chw).mean() < 3


def test_multi_picture_jpeg_from_a_camera_is_a_jpeg(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (40, 200)]
    path = tmp_path / "images/train/a/camera.jpg"
    path.parent.mkdir(parents=True)
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.format == "MPO"
    _, pixels = to_parquet(tmp_path / "images", None)
    assert np.abs(pixels[0].astype(int) - 40).max() <= 2  # the first frame


@pytest.mark.parametrize(
    ("name", "mode", "kwargs"),
    [
        ("x.bmp", "RGB", {}),
        ("x.BMP", "L", {}),
        ("x.ppm", "RGB", {}),
        ("x.pgm", "L", {}),
        ("x.tif", "RGB", {}),
        ("x.tiff", "L", {"compression": "tiff_lzw"}),
        ("x.webp", "RGB", {"lossless": True}),
    ],
)
def test_the_other_formats_torchvision_loads_decode_exactly(
    tmp_path: Path, name: str, mode: str, kwargs: dict
) -> None:
    """BMP, PPM/PGM, TIFF and lossless WebP, the rest of torchvision's IMG_EXTENSIONS, hold the
    pixels exactly; each decodes to them, beside a PNG of the same shape."""
    array = noise((5, 7, 3) if mode == "RGB" else (5, 7), 3)
    save(tmp_path / f"images/train/a/{name}", array, **kwargs)
    save(tmp_path / "images/train/b/y.png", array)
    table, pixels = to_parquet(tmp_path / "images", None)
    chw = array[None] if mode == "L" else array.transpose(2, 0, 1)
    for got in by_file(table, pixels).values():
        np.testing.assert_array_equal(got, chw)


def test_lossy_webp_decodes_close_to_what_was_saved(tmp_path: Path) -> None:
    y, x = np.mgrid[0:16, 0:24]
    smooth = np.stack([x * 10, y * 15, (x + y) * 6], axis=-1).astype(np.uint8)
    save(tmp_path / "images/train/a/x.webp", smooth, quality=95)
    save(tmp_path / "images/train/b/y.webp", smooth, quality=95)
    _table, pixels = to_parquet(tmp_path / "images", None)
    assert pixels.shape == (2, 3, 16, 24)
    assert np.abs(pixels[0].astype(int) - smooth.transpose(2, 0, 1)).mean() < 3


@pytest.mark.parametrize(("name", "kwargs"), [("pages.tif", {}), ("animated.webp", {"lossless": True})])
def test_a_file_of_several_frames_gives_its_first(tmp_path: Path, name: str, kwargs: dict) -> None:
    """A multi-page TIFF or an animated WebP gives its first frame, as torchvision's loader takes it."""
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (40, 200)]
    path = tmp_path / "images/train/a" / name
    path.parent.mkdir(parents=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], **kwargs)
    with Image.open(path) as im:
        assert im.n_frames == 2
    _, pixels = to_parquet(tmp_path / "images", None)
    assert pixels.tolist() == np.full((1, 3, 8, 8), 40).tolist()


def test_exif_orientation_is_not_applied_pixels_are_taken_as_stored(tmp_path: Path) -> None:
    """A camera's "rotate 90°" EXIF tag is left alone, as torchvision's ImageFolder leaves it: the
    image keeps its stored width and height, so a shape check sees what the file holds."""
    y, x = np.mgrid[0:8, 0:16]
    stored = np.stack([x * 15, y * 30, np.zeros_like(x)], axis=-1).astype(np.uint8)  # 16 wide, 8 high
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: a viewer turns it 90° clockwise, to 8 wide and 16 high
    save(tmp_path / "images/train/a/photo.jpg", image, exif=exif, quality=95)
    with Image.open(tmp_path / "images/train/a/photo.jpg") as im:
        assert im.getexif()[0x0112] == 6
    _table, pixels = to_parquet(tmp_path / "images", None)
    assert pixels.shape == (1, 3, 8, 16)
    assert np.abs(pixels[0].astype(int) - stored.transpose(2, 0, 1)).mean() < 3


def triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an antialiased bilinear (triangle) filter, widened by the shrink factor."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale
    distance = np.abs(np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / max(scale, 1.0)
    weights = np.clip(1 - distance, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def test_set_shape_resizes_with_antialiasing_and_converts_grey_to_rgb(tmp_path: Path) -> None:
    quadrants = np.zeros((16, 24), np.uint8)
    quadrants[:8, 12:], quadrants[8:, :12], quadrants[8:, 12:] = 80, 160, 240
    save(tmp_path / "images/train/q/quadrants.png", quadrants)
    save(tmp_path / "images/train/n/noise.png", noise((32, 32, 3), seed=1))
    table, pixels = to_parquet(tmp_path / "images", (3, 4, 6))
    got = by_file(table, pixels)
    expected = triangle_weights(16, 4) @ quadrants @ triangle_weights(24, 6).T
    for plane in got["train/q/quadrants.png"]:  # grey becomes three equal planes
        assert np.abs(plane - expected).max() <= 1, plane
    # 8x shrink: an antialiased filter averages ~16x16 inputs (std ~74/8); plain bilinear only 2x2 (~37)
    assert got["train/n/noise.png"].std() < 20


def test_set_shape_converts_rgb_to_grey_luma_and_palette_to_rgb(tmp_path: Path) -> None:
    red = np.zeros((3, 5, 3), np.uint8)
    red[..., 0] = 255
    save(tmp_path / "images/train/r/red.png", red)
    _table, pixels = to_parquet(tmp_path / "images", (1, 3, 5))
    np.testing.assert_array_equal(pixels[0], np.full((1, 3, 5), 76))  # ITU-R 601-2: 255 * 299/1000

    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((1, 0), 1)
    save(tmp_path / "pal/train/p/p.png", palette)
    _table, pixels = to_parquet(tmp_path / "pal", (3, 2, 4))
    assert pixels[0][:, 0, 1].tolist() == [10, 20, 30] and pixels[0][:, 1, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("channels", [1, 3])
def test_palette_with_per_entry_transparency_converts_without_a_warning(
    tmp_path: Path, channels: int
) -> None:
    """A PNG palette with an alpha per entry (what many editors save) decodes quietly: Pillow warns
    when such an image goes straight to L or RGB, and a warning would print two lines amid the
    stage's one-line output. The pixels are the palette's colours, alpha dropped."""
    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((1, 0), 1)
    save(tmp_path / "images/train/p/p.png", palette, transparency=b"\x00\x80")
    with Image.open(tmp_path / "images/train/p/p.png") as im:
        assert isinstance(im.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _table, pixels = to_parquet(tmp_path / "images", (channels, 2, 4))
    grey = [18]  # ITU-R 601-2: (10*299 + 20*587 + 30*114) / 1000 = 18.15
    expected = [10, 20, 30] if channels == 3 else grey
    assert pixels[0][:, 0, 1].tolist() == expected and pixels[0][:, 1, 1].tolist() == [0] * channels


def test_files_in_subfolders_get_their_path_as_key_and_hidden_names_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save(root / "train/cat/a/b/001.png", noise((2, 2), 0))
    save(root / "train/cat/002.PNG", noise((2, 2), 1))
    (root / "train/cat/.DS_Store").write_bytes(b"junk")
    (root / "train/.cache").mkdir()
    (root / "train/.cache/x.txt").write_text("junk")
    (root / "train/cat/.thumbs").mkdir()
    (root / "train/cat/.thumbs/t.txt").write_text("junk")
    for explorer_file in ("Thumbs.db", "a/ehthumbs.db", "a/b/desktop.ini"):  # Windows hides these
        (root / "train/cat" / explorer_file).write_bytes(b"junk")
    (root / "train/desktop.ini").write_text("[.ShellClassInfo]")
    (root / "__MACOSX/train/cat").mkdir(parents=True)  # a ZIP made on a Mac, unpacked beside train/
    (root / "__MACOSX/train/cat/._002.PNG").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "elsewhere").mkdir()
    save(tmp_path / "elsewhere/003.png", noise((2, 2), 2))
    (root / "train/cat/linked.png").symlink_to(tmp_path / "elsewhere/003.png")  # DVC hashes its content
    entries = scan_split(root, "train")
    assert sorted(e.key for e in entries) == ["002.PNG", "a/b/001.png", "linked.png"]
    assert {e.file for e in entries} == {"train/cat/a/b/001.png", "train/cat/002.PNG", "train/cat/linked.png"}
    assert class_names(entries) == ["cat"]


@pytest.mark.parametrize(
    ("link", "target"), [("train", "train"), ("train/cat", "cat"), ("train/cat/sub", "cat")]
)
def test_a_folder_reached_through_a_symbolic_link_is_refused(tmp_path: Path, link: str, target: str) -> None:
    """DVC hashes data/user without going into linked folders: images added there would go unseen."""
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    save(elsewhere / "train/dog/001.png", noise((2, 2), 0))  # what the links point to
    save(elsewhere / "cat/002.png", noise((2, 2), 1))
    if link != "train":
        save(root / "train/dog/001.png", noise((2, 2), 0))
    if link == "train/cat/sub":
        save(root / "train/cat/003.png", noise((2, 2), 2))
    root.mkdir(exist_ok=True)
    (root / link).symlink_to(elsewhere / target)
    assert refused(scan_split, root, "train") == (
        f"{root / link}: a folder reached through a symbolic link (to {elsewhere / target}); DVC does not "
        "look inside one, so changes there would not rerun the data stages: make it a real folder"
    )


# ============================================================================ order


def test_order_is_the_sha256_of_the_path_whatever_the_filesystem_lists(tmp_path: Path) -> None:
    names = [f"train/c{i % 3}/{i:03d}.png" for i in range(24)]
    for folder, order in (("fwd", names), ("rev", names[::-1])):  # created in opposite orders
        for name in order:
            save(tmp_path / folder / name, noise((2, 2), 0))
    forward = scan_split(tmp_path / "fwd", "train")
    assert [e.file for e in forward] == sha_order(names)
    assert forward == scan_split(tmp_path / "rev", "train")
    assert {e.label for e in forward[:6]} == {"c0", "c1", "c2"}  # classes mixed from the start


# ============================================================================ refusals while scanning


def test_missing_folders_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    assert refused(scan_split, root, "train") == (
        f"{root}: expected the images folder, with train/<class>/<image> inside it, found nothing"
    )
    root.write_bytes(b"")  # data.images_dir naming a file
    assert refused(scan_split, root, "train") == (
        f"{root}: expected the images folder, with train/<class>/<image> inside it, found a file"
    )
    root.unlink()
    root.mkdir()
    assert refused(scan_split, root, "train") == (
        f"{root / 'train'}: expected a folder of class folders train/<class>/<image>, found nothing"
    )
    (root / "train").write_text("")
    assert refused(scan_split, root, "train") == (
        f"{root / 'train'}: expected a folder of class folders train/<class>/<image>, found a file"
    )
    assert scan_split(root, "test") == []
    (root / "test").mkdir()
    assert (
        refused(scan_split, root, "test")
        == f"{root / 'test'}: no class folders; expected test/<class>/<image>"
    )


@pytest.mark.parametrize("folders", [("dog", "cat"), ("training_set", "test_set")])
def test_folders_in_place_of_train_are_named_with_the_fix(tmp_path: Path, folders: tuple[str, str]) -> None:
    """torchvision's ImageFolder layout (images/<class>/...), or splits named otherwise, lack train/:
    the message names what is there and the layout it must become."""
    root = tmp_path / "images"
    for folder in folders:
        save(root / folder / "x/1.png", noise((2, 2), 0))
    (root / "README.txt").write_text("a file beside the splits is no split")
    assert refused(scan_split, root, "train") == (
        f"{root / 'train'}: expected a folder of class folders train/<class>/<image>, found nothing; "
        f"{root} holds {', '.join(repr(f) for f in sorted(folders))}: rename or move them so that it holds "
        "train/<class>/ (and optionally test/<class>/)"
    )


def test_an_images_dir_that_is_the_train_folder_itself_is_pointed_above(tmp_path: Path) -> None:
    """data.images_dir: data/user/images/train, its class folders inside: the fix is one level up."""
    root = tmp_path / "images" / "train"
    for cls in ("dog", "cat"):
        save(root / cls / "1.png", noise((2, 2), 0))
    assert refused(scan_split, root, "train") == (
        f"{root / 'train'}: expected a folder of class folders train/<class>/<image>, found nothing; "
        f"{root} is itself a train/ folder: set data.images_dir to the folder that holds it, {root.parent}"
    )


@pytest.mark.parametrize(
    "folder, fix",
    [
        (
            "val",
            "rename it test/ to test on it, or merge it into train/ and set data.val_fraction "
            "(the validation split is held out of train)",
        ),
        (
            "Validation",
            "rename it test/ to test on it, or merge it into train/ and set data.val_fraction "
            "(the validation split is held out of train)",
        ),
        ("cat", "move it out (class folders go in train/<class>/ and test/<class>/)"),
    ],
)
def test_a_folder_beside_train_and_test_is_refused_not_left_out(
    tmp_path: Path, folder: str, fix: str
) -> None:
    """ImageNet's val/, or a class folder one level too high, would otherwise be left out without a word."""
    root = tmp_path / "images"
    save(root / "train/cat/1.png", noise((2, 2), 0))
    save(root / "test/cat/1.png", noise((2, 2), 1))
    for hidden in (".git", ".ipynb_checkpoints"):
        (root / hidden).mkdir()
    (root / "LICENSE").write_text("files are fine")
    assert len(scan_split(root, "train")) == 1
    save(root / folder / "cat/2.png", noise((2, 2), 2))
    assert refused(scan_split, root, "train") == (
        f"{root / folder}: expected only train/ and test/ in {root}, found {folder}/; {fix}"
    )


def test_empty_class_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save(root / "train/cat/1.png", noise((2, 2), 0))
    (root / "train/dog/.hidden").mkdir(parents=True)
    assert refused(scan_split, root, "train") == (
        f"{root / 'train/dog'}: class folder holds no images; expected at least one {ACCEPTED} file"
    )


def test_file_directly_under_train_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save(root / "train/cat/1.png", noise((2, 2), 0))
    save(root / "train/stray.png", noise((2, 2), 0))
    assert refused(scan_split, root, "train") == (
        f"{root / 'train/stray.png'}: file directly under train/; "
        "expected it in a class folder train/<class>/"
    )


def test_non_image_file_is_refused_by_suffix(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save(root / "train/cat/1.png", noise((2, 2), 0))
    (root / "train/cat/sub").mkdir()
    (root / "train/cat/sub/notes.txt").write_text("hello")
    assert refused(scan_split, root, "train") == (
        f"{root / 'train/cat/sub/notes.txt'}: not an accepted image file; expected {ACCEPTED}"
    )


def test_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save(root / "train/cat/1.png", noise((2, 2), 0))
    bad = os.fsencode(root / "train/cat") + b"/caf\xe9.png"
    with open(bad, "wb") as f:
        f.write(b"x")
    message = refused(scan_split, root, "train")
    assert message == f"{Path(os.fsdecode(bad))!r}: file name is not valid UTF-8; expected UTF-8 names"


def test_test_class_unknown_to_train_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for file in ("train/cat/1.png", "train/dog/1.png", "test/cat/2.png", "test/cow/3.png"):
        save(root / file, noise((2, 2), 0))
    classes = class_names(scan_split(root, "train"))
    assert classes == ["cat", "dog"]
    assert refused(scan_split, root, "test", classes) == (
        f"{root / 'test/cow'}: class 'cow' is not a train class; expected one of 'cat', 'dog'"
    )
    (root / "test/cow/3.png").unlink()
    (root / "test/cow").rmdir()
    assert [e.file for e in scan_split(root, "test", classes)] == ["test/cat/2.png"]


# ============================================================================ refusals while reading images


def one_odd_image(root: Path, odd, normal=None) -> Path:
    """Two train images; the one second in file order is ``odd``; returns its path."""
    first, second = sha_order(["train/a/1.png", "train/b/2.png"])
    save(root / first, normal if normal is not None else noise((4, 6, 3), 0))
    save(root / second, odd)
    return root / second


def check_both(root: Path, image_shape, message: str) -> None:
    """The header check and the full decode refuse the same file with the same message."""
    entries = scan_split(root, "train")
    assert refused(check_images, root, entries, image_shape) == message
    write_listing(entries, root.parent / "l.csv")
    assert (
        refused(
            images_to_parquet,
            root.parent / "l.csv",
            root,
            root.parent / "o.parquet",
            image_shape=image_shape,
            compression="zstd",
            compression_level=None,
            row_group_size=8,
        )
        == message
    )
    assert not (root.parent / "o.parquet").exists()


def test_other_size_without_shape_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    odd = one_odd_image(root, noise((4, 5, 3), 1))
    first = root / sha_order(["train/a/1.png", "train/b/2.png"])[0]
    check_both(
        root, None, f"{odd}: image is 5x4 RGB, expected 6x4 RGB as {first}; set data.image_shape to convert"
    )
    to_parquet(root, (3, 4, 6))  # with a shape the odd one is resized


def test_other_mode_without_shape_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    odd = one_odd_image(root, noise((4, 6), 1))
    first = root / sha_order(["train/a/1.png", "train/b/2.png"])[0]
    check_both(
        root, None, f"{odd}: image is 6x4 L, expected 6x4 RGB as {first}; set data.image_shape to convert"
    )


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "1"])
def test_mode_other_than_l_or_rgb_without_shape_is_refused(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "images"
    first = root / sha_order(["train/a/1.png", "train/b/2.png"])[0]
    one_odd_image(root, noise((4, 6, 3), 1), normal=Image.new(mode, (6, 4)))
    check_both(
        root,
        None,
        f"{first}: image mode is {mode}, expected L or RGB; set data.image_shape [C, H, W] to convert",
    )
    to_parquet(root, (3, 4, 6))


@pytest.mark.parametrize(
    ("array", "name"),
    [
        (np.full((4, 6), 1000, np.uint16), "2.png"),
        (np.full((4, 6), 1000, np.uint16), "2.pgm"),
        (np.full((4, 6), 0.5, np.float32), "2.tif"),
    ],
)
def test_an_image_of_more_than_8_bits_is_refused_even_with_a_shape(
    tmp_path: Path, array: np.ndarray, name: str
) -> None:
    """Pillow's conversion to 8 bits clips (1000 becomes 255), never scales: refused, with the fix."""
    root = tmp_path / "images"
    save(root / "train/a/1.png", noise((4, 6), 0))
    odd = save(root / f"train/b/{name}", array)
    with Image.open(odd) as im:
        mode = im.mode
    assert mode.startswith("I") or mode == "F"
    for image_shape in [(1, 4, 6), (3, 4, 6)]:
        check_both(
            root,
            image_shape,
            f"{odd}: image mode {mode} has more than 8 bits per channel; expected 8 bits: scale it to "
            "0..255 first (how its range maps to 8 bits, a shift or a window, is the data's choice)",
        )


def test_a_mode_pillow_cannot_take_straight_to_grey_goes_through_rgb(tmp_path: Path) -> None:
    """A TIFF may hold CIE L*a*b*, which Pillow converts to RGB but not straight to L: it goes
    through RGB, as torchvision's loader takes every image. Without data.image_shape the header check
    refuses it, as it refuses any mode other than the first image's L or RGB."""
    lab = Image.new("LAB", (6, 4), (50, 10, 20))
    rgb = np.asarray(lab.convert("RGB"))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    assert len(set(rgb.ravel().tolist())) > 1  # three planes that differ, so a mix-up would show
    for shape, expected in [((3, 4, 6), rgb.transpose(2, 0, 1)), ((1, 4, 6), grey[None])]:
        root = tmp_path / f"c{shape[0]}/images"
        save(root / "train/a/lab.tif", lab)
        save(root / "train/b/1.png", noise((4, 6, 3), 0))
        table, pixels = to_parquet(root, shape)
        np.testing.assert_array_equal(by_file(table, pixels)["train/a/lab.tif"], expected)
    first, second = sha_order(["train/a/1.png", "train/b/lab.tif"])
    root = tmp_path / "plain/images"
    save(root / first, noise((4, 6, 3), 0))
    odd = save(root / second, lab)
    assert refused(check_images, root, scan_split(root, "train"), None) == (
        f"{odd}: image is 6x4 LAB, expected 6x4 RGB as {root / first}; set data.image_shape to convert"
    )


@pytest.mark.parametrize(
    ("size", "workers", "images", "plan"),
    [
        ((16, 16), 4, 3, ("processes", 4)),
        ((127, 129), 2, 3, ("processes", 2)),
        ((16, 16), 4, 2, ("threads", 1)),  # too few to pay for starting processes
        ((16, 16), 1, 3, ("threads", 1)),
        ((128, 128), 4, 3, ("threads", 4)),
        ((300, 200), 2, 2, ("threads", 2)),
        ((300, 200), 1, 3, ("threads", 1)),
    ],
)
def test_small_images_decode_in_processes_larger_ones_on_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], workers: int, images: int, plan
) -> None:
    """Threads taking turns on the GIL decoded images under about 100x100 pixels slower than one
    thread (bench/notes.md): the first image's size decides, from 128x128 up threads pay; below,
    processes do, once the listing is long enough to pay for starting them."""
    monkeypatch.setattr(imagedecode, "PROCESSES_FROM_IMAGES", 3)
    root = tmp_path / "images"
    save(root / "train/a/0.png", noise((size[1], size[0]), 0))  # width x height
    for n in range(1, images):
        save(root / f"train/a/{n}.png", noise((8, 8), n))
    entries = sorted(scan_split(root, "train"), key=lambda e: e.file)  # 0.png first: its size decides
    assert imagedecode.decode_plan(entries, root, workers) == imagedecode.Plan(*plan)
    assert imagedecode.decode_plan([], root, workers) == imagedecode.Plan("threads", 1)


def decode_in(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """decoded_batches decodes these tests' tiny images on threads or in processes, as ``how`` says
    (with workers > 1), a few images per task or piece, so that a few images spread over them; with
    "processes", check_images checks their headers in processes too."""
    monkeypatch.setattr(imagedecode, "THREADS_FROM_PIXELS", 0 if how == "threads" else 1 << 40)
    monkeypatch.setattr(imagedecode, "PROCESSES_FROM_IMAGES", 0)
    monkeypatch.setattr(imagedecode, "DECODE_CHUNK", 2)
    monkeypatch.setattr(imagedecode, "PIECE_IMAGES", 2)
    monkeypatch.setattr(images, "CHECKS_IN_PROCESSES_FROM", 0 if how == "processes" else 1 << 40)
    monkeypatch.setattr(images, "CHECK_PIECE", 2)


@pytest.mark.parametrize(("images_count", "workers", "pool"), [(3, 2, [2]), (2, 2, []), (3, 1, [])])
def test_header_checks_are_shared_out_from_a_number_of_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images_count: int, workers: int, pool: list[int]
) -> None:
    """Opening a header is mostly Python: processes check them, once there are enough to pay for
    starting them (CHECKS_IN_PROCESSES_FROM), and only where prep.workers allows more than one."""
    opened: list[int] = []

    class Counted(images.Workers):
        def __init__(self, workers: int, preload: tuple[str, ...] = ()) -> None:
            opened.append(workers)
            super().__init__(workers, preload)

    monkeypatch.setattr(images, "Workers", Counted)
    monkeypatch.setattr(images, "CHECKS_IN_PROCESSES_FROM", 3)
    root = tmp_path / "images"
    for n in range(images_count):
        save(root / f"train/{'ab'[n % 2]}/{n}.png", noise((4, 4), n))
    assert check_images(root, scan_split(root, "train"), None, workers) == (1, 4, 4)
    assert opened == pool


@pytest.mark.parametrize("image_shape", [None, (1, 4, 4)])
@pytest.mark.parametrize(("how", "workers"), [("threads", 1), ("processes", 3)])
def test_header_checks_name_the_first_failing_image_in_listing_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, workers: int, image_shape
) -> None:
    """Checked in one process or shared out in pieces, the headers of a folder with a foreign file
    and images of another size give the error of the first in listing order, and the same shape."""
    decode_in(monkeypatch, how)
    root = tmp_path / "images"
    for n in range(9):
        save(root / f"train/{'ab'[n % 2]}/{n}.png", noise((4, 4), n))
    entries = scan_split(root, "train")
    assert check_images(root, entries, image_shape, workers) == (image_shape or (1, 4, 4))
    for k in (3, 6):  # another size: refused without image_shape, converted with it
        save(root / entries[k].file, noise((5, 4), k))
    (root / entries[7].file).write_bytes(b"not an image")
    first, wrong = root / entries[0].file, root / entries[3].file
    expected = (
        f"{wrong}: image is 4x5 L, expected 4x4 L as {first}; set data.image_shape to convert"
        if image_shape is None
        else f"{root / entries[7].file}: Pillow cannot identify an image in this file; expected {ACCEPTED}"
    )
    assert refused(check_images, root, entries, image_shape, workers) == expected


@pytest.mark.parametrize(("how", "counts"), [("threads", (1, 2, 4)), ("processes", (3,))])
def test_the_first_failing_image_in_file_order_is_named_whatever_worker_fails_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, counts: tuple[int, ...]
) -> None:
    """Threads or processes decode a few images per task; of three broken images, two in one task
    and one in another, the one first in the listing is named, as one thread would name it."""
    decode_in(monkeypatch, how)
    root = tmp_path / "images"
    for n in range(9):
        save(root / f"train/a/{n}.png", noise((4, 4), n))
    entries = scan_split(root, "train")
    broken = [root / entries[k].file for k in (2, 3, 6)]  # both of the second task's, one of the fourth's
    for path in broken:
        path.write_bytes(path.read_bytes()[:60])  # the header whole, the pixels cut
    for workers in counts:
        assert imagedecode.decode_plan(entries, root, workers).how == how
        message = refused(lambda w=workers: list(decoded_batches(entries, root, (1, 4, 4), False, 9, w)))
        assert message.startswith(f"{broken[0]}: cannot decode image: "), message


@pytest.mark.parametrize("image_shape", [None, (1, 3, 4)])
def test_an_image_past_pillows_bomb_warning_decodes_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_shape
) -> None:
    """From Image.MAX_IMAGE_PIXELS (89 million pixels) Pillow warns that an image may be a
    decompression bomb: two lines amid the stage's output, about the user's own files. The header
    check and the decode (in threads) print nothing, and leave the warning filters as they were."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # a warning from 31 pixels, the error from 61
    root = tmp_path / "images"
    for n, path in enumerate(["train/a/1.png", "train/a/2.png", "train/b/3.png"]):
        save(root / path, noise((6, 8), n))  # 48 pixels
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_images(root, scan_split(root, "train"), image_shape) == (image_shape or (1, 6, 8))
        _table, pixels = to_parquet(root, image_shape, row_group_size=2)
        assert warnings.filters[0][2] is Warning  # our filter is gone once the decoding ends
    assert pixels.shape == (3, *(image_shape or (1, 6, 8)))
    assert warnings.filters == before
    batches = decoded_batches(scan_split(root, "train"), root, (1, 6, 8), False, rows=1, workers=2)
    next(batches)
    assert warnings.filters == before  # not held while the caller's code runs between batches
    batches.close()


@pytest.mark.parametrize("how", ["threads", "processes"])
@pytest.mark.parametrize("image_shape", [None, (1, 4, 4)])
def test_pillows_warnings_about_a_file_are_a_line_each_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, image_shape, how
) -> None:
    """Pillow warns about a damaged file without naming it, and Python prints a text once per
    process: a user could not find the file. Opened or decoded (in threads, or in processes that hand
    their warnings back) here, each damaged file gets one ``warning:`` record naming it, and nothing
    reaches Python's own warning printer."""
    decode_in(monkeypatch, how)
    root = tmp_path / "images"
    damaged = [synth.damaged_tiff(root / f"train/a/{n}.tif", noise((8, 8), n)) for n in range(3)]
    save(root / "train/b/3.png", noise((8, 8), 3))
    entries = scan_split(root, "train")
    named = sorted(f"{p}: {synth.TIFF_TAG_WARNING}" for p in damaged)
    caplog.set_level(logging.WARNING, logger="pipeline.imagefile")
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("default")  # Python's own: each text printed once
        check_images(root, entries, image_shape, workers=2)  # in processes with how: processes
        assert sorted(r.getMessage() for r in caplog.records) == named
        caplog.clear()
        shape = image_shape or (1, 8, 8)
        [(_batch, pixels)] = decoded_batches(entries, root, shape, image_shape is not None, rows=4, workers=2)
        assert sorted(r.getMessage() for r in caplog.records) == named
    assert [str(w.message) for w in printed] == []
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    if image_shape is None:  # the pixels are read all the same
        i = [e.file for e in entries].index("train/a/0.tif")
        np.testing.assert_array_equal(pixels[i, 0], noise((8, 8), 0))


@pytest.mark.parametrize(("how", "workers"), [("threads", 1), ("processes", 3)])
def test_past_ten_files_a_pillow_warning_says_the_others_are_not_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, how: str, workers: int
) -> None:
    """Thousands of photos from one camera can carry the same damage: ten files are named for a
    text, counted over every batch of the decode (and every process's pieces), then one line says
    the rest are not."""
    decode_in(monkeypatch, how)
    root = tmp_path / "images"
    for n in range(13):
        synth.damaged_tiff(root / f"train/a/{n:02}.tif", noise((4, 4), n))
    entries = scan_split(root, "train")
    assert imagedecode.decode_plan(entries, root, workers) == imagedecode.Plan(how, workers)
    caplog.set_level(logging.WARNING, logger="pipeline.imagefile")
    caplog.clear()  # the plan's look at the first file's header warned about it
    for _ in decoded_batches(entries, root, (1, 4, 4), False, rows=3, workers=workers):
        pass
    messages = [r.getMessage() for r in caplog.records]
    order = [str(root / e.file) for e in entries]
    assert messages == [f"{p}: {synth.TIFF_TAG_WARNING}" for p in order[:10]] + [
        f"{synth.TIFF_TAG_WARNING}: said of over 10 files, the others not named"
    ]


@pytest.mark.parametrize("image_shape", [None, (1, 3, 4)])
def test_an_image_past_pillows_bomb_limit_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_shape
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # the error from 41 pixels
    odd = one_odd_image(tmp_path / "images", noise((6, 8), 1), normal=noise((3, 4), 0))
    check_both(
        tmp_path / "images",
        image_shape,
        f"{odd}: image has more than 40 pixels, the most Pillow decodes (its guard against "
        "decompression bombs); expected a smaller image: downscale it first",
    )


def test_other_format_behind_an_image_suffix_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    odd = one_odd_image(root, noise((4, 6, 3), 1))
    Image.fromarray(noise((4, 6, 3), 1)).save(odd, format="GIF")
    check_both(root, (3, 4, 6), f"{odd}: image is GIF, expected {ACCEPTED}")


def test_file_pillow_cannot_identify_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    odd = one_odd_image(root, noise((4, 6, 3), 1))
    odd.write_bytes(b"not an image at all")
    check_both(root, (3, 4, 6), f"{odd}: Pillow cannot identify an image in this file; expected {ACCEPTED}")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_fails_the_decode_even_if_pillow_was_told_to_allow_it(
    tmp_path: Path, suffix: str, monkeypatch
) -> None:
    root = tmp_path / "images"
    names = [f"train/{c}/{i}{suffix}" for c in "ab" for i in range(3)]
    for i, name in enumerate(names):
        save(root / name, noise((64, 64, 3), i))  # big enough that half of it is past the headers
    bad = root / sha_order(names)[3]  # in the middle: earlier row groups were already written
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    entries = scan_split(root, "train")
    assert check_images(root, entries, None) == (3, 64, 64)  # headers are intact: only decoding can tell
    write_listing(entries, tmp_path / "train.csv")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might have set it
    message = refused(
        images_to_parquet,
        tmp_path / "train.csv",
        root,
        tmp_path / "out/train.parquet",
        image_shape=(3, 64, 64),
        compression="zstd",
        compression_level=None,
        row_group_size=1,
    )
    assert message.startswith(f"{bad}: cannot decode image: image file is truncated")
    assert message.endswith(f"; expected a complete {ACCEPTED} file")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the setting is restored
    assert os.listdir(tmp_path / "out") == []  # no Parquet file, no temporaries


def test_bad_image_shape_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save(root / "train/a/1.png", noise((2, 2), 0))
    assert refused(check_images, root, scan_split(root, "train"), (2, 4, 4)) == (
        "data.image_shape: expected [C, H, W] with C 1 (grey) or 3 (RGB), the channels of an image, "
        "and H, W positive, found [2, 4, 4]"
    )


# ============================================================================ the listing and empty outputs


def test_listing_round_trip_with_awkward_class_names(tmp_path: Path) -> None:
    root = tmp_path / "images"
    labels = ["a,b", 'say "hi"', "ünïcødé 猫", " spaced ", "new\nline"]
    for i, label in enumerate(labels):
        save(root / "train" / label / f"x,{i}.png", noise((2, 2), i))
    entries = scan_split(root, "train")
    write_listing(entries, tmp_path / "listing.csv")
    assert read_listing(tmp_path / "listing.csv") == entries
    assert class_names(entries) == sorted(labels)
    other = pl.read_csv(tmp_path / "listing.csv")  # another CSV reader agrees on the cells
    assert other.columns == ["label", "file"] and other["label"].to_list() == [e.label for e in entries]
    assert other["file"].to_list() == [f"train/{e.label}/{e.key}" for e in entries]


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["label", "path"]], "line 1 (header): expected label,file, found 'label,path'"),
        (
            [["label", "file"], ["cat", "train/cat/1.png"], ["cat", "train/cat/2.png", "x"]],
            "row 2 (record 3): expected 2 values (label,file), found 3",
        ),
        (
            [["label", "file"], ["cat", "train/dog/1.png"]],
            "row 1 (record 2): expected a file train/<label>/<path> or test/<label>/<path> with label "
            "'cat', "
            "found 'train/dog/1.png'",
        ),
        (
            [["label", "file"], ["cat", "train/cat/../../../etc/passwd"]],
            "row 1 (record 2): expected a file train/<label>/<path> or test/<label>/<path> with label "
            "'cat', "
            "found 'train/cat/../../../etc/passwd'",
        ),
    ],
)
def test_listing_is_read_strictly(tmp_path: Path, rows: list[list[str]], message: str) -> None:
    path = write_rows(tmp_path / "listing.csv", rows)
    assert refused(read_listing, path) == f"{path}: {message}"


def test_empty_listing_gives_a_parquet_file_with_no_rows_and_the_shape(tmp_path: Path) -> None:
    write_listing([], tmp_path / "test.csv")
    assert read_listing(tmp_path / "test.csv") == []
    rows = images_to_parquet(
        tmp_path / "test.csv",
        tmp_path,
        tmp_path / "test.parquet",
        image_shape=(3, 8, 6),
        compression="uncompressed",
        compression_level=None,
        row_group_size=16,
    )
    table = pq.read_table(tmp_path / "test.parquet")
    assert rows == table.num_rows == 0
    assert table.schema.field("pixels").type == pa.binary(3 * 8 * 6)
    assert open_table(tmp_path / "test.parquet").image_shape == (3, 8, 6)
    assert refused(
        images_to_parquet,
        tmp_path / "test.csv",
        tmp_path,
        tmp_path / "none.parquet",
        image_shape=None,
        compression="zstd",
        compression_level=None,
        row_group_size=16,
    ) == (
        f"{tmp_path / 'test.csv'}: listing is empty and data.image_shape is not set; "
        "expected one or the other"
    )


def test_rows_are_written_in_row_groups_in_listing_order(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(5):
        save(root / f"train/c{i % 2}/{i}.png", noise((3, 3), i))
    table, _ = to_parquet(root, None, row_group_size=2)
    assert pq.ParquetFile(tmp_path / "train.parquet").metadata.num_row_groups == 3
    assert table.column("file").to_pylist() == [e.file for e in read_listing(tmp_path / "train.csv")]
    assert [
        ImageEntry(*r, key=r[1].split("/", 2)[2])
        for r in zip(table.column("label").to_pylist(), table.column("file").to_pylist())
    ] == scan_split(root, "train")


def test_a_piece_whose_pixels_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """A decoding process writes a piece's pixels to a temporary file (a full disk, say): one line."""
    save(tmp_path / "images/train/a/0.png", noise((4, 4), 0))
    out = tmp_path / "gone/0.u8"
    piece = imagedecode._Piece((str(tmp_path / "images/train/a/0.png"),), (1, 4, 4), False, "", str(out))
    with pytest.raises(OutputError) as info:
        imagedecode._decode_piece(piece)
    missing = f"[Errno 2] No such file or directory: '{out}'"
    assert str(info.value) == f"{out}: cannot write decoded pixels: {missing}"


def test_no_temporary_folder_for_the_pieces_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes pass a piece's pixels through a file of the temporary folder (TMPDIR): without one,
    one line."""
    decode_in(monkeypatch, "processes")
    for n in range(2):
        save(tmp_path / f"images/train/a/{n}.png", noise((4, 4), n))
    entries = scan_split(tmp_path / "images", "train")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(OutputError) as info:
        list(decoded_batches(entries, tmp_path / "images", (1, 4, 4), False, 2, 2))
    gone = tmp_path / "gone"
    assert str(info.value).startswith(f"{gone}: cannot make a folder for decoded pixels: [Errno 2]")
    assert str(info.value).endswith("; expected a writable temporary folder (set TMPDIR)")


@pytest.mark.parametrize(("how", "workers"), [("threads", 1), ("processes", 3)])
def test_memory_holds_one_row_group_not_every_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, workers: int
) -> None:
    """numpy's buffers are traced by tracemalloc: the decoded pixels alive at once are one row
    group's, and with processes a few pieces per process besides."""
    decode_in(monkeypatch, how)
    root = tmp_path / "images"
    for i in range(400):
        save(root / f"train/c{i % 4}/{i}.png", noise((64, 64, 3), i), compress_level=0)
    entries = scan_split(root, "train")
    write_listing(
        entries[:1], tmp_path / "warm.csv"
    )  # Pillow's plugins and Arrow's modules load on first use
    images_to_parquet(
        tmp_path / "warm.csv",
        root,
        tmp_path / "warm.parquet",
        image_shape=None,
        compression="zstd",
        compression_level=None,
        row_group_size=8,
    )
    write_listing(entries, tmp_path / "train.csv")
    tracemalloc.start()
    try:
        images_to_parquet(
            tmp_path / "train.csv",
            root,
            tmp_path / "train.parquet",
            image_shape=None,
            compression="zstd",
            compression_level=None,
            row_group_size=8,
            workers=workers,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pq.ParquetFile(tmp_path / "train.parquet").metadata.num_row_groups == 50
    assert peak < 400 * 64 * 64 * 3 / 4, peak  # all the pixels would be 4.9 MB; one row group is 98 KB
