"""``params.yaml`` sections as frozen pydantic dataclasses that reject unknown keys and bad values.

Each stage reads the section(s) it needs with :func:`load_section`. pydantic
(v2, strict mode) checks every value against its field's annotation: ``bool``
is never accepted as a number, ``int`` is accepted (and stored as ``float``)
where a float is expected, ranges come from ``Field`` constraints. A key is
one line: a name, a type (the aliases below carry the common ranges) and a
default. Messages are one line naming the file and the dotted key, what was
expected and what was found.

Two things stay hand-written: the message text (pydantic's own names the
field, not ``section.key``, spreads over several lines and echoes inputs in
full, which a YAML alias bomb makes endless), and checks across fields
(``prep.compression_level`` depends on the codec), in a class's ``check``.

params.yaml is parsed as YAML 1.2 (ruamel, as DVC itself does), so ``1e-3`` is
a float here exactly as it is in ``dvc exp show``.
"""

from __future__ import annotations

import os
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from pipeline.errors import ParamsError
from pipeline.sources import DATASETS

DEFAULT_PARAMS = Path("params.yaml")
MAX_SEED = 2**63 - 1  # torch.manual_seed overflows past 2**64 - 1; keep it in int64

T = TypeVar("T")


class Expect:
    """The 'expected ...' text for a value of the right type that breaks the field's constraint."""

    def __init__(self, text: str) -> None:
        self.text = text


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if type(value) is list else value  # YAML gives lists; frozen params hold tuples


IntAtLeast0 = Annotated[int, Field(ge=0), Expect("an integer >= 0")]
IntAtLeast1 = Annotated[int, Field(ge=1), Expect("an integer >= 1")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), Expect(f"an integer 0..{MAX_SEED}")]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False), Expect("a positive finite number")]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False), Expect("a finite number >= 0")]
# A day: longer is never meant, and past ~9.2e9 s Python's clocks overflow
# (OverflowError deep in socket code).
MAX_SECONDS = 86400.0
Seconds = Annotated[
    float,
    Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False),
    Expect(f"a number of seconds > 0 and <= {MAX_SECONDS:g}"),
]
# Adam's first step is lr / (1 - beta1) = 10 x lr, applied as a float32: past ~3.4e37 it overflows
# (a RuntimeError from inside torch.optim) instead of training to a non-finite loss, which is refused.
MAX_LR = 1e37
LearningRate = Annotated[
    float, Field(gt=0, le=MAX_LR, allow_inf_nan=False), Expect(f"a positive number <= {MAX_LR:g}")
]
FilePath = Annotated[str, Field(pattern=r"\S"), Expect("a file path")]
Source = Annotated[str, Field(pattern=r"\S"), Expect("a URL or folder")]
Sources = Annotated[tuple[Source, ...], BeforeValidator(_list_to_tuple)]

Augmentations = Annotated[tuple[Literal["flip", "translate"], ...], BeforeValidator(_list_to_tuple)]

_CONFIG = ConfigDict(strict=True, extra="forbid")


Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False), Expect("a number in [0, 1)")]
Channels = Annotated[int, Field(ge=1, le=64), Expect("an integer 1..64 (channels)")]
# An image side: at least the model's trainer.model.MIN_SIDE (two 2x2 poolings), so a shape that
# cannot train stops the first stage that runs, not train after the data stages.
MIN_SIDE = 4
Side = Annotated[
    int, Field(ge=MIN_SIDE, le=65536), Expect(f"an integer {MIN_SIDE}..65536 (the model halves it twice)")
]
ImageShape = Annotated[tuple[Channels, Side, Side], BeforeValidator(_list_to_tuple)]


