"""``params.yaml`` sections as frozen dataclasses that reject unknown keys and bad values.

Each stage reads the section(s) it needs with :func:`load_section`. Values are
checked by the dataclass field's annotation (``bool`` is never accepted as a
number, ``int`` is accepted where a float is expected) and then by the class's
``check`` method for ranges. Messages name the file and the dotted key.

params.yaml is parsed as YAML 1.2 (ruamel, as DVC itself does), so ``1e-3`` is
a float here exactly as it is in ``dvc exp show``.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.errors import ParamsError

DEFAULT_PARAMS = Path("params.yaml")
MAX_SEED = 2**63 - 1

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DataParams:
    """``data``: which dataset, and where to get it."""

    dataset: Literal["fashion-mnist", "mnist", "csv"] = "fashion-mnist"
    mirrors: tuple[str, ...] = ()
    train_csv: str = "data/user/train.csv"
    test_csv: str = "data/user/test.csv"

    def check(self, where: str) -> None:
        for i, mirror in enumerate(self.mirrors):
            if not mirror.strip():
                raise ParamsError(f"{where}: data.mirrors[{i}]: expected a URL or folder, found an empty string")
        for key in ("train_csv", "test_csv"):
            if not getattr(self, key).strip():
                raise ParamsError(f"{where}: data.{key}: expected a file path, found an empty string")


@dataclasses.dataclass(frozen=True)
class PrepParams:
    """``prep``: Parquet encoding and tensor sharding."""

    compression: Literal["zstd", "snappy", "lz4", "gzip", "brotli", "uncompressed"] = "zstd"
    compression_level: int | None = None
    row_group_size: int = 65536
    shard_size: int = 65536
    normalize: Literal["unit", "standard"] = "unit"

    def check(self, where: str) -> None:
        _at_least(where, "prep.row_group_size", self.row_group_size, 1)
        _at_least(where, "prep.shard_size", self.shard_size, 1)
        if self.compression_level is not None:
            levels = {"zstd": (1, 22), "gzip": (0, 9), "brotli": (0, 11)}
            if self.compression not in levels:
                raise ParamsError(
                    f"{where}: prep.compression_level: codec {self.compression!r} takes no level; "
                    f"expected null, found {self.compression_level}"
                )
            lo, hi = levels[self.compression]
            if not lo <= self.compression_level <= hi:
                raise ParamsError(
                    f"{where}: prep.compression_level: expected {lo}..{hi} for {self.compression}, "
                    f"found {self.compression_level}"
                )


@dataclasses.dataclass(frozen=True)
class LoaderParams:
    """``loader``: DataLoader settings. They change speed, never results."""

    batch_size: int = 512
    num_workers: int = 0
    persistent_workers: bool = False
    pin_memory: bool = True
    prefetch_factor: int | None = None
    shuffle: bool = True
    device_resident: bool = False

    def check(self, where: str) -> None:
        _at_least(where, "loader.batch_size", self.batch_size, 1)
        _at_least(where, "loader.num_workers", self.num_workers, 0)
        if self.prefetch_factor is not None:
            _at_least(where, "loader.prefetch_factor", self.prefetch_factor, 1)


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """``train``: optimisation, device and checkpointing."""

    epochs: int = 5
    lr: float = 0.001
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    free_graph: bool = True
    verify: Literal["header", "full"] = "header"
    checkpoint_every: int = 1
    threads: int | None = None

    def check(self, where: str) -> None:
        _at_least(where, "train.epochs", self.epochs, 1)
        _at_least(where, "train.seed", self.seed, 0)
        if self.seed > MAX_SEED:  # torch.manual_seed overflows past 2**64 - 1; keep it in int64
            raise ParamsError(f"{where}: train.seed: expected an integer 0..{MAX_SEED}, found {_show(self.seed)}")
        _at_least(where, "train.checkpoint_every", self.checkpoint_every, 0)
        if self.threads is not None:
            _at_least(where, "train.threads", self.threads, 1)
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ParamsError(f"{where}: train.lr: expected a positive finite number, found {self.lr}")


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "prep": PrepParams,
    "loader": LoaderParams,
    "train": TrainParams,
}


def _at_least(where: str, key: str, value: int, low: int) -> None:
    if value < low:
        raise ParamsError(f"{where}: {key}: expected an integer >= {low}, found {_show(value)}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def _show(value: Any) -> str:
    """repr() bounded in size: YAML aliases can build a "billion laughs" value whose full repr never ends."""
    return _REPR.repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to the field's Python type)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return (type(value) is str and value in typing.get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _coerce(arg, value)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, converted = _coerce(item, v)
            if not ok:
                return False, value
            out.append(converted)
        return True, tuple(out)
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return type(value) is bool, value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported params annotation {tp!r}")


def parse_section(cls: type[T], section: str, values: Any, where: str = "params.yaml") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys, wrong types and bad ranges."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ParamsError(f"{where}: {section}: expected a mapping of keys, found {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise ParamsError(
            f"{where}: {section}.{unknown[0]}: unknown key; known keys of {section!r} are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in values.items():
        ok, converted = _coerce(hints[key], value)
        if not ok:
            raise ParamsError(f"{where}: {section}.{key}: expected {_type_name(hints[key])}, found {_show(value)}")
        kwargs[key] = converted
    obj = cls(**kwargs)
    obj.check(where)  # type: ignore[attr-defined]
    return obj


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
    except (YAMLError, ValueError, RecursionError) as exc:  # ValueError: ints over 4300 digits; deep nesting
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at top level, found {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in SECTIONS)
    if unknown:
        raise ParamsError(f"{path}: {unknown[0]}: unknown section; known sections are {', '.join(SECTIONS)}")
    return doc


def load_section(section: str, path: Path | str = DEFAULT_PARAMS) -> Any:
    """Read one section of params.yaml into its frozen dataclass."""
    doc = read_params_file(path)
    return parse_section(SECTIONS[section], section, doc.get(section), where=str(path))
