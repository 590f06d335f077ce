"""Catch-up state as a chunked, verifiable byte stream: tensors (DiLoCo anchor + outer momentum, full
precision) plus scalars.

The state is one byte string laid out by an *index*: each tensor's raw little-endian bytes in sorted
name order, back to back. It travels in ``chunk``-sized pieces; the index lists every piece's sha256,
and the index's own sha256 is what a donor's state manifest announces (a two-level hash tree). So:

- a receiver verifies each chunk on arrival and writes it straight to disk: one chunk in memory, never
  two copies of a 4 GB state;
- donors holding the same state serve the same chunks, and a transfer that loses its donor resumes
  from another one, keeping every chunk it already has;
- a donor serves chunks straight out of its live tensors (``read_range``): no encoded copy either.

Index: msgpack ``{"v": 2, "chunk": C, "total": T, "tensors": [[name, dtype, shape, offset], ...],
"scalars": {name: value}, "chunks": [32-byte digests]}``. Scalars are ints, floats or bools; no
pickle anywhere. ``decode_index`` checks that the tensors tile ``[0, T)`` exactly and that the chunk
list covers it, before the receiver allocates anything.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import msgpack
import numpy as np
import torch
from swarmnode.compression import quant
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

__all__ = [
    "CHUNK",
    "StateIndex",
    "TensorEntry",
    "build_index",
    "decode_index",
    "encode_index",
    "index_size",
    "read_range",
    "tensors_from_file",
]

# One blob chunk of the stream protocol (``limits.MAX_BLOB_CHUNK_BYTES``): one request per chunk.
CHUNK = 4 << 20
MIN_CHUNK = 64 << 10
_VERSION = 2
_MAX_SCALARS = 64
_MAX_KEY = 64
_MAX_NAME = 256
_MAX_DIMS = 8
_MAX_TENSORS = 1 << 16
_DIGEST = 32
# Floating dtypes only: a state is an anchor and a momentum, nothing else.
_DTYPES = {"float32": (torch.float32, 4), "bfloat16": (torch.bfloat16, 2), "float16": (torch.float16, 2)}
_NAMES = {v[0]: k for k, v in _DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError(
        "the state stream is little-endian and read zero-copy: big-endian hosts are unsupported"
    )


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype][1]


@dataclass(frozen=True, slots=True)
class StateIndex:
    chunk: int
    total: int
    tensors: tuple[TensorEntry, ...]
    scalars: dict[str, float | int | bool] = field(default_factory=dict)
    chunks: tuple[bytes, ...] = ()

    def chunk_range(self, i: int) -> tuple[int, int]:
        start = i * self.chunk
        return start, min(self.total, start + self.chunk)


def index_size(
    shapes: Mapping[str, tuple[int, ...]], *, chunk: int = CHUNK, itemsize: int = 4
) -> tuple[int, int]:
    """(bytes of the state, bytes of its index) for tensors of these shapes: the caps a receiver
    derives from its own model."""
    total = sum(math.prod(s) * itemsize for s in shapes.values())
    n_chunks = -(-total // chunk)
    meta = sum(len(n) * 4 + 32 + 9 * len(s) for n, s in shapes.items())
    return total, meta + (_DIGEST + 2) * n_chunks + 4096


def _raw(t: Tensor) -> np.ndarray:
    """A zero-copy uint8 view of a contiguous CPU tensor's bytes."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("state tensors must be contiguous CPU tensors")
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _layout(tensors: Mapping[str, Tensor]) -> tuple[tuple[TensorEntry, ...], int]:
    entries = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be part of a state")
        e = TensorEntry(name, _NAMES[t.dtype], tuple(int(d) for d in t.shape), offset)
        entries.append(e)
        offset += e.nbytes
    return tuple(entries), offset


def read_range(tensors: Mapping[str, Tensor], index: StateIndex, start: int, end: int) -> bytes:
    """Bytes [start, end) of the state stream, gathered from the live tensors."""
    if not 0 <= start <= end <= index.total:
        raise ValueError(f"range [{start}, {end}) outside the state's {index.total} bytes")
    parts = []
    for e in index.tensors:
        lo, hi = max(start, e.offset), min(end, e.offset + e.nbytes)
        if lo < hi:
            parts.append(_raw(tensors[e.name])[lo - e.offset : hi - e.offset].tobytes())
    return b"".join(parts)


