"""DiLoCo pseudo-gradient codecs: what a node serves as its round contribution.

``int8`` (dense): every tensor quantised by ``quant.quantize_int8`` with one fp32 scale per 256
values (a per-tensor scale lost most small entries of embedding deltas; 256 costs 1.6 % overhead).
The blob is a msgpack map ``{"v": 1, "codec": "int8", "t": [[name, shape, int8 bytes], ...]}``.
The author averages the *decoded* values of its own blob, like every receiver, so replicas that
merged the same contributions land on bit-identical anchors. No pickle: a peer's bytes can only
become finite fp32 tensors of the shapes the blob states, checked before anything is allocated.
"""

from __future__ import annotations

import math

import msgpack
import torch
from swarmnode.compression import quant
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

__all__ = ["CODECS", "QUANT_BLOCK", "decode_delta", "encode_delta", "encoded_size"]

QUANT_BLOCK = 256
CODECS = ("int8",)
_MAX_TENSORS = 1 << 16
_MAX_NAME = 256
_MAX_DIMS = 8


def encoded_size(shapes: dict[str, tuple[int, ...]]) -> int:
    """Upper bound of ``encode_delta``'s output for tensors of these shapes (caps derive from it)."""
    total = 64
    for name, shape in shapes.items():
        numel = math.prod(shape)
        total += quant.quantized_size(numel, QUANT_BLOCK) + len(name) + 16 + 9 * len(shape)
    return total


def encode_delta(delta: dict[str, Tensor], codec: str = "int8") -> bytes:
    if codec not in CODECS:
        raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")
    items = []
    for name in sorted(delta):
        t = delta[name]
        items.append([name, list(t.shape), quant.quantize_int8(t, block=QUANT_BLOCK)])
    return msgpack.packb({"v": 1, "codec": codec, "t": items}, use_bin_type=True)


def decode_delta(data: bytes, max_bytes: int) -> dict[str, Tensor]:
    """Inverse of ``encode_delta``; any malformed or non-finite blob is a ``ProtocolError``."""
    if len(data) > max_bytes:
        raise ProtocolError(f"pseudo-gradient blob: {len(data)} bytes, over the limit of {max_bytes}")
    obj = quant.unpack_bounded(
        data, "pseudo-gradient blob", max_str_len=_MAX_NAME * 4, max_array_len=_MAX_TENSORS, max_map_len=8
    )
    if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("t"), list):
        raise ProtocolError("pseudo-gradient blob: expected {'v': 1, 'codec': ..., 't': [...]}")
    if obj.get("codec") not in CODECS:
        raise ProtocolError(f"pseudo-gradient blob: unknown codec {obj.get('codec')!r:.40}")
    out: dict[str, Tensor] = {}
    for item in obj["t"]:
        if not (isinstance(item, list) and len(item) == 3):
            raise ProtocolError("pseudo-gradient blob: each entry must be [name, shape, bytes]")
        name, shape, raw = item
        if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or name in out:
            raise ProtocolError(f"pseudo-gradient blob: bad or duplicate name {name!r:.80}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)
        ):
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} has a bad shape")
        if not isinstance(raw, bytes):
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} data must be bytes")
        try:
            t = quant.dequantize_int8(raw, shape=tuple(shape), max_bytes=len(raw))
        except ProtocolError as exc:
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r}: {exc}") from None
        if not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} is not finite")
        out[name] = t
    return out
