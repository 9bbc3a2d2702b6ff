"""Block-wise CSV parsing: blocks are whole lines, only a genuine single over-long line takes the slow path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from pipeline import csvblocks
from pipeline.errors import DataError
from pipeline.tabular import HEADER_LINE


def _rows(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    table = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 784))], axis=1)
    return b"".join(b",".join(str(v).encode() for v in row) + b"\n" for row in table)


def test_blocks_are_whole_lines_and_only_a_single_long_line_is_taken_for_one(monkeypatch) -> None:
    size = 10_000
    monkeypatch.setattr(csvblocks, "BLOCK_BYTES", size)  # small blocks, so a few rows cross every boundary
    data = _rows(40)
    blocks = list(csvblocks._blocks(io.BytesIO(data), size))
    assert b"".join(blocks) == data and all(b.endswith(b"\n") for b in blocks)
    over = [b for b in blocks if len(b) > size]
    # blocks of many lines run a line over the block size: they are not "one hostile line"
    assert over and not any(csvblocks._one_long_line(b) for b in over)
    long_line = b"1," * (size // 2) + b"1\n"
    assert csvblocks._one_long_line(long_line)
    cut = data.index(b"\n", 3000) + 1
    spliced = data[:cut] + long_line + data[cut:]
    blocks = list(csvblocks._blocks(io.BytesIO(spliced), size))
    assert b"".join(blocks) == spliced
    # the hostile line is a block of its own, so explaining it copies none of its neighbours
    assert [b for b in blocks if csvblocks._one_long_line(b)] == [long_line]


def test_parsed_blocks_speak_of_the_given_file_and_column_names(tmp_path: Path) -> None:
    body = _rows(30).split(b"\n")
    body[24] = body[24].rsplit(b",", 1)[0] + b",256"
    path = tmp_path / "copy.csv"
    path.write_bytes(HEADER_LINE + b"\n".join(body))
    names = ["label", *(f"pixel{i}" for i in range(784))]  # Kaggle's zero-based spelling
    with pytest.raises(DataError) as err:
        list(csvblocks.parsed_blocks(path, len(HEADER_LINE), where="user.csv", names=names))
    assert str(err.value) == ("user.csv: row 25 (line 26), column 785 (pixel783): "
                              "expected an integer 0..255, found 256")
    good = tmp_path / "good.csv"
    good.write_bytes(HEADER_LINE + _rows(30))
    assert sum(df.height for df in csvblocks.parsed_blocks(good, len(HEADER_LINE))) == 30
