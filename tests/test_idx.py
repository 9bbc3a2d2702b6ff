"""IDX encode/decode: round trips for every dtype, exact bytes, malformed files refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.errors import DataError
from pipeline.idx import DTYPE_CODES, MAX_DIMS, decode_idx, encode_idx, parse_idx_header

ALL_DTYPES = ["u1", "i1", ">i2", ">i4", ">f4", ">f8"]


def header(code: int, *dims: int, zero: int = 0) -> bytes:
    return struct.pack(">HBB", zero, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def test_known_bytes_of_a_small_uint8_array():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert encode_idx(a) == bytes.fromhex("0000 0802 00000002 00000003 000102030405".replace(" ", ""))


def test_known_bytes_are_big_endian_for_wide_types():
    a = np.array([1, -2], dtype="<i4")  # little-endian input must still be written big-endian
    assert encode_idx(a) == header(0x0C, 2) + bytes.fromhex("00000001fffffffe")
    f = np.array([1.5], dtype="<f8")
    assert encode_idx(f) == header(0x0E, 1) + struct.pack(">d", 1.5)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (0,), (2, 0, 5)])
def test_round_trip_every_dtype(dtype, shape):
    rng = np.random.default_rng(1)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        a = rng.standard_normal(shape).astype(dt)
    else:
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dt)
    raw = encode_idx(a)
    assert raw[2] in DTYPE_CODES and DTYPE_CODES[raw[2]] == dt
    back = decode_idx(raw)
    assert back.shape == shape
    assert back.dtype == dt.newbyteorder("=")  # native order after decoding
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, a)
    assert encode_idx(back) == raw


@pytest.mark.parametrize("native", ["<i2", "<i4", "<f4", "<f8"])
def test_little_endian_and_native_inputs_encode_the_same(native):
    a = np.array([[1, 2], [300, -7]], dtype=native)
    assert encode_idx(a) == encode_idx(a.astype(np.dtype(native).newbyteorder(">")))


def test_uint8_decode_is_a_view_of_the_input_buffer():
    raw = encode_idx(np.arange(12, dtype=np.uint8).reshape(3, 4))
    out = decode_idx(raw)
    assert not out.flags.owndata  # zero copy: 60000x784 train images are not duplicated


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.dtype(d) for d in ALL_DTYPES]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    )
)
def test_round_trip_property(a):
    back = decode_idx(encode_idx(a))
    assert back.shape == a.shape
    # NaN payloads and -0.0 must survive bit for bit
    assert back.astype(a.dtype).tobytes() == np.ascontiguousarray(a).tobytes()


def test_header_fields():
    dtype, shape, offset = parse_idx_header(header(0x08, 2, 28, 28) + bytes(2 * 28 * 28))
    assert (dtype, shape, offset) == (np.dtype("u1"), (2, 28, 28), 16)


# ------------------------------------------------------------------- malformed IDX

GOOD = header(0x08, 2, 3) + bytes(6)


@pytest.mark.parametrize(
    "data, fragments",
    [
        (b"", ["0 bytes is too short", "need at least 4"]),
        (b"\x00\x00\x08", ["3 bytes is too short"]),
        (
            b"\x1f\x8b" + GOOD[2:],
            ["bad IDX magic", "expected first two bytes 00 00", "found 1f 8b"],
        ),  # still gzipped
        (header(0x08, 6, zero=1) + bytes(6), ["bad IDX magic", "found 00 01"]),
        (header(0x0A, 6) + bytes(6), ["unknown IDX dtype code 0x0a"]),
        (header(0xFF, 6) + bytes(6), ["unknown IDX dtype code 0xff"]),
        (struct.pack(">HBB", 0, 8, 0), ["dimension count must be 1..8, found 0"]),
        (header(0x08, *([1] * 9)) + b"\x00", ["dimension count must be 1..8, found 9"]),
        (struct.pack(">HBB", 0, 8, 3) + bytes(8), ["header truncated", "expected 16 bytes, found 12"]),
        (header(0x08, 2, 3) + bytes(5), ["shape [2, 3] of uint8 needs 18 bytes, found 17"]),
        (header(0x08, 2, 3) + bytes(7), ["shape [2, 3] of uint8 needs 18 bytes, found 19"]),  # trailing bytes
        (header(0x0C, 2, 3) + bytes(6), ["shape [2, 3] of >i4 needs 36 bytes, found 18"]),
        # 4 billion^3 elements claimed by a 28-byte file: refused without allocating anything
        (header(0x0E, 2**32 - 1, 2**32 - 1, 2**32 - 1) + bytes(8), ["needs", "found 24"]),
    ],
    ids=[
        "empty",
        "3-bytes",
        "gzip-magic",
        "magic-0001",
        "code-0a",
        "code-ff",
        "ndim-0",
        "ndim-9",
        "header-truncated",
        "data-short",
        "data-long",
        "wide-short",
        "huge-dims",
    ],
)
def test_malformed_idx_refused_with_reason(data, fragments):
    with pytest.raises(DataError) as err:
        decode_idx(data, "somewhere/train-images-idx3-ubyte")
    message = str(err.value)
    assert message.startswith("somewhere/train-images-idx3-ubyte: ")
    for fragment in fragments:
        assert fragment in message


def test_max_dims_is_accepted():
    a = np.zeros((1,) * MAX_DIMS, dtype=np.uint8)
    assert decode_idx(encode_idx(a)).shape == a.shape


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.array(5, dtype=np.uint8), "1..8 dimensions, got 0"),
        (np.zeros((1,) * 9, dtype=np.uint8), "1..8 dimensions, got 9"),
        (np.zeros(3, dtype=np.uint16), "cannot hold dtype uint16"),
        (np.zeros(3, dtype=np.int64), "cannot hold dtype int64"),
        (np.zeros(3, dtype=np.complex64), "cannot hold dtype complex64"),
        (np.zeros(3, dtype=bool), "cannot hold dtype bool"),
    ],
)
def test_encode_refuses_what_idx_cannot_hold(array, fragment):
    with pytest.raises(ValueError, match=fragment):
        encode_idx(array)
