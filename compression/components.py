"""One tensor's DeMo payload: coded indices followed by coded values.

The values part has a size fixed by (n_chunks, k, codec), so it sits at the end and needs no length
field; the indices part is whatever precedes it. Both sizes are checked against what the geometry
allows before any decoding work is done.
"""

from __future__ import annotations

import numpy as np
from swarmnode.compression import indices as _indices
from swarmnode.compression import values as _values
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor


def encode_components(
    indices: Tensor | np.ndarray, values: Tensor, *, chunk_numel: int, value_codec: str
) -> bytes:
    if tuple(indices.shape) != tuple(values.shape):
        raise ValueError(f"indices/values: shapes differ, {tuple(indices.shape)} vs {tuple(values.shape)}")
    return _indices.encode_indices(indices, chunk_numel) + _values.encode_values(values, value_codec)


def max_encoded_size(n_chunks: int, k: int, chunk_numel: int, value_codec: str) -> int:
    return _indices.max_encoded_size(n_chunks, k, chunk_numel) + _values.encoded_size(
        n_chunks, k, value_codec
    )


def decode_components(
    data: bytes, *, n_chunks: int, k: int, chunk_numel: int, value_codec: str
) -> tuple[Tensor, Tensor]:
    """(int64 indices [n_chunks, k], float32 values [n_chunks, k]); ProtocolError for bad bytes."""
    if n_chunks < 0 or k < 0 or chunk_numel < 1 or k > chunk_numel:
        raise ProtocolError(f"n_chunks/k/chunk_numel: invalid geometry {n_chunks}/{k}/{chunk_numel}")
    val_len = _values.encoded_size(n_chunks, k, value_codec)
    if len(data) > max_encoded_size(n_chunks, k, chunk_numel, value_codec):
        raise ProtocolError(f"components: {len(data)} bytes exceeds the bound for {n_chunks}x{k}")
    if len(data) < val_len + _indices.HEADER_SIZE:
        raise ProtocolError(f"components: {len(data)} bytes is too short for {n_chunks}x{k} {value_codec}")
    view = memoryview(data)
    split = len(data) - val_len
    idx = _indices.decode_indices(bytes(view[:split]), n_chunks, k, chunk_numel)
    vals = _values.decode_values(bytes(view[split:]), n_chunks, k, value_codec)
    return _indices.as_tensor(idx), vals