@dataclass(frozen=True, config=_CONFIG)
class DataParams:
    """``data``: which dataset, where to get it, its image shape and its splits."""

    dataset: Literal["fashion-mnist", "mnist", "csv", "images"] = "fashion-mnist"
    mirrors: Sources = ()
    train_csv: FilePath = "data/user/train.csv"
    test_csv: FilePath | None = "data/user/test.csv"  # None: test held out of train by test_fraction
    images_dir: FilePath = "data/user/images"
    image_shape: ImageShape | None = None  # [C, H, W]; None: from the data (square grey for a CSV)
    test_fraction: Fraction = 0.1  # held out of train when the source has no test split
    val_fraction: Fraction = 0.0  # held out of train for val_loss / val_acc; 0: no validation split
    timeout_s: Seconds = 30.0
    min_rate_kbps: NonNegativeFinite = 64.0

    def check(self, where: str) -> None:
        """The two held-out fractions share one train split; a user's test CSV is not the train CSV; a
        built-in dataset keeps its own shape (refused here, before any stage's work, not by
        ``tensorize`` after two stages ran)."""
        if self.test_fraction + self.val_fraction >= 1:
            raise ParamsError(
                f"{where}: data.val_fraction: expected test_fraction + val_fraction < 1, found "
                f"{self.test_fraction} + {self.val_fraction}"
            )
        if (
            self.dataset == "csv"
            and self.test_csv is not None
            and os.path.normpath(self.test_csv) == os.path.normpath(self.train_csv)
        ):
            raise ParamsError(
                f"{where}: data.test_csv: expected another file than data.train_csv, found the same file, "
                f"{self.train_csv}, for both (a test on the train rows measures memory, not accuracy); set "
                "data.test_csv: null and a test split is held out of train (data.test_fraction)"
            )
        spec = DATASETS.get(self.dataset)
        if spec is not None and self.image_shape not in (None, spec.image_shape):
            raise ParamsError(
                f"{where}: data.image_shape: expected null or {list(spec.image_shape)} for {self.dataset}, "
                f"whose images are not resized, found {list(self.image_shape)} (data.image_shape shapes "
                "data.dataset csv and images)"
            )


_LEVELS = {"zstd": (1, 22), "gzip": (0, 9), "brotli": (0, 11)}


@dataclass(frozen=True, config=_CONFIG)
class PrepParams:
    """``prep``: Parquet encoding and tensor sharding."""

    compression: Literal["zstd", "snappy", "lz4", "gzip", "brotli", "uncompressed"] = "zstd"
    compression_level: int | None = None
    row_group_size: IntAtLeast1 = 32768
    shard_size: IntAtLeast1 = 65536
    normalize: Literal["unit", "standard"] = "unit"
    # uint8: shards hold the source bytes, normalised on the training device through the same table.
    shard_dtype: Literal["float32", "uint8"] = "float32"
    workers: IntAtLeast1 | None = None  # processes for the data stages' independent pieces; None = all cores

    def check(self, where: str) -> None:
        """The level's range depends on the codec: a check across two fields."""
        if self.compression_level is None:
            return
        if self.compression not in _LEVELS:
            raise ParamsError(
                f"{where}: prep.compression_level: codec {self.compression!r} takes no level; "
                f"expected null, found {self.compression_level}"
            )
        lo, hi = _LEVELS[self.compression]
        if not lo <= self.compression_level <= hi:
            raise ParamsError(
                f"{where}: prep.compression_level: expected {lo}..{hi} for {self.compression}, "
                f"found {self.compression_level}"
            )


@dataclass(frozen=True, config=_CONFIG)
class LoaderParams:
    """``loader``: DataLoader settings. Those marked speed change speed, never results; the batch size
    and the shuffle choose the batches."""

    batch_size: IntAtLeast1 = 512
    num_workers: IntAtLeast0 = 0
    persistent_workers: bool = False
    pin_memory: bool = True
    prefetch_factor: IntAtLeast1 | None = None
    shuffle: bool = True
    shuffle_window: IntAtLeast1 | None = None  # shards shuffled together; None = one global shuffle
    device_resident: bool = False  # the whole split on the training device; batches are index ops there
    # Streaming from the DVC remote (trainer/stream.py): the local shard cache's size bound and how many
    # shards are fetched ahead. None: no bound / one shuffle window ahead.
    cache_limit_mb: PositiveFinite | None = None
    prefetch_shards: IntAtLeast1 | None = None


