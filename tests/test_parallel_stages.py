"""prep.shard_dtype uint8 (the write side) and prep.workers: the data stages' bytes never depend on the worker
count.

uint8 shards hold the source bytes exactly, and the trainer's lookup table reproduces the
float32 shard bit for bit; the file is what safetensors writes. tensorize (float32 and
uint8, with and without held-out splits, either layout) and parquet (images) give the same
bytes with 1 and 2 workers; Workers.map gives results in order whatever order they finish in.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import synth
from PIL import Image

from pipeline import csvblocks, imagedecode
from pipeline.errors import DataError
from pipeline.images import scan_split, write_listing
from pipeline.manifest import read_manifest
from pipeline.normalize import lookup_table, make_normalization
from pipeline.parquet import csv_to_parquet, images_to_parquet, iter_rows, open_table, read_labels
from pipeline.pool import Workers, cpu_count, read_ahead
from pipeline.shards import write_shard
from pipeline.tensorize import tensorize, write_split

CODEC = {"compression": "zstd", "compression_level": None, "row_group_size": 16}


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _wide_parquet(tmp_path: Path, n_train: int, n_test: int) -> tuple[Path, Path, synth.Split]:
    train, test = synth.split(n_train, 1), synth.split(n_test, 2)
    paths = []
    for name, s in (("train", train), ("test", test)):
        csv = synth.write_csv(tmp_path / f"{name}.csv", s)
        paths.append(tmp_path / f"{name}.parquet")
        csv_to_parquet(csv, paths[-1], allow_empty=True, **CODEC)
    return paths[0], paths[1], train


# Every format the image-folder source reads, and sizes other than the (3, 6, 5) asked for, so the
# threads decode, convert and resize.
_FORMATS = [
    (".png", {}),
    (".jpg", {}),
    (".bmp", {}),
    (".tif", {"compression": "tiff_lzw"}),
    (".webp", {}),
    (".ppm", {}),
]


def _image_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        suffix, kwargs = _FORMATS[i % len(_FORMATS)]
        path = root / "train" / f"c{i % 3}" / f"{i:03d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (6, 5, 3) if i % 2 else (9 + i % 4, 7, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, **kwargs)
    return root


def _tensorize(train_pq: Path, test_pq: Path, out: Path, **kw) -> dict:
    return tensorize(
        train_pq,
        test_pq,
        out / "train",
        out / "test",
        out / "val",
        dataset="csv",
        shard_size=7,
        **{"normalize_kind": "unit", "test_fraction": 0.2, "val_fraction": 0.0, **kw},
    )


def test_uint8_shard_holds_the_source_bytes_and_the_table_gives_the_float32_values(tmp_path):
    train_pq, test_pq, train = _wide_parquet(tmp_path, 30, 9)
    for dtype in ("float32", "uint8"):
        _tensorize(
            train_pq, test_pq, tmp_path / dtype, shard_dtype=dtype, normalize_kind="standard", workers=1
        )
    manifest = read_manifest(tmp_path / "uint8" / "train")
    floats = read_manifest(tmp_path / "float32" / "train")
    assert manifest.image_dtype == "uint8" and manifest.normalization == floats.normalization
    assert manifest.normalization.kind == "standard"
    raw = [safetensors.numpy.load_file(tmp_path / "uint8" / "train" / s.file) for s in manifest.shards]
    flt = [safetensors.numpy.load_file(tmp_path / "float32" / "train" / s.file) for s in floats.shards]
    images = np.concatenate([r["images"] for r in raw])
    assert images.dtype == np.uint8 and images.shape == (30, 1, 28, 28)
    assert np.array_equal(
        images.reshape(30, -1), train.pixels
    )  # the source bytes, in order, nothing held out
    assert all(r["labels"].dtype == np.int64 for r in raw)
    table = lookup_table(manifest.normalization)
    expected = np.concatenate([f["images"] for f in flt])
    assert table[0][images].view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()


def test_write_split_writes_uint8_shards(tmp_path):
    s = synth.split(9, 4)
    manifest = write_split(
        [(s.pixels, s.labels)],
        tmp_path / "t",
        dataset="fashion-mnist",
        split="train",
        shard_size=4,
        normalization=make_normalization("unit", None),
        shard_dtype="uint8",
    )
    assert manifest.image_dtype == "uint8" and [m.num_samples for m in manifest.shards] == [4, 4, 1]
    loaded = [safetensors.numpy.load_file(tmp_path / "t" / m.file) for m in manifest.shards]
    assert np.array_equal(np.concatenate([x["images"] for x in loaded]), s.images[:, None])
    assert np.array_equal(np.concatenate([x["labels"] for x in loaded]), s.labels.astype(np.int64))


@pytest.mark.parametrize("shape, n", [((1, 28, 28), 5), ((3, 5, 7), 3)])
def test_uint8_shard_is_safetensors_own_bytes_with_sorted_header(shape, n):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, 9, n).astype(np.int64)
    out = io.BytesIO()
    size, sha = write_shard(
        out,
        (images[i : i + 2] for i in range(0, n, 2)),
        labels,
        shape,
        {"split": "train", "dataset": "d"},
        "uint8",
    )
    blob = safetensors.numpy.save(
        {"images": images, "labels": labels}, metadata={"split": "train", "dataset": "d"}
    )
    header_len = struct.unpack("<Q", blob[:8])[0]
    ours = out.getvalue()
    assert size == len(ours) == len(blob) and ours[8 + header_len :] == blob[8 + header_len :]
    assert json.loads(ours[8 : 8 + header_len]) == json.loads(blob[8 : 8 + header_len])
    assert json.loads(ours[8 : 8 + header_len])["images"]["dtype"] == "U8"
    assert list(json.loads(ours[8 : 8 + header_len])) == sorted(json.loads(blob[8 : 8 + header_len]))
    assert sha == hashlib.sha256(ours).hexdigest()


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@pytest.mark.parametrize(
    ("held_out", "normalize_kind"),  # statistics counted by the routing pass or by the train shards
    [(False, "unit"), (True, "standard"), (True, "unit"), (False, "standard")],
)
def test_tensorize_bytes_do_not_depend_on_workers(tmp_path, dtype, held_out, normalize_kind):
    train_pq, test_pq, _ = _wide_parquet(tmp_path, 40, 0 if held_out else 11)
    kw = {"shard_dtype": dtype, "val_fraction": 0.25 if held_out else 0.0, "normalize_kind": normalize_kind}
    one = _tensorize(train_pq, test_pq, tmp_path / "one", workers=1, **kw)
    two = _tensorize(train_pq, test_pq, tmp_path / "two", workers=2, **kw)
    assert one == two
    assert len(one["train"].shards) > 1 and (one["val"].num_samples > 0) == held_out
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")


@pytest.mark.parametrize("workers", [1, 2])
def test_more_than_one_worker_takes_the_parallel_path(tmp_path, monkeypatch, workers):
    """The byte-identity tests above compare the two paths only if workers > 1 reaches the
    parallel one, and 1 the serial one."""
    import pipeline.tensorize as tensorize_module

    taken = []
    for name in ("_serial", "_parallel"):
        path = getattr(tensorize_module, name)
        monkeypatch.setattr(
            tensorize_module, name, lambda *a, _p=path, _n=name, **k: taken.append(_n) or _p(*a, **k)
        )
    train_pq, test_pq, _ = _wide_parquet(tmp_path, 40, 11)
    _tensorize(train_pq, test_pq, tmp_path / "out", workers=workers)
    assert taken == ["_serial" if workers == 1 else "_parallel"]


def test_the_pool_is_shut_before_the_split_folders_close(tmp_path, monkeypatch):
    """The pool opens before the folders (its workers boot while the inputs' metadata is read),
    yet shuts first: no worker may still write into a folder being committed or discarded."""
    import pipeline.tensorize as tensorize_module

    events, real_dir, real_close = [], tensorize_module.atomic_dir, Workers.close

    @contextlib.contextmanager
    def folder(target):
        try:
            with real_dir(target) as tmp:
                yield tmp
        finally:
            events.append("folder")

    def close(self):
        events.append("pool" if self._pool is not None else "closed already")
        real_close(self)

    monkeypatch.setattr(tensorize_module, "atomic_dir", folder)
    monkeypatch.setattr(Workers, "close", close)
    train_pq, test_pq, _ = _wide_parquet(tmp_path, 40, 11)
    _tensorize(train_pq, test_pq, tmp_path / "out", workers=2)
    assert events == ["pool", "folder", "folder", "folder", "closed already"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("held_out", [False, True])
def test_uint8_standard_shards_count_their_statistics_in_the_same_pass(tmp_path, workers, held_out):
    """uint8 shards do not depend on the statistics, so they are counted while the shards are written
    (no first pass over the pixels); the manifests record what the float32 path's first pass finds."""
    train_pq, test_pq, _ = _wide_parquet(tmp_path, 40, 0 if held_out else 11)
    kw = {"val_fraction": 0.25 if held_out else 0.0, "normalize_kind": "standard", "workers": workers}
    f32 = _tensorize(train_pq, test_pq, tmp_path / "f32", shard_dtype="float32", **kw)
    u8 = _tensorize(train_pq, test_pq, tmp_path / "u8", shard_dtype="uint8", **kw)
    for split, manifest in u8.items():
        assert manifest.normalization == f32[split].normalization, split
        assert manifest.normalization.kind == "standard" and manifest.train_stats == f32[split].train_stats
        assert manifest.class_counts == f32[split].class_counts


def test_image_layout_tensorize_and_parquet_bytes_do_not_depend_on_workers(tmp_path, monkeypatch):
    # Each row group of 5 images is 3 tasks for the threads, or 3 pieces for the processes.
    monkeypatch.setattr(imagedecode, "DECODE_CHUNK", 2)
    monkeypatch.setattr(imagedecode, "PIECE_IMAGES", 2)
    monkeypatch.setattr(imagedecode, "PROCESSES_FROM_IMAGES", 0)
    root = _image_folder(tmp_path / "images", 23)
    write_listing(scan_split(root, "train"), tmp_path / "train.csv")
    write_listing([], tmp_path / "test.csv")
    for n, threads_from in ((1, 0), (2, 0), (3, 1 << 40)):  # one thread, two threads, three processes
        monkeypatch.setattr(imagedecode, "THREADS_FROM_PIXELS", threads_from)
        for split in ("train", "test"):
            images_to_parquet(
                tmp_path / f"{split}.csv",
                root,
                tmp_path / f"{split}-{n}.parquet",
                image_shape=(3, 6, 5),
                workers=n,
                **{**CODEC, "row_group_size": 5},
            )
    assert imagedecode.decode_plan(scan_split(root, "train"), root, 3) == imagedecode.Plan("processes", 3)
    for n in (2, 3):
        assert (tmp_path / "train-1.parquet").read_bytes() == (tmp_path / f"train-{n}.parquet").read_bytes()
    for n in (1, 2):
        tensorize(
            tmp_path / "train-1.parquet",
            tmp_path / "test-1.parquet",
            tmp_path / f"t{n}/train",
            tmp_path / f"t{n}/test",
            tmp_path / f"t{n}/val",
            dataset="images",
            shard_size=4,
            normalize_kind="unit",
            test_fraction=0.3,
            val_fraction=0.2,
            shard_dtype="uint8",
            workers=n,
        )
    assert _tree_bytes(tmp_path / "t1") == _tree_bytes(tmp_path / "t2")
    assert read_manifest(tmp_path / "t1" / "val").num_samples > 0
    table = open_table(tmp_path / "train-1.parquet")  # iter_rows' contract holds for this layout too
    without = list(iter_rows(table, 4, 3, 19, labels=False))
    with_labels = list(iter_rows(table, 4, 3, 19))
    assert all(r.labels is None for r in without) and all(r.labels is not None for r in with_labels)
    assert [r.files for r in without] == [r.files for r in with_labels]


@pytest.mark.parametrize(("start", "stop", "chunk"), [(0, 70, 7), (5, 44, 10), (16, 32, 100), (31, 33, 1)])
def test_rows_and_labels_of_any_span_across_row_groups(tmp_path, start, stop, chunk):
    """Each row group is decoded once and cut into chunks; spans may start and end inside groups."""
    train_path, _, train = _wide_parquet(tmp_path, 70, 3)  # row groups of 16 rows
    table = open_table(train_path)
    parts = list(iter_rows(table, chunk, start, stop))
    assert all(0 < len(p.labels) <= chunk for p in parts)
    assert np.array_equal(np.concatenate([p.pixels for p in parts]), train.pixels[start:stop])
    assert np.array_equal(np.concatenate([p.labels for p in parts]), train.labels[start:stop])
    assert np.array_equal(read_labels(table, start, stop), train.labels[start:stop])
    assert np.array_equal(read_labels(table), train.labels)


@pytest.mark.parametrize("columns", [1, 5, 784])
def test_a_wide_row_group_is_decoded_a_block_of_columns_at_a_time(tmp_path, monkeypatch, columns):
    """Polars decodes ``DECODE_BYTES`` of columns at a time (its allocator keeps what each
    decode held, so the blocks are small): blocks of 1, 5 or all columns give the same rows."""
    from pipeline import parquet

    train_path, _, train = _wide_parquet(tmp_path, 70, 3)  # row groups of 16 rows
    monkeypatch.setattr(parquet, "DECODE_BYTES", 16 * columns)
    parts = list(iter_rows(open_table(train_path), 10, 5, 44))
    assert np.array_equal(np.concatenate([p.pixels for p in parts]), train.pixels[5:44])


def test_a_split_of_every_row_is_a_range_not_an_index_that_grows_with_the_data():
    """With nothing held out, every train row trains: the stage holds a range, not 8 bytes a row;
    the pieces' indices are the same either way."""
    from pipeline.splits import TEST, TRAIN, VAL
    from pipeline.tensorize import _index_bytes, _rows_of

    every = np.full(10, TRAIN, dtype=np.uint8)
    assert _rows_of(every, TRAIN) == range(10) and len(_rows_of(every, VAL)) == 0
    mixed = np.array([TRAIN, VAL, TRAIN, TEST, TRAIN], dtype=np.uint8)
    assert np.array_equal(_rows_of(mixed, TRAIN), [0, 2, 4])
    assert _index_bytes(range(10)[3:7]) == np.arange(3, 7, dtype=np.int64).tobytes()
    assert _index_bytes(_rows_of(mixed, TRAIN)[1:]) == np.array([2, 4], dtype=np.int64).tobytes()


def test_a_shard_piece_reads_its_rows_without_opening_the_file_again(tmp_path, monkeypatch):
    """A piece carries the table the stage opened: Arrow's ``ParquetFile`` parses the whole footer,
    which grows with a wide file's row groups, and every piece of every worker would parse it again.
    The table travels to a worker without its Polars scan (the worker makes its own)."""
    import pickle

    import pyarrow.parquet as pq

    from pipeline.shardjobs import RoutePiece, ShardPiece, route_piece, write_piece
    from pipeline.splits import TEST, TRAIN, VAL

    train_pq, _, train = _wide_parquet(tmp_path, 40, 3)
    table = open_table(train_pq)
    read_labels(table)  # the scan is made and cached, as the stage's own reads may do
    sent = pickle.loads(pickle.dumps(table))
    assert "scan" in vars(table) and "scan" not in vars(sent) and sent == table

    def no_footer_parse(*args, **kwargs):
        raise AssertionError("a piece opened the file with Arrow")

    monkeypatch.setattr(pq, "ParquetFile", no_footer_parse)
    wanted = np.array([3, 4, 17, 20, 33], dtype=np.int64)
    (tmp_path / "out").mkdir()
    done = write_piece(
        ShardPiece(
            sent,
            wanted.tobytes(),
            str(tmp_path / "out"),
            str(tmp_path / "out"),
            "s.safetensors",
            "train",
            "csv",
            (1, 28, 28),
            None,
            tuple(map(str, range(10))),
            "uint8",
            False,
        )
    )
    tensors = safetensors.numpy.load_file(tmp_path / "out" / "s.safetensors")
    assert done.num_samples == 5
    assert np.array_equal(tensors["images"].reshape(5, -1), train.pixels[wanted])
    # The routing pass's pieces too: the split of each row and the histogram of those that train.
    raw, histogram = route_piece(RoutePiece(sent, 0, 40, 0.2, 0.1, 1, True))
    codes = np.frombuffer(raw, dtype=np.uint8)
    assert len(codes) == 40 and set(codes.tolist()) == {TRAIN, VAL, TEST}
    assert np.array_equal(
        np.asarray(histogram)[0], np.bincount(train.pixels[codes == TRAIN].ravel(), minlength=256)
    )


def test_rows_without_labels_leave_the_label_column_unread(tmp_path):
    """A shard writes its labels before its pixels, so its pixel pass asks for none: the label
    column is not read again. A null label (which any read of the column refuses) shows it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train_path, _, train = _wide_parquet(tmp_path, 40, 3)
    data = pq.read_table(train_path)
    labels = pa.array([None if i == 30 else int(v) for i, v in enumerate(train.labels)], pa.uint16())
    pq.write_table(data.set_column(0, "label", labels), tmp_path / "null.parquet", row_group_size=16)
    table = open_table(tmp_path / "null.parquet")
    parts = list(iter_rows(table, 7, 2, 40, labels=False))
    assert all(p.labels is None for p in parts)
    assert np.array_equal(np.concatenate([p.pixels for p in parts]), train.pixels[2:40])
    with pytest.raises(
        DataError, match=r"null.parquet: row 31, column 'label': expected a value, found null"
    ):
        list(iter_rows(table, 7, 2, 40))
    # The footer's statistics give the largest label without reading the column; a row group
    # with a null has no usable maximum, so the caller reads the column and meets the null.
    assert open_table(train_path).largest_label == int(train.labels.max())
    assert table.largest_label is None


def test_csv_parquet_bytes_do_not_depend_on_workers(tmp_path, monkeypatch):
    # Blocks of 16 KiB: the 50 rows (~147 KB) are many blocks, so the read-ahead path sees several.
    monkeypatch.setattr(csvblocks, "BLOCK_BYTES", 16 << 10)
    csv = synth.write_csv(tmp_path / "train.csv", synth.split(50, 3))
    for n in (1, 2):
        assert csv_to_parquet(csv, tmp_path / f"{n}.parquet", workers=n, **CODEC) == 50
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_bytes(csv.read_bytes() + b"3," + b"1," * 783 + b"256\n")
    with pytest.raises(
        DataError, match=r"row 51 \(line 52\), column 785 \(pixel784\): expected an integer 0..255, found 256"
    ):
        csv_to_parquet(bad, tmp_path / "bad.parquet", workers=2, **CODEC)
    assert not (tmp_path / "bad.parquet").exists()


def _items_then_failure():
    yield from (1, 2, 3)
    raise DataError("fourth item refused")


def test_read_ahead_keeps_order_and_raises_the_producers_error_after_its_items():
    got = []
    with pytest.raises(DataError, match="fourth item refused"):
        for item in read_ahead(_items_then_failure(), lambda x: 1, 1):
            got.append(item)
    assert got == [1, 2, 3]
    assert list(read_ahead(iter(range(100)), lambda x: x, 10)) == list(range(100))


def _slow_square(x: int) -> int:
    time.sleep(0.05 * (4 - x) if x < 4 else 0)  # the first pieces finish last
    return x * x


def polars_threads(_: int) -> int:
    """What a pool worker's Polars runs on (module level: workers import it by name)."""
    import polars as pl

    return pl.thread_pool_size()


def _worker_threads(_: int) -> tuple[int, int]:
    time.sleep(0.1)
    return os.getpid(), polars_threads(0)


def test_each_pool_worker_runs_polars_on_one_thread_unless_the_user_says(monkeypatch):
    monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)
    with Workers(3) as pool:
        ran = list(pool.map(_worker_threads, range(8)))
    in_workers = [threads for pid, threads in ran if pid != os.getpid()]
    assert in_workers and set(in_workers) == {1}, ran
    # The fork server keeps the environment it started with: the user's setting, in a fresh process.
    code = (
        "from test_parallel_stages import polars_threads\nfrom pipeline.pool import Workers\n"
        "with Workers(2) as pool:\n    print(sorted(set(pool.map(polars_threads, range(4)))))"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "POLARS_MAX_THREADS": "3", "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "[3]", out.stderr  # this process's Polars, and the worker's


def _has_module(name: str) -> bool:
    return name in sys.modules


def _has_tabnanny(_: int) -> tuple[int, bool]:
    time.sleep(0.1)
    return os.getpid(), "tabnanny" in sys.modules


def test_the_workers_start_when_the_pool_opens_and_import_what_their_pieces_need():
    """A stage opens its pool before reading its inputs' metadata: the workers boot meanwhile.
    Three processes run the pieces: this one and two started workers."""
    for preload, found in ((("tabnanny",), True), ((), False)):  # a module nothing here imports
        with Workers(3, preload=preload) as pool:
            started = multiprocessing.active_children()  # before any piece was given
            assert len(started) == 2, started
            ran = list(pool.map(_has_tabnanny, range(8)))
        assert {has for pid, has in ran if pid != os.getpid()} == {found}, ran


def test_workers_map_keeps_the_order_whatever_finishes_first():
    with Workers(2) as pool:
        assert list(pool.map(_slow_square, range(6))) == [x * x for x in range(6)]


def _slow_in_a_worker(piece: tuple[int, int]) -> int:
    """Slow in a worker, instant in the map's own process (which would then draw ever more)."""
    i, parent = piece
    if os.getpid() != parent:
        time.sleep(0.3)
    return i


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_map_draws_a_bounded_number_of_pieces_ahead(workers):
    """Pieces are made as the processes take them: memory stays bounded by the piece size, not the
    number of pieces. This process takes pieces while it waits for a worker's, but only while
    fewer than 2 x workers wait to be taken; each worker holds 2 (the one it runs, its next)."""
    drawn = []

    def pieces():
        for i in range(40):
            drawn.append(i)
            yield i, os.getpid()

    with Workers(workers) as pool:
        ahead = []
        for taken, result in enumerate(pool.map(_slow_in_a_worker, pieces())):
            assert result == taken
            ahead.append(len(drawn) - taken)
    assert drawn == list(range(40))
    bound = 2 * workers + 2 * (workers - 1)  # waiting to be taken, and the workers' next pieces
    assert max(ahead) <= bound and max(ahead) >= 2 * workers, ahead


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_workers_map_draws_a_bounded_number_of_pieces_ahead_of_a_slow_consumer(workers):
    """Workers whose pieces finish before the consumer takes their results are given no more
    pieces than the bound allows, however many are left."""
    drawn = []

    def pieces():
        for i in range(60):
            drawn.append(i)
            yield i

    ahead = []
    with Workers(workers) as pool:
        for taken, result in enumerate(pool.map(abs, pieces())):
            assert result == taken
            time.sleep(0.02)  # the consumer: slower than the pieces
            ahead.append(len(drawn) - taken)
    assert max(ahead) <= 2 * workers + 2 * (workers - 1), ahead


def test_read_ahead_stays_within_its_budget_and_stops_the_producer_when_the_consumer_does():
    produced, closed = [], []

    def items():
        try:
            for i in range(50):
                produced.append(i)
                yield i
        finally:  # where it runs: a generator left to the garbage collector closes in another thread
            closed.append(threading.current_thread().name)

    got = []
    for item in read_ahead(items(), lambda x: 2, 6):  # three items of weight 2 ahead at most
        time.sleep(0.005)  # a slow consumer: the producer would run far ahead without the budget
        # ahead: the items queued (6 / 2) and the one the producer holds while it waits
        assert len(produced) <= len(got) + 1 + 3 + 1, (len(got), len(produced))
        got.append(item)
    assert got == list(range(50))
    produced.clear()
    stream = read_ahead(items(), lambda x: 1, 2)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # the consumer stops early: the producer's generator is closed, its file with it
    assert closed == ["read-ahead", "read-ahead"] and len(produced) < 50


def _die(piece: tuple[int, int]) -> int:
    i, parent = piece
    if i >= 3 and os.getpid() != parent:
        os._exit(9)  # a worker killed mid-piece (out of memory, a signal)
    time.sleep(0.05)
    return i


def test_a_worker_that_dies_is_one_line(tmp_path):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as err, Workers(2) as pool:
        list(pool.map(_die, [(i, os.getpid()) for i in range(12)]))
    assert str(err.value).startswith("a worker process of this stage died (") and "\n" not in str(err.value)
    assert str(err.value).endswith("rerun with prep.workers: 1 to run every piece in the stage's own process")


def _slow_pid(piece: int) -> int:
    time.sleep(0.2)  # long enough that every process takes pieces
    return os.getpid()


def test_workers_serve_every_pass_of_a_stage():
    """Tensorize routes, then writes: one start of the workers (an interpreter importing Polars and
    Arrow each) serves both passes, and the map's own process runs pieces too."""
    with Workers(3) as pool:
        first = set(pool.map(_slow_pid, range(9)))
        second = set(pool.map(_slow_pid, range(9)))
    # Workers of a fresh pool would have new pids: none in common with the first pass.
    assert first == second and len(first) == 3 and os.getpid() in first
    with Workers(1) as one:
        assert set(one.map(_slow_pid, range(2))) == {os.getpid()}


_LONG_TMPDIR = """
import sys
from pipeline import pool
from pipeline.cli import run_stage

def main(argv):
    pool.SHORT_TEMP_FOLDERS = tuple(sys.argv[1:]) or pool.SHORT_TEMP_FOLDERS
    with pool.Workers(2) as workers:
        print(list(workers.map(abs, range(-3, 3))), flush=True)

run_stage(main)
"""


def _run_with_long_tmpdir(tmp_path: Path, *short: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A fresh process (the forkserver and multiprocessing's folder are made once per process) that
    opens a pool of two under a ``TMPDIR`` of 120 characters made in ``tmp_path``, ``short`` standing
    for pool.SHORT_TEMP_FOLDERS; the process and that folder."""
    long = tmp_path / ("t" * max(1, 120 - len(str(tmp_path))))
    long.mkdir()
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-c", _LONG_TMPDIR, *short],
        env={**os.environ, "PYTHONPATH": str(root), "TMPDIR": str(long)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return res, long


def test_a_tmpdir_too_long_for_the_forkservers_socket_still_runs_the_pieces(tmp_path):
    """From about 76 characters (a cluster job's or a CI workspace's folder), TMPDIR left no room for
    the forkserver's socket path: every stage with workers stopped on a traceback ending in
    ``OSError: AF_UNIX path too long``. Multiprocessing's folder now goes to /tmp, as Python 3.14 does."""
    res, long = _run_with_long_tmpdir(tmp_path)
    assert res.returncode == 0 and res.stdout == "[3, 2, 1, 0, 1, 2]\n", res.stderr
    assert list(long.iterdir()) == []  # multiprocessing's folder was not made there


def test_a_tmpdir_too_long_with_no_short_folder_to_use_is_one_line(tmp_path):
    res, long = _run_with_long_tmpdir(tmp_path, str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr == (
        f"error: the temporary folder {long} ({len(str(long))} characters) leaves no room for the worker "
        f"processes' socket path, and none of {tmp_path / 'missing'} could be used instead: set TMPDIR "
        "to a folder of at most 71 characters, or prep.workers: 1\n"
    )


_CTRL_C_STAGE = """
import time
from pipeline.cli import run_stage
from pipeline.pool import Workers

def main(argv):
    with Workers(2) as pool:
        print("started", sum(pool.map(len, ["ab", "c"])), flush=True)  # both workers up
        list(pool.map(time.sleep, [60, 60, 60]))

run_stage(main)
"""


def _ctrl_c_stage(tmp_path: Path, snippet: str, marker: str, settle_s: float) -> tuple[int, str]:
    """``snippet`` run as a stage in its own process group, as a terminal's foreground job is, and the
    group sent SIGINT ``settle_s`` after ``marker`` appears in its output: its exit status and output."""
    root = Path(__file__).resolve().parent.parent
    log = tmp_path / "stage.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", snippet],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while marker not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        time.sleep(settle_s)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, log.read_text()


def test_ctrl_c_in_a_parallel_stage_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C reaches the whole process group, the stage's workers included: the stage says so in one
    line; each worker busy with a piece used to add a KeyboardInterrupt traceback of its own."""
    code, text = _ctrl_c_stage(tmp_path, _CTRL_C_STAGE, "started 3", 0.5)  # the workers are in their pieces
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.endswith("error: interrupted\n"), text


_CTRL_C_POOL_START = """
import multiprocessing
from pipeline.cli import run_stage
from pipeline.pool import Workers

def main(argv):
    # The forkserver imports this module first, before it can set a handler: a slow start-up to hit.
    multiprocessing.get_context("forkserver").set_forkserver_preload(["slow_start"])
    with Workers(2) as pool:
        print("started", sum(pool.map(len, ["ab", "c"])), flush=True)

run_stage(main)
"""


def test_ctrl_c_while_the_workers_start_is_one_line_and_exit_130(tmp_path):
    """The forkserver and the workers are new interpreters, and each prints a traceback of its own
    imports if Ctrl-C reaches it before it has a handler: they start with SIGINT blocked."""
    (tmp_path / "slow_start.py").write_text(
        "import sys, time\nprint('forkserver starting', file=sys.stderr, flush=True)\ntime.sleep(3)\n"
    )
    code, text = _ctrl_c_stage(tmp_path, _CTRL_C_POOL_START, "forkserver starting", 0.0)
    assert code == 130, text
    assert text == "forkserver starting\nerror: interrupted\n", text


_CTRL_C_DECODE = """
import tempfile
from pathlib import Path
from pipeline import imagedecode
from pipeline.cli import run_stage
from pipeline.images import scan_split, write_listing
from pipeline.parquet import images_to_parquet

def main(argv):
    tempfile.tempdir = "scratch"  # where the pieces' pixels pass
    imagedecode.PROCESSES_FROM_IMAGES, imagedecode.PIECE_IMAGES = 0, 1  # processes, an image per piece
    write_listing(sorted(scan_split(Path("images"), "train"), key=lambda e: e.file), Path("train.csv"))
    print("started", flush=True)
    images_to_parquet(Path("train.csv"), Path("images"), Path("train.parquet"), image_shape=(1, 4, 4),
                      compression="zstd", compression_level=None, row_group_size=8, workers=2)

run_stage(main)
"""


def test_ctrl_c_while_processes_decode_images_is_one_line_and_leaves_nothing(tmp_path):
    """An image folder of small images is decoded in processes, each piece's pixels passing through a
    temporary file: Ctrl-C mid-decode is one line and exit 130, with no Parquet file and no piece's
    file left behind."""
    small = tmp_path / "images/train/a/000.png"
    small.parent.mkdir(parents=True)
    Image.new("L", (4, 4), 1).save(small)  # the first image: small, so processes decode the folder
    Image.new("L", (3000, 3000), 7).save(tmp_path / "big.png")  # tens of milliseconds each to decode
    big = (tmp_path / "big.png").read_bytes()
    for n in range(1, 200):
        path = tmp_path / f"images/train/{'ab'[n % 2]}/{n:03}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(big)
    (tmp_path / "scratch").mkdir()
    code, text = _ctrl_c_stage(tmp_path, _CTRL_C_DECODE, "started", 1.0)
    assert code == 130, text
    assert "Traceback" not in text and text.endswith("started\nerror: interrupted\n"), text
    assert not (tmp_path / "train.parquet").exists() and list((tmp_path / "scratch").iterdir()) == []


_DEFERRED = """
import os, signal, threading, time
from pipeline.pool import ctrl_c_deferred

steps = []
# A thread that takes signals, as the pool's and PyTorch's threads do: with SIGINT blocked in the main thread,
# the kernel hands it to this one, whose C handler only notes it for the main thread's Python handler.
threading.Thread(target=time.sleep, args=(3,), daemon=True).start()
try:
    with ctrl_c_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the usual handler would have raised by now
        steps.append("block ran to its end")
    steps.append("not interrupted")
except KeyboardInterrupt:
    steps.append("interrupted after the block")
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
with ctrl_c_deferred():
    inside = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # forks start with it blocked
steps.append(f"a quiet block raises nothing; SIGINT blocked inside: {inside}")
elsewhere = threading.Thread(target=lambda: ctrl_c_deferred().__enter__())  # no handler to swap there
elsewhere.start()
elsewhere.join()
signal.signal(signal.SIGINT, signal.SIG_IGN)
with ctrl_c_deferred():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
steps.append("an ignored Ctrl-C stays ignored")
print(steps)
"""


def test_ctrl_c_in_a_pools_bookkeeping_is_raised_after_it():
    """``ctrl_c_deferred``: a Ctrl-C inside the block is raised once the block ends, never inside it, where
    it could leave a future's lock held by the main thread and the pool's own thread waiting for it."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _DEFERRED], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(
        [
            "block ran to its end",
            "interrupted after the block",
            "a quiet block raises nothing; SIGINT blocked inside: True",
            "an ignored Ctrl-C stays ignored",
        ]
    ), out.stderr


def test_reading_rows_and_labels_does_not_import_pandas(tmp_path):
    """Arrow's ``to_numpy`` imports pandas: some 40 MB and a few tenths of a second in every worker."""
    train_path, _, _ = _wide_parquet(tmp_path, 40, 3)
    code = (
        "import sys; from pathlib import Path; "
        "from pipeline.parquet import open_table, read_labels, iter_rows; "
        f"t = open_table(Path({str(train_path)!r})); labels = read_labels(t, 3, 37); "
        "n = sum(len(r.labels) for r in iter_rows(t, 5)); "
        "print(labels.dtype, len(labels), n, 'pandas' in sys.modules)"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.stdout.split() == ["uint16", "34", "40", "False"], out.stderr


@pytest.mark.parametrize("workers", [1, None])
def test_prep_workers_1_keeps_the_stages_on_one_core(tmp_path, monkeypatch, workers):
    """prep.workers: 1 is a serial run: Polars' and Arrow's own thread pools in each data stage are one
    thread.

    Polars sizes its pool when first imported, so the stages import it only after reading
    prep.workers (pipeline.pool.use_cores); more workers keep the libraries' defaults, except in
    tensorize, whose every process runs pieces on one thread.
    """
    monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)
    tr, te = synth.split(40, seed=1), synth.split(10, seed=2)
    csvs = [synth.write_csv(tmp_path / "csv" / f"{n}.csv", s) for n, s in (("train", tr), ("test", te))]
    params = synth.write_params(
        tmp_path / "params.yaml",
        data={"dataset": "csv", "train_csv": str(csvs[0]), "test_csv": str(csvs[1])},
        prep={"workers": workers, "shard_size": 16},
    )
    parquet = ["data/parquet/train.parquet", "data/parquet/test.parquet"]
    runs = [
        ("csv", "--raw", "raw", "--train", "c/train.csv", "--test", "c/test.csv"),
        (
            "parquet",
            "--train-csv",
            "c/train.csv",
            "--test-csv",
            "c/test.csv",
            "--train",
            parquet[0],
            "--test",
            parquet[1],
        ),
        (
            "tensorize",
            "--train-parquet",
            parquet[0],
            "--test-parquet",
            parquet[1],
            "--train",
            "t",
            "--test",
            "e",
        ),
    ]
    for stage, *args in runs:
        proc = synth.run_stage(stage, "--params", params, *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        if workers == 1:
            assert (
                f"{stage}: prep.workers 1: 1 core(s); in this process Polars 1 thread(s), Arrow 1"
                in proc.stdout
            )
        elif cpu_count() > 1:
            cores = f"{cpu_count()} core(s), all this process may use"
            assert f"{stage}: prep.workers null: {cores}; in this process Polars " in proc.stdout
            one = "Polars 1 thread(s), Arrow 1\n" in proc.stdout
            # tensorize's own process writes shards beside its workers: one thread, as each of them
            assert one == (stage == "tensorize"), proc.stdout
