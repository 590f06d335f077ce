"""Value coding for top-k components: int8 with a per-chunk scale, or 1-bit sign with one scale.

int8: per chunk, scale = max|v| / 127 as bfloat16 (rounded up), then round(v / scale). Top-k
values of one chunk are all among its largest, so a max-scaled int8 keeps them to within 0.4% of
the chunk's max. bfloat16, not float16: DeMo momentum is scaled by the learning rate and can sit
far below float16's normal range (6e-5), where a float16 scale would flush whole chunks to zero;
float32 scales would cost 0.5 bit per value more. Layout: n_chunks bfloat16 scales | n_chunks*k int8.

sign: one float32 scale per tensor, mean |v|, then one bit per value (1 = negative), packed MSB
first. DeMo applies sign(aggregate) anyway, so the scale only keeps average magnitudes right when
peers' components are averaged; a per-chunk scale would cost 0.5 bit per value at k=32, a third of
the whole sign payload. Layout: float32 scale | ceil(n_chunks*k / 8) bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

CODECS = ("int8", "sign")
_MAX_SCALE = float(np.finfo(np.float32).max) / 128


def _bf16_round_up(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of non-negative float32 `x`, rounded up so max|v| / scale <= 127."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0xFFFF) >> 16).astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encoded_size(n_chunks: int, k: int, codec: str) -> int:
    """Exact size of `encode_values` output for this geometry."""
    if codec == "int8":
        return 2 * n_chunks + n_chunks * k
    if codec == "sign":
        return 4 + -(-(n_chunks * k) // 8)
    raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")


def _values_2d(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().to(torch.float32).cpu().numpy()
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"values: expected 2-D [n_chunks, k], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("values: non-finite entries cannot be coded")
    return arr


def encode_values(values: Tensor | np.ndarray, codec: str) -> bytes:
    v = _values_2d(values)
    if codec == "int8":
        amax = np.abs(v).max(axis=1) if v.size else np.zeros(v.shape[0], np.float32)
        scale_bits = _bf16_round_up((amax / np.float32(127.0)).astype(np.float32))
        scale = _bf16_to_f32(scale_bits)
        safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
        q = np.clip(np.rint(v / safe), -127, 127).astype(np.int8)
        return scale_bits.astype("<u2").tobytes() + q.tobytes()
    if codec == "sign":
        mean_abs = float(np.abs(v).mean()) if v.size else 0.0
        bits = np.packbits((v < 0).ravel())
        return np.array([mean_abs], dtype="<f4").tobytes() + bits.tobytes()
    raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")


def decode_values(data: bytes, n_chunks: int, k: int, codec: str) -> Tensor:
    """Inverse of `encode_values` (lossy); ProtocolError for a wrong size or non-finite scales."""
    if n_chunks < 0 or k < 0:
        raise ProtocolError(f"n_chunks/k: expected >= 0, got {n_chunks}/{k}")
    want = encoded_size(n_chunks, k, codec)
    if len(data) != want:
        raise ProtocolError(f"values: expected {want} bytes for {n_chunks}x{k} {codec}, got {len(data)}")
    if codec == "int8":
        scale = _bf16_to_f32(np.frombuffer(data, dtype="<u2", count=n_chunks))
        # 127 * scale must stay finite, or dequantised values would be inf.
        if not (np.isfinite(scale) & (scale >= 0) & (scale <= _MAX_SCALE)).all():
            raise ProtocolError(f"values: int8 scales must be in [0, {_MAX_SCALE:.3g}]")
        q = np.frombuffer(data, dtype=np.int8, offset=2 * n_chunks).reshape(n_chunks, k)
        if (q == -128).any():
            raise ProtocolError("values: int8 value -128 is never produced by the encoder")
        out = q.astype(np.float32) * scale[:, None]
    else:
        sign_scale = float(np.frombuffer(data, dtype="<f4", count=1)[0])
        if not np.isfinite(sign_scale) or sign_scale < 0:
            raise ProtocolError("values: sign scale must be finite and >= 0")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=4))
        n = n_chunks * k
        if bits[n:].any():
            raise ProtocolError("values: sign padding bits must be zero")
        out = np.where(bits[:n].reshape(n_chunks, k) == 1, -sign_scale, sign_scale).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out))