@dataclass(frozen=True, config=_CONFIG)
class TrainParams:
    """``train``: optimisation, device and checkpointing."""

    epochs: IntAtLeast1 = 5
    lr: LearningRate = 0.001
    seed: Seed = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    free_graph: bool = True
    verify: Literal["header", "full"] = "header"
    checkpoint_every: IntAtLeast0 = 1
    # Also mid-epoch, at the first step boundary this long after the last checkpoint; None = off.
    # 300 s: a preemption loses at most 5 minutes, for a write that costs well under 1 % of them
    # (bench/checkpoint.md).
    checkpoint_seconds: Seconds | None = 300.0
    processes: IntAtLeast1 = 1
    max_restarts: IntAtLeast0 = 3
    threads: IntAtLeast1 | None = None  # intra-op threads; None = PyTorch's choice
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast; fp16 needs CUDA
    augment: Augmentations = ()  # on-device batch transforms, seeded by (seed, epoch, global batch)

    def check(self, where: str) -> None:
        """Each augmentation at most once: a list names a set of transforms, applied in a fixed order."""
        twice = sorted({a for a in self.augment if self.augment.count(a) > 1})
        if twice:
            raise ParamsError(
                f"{where}: train.augment: expected each of 'flip', 'translate' at most once, "
                f"found {twice[0]!r} twice"
            )


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "prep": PrepParams,
    "loader": LoaderParams,
    "train": TrainParams,
}


class _YamlRepr(reprlib.Repr):
    """Python's repr, but null, true and false as the user wrote them in YAML (not None, True, False)."""

    def repr_NoneType(self, _value: None, _level: int) -> str:  # noqa: N802 (reprlib's naming)
        return "null"

    def repr_bool(self, value: bool, _level: int) -> str:
        return "true" if value else "false"


_REPR = _YamlRepr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def _show(value: Any) -> str:
    """repr() bounded in size: YAML aliases can build a "billion laughs" value whose full repr never ends."""
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    return _REPR.repr(value)


_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) > 1 and args[-1] is not Ellipsis:  # a fixed length: data.image_shape's [C, H, W]
            return f"a list of {len(args)} {_PLURALS.get(args[0], _type_name(args[0]))}"
        if typing.get_origin(args[0]) is Literal:  # train.augment
            return f"a list, each {_type_name(args[0])}"
        return f"a list of {_PLURALS.get(args[0], _type_name(args[0]))}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _expectation(tp: Any) -> str | None:
    """The :class:`Expect` text in an annotation, looking inside unions and tuples."""
    if typing.get_origin(tp) is Annotated:
        found = [m.text for m in tp.__metadata__ if isinstance(m, Expect)]
        return found[0] if found else _expectation(typing.get_args(tp)[0])
    for arg in typing.get_args(tp):
        if (text := _expectation(arg)) is not None:
            return text
    return None


# pydantic error types for a value of the right type that breaks a constraint; any other is a wrong type.
_CONSTRAINT_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "finite_number",
    "string_pattern_mismatch",
    "too_short",
    "too_long",
}


def _item(tp: Any, index: int) -> Any:
    """The annotation of item ``index`` of a fixed-length tuple type (inside Annotated or a union)."""
    if typing.get_origin(tp) is Annotated:
        return _item(typing.get_args(tp)[0], index)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tuples = [a for a in typing.get_args(tp) if a is not type(None)]
        return _item(tuples[0], index) if len(tuples) == 1 else tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and Ellipsis not in args:
        return args[index]
    return tp


