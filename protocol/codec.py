"""msgpack codec for protocol records: `encode(record) -> bytes`, `decode(data, expected) -> record`.

Wire form: one msgpack map per message, `{"kind": <record KIND>, "v": [major, minor], <fields>}`;
nested records are plain maps of their fields. Decoding never trusts the peer:

1. `len(data)` is checked against the kind's limit before unpacking (the largest limit of all
   kinds when no kind is expected, then the kind's own limit once the tag is read);
2. msgpack unpacks with its own str/bin/array/map limits, no ext types, string map keys only, so
   a declared length cannot make it allocate beyond the caps;
3. every field is checked against the record's declared type and constraints; the ProtocolError
   names the path, e.g. "RolloutBatch.groups[3].task.seed: expected int, got str".

Unknown fields are ignored (newer minor versions may add some). `encode` runs the same checks, so
whatever a node sends, its peers can decode. No pickle, no ext types.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from functools import cache
from typing import Any, Literal, TypeVar, overload

import msgpack
from swarmnode.protocol import limits
from swarmnode.protocol.errors import MessageTooLarge, ProtocolError
from swarmnode.protocol.records import PROTOCOL_VERSION, RECORDS_BY_KIND

R = TypeVar("R")

_UNPACK_OPTIONS: dict[str, Any] = dict(
    raw=False,
    strict_map_key=True,
    use_list=True,
    max_str_len=limits.UNPACK_MAX_STR_LEN,
    max_array_len=limits.UNPACK_MAX_ARRAY_LEN,
    max_map_len=limits.UNPACK_MAX_MAP_LEN,
    max_ext_len=0,
)
# What msgpack raises on malformed input: truncation, bad format bytes, nesting deeper than its
# stack, limits exceeded, invalid UTF-8, non-string map keys.
_UNPACK_ERRORS = (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError)
# Empty arrays and maps cost one byte on the wire but ~60 bytes each in Python (measured: a 512 KiB
# message of nested empty arrays peaked at 33 MB). Real records spend well over 8 bytes per
# container (field names are keys), so a budget of one container per 8 bytes never rejects a valid
# message and bounds that expansion to ~8x.
BYTES_PER_CONTAINER = 8


class _ContainerBudget:
    """list_hook/object_hook for msgpack: counts containers, stops unpacking past the budget."""

    __slots__ = ("left",)

    def __init__(self, n_bytes: int) -> None:
        self.left = 16 + n_bytes // BYTES_PER_CONTAINER

    def __call__(self, container: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ProtocolError(f"more than one array or map per {BYTES_PER_CONTAINER} bytes")
        return container


_BLANK_ERRORS = {"StackError": "nested too deeply", "FormatError": "reserved format byte"}


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    hint: Any
    meta: dict[str, Any]
    optional: bool


@cache
def _schema(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        optional = f.default is not dataclasses.MISSING
        out.append(_Field(f.name, hints[f.name], dict(f.metadata), optional))
    return tuple(out)


def _type_name(value: object) -> str:
    return {dict: "map", list: "array", type(None): "nil"}.get(type(value), type(value).__name__)


def _expected(path: str, what: str, value: object) -> ProtocolError:
    return ProtocolError(f"{path}: expected {what}, got {_type_name(value)}")


def _int(value: object, meta: dict[str, Any], path: str, prefix: str = "") -> int:
    # bool is a subclass of int in Python; on the wire it is a different type.
    if type(value) is not int:
        raise _expected(path, "int", value)
    lo = meta.get(prefix + "min", limits.MIN_INT)
    hi = meta.get(prefix + "max", limits.MAX_INT)
    if not lo <= value <= hi:
        raise ProtocolError(f"{path}: {value} out of range [{lo}, {hi}]")
    return value


def _float(value: object, meta: dict[str, Any], path: str, prefix: str = "") -> float:
    # Integers are accepted where floats are expected: other encoders may write 1.0 as 1.
    if type(value) is int:
        value = float(value)
    elif type(value) is not float:
        raise _expected(path, "float", value)
    # Every float on the wire is a reward, logprob, rate, weight or time: non-finite is never valid.
    if not math.isfinite(value):
        raise ProtocolError(f"{path}: expected a finite number, got {value}")
    lo = meta.get(prefix + "min")
    hi = meta.get(prefix + "max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProtocolError(f"{path}: {value} out of range [{lo}, {hi}]")
    return value


def _str(value: object, meta: dict[str, Any], path: str, prefix: str = "") -> str:
    if type(value) is not str:
        raise _expected(path, "str", value)
    max_len = meta.get(prefix + "max_len")
    if max_len is not None and len(value) * 4 > max_len:
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError(f"{path}: not valid UTF-8 text") from None
        if n > max_len:
            raise ProtocolError(f"{path}: {n} bytes of text, over the limit of {max_len}")
    if len(value) < meta.get(prefix + "min_len", 0):
        raise ProtocolError(f"{path}: must not be empty")
    pattern = meta.get(prefix + "pattern")
    if pattern is not None and pattern.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise ProtocolError(f"{path}: {shown!r} does not match {pattern.pattern}")
    return value


def _bytes(value: object, meta: dict[str, Any], path: str) -> bytes:
    if type(value) is not bytes:
        raise _expected(path, "bin", value)
    max_len = meta.get("max_len")
    if max_len is not None and len(value) > max_len:
        raise ProtocolError(f"{path}: {len(value)} bytes, over the limit of {max_len}")
    return value


_SCALARS = {int: _int, float: _float, str: _str}


def _sequence(value: object, hint: Any, meta: dict[str, Any], path: str) -> list[Any]:
    if type(value) is not list:
        raise _expected(path, "array", value)
    lo, hi = meta.get("min_len", 0), meta.get("max_len", limits.UNPACK_MAX_ARRAY_LEN)
    if not lo <= len(value) <= hi:
        raise ProtocolError(f"{path}: {len(value)} items, expected {lo} to {hi}")
    item_type = typing.get_args(hint)[0]
    scalar = _SCALARS.get(item_type)
    if scalar is not None:
        return [scalar(v, meta, f"{path}[{i}]", "item_") for i, v in enumerate(value)]
    return [_record(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]


def _value(hint: Any, meta: dict[str, Any], value: object, path: str) -> Any:
    scalar = _SCALARS.get(hint)
    if scalar is not None:
        return scalar(value, meta, path)
    if hint is bytes:
        return _bytes(value, meta, path)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if type(value) is not str or value not in choices:
            shown = repr(value) if type(value) is str else _type_name(value)
            raise ProtocolError(f"{path}: expected one of {', '.join(choices)}, got {shown}")
        return value
    if origin is list:
        return _sequence(value, hint, meta, path)
    if origin is tuple:
        return tuple(_sequence(value, hint, meta, path))
    if dataclasses.is_dataclass(hint):
        return _record(hint, value, path)
    raise TypeError(f"no wire form for {hint!r} at {path}")  # a bug in records.py, not bad input


def _record(cls: Any, obj: object, path: str, version: tuple[int, int] | None = None) -> Any:
    if type(obj) is not dict:
        raise _expected(path, "map", obj)
    kwargs: dict[str, Any] = {}
    for f in _schema(cls):
        if f.meta.get("version"):
            kwargs[f.name] = version if version is not None else PROTOCOL_VERSION
            continue
        if f.name not in obj:
            if f.optional:
                continue
            raise ProtocolError(f"{path}.{f.name}: missing")
        kwargs[f.name] = _value(f.hint, f.meta, obj[f.name], f"{path}.{f.name}")
    record = cls(**kwargs)
    problems = getattr(record, "_problems", None)
    if problems is not None:
        for problem in problems():
            raise ProtocolError(f"{path}.{problem}")
    return record


def _version(obj: dict[Any, Any], name: str) -> tuple[int, int]:
    raw = obj.get("v")
    if type(raw) is not list or len(raw) != 2 or any(type(x) is not int or x < 0 for x in raw):
        raise ProtocolError(f"{name}.v: expected [major, minor] protocol version, got {raw!r:.40}")
    major, minor = raw
    if major != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            f"{name}.v: protocol version {major}.{minor} is not spoken here; this node speaks "
            f"{PROTOCOL_VERSION[0]}.x (up to {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]})"
        )
    return (major, minor)


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_wire(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("version")
        }
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    return value


def _kind_of(cls: type) -> str:
    kind = getattr(cls, "KIND", None)
    if not isinstance(kind, str) or RECORDS_BY_KIND.get(kind) is not cls:
        raise TypeError(f"{cls.__name__} is not a protocol record")
    return kind


def encode(record: Any) -> bytes:
    """Encode a record; raises ProtocolError if it breaks a wire rule or the size limit."""
    cls = type(record)
    kind = _kind_of(cls)
    version = getattr(record, "version", PROTOCOL_VERSION)
    if not isinstance(version, tuple):
        raise ProtocolError(f"{cls.__name__}.version: expected (major, minor), got {version!r}")
    wire = _to_wire(record)
    try:
        _version({"v": list(version)}, cls.__name__)
        # The same checks a receiver runs: what we send, every peer can decode.
        _record(cls, wire, cls.__name__)
        data = msgpack.packb({"kind": kind, "v": list(version), **wire}, use_bin_type=True)
    except ProtocolError as e:
        raise ProtocolError(f"cannot encode: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {cls.__name__}: {e}") from e
    if len(data) > cls.MAX_BYTES:  # type: ignore[attr-defined]
        raise MessageTooLarge(
            f"cannot encode: {cls.__name__} is {len(data)} bytes, over its limit of "
            f"{cls.MAX_BYTES}; split it or send it as a blob"  # type: ignore[attr-defined]
        )
    return data


@overload
def decode(data: bytes, expected: type[R]) -> R: ...
@overload
def decode(data: bytes, expected: None = None) -> Any: ...
def decode(data: bytes, expected: type[Any] | None = None) -> Any:
    """Decode bytes from a peer into a record; any invalid input raises ProtocolError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if expected is not None and getattr(expected, "MAX_BYTES", None) is None:
        raise TypeError(f"expected must be a protocol record type, got {expected!r}")
    cap = limits.MAX_MESSAGE_BYTES if expected is None else expected.MAX_BYTES
    name = "message" if expected is None else expected.__name__
    if len(data) > cap:
        raise MessageTooLarge(f"{name}: {len(data)} bytes, over the limit of {cap}")
    try:
        # max_bin_len: a bin can never be longer than the message it arrived in.
        budget = _ContainerBudget(len(data))
        obj = msgpack.unpackb(data, max_bin_len=cap, list_hook=budget, object_hook=budget, **_UNPACK_OPTIONS)
    except ProtocolError as e:
        raise ProtocolError(f"{name}: {e}") from None
    except _UNPACK_ERRORS as e:
        # msgpack's StackError and FormatError carry no text of their own.
        detail = str(e) or _BLANK_ERRORS.get(type(e).__name__, "malformed")
        raise ProtocolError(f"{name}: not a valid msgpack message ({type(e).__name__}: {detail})") from None
    if type(obj) is not dict:
        raise _expected(name, "map", obj)
    kind = obj.get("kind")
    cls = RECORDS_BY_KIND.get(kind) if type(kind) is str else None
    if cls is None:
        shown = repr(kind) if type(kind) is str else _type_name(kind)
        raise ProtocolError(f"{name}.kind: unknown message kind {shown:.80}")
    if expected is not None and cls is not expected:
        raise ProtocolError(f"{name}.kind: expected {expected.KIND!r}, got {kind!r}")
    if len(data) > cls.MAX_BYTES:
        raise MessageTooLarge(f"{cls.__name__}: {len(data)} bytes, over the limit of {cls.MAX_BYTES}")
    version = _version(obj, cls.__name__)
    try:
        return _record(cls, obj, cls.__name__, version)
    except RecursionError:  # cannot happen with the records we have; kept as a boundary guard
        raise ProtocolError(f"{cls.__name__}: nested too deeply") from None


def kinds() -> dict[str, type]:
    """Every record kind this node speaks, by wire tag."""
    return dict(RECORDS_BY_KIND)


__all__ = ["decode", "encode", "kinds"]
