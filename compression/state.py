"""Catch-up state codec: tensors (DiLoCo anchor + outer momentum, full precision) plus scalars.

A msgpack map ``{"v": 1, "tensors": <quant.encode_tensor_dict bytes>, "scalars": {name: value}}``.
Scalars are ints, floats or bools only; no pickle anywhere.
"""

from __future__ import annotations

from typing import Any

import msgpack
from swarmnode.compression import quant
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

__all__ = ["decode_state", "encode_state"]

_MAX_SCALARS = 64
_MAX_KEY = 64


def encode_state(tensors: dict[str, Tensor], scalars: dict[str, float | int | bool]) -> bytes:
    for k, v in scalars.items():
        if not isinstance(v, int | float | bool) or not 1 <= len(k) <= _MAX_KEY:
            raise ValueError(f"scalar {k!r}: expected a short name and an int/float/bool, got {v!r}")
    body = quant.encode_tensor_dict({k: v.contiguous() for k, v in tensors.items()})
    return msgpack.packb({"v": 1, "tensors": body, "scalars": dict(scalars)}, use_bin_type=True)


def decode_state(blob: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Tensors and scalars in one dict; ``ProtocolError`` for anything malformed."""
    if len(blob) > max_bytes:
        raise ProtocolError(f"state blob: {len(blob)} bytes, over the limit of {max_bytes}")
    obj = quant.unpack_bounded(
        blob, "state blob", max_str_len=_MAX_KEY * 4, max_array_len=_MAX_SCALARS, max_map_len=_MAX_SCALARS
    )
    if (
        not isinstance(obj, dict)
        or obj.get("v") != 1
        or not isinstance(obj.get("tensors"), bytes)
        or not isinstance(obj.get("scalars"), dict)
    ):
        raise ProtocolError("state blob: expected {'v': 1, 'tensors': bytes, 'scalars': {...}}")
    out: dict[str, Any] = dict(quant.decode_tensor_dict(obj["tensors"], max_bytes=len(blob)))
    for k, v in obj["scalars"].items():
        if not isinstance(v, int | float | bool) or k in out:
            raise ProtocolError(f"state blob: scalar {k!r:.40} is not an int/float/bool or clashes")
        out[k] = v
    return out