def _channels_last_hint(shape: Any) -> str:
    """For ``[28, 28, 1]``, Keras' and NumPy's image order: the shape PyTorch's order gives."""
    if isinstance(shape, list | tuple) and len(shape) == 3 and shape[2] in (1, 3) and shape[0] not in (1, 3):
        return f" ([H, W, C] order? expected [C, H, W], channels first: {[shape[2], shape[0], shape[1]]})"
    return ""


def _message(cls: type, section: str, values: Mapping, exc: ValidationError, where: str) -> str:
    error = exc.errors(include_url=False, include_context=False)[0]
    key = str(error["loc"][0])
    if error["type"] in _CONSTRAINT_ERRORS:
        at = key + "".join(f"[{i}]" for i in error["loc"][1:])
        hint = typing.get_type_hints(cls, include_extras=True)[key]
        for index in error["loc"][1:]:  # data.image_shape[1]: the expectation of H, not of C
            hint = _item(hint, index) if isinstance(index, int) else hint
        expected = _expectation(hint)
        found = f"{where}: {section}.{at}: expected {expected}, found {_show(error['input'])}"
        return found + _channels_last_hint(values.get(key) if key == "image_shape" else None)
    # A wrong type anywhere inside a value: name the key's whole type and show the value it was given.
    expected = _type_name(typing.get_type_hints(cls)[key])
    return f"{where}: {section}.{key}: expected {expected}, found {_show(values[key])}"


def parse_section(cls: type[T], section: str, values: Any, where: str = "params.yaml") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys, wrong types and bad ranges."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ParamsError(f"{where}: {section}: expected a mapping of keys, found {type(values).__name__}")
    known = sorted(f.name for f in fields(cls))
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:  # checked first: a typo is reported as a typo, with the keys it could have meant
        raise ParamsError(
            f"{where}: {section}.{unknown[0]}: unknown key; known keys of {section!r} are {', '.join(known)}"
        )
    try:
        obj = cls(**values)
    except ValidationError as exc:
        raise ParamsError(_message(cls, section, values, exc, where)) from None
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _yaml_message(path: Path, exc: MarkedYAMLError) -> str:
    """ruamel's multi-line text (``in "<unicode string>"``, a link) as one line: file, line and column."""
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(exc.problem or exc.context or type(exc).__name__).split())
    hint = " (YAML indents with spaces, never tabs)" if "'\\t'" in problem else ""
    return f"{where}: not valid YAML: {problem}{hint}"[:400]


def read_params_file(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """Parse params.yaml (YAML 1.2) into plain Python objects."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot read params file: {exc}") from None
    try:
        doc = YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as exc:
        raise ParamsError(_yaml_message(path, exc)) from None
    except (YAMLError, ValueError, RecursionError) as exc:  # ValueError: ints over 4300 digits; deep nesting
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at top level, found {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in SECTIONS)
    if unknown:
        raise ParamsError(f"{path}: {unknown[0]}: unknown section; known sections are {', '.join(SECTIONS)}")
    return doc


def load_section(section: str, path: Path | str = DEFAULT_PARAMS) -> Any:
    """Read one section of params.yaml into its frozen dataclass, every value of every section checked.

    Args:
        section: ``data``, ``prep``, ``loader`` or ``train``.
        path: the params file.

    Returns:
        The section's dataclass (e.g. :class:`TrainParams`); keys the file leaves out take their
        defaults.

    Raises:
        ParamsError: the file cannot be read or parsed, or a key is unknown, of the wrong type or
            out of range; one line naming the file, key and what was expected.
    """
    doc = read_params_file(path)
    # Every section is checked, not only this stage's: a bad value stops the first stage that runs,
    # before its work, instead of the stage that reads it after the stages upstream of it have run.
    for name, cls in SECTIONS.items():
        if name != section and name in doc:
            parse_section(cls, name, doc[name], where=str(path))
    return parse_section(SECTIONS[section], section, doc.get(section), where=str(path))