def build_index(
    tensors: Mapping[str, Tensor], scalars: Mapping[str, float | int | bool], *, chunk: int = CHUNK
) -> StateIndex:
    """Lay out ``tensors`` and hash every chunk (reads the tensors once, one chunk at a time)."""
    if not MIN_CHUNK <= chunk <= CHUNK:
        raise ValueError(f"chunk: expected {MIN_CHUNK}..{CHUNK} bytes, got {chunk}")
    for k, v in scalars.items():
        if not isinstance(v, int | float | bool) or not 1 <= len(k) <= _MAX_KEY:
            raise ValueError(f"scalar {k!r}: expected a short name and an int/float/bool, got {v!r}")
    entries, total = _layout(tensors)
    index = StateIndex(chunk=chunk, total=total, tensors=entries, scalars=dict(scalars))
    digests = []
    for i in range(-(-total // chunk)):
        lo, hi = index.chunk_range(i)
        digests.append(hashlib.sha256(read_range(tensors, index, lo, hi)).digest())
    return StateIndex(chunk=chunk, total=total, tensors=entries, scalars=dict(scalars), chunks=tuple(digests))


def encode_index(index: StateIndex) -> bytes:
    return msgpack.packb(
        {
            "v": _VERSION,
            "chunk": index.chunk,
            "total": index.total,
            "tensors": [[e.name, e.dtype, list(e.shape), e.offset] for e in index.tensors],
            "scalars": dict(index.scalars),
            "chunks": list(index.chunks),
        },
        use_bin_type=True,
    )


def _int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_index(data: bytes, *, max_bytes: int, max_total: int) -> StateIndex:
    """Inverse of ``encode_index``; ``ProtocolError`` unless the tensors tile the stream exactly, the
    chunk list covers it, and the stream is at most ``max_total`` bytes."""
    if len(data) > max_bytes:
        raise ProtocolError(f"state index: {len(data)} bytes, over the limit of {max_bytes}")
    obj = quant.unpack_bounded(
        data,
        "state index",
        max_str_len=_MAX_NAME * 4,
        max_array_len=_MAX_TENSORS * 4,
        max_map_len=_MAX_SCALARS,
    )
    if not isinstance(obj, dict) or obj.get("v") != _VERSION:
        raise ProtocolError(f"state index: expected a map with v={_VERSION}")
    chunk, total, raw_tensors = obj.get("chunk"), obj.get("total"), obj.get("tensors")
    scalars, chunks = obj.get("scalars"), obj.get("chunks")
    if not (_int(chunk) and MIN_CHUNK <= chunk <= CHUNK):
        raise ProtocolError(f"state index: chunk {chunk!r:.40} outside {MIN_CHUNK}..{CHUNK}")
    if not (_int(total) and 0 <= total <= max_total):
        raise ProtocolError(f"state index: total {total!r:.40} outside 0..{max_total}")
    if not isinstance(raw_tensors, list) or not isinstance(scalars, dict) or not isinstance(chunks, list):
        raise ProtocolError("state index: tensors, scalars and chunks must be a list, a map and a list")
    entries: list[TensorEntry] = []
    offset = 0
    for item in raw_tensors:
        if not (isinstance(item, list) and len(item) == 4):
            raise ProtocolError("state index: each tensor must be [name, dtype, shape, offset]")
        name, dtype, shape, off = item
        if (
            not isinstance(name, str)
            or not 1 <= len(name) <= _MAX_NAME
            or (entries and name <= entries[-1].name)
        ):
            raise ProtocolError(f"state index: bad, duplicate or unsorted name {name!r:.80}")
        if dtype not in _DTYPES:
            raise ProtocolError(f"state index: {name}: dtype {dtype!r:.20} is not a state dtype")
        if not (
            isinstance(shape, list)
            and len(shape) <= _MAX_DIMS
            and all(_int(s) and 0 <= s < 2**40 for s in shape)
        ):
            raise ProtocolError(f"state index: {name}: bad shape")
        if off != offset:
            raise ProtocolError(f"state index: {name} starts at {off!r:.20}, expected {offset}")
        e = TensorEntry(name, dtype, tuple(shape), offset)
        offset += e.nbytes
        if offset > total:
            raise ProtocolError(f"state index: {name} ends past the stream's {total} bytes")
        entries.append(e)
    if offset != total:
        raise ProtocolError(f"state index: tensors cover {offset} of {total} bytes")
    if len(chunks) != -(-total // chunk) or not all(
        isinstance(c, bytes) and len(c) == _DIGEST for c in chunks
    ):
        raise ProtocolError(f"state index: expected {-(-total // chunk)} 32-byte chunk digests")
    if len(scalars) > _MAX_SCALARS:
        raise ProtocolError("state index: too many scalars")
    for k, v in scalars.items():
        if not isinstance(k, str) or not 1 <= len(k) <= _MAX_KEY or not isinstance(v, int | float | bool):
            raise ProtocolError(f"state index: scalar {k!r:.40} is not an int/float/bool")
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            raise ProtocolError(f"state index: scalar {k!r:.40} out of range")
    return StateIndex(
        chunk=chunk, total=total, tensors=tuple(entries), scalars=dict(scalars), chunks=tuple(chunks)
    )


def tensors_from_file(path: Path, index: StateIndex) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) memory-mapped from a state stream written to ``path`` (copy-on-write, so pages
    stay in the page cache, not in the process's private memory, until the caller copies them)."""
    size = path.stat().st_size
    if size != index.total:
        raise ProtocolError(f"state file {path} holds {size} bytes, the index says {index.total}")
    for e in index.tensors:
        torch_dtype = _DTYPES[e.dtype][0]
        if e.nbytes == 0:
            yield e.name, torch.empty(e.shape, dtype=torch_dtype)
            continue
        mm = np.memmap(path, dtype=np.uint8, mode="c", offset=e.offset, shape=(e.nbytes,))
        yield e.name, torch.from_numpy(mm).view(torch_dtype).reshape(e.shape)
