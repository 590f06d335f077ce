"""DiLoCo pseudo-gradient codecs: what a node serves as its round contribution.

``int8`` (dense): every tensor quantised by ``quant.quantize_int8`` with one fp32 scale per 256
values (a per-tensor scale lost most small entries of embedding deltas; 256 costs 1.6 % overhead).
Layout: ``b"SNPG" | version u8 | header length u32 | msgpack header | payloads``, the header being
``{"codec": "int8", "t": [[name, shape, payload length], ...]}`` in sorted name order and the payloads
following back to back. A receiver decodes one tensor at a time straight out of the blob
(``iter_decode_delta``): a 0.5 B-parameter merge never holds a contributor's Δ as a dict of fp32
tensors, and never copies the blob.

The author averages the *decoded* values of its own blob, like every receiver, so replicas that
merged the same contributions land on bit-identical anchors. No pickle: a peer's bytes can only
become finite fp32 tensors of the shapes the header states, checked before anything is allocated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Mapping

import msgpack
import torch
from swarmnode.compression import quant
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

__all__ = [
    "CODECS",
    "QUANT_BLOCK",
    "decode_delta",
    "delta_codec",
    "delta_sq_norms",
    "encode_delta",
    "encoded_size",
    "iter_decode_delta",
]

QUANT_BLOCK = 256
CODECS = ("int8",)
_MAGIC = b"SNPG"
_VERSION = 2
_PREFIX = struct.Struct("<4sBI")
_MAX_HEADER = 16 << 20
_MAX_TENSORS = 1 << 16
_MAX_NAME = 256
_MAX_DIMS = 8


def encoded_size(shapes: Mapping[str, tuple[int, ...]], codec: str = "int8") -> int:
    """Upper bound of ``encode_delta``'s output for tensors of these shapes (caps derive from it)."""
    if codec != "int8":
        raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")
    total = _PREFIX.size + 64
    for name, shape in shapes.items():
        numel = math.prod(shape)
        total += quant.quantized_size(numel, QUANT_BLOCK) + len(name) * 4 + 24 + 9 * len(shape)
    return total


def _items(delta: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    if isinstance(delta, Mapping):
        return ((n, delta[n]) for n in sorted(delta))
    return iter(delta)


def encode_delta(delta: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], codec: str = "int8") -> bytes:
    """A mapping, or (name, Δ) pairs in sorted name order (e.g. ``DiLoCo.iter_pseudo_gradient``, so
    the fp32 Δ of a large model exists one tensor at a time)."""
    if codec not in CODECS:
        raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")
    entries: list[list[object]] = []
    payloads: list[bytes] = []
    last = ""
    for name, t in _items(delta):
        if entries and name <= last:
            raise ValueError(f"delta names must be unique and sorted, got {name!r} after {last!r}")
        last = name
        payload = quant.quantize_int8(t, block=QUANT_BLOCK)
        entries.append([name, list(t.shape), len(payload)])
        payloads.append(payload)
    header = msgpack.packb({"codec": codec, "t": entries}, use_bin_type=True)
    return b"".join([_PREFIX.pack(_MAGIC, _VERSION, len(header)), header, *payloads])


def delta_codec(data: bytes) -> str:
    """The codec a blob says it was written with; ``ProtocolError`` when it is not a Δ blob."""
    if len(data) >= _PREFIX.size and data[:4] == _MAGIC:
        return "int8"
    raise ProtocolError("pseudo-gradient blob: unknown format")


def _header(data: bytes, max_bytes: int) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    """[(name, shape, payload offset, payload length)], checked against the blob's real size."""
    if len(data) > max_bytes:
        raise ProtocolError(f"pseudo-gradient blob: {len(data)} bytes, over the limit of {max_bytes}")
    if len(data) < _PREFIX.size:
        raise ProtocolError("pseudo-gradient blob: shorter than its prefix")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise ProtocolError(f"pseudo-gradient blob: bad magic/version {magic!r}/{version}")
    if hlen > min(_MAX_HEADER, len(data) - _PREFIX.size):
        raise ProtocolError(f"pseudo-gradient blob: header of {hlen} bytes does not fit")
    obj = quant.unpack_bounded(
        data[_PREFIX.size : _PREFIX.size + hlen],
        "pseudo-gradient header",
        max_str_len=_MAX_NAME * 4,
        max_array_len=_MAX_TENSORS,
        max_map_len=4,
    )
    if not isinstance(obj, dict) or obj.get("codec") not in CODECS or not isinstance(obj.get("t"), list):
        raise ProtocolError("pseudo-gradient header: expected {'codec': 'int8', 't': [...]}")
    offset = _PREFIX.size + hlen
    out: list[tuple[str, tuple[int, ...], int, int]] = []
    last = ""
    for item in obj["t"]:
        if not (isinstance(item, list) and len(item) == 3):
            raise ProtocolError("pseudo-gradient header: each entry must be [name, shape, length]")
        name, shape, length = item
        if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or (out and name <= last):
            raise ProtocolError(f"pseudo-gradient header: bad, duplicate or unsorted name {name!r:.80}")
        last = name
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)
        ):
            raise ProtocolError(f"pseudo-gradient header: tensor {name!r} has a bad shape")
        numel = math.prod(shape)
        if not isinstance(length, int) or length != quant.quantized_size(numel, QUANT_BLOCK):
            raise ProtocolError(
                f"pseudo-gradient header: tensor {name!r}: {length!r} bytes for {numel} values"
            )
        out.append((name, tuple(shape), offset, length))
        offset += length
    if offset != len(data):
        raise ProtocolError(f"pseudo-gradient blob: payloads end at {offset}, the blob has {len(data)} bytes")
    return out, offset


def iter_decode_delta(data: bytes, max_bytes: int) -> Iterator[tuple[str, Tensor]]:
    """(name, fp32 Δ) one tensor at a time, sorted by name. The header is checked in full before the
    first tensor is yielded; a payload that is malformed or not finite raises ``ProtocolError`` when
    it is reached (a merge validates every blob once, on arrival, before averaging any)."""
    entries, _ = _header(data, max_bytes)
    view = memoryview(data)
    for name, shape, offset, length in entries:
        try:
            t = quant.dequantize_int8(view[offset : offset + length], shape=shape, max_bytes=length)
        except ProtocolError as exc:
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r}: {exc}") from None
        if not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} is not finite")
        yield name, t


def delta_sq_norms(data: bytes, max_bytes: int) -> list[tuple[str, tuple[int, ...], float]]:
    """[(name, shape, ‖Δ‖²)] straight from the int8 codes and block scales, without decoding to fp32:
    checks everything ``iter_decode_delta`` checks (a blob that passes decodes to finite tensors of
    these shapes). The sums run block by block in float64 in a fixed order, so every node computes
    the same norm for the same blob."""
    entries, _ = _header(data, max_bytes)
    view = memoryview(data)
    out = []
    for name, shape, offset, length in entries:
        try:
            sq = quant.int8_sq_norm(view[offset : offset + length], shape=shape, max_bytes=length)
        except ProtocolError as exc:
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r}: {exc}") from None
        out.append((name, shape, sq))
    return out


def decode_delta(data: bytes, max_bytes: int) -> dict[str, Tensor]:
    """Inverse of ``encode_delta``; any malformed or non-finite blob is a ``ProtocolError``."""
    return dict(iter_decode_delta(data, max_bytes))
