"""Which split a sample belongs to, decided by a stable hash of its identity.

Each sample gets a number ``u`` in [0, 1) from the BLAKE2b hash of its identity
(its path inside its class folder, or its CSV row's content: label and pixels).
A source without a test split sends ``u < test_fraction`` to test; the next
``val_fraction`` of the range goes to validation; the rest trains. A sample's split
depends on nothing but its own identity, so adding or removing other samples never
moves it, and the rule is applied to every class alike, so each class keeps its
share in expectation (stratified up to sampling noise: exact per-class counts would
require moving samples between splits when new ones arrive).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2
_PERSON = b"split-v1"


def hash_unit(keys: Iterable[bytes]) -> np.ndarray:
    """float64 in [0, 1) for each key: the first 53 bits of its BLAKE2b-64 digest."""
    out = [
        int.from_bytes(hashlib.blake2b(k, digest_size=8, person=_PERSON).digest(), "little") >> 11
        for k in keys
    ]
    return np.asarray(out, dtype=np.float64) / float(1 << 53)


def assign(u: np.ndarray, *, test_fraction: float, val_fraction: float) -> np.ndarray:
    """uint8 codes TRAIN / VAL / TEST for hash values ``u``.

    ``test_fraction`` 0 keeps the source's test split (no test rows are held out of train).
    """
    codes = np.full(len(u), TRAIN, dtype=np.uint8)
    codes[u < test_fraction + val_fraction] = VAL
    codes[u < test_fraction] = TEST
    return codes


def row_keys(labels: np.ndarray, pixels: np.ndarray) -> list[bytes]:
    """The identity of CSV rows: the label as text, a NUL, then the pixel bytes."""
    return [str(label).encode() + b"\0" + row.tobytes() for label, row in zip(labels.tolist(), pixels)]


def file_keys(files: Iterable[str]) -> list[bytes]:
    """The identity of image files ``<split>/<class>/<path>``: the path inside the class folder."""
    return [f.split("/", 2)[-1].encode() for f in files]
