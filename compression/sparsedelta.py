"""``sparse``: a compressed DiLoCo pseudo-gradient codec, top-k per tile with 2-bit values and local
error feedback, 0.0176 B/param on the wire all overhead included (dense int8 is ~1.016).

Per tensor: the tensor is viewed as 2-D and cut into ``tile`` x ``tile`` tiles (``dct.ChunkedDCT``:
4096 values per chunk at the default tile of 64; vectors in pieces of 64·64), optionally DCT-II'd per
tile, and the ``k`` largest magnitudes of every chunk are kept (``k`` is given per 4096 values and
scaled to the chunk's size, at least 1). Their positions are coded by ``indices.encode_indices``
(Rice-coded gaps, within 1.02x of log2(C(4096, k)) bits); their values with 2 bits each, a sign and
one magnitude bit choosing between two per-chunk levels ``lo <= hi`` (bfloat16, fitted by a few
rounds of 1-D 2-means: each level is the mean magnitude of the values it stands for). Payload of one
tensor: indices | n_chunks x (lo, hi) bfloat16 | 2 bits per kept value, packed MSB first, zero padded.
The values part has a size fixed by the geometry, so the indices part is what precedes it.

Bytes (Rice indices 7.69 bits, 1.02x the bound of 7.55; 2 value bits, 32 level bits per 4096-value chunk) at the default
k = 56 per 4096: 56 x 9.7 + 32 = 575 bits per 4096 values = 0.0176 B/param. Measured with every
header byte counted (``python scripts/bench_compression.py --sparse-only``, section ``sparse_delta``):
0.017586 B/param on 50.0 M parameters of Qwen2.5-0.5B shapes (3 layers + a 6016 x 896 embedding
slice; header 1842 bytes), projected 0.017576 B/param (8.68 MB) for the full 494 M layout from the
measured bytes of each shape. Tiny models pay more for the header: 0.0278 on the 135 k-parameter
tiny model. The 0.02 budget leaves room for k up to 64 (0.0195 B/param on a 4864 x 896 tensor).

Value domain or DCT (same 50 M layout, k = 56, one round, no error feedback; cosine of the decoded
Δ with Δ): i.i.d. Gaussian Δ 0.327 both ways (nothing for a DCT to gather); a sum of 10 soft-sign
steps of a shared direction plus noise (AdamW-like) 0.260 value domain, 0.328 DCT (the DCT makes
a flat-topped distribution Gaussian, whose top-k holds more energy); rank-4 random walks plus 10 %
noise (smooth) 0.163 vs 0.984; a real AdamW Δ (the tiny model between 20 and 60 warm-up steps)
0.316 vs 0.451. The DCT keeps more, but its inverse is a float32 matmul whose rounding may differ
between BLAS builds and thread counts, and replicas must land on bit-identical anchors; the value
domain's decode is a scatter, exact everywhere. So ``sparse`` is the value domain and ``sparse-dct``
(``dct: true`` in the header) is for cohorts on one build. Error feedback, not one round's cosine,
is what makes either work: over 20 rounds of a persistent AdamW-like Δ plus fresh noise of twice its
scale (one 14.9 M-parameter layer), the sum of what was sent has cosine 0.733 with the sum of the
Δs with error feedback and 0.516 without; with a single Δ followed by empty rounds it converges to
the whole Δ (``tests/test_sparsedelta.py``). Speed on this loaded 2-core machine: 0.14 s/M params
to encode (70 s at 494 M), 0.07 s/M to decode.

``ErrorFeedback`` keeps, per tensor, what the blob did not carry (e ← Δ + e − decode(encode(Δ + e)))
and adds it to the next round's Δ. It is kept on CPU in the parameter's dtype when one is given
(bf16 models: 2 B/param; 0.99 GB at 494 M parameters), else float32; it is this node's own state,
checkpointed with the DiLoCo state but never served to joiners (``optim.diloco``).

Decoding is strict and bounded: geometry parameters are range-checked, the receiver states the
shapes it expects (only those are ever allocated), every payload length, index stream, level and
padding bit is checked, and anything wrong is a ``ProtocolError`` (a ``ValueError``) naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from swarmnode.compression import dct as _dct
from swarmnode.compression import indices as _indices
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

__all__ = [
    "DEFAULT_K",
    "DEFAULT_TILE",
    "ErrorFeedback",
    "SparseParams",
    "decode_tensor",
    "encode_tensor",
    "payload_bounds",
    "tensor_sq_norm",
]

DEFAULT_TILE = 64
DEFAULT_K = 56  # per 4096 values: 0.0176 B/param all overhead included
CHUNK_REF = 4096  # the chunk size ``k`` is stated for
MIN_TILE, MAX_TILE = 8, 256
MAX_DENSITY = 1 / 8  # k per 4096 at most 512: a sparse blob stays far below the dense int8 one
# Tile rows transformed at once: bounds the fp32 temporaries of a 136 M-value embedding.
BAND_NUMEL = 1 << 22
_LLOYD_ROUNDS = 4
_BF16_MAX_BITS = 0x7F7F  # the largest finite bfloat16


@dataclass(frozen=True, slots=True)
class SparseParams:
    """What a sparse blob's header states; a receiver accepts any value in range."""

    tile: int = DEFAULT_TILE
    k: int = DEFAULT_K  # kept values per 4096 (scaled to each chunk's size)
    dct: bool = False

    def __post_init__(self) -> None:
        check_params(self.tile, self.k, self.dct, error=ValueError)


def check_params(tile: object, k: object, use_dct: object, *, error: type[ValueError]) -> None:
    for name, v in (("tile", tile), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise error(f"sparse {name}: expected an integer, got {v!r:.40}")
    assert isinstance(tile, int)
    assert isinstance(k, int)
    if not MIN_TILE <= tile <= MAX_TILE:
        raise error(f"sparse tile: expected {MIN_TILE}..{MAX_TILE}, got {tile}")
    if not 1 <= k <= CHUNK_REF * MAX_DENSITY:
        raise error(f"sparse k: expected 1..{int(CHUNK_REF * MAX_DENSITY)} per {CHUNK_REF}, got {k}")
    if not isinstance(use_dct, bool):
        raise error(f"sparse dct: expected true/false, got {use_dct!r:.40}")


def _geometry(shape: tuple[int, ...], p: SparseParams) -> tuple[_dct.ChunkedDCT, int]:
    t = _dct.ChunkedDCT(tuple(shape) or (1,), chunk=p.tile, use_dct=p.dct)
    k = max(1, min(t.chunk_numel, round(p.k * t.chunk_numel / CHUNK_REF)))
    return t, k


def values_size(n_chunks: int, k: int) -> int:
    """Exact size of the values part: two bfloat16 levels per chunk, then 2 bits per kept value."""
    return 4 * n_chunks + -(-(2 * n_chunks * k) // 8)


def payload_bounds(shape: tuple[int, ...], p: SparseParams) -> tuple[int, int]:
    """(smallest, largest) valid payload length of a tensor of ``shape`` (0 for an empty tensor)."""
    if math.prod(shape) == 0:
        return 0, 0
    t, k = _geometry(shape, p)
    vals = values_size(t.n_chunks, k)
    return vals + _indices.HEADER_SIZE + 1, vals + _indices.max_encoded_size(t.n_chunks, k, t.chunk_numel)


# -- values ---------------------------------------------------------------------------------------


def _bf16_nearest(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of finite, non-negative float32 ``x`` (round to nearest even)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    out = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.minimum(out, _BF16_MAX_BITS).astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _quantize(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(levels as bf16 bits [n, 2], codes [n, k] uint8 = sign << 1 | high) for values [n, k]."""
    a = np.abs(v).astype(np.float64)
    k = a.shape[1]
    thr = a.mean(axis=1, keepdims=True)
    total = a.sum(axis=1)
    lo = hi = total / max(k, 1)
    for _ in range(_LLOYD_ROUNDS):
        high = a > thr
        n_hi = high.sum(axis=1)
        s_hi = np.where(high, a, 0.0).sum(axis=1)
        n_lo = k - n_hi
        hi = np.where(n_hi > 0, s_hi / np.maximum(n_hi, 1), total / max(k, 1))
        lo = np.where(n_lo > 0, (total - s_hi) / np.maximum(n_lo, 1), hi)
        thr = ((lo + hi) / 2)[:, None]
    levels = np.stack([_bf16_nearest(lo.astype(np.float32)), _bf16_nearest(hi.astype(np.float32))], axis=1)
    lf = _bf16_to_f32(levels).astype(np.float64)
    high = np.abs(a - lf[:, 1:2]) < np.abs(a - lf[:, 0:1])
    codes = ((v < 0).astype(np.uint8) << 1) | high.astype(np.uint8)
    return levels, codes


def _dequantize(levels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    lf = _bf16_to_f32(levels)
    mag = np.where((codes & 1).astype(bool), lf[:, 1:2], lf[:, 0:1])
    return np.where((codes >> 1).astype(bool), -mag, mag).astype(np.float32)


def _encode_values(levels: np.ndarray, codes: np.ndarray) -> bytes:
    bits = np.stack([(codes >> 1) & 1, codes & 1], axis=-1).astype(np.uint8).ravel()
    return levels.astype("<u2").tobytes() + np.packbits(bits).tobytes()


def _decode_values(data: memoryview, n_chunks: int, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) != values_size(n_chunks, k):
        raise ProtocolError(
            f"{what}: values part is {len(data)} bytes, {n_chunks}x{k} needs {values_size(n_chunks, k)}"
        )
    levels = np.frombuffer(data, dtype="<u2", count=2 * n_chunks).reshape(n_chunks, 2).astype(np.uint16)
    lf = _bf16_to_f32(levels)
    if not np.isfinite(lf).all() or (lf < 0).any() or (lf[:, 0] > lf[:, 1]).any():
        raise ProtocolError(f"{what}: levels must be finite with 0 <= lo <= hi")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=4 * n_chunks))
    n = 2 * n_chunks * k
    if bits[n:].any():
        raise ProtocolError(f"{what}: value padding bits must be zero")
    pairs = bits[:n].reshape(n_chunks, k, 2)
    codes = (pairs[..., 0] << 1) | pairs[..., 1]
    return levels, codes.astype(np.uint8)


# -- one tensor -----------------------------------------------------------------------------------


def _bands(t: _dct.ChunkedDCT) -> list[tuple[int, int]]:
    return _dct.row_bands(t, BAND_NUMEL)


def _rows(t: _dct.ChunkedDCT) -> int:
    return t.shape[0] if len(t.shape) >= 2 else 1


def encode_tensor(x: Tensor, p: SparseParams) -> tuple[bytes, Tensor]:
    """(payload, the float32 tensor every receiver decodes from it): the caller's error feedback
    keeps ``x - decoded``. ``x`` must be finite."""
    shape = tuple(x.shape)
    if x.numel() == 0:
        return b"", torch.zeros(shape, dtype=torch.float32)
    x32 = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x32).all()):
        raise ValueError("x: non-finite entries cannot be coded")
    t, k = _geometry(shape, p)
    rows = _rows(t)
    m = x32.reshape(rows, -1)
    out = torch.empty(rows, m.shape[1], dtype=torch.float32)
    all_idx: list[np.ndarray] = []
    all_levels: list[np.ndarray] = []
    all_codes: list[np.ndarray] = []
    for b0, b1 in _bands(t):
        r0, r1 = b0 * t._tr, min(rows, b1 * t._tr)
        coeffs = _dct.forward_band(t, m[r0:r1], b1 - b0)
        idx, vals = _dct.topk_chunks(coeffs, k)
        levels, codes = _quantize(vals.numpy())
        q = torch.from_numpy(_dequantize(levels, codes))
        dense = _dct.scatter_chunks(idx, q, coeffs.shape[0], t.chunk_numel)
        out[r0:r1] = _dct.inverse_band(t, dense, b1 - b0, r1 - r0)
        all_idx.append(idx.numpy())
        all_levels.append(levels)
        all_codes.append(codes)
    payload = _indices.encode_indices(np.concatenate(all_idx), t.chunk_numel) + _encode_values(
        np.concatenate(all_levels), np.concatenate(all_codes)
    )
    return payload, out.reshape(shape)


def _parts(
    data: memoryview, shape: tuple[int, ...], p: SparseParams, what: str
) -> tuple[_dct.ChunkedDCT, int, np.ndarray, np.ndarray, np.ndarray]:
    """(geometry, k, indices [n, k], levels [n, 2], codes [n, k]) of a payload, all checked."""
    lo, hi = payload_bounds(shape, p)
    if not lo <= len(data) <= hi:
        raise ProtocolError(f"{what}: payload of {len(data)} bytes, {list(shape)} allows {lo}..{hi}")
    t, k = _geometry(shape, p)
    split = len(data) - values_size(t.n_chunks, k)
    levels, codes = _decode_values(data[split:], t.n_chunks, k, what)
    try:
        idx = _indices.decode_indices(bytes(data[:split]), t.n_chunks, k, t.chunk_numel)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    return t, k, idx, levels, codes


def decode_tensor(
    data: memoryview | bytes, shape: tuple[int, ...], p: SparseParams, what: str = "sparse"
) -> Tensor:
    """The float32 tensor of ``shape`` a payload codes; ``ProtocolError`` for bytes that do not fit
    exactly. Allocates the tensor of ``shape`` and one band of ~``BAND_NUMEL`` values, nothing more."""
    view = memoryview(data)
    if math.prod(shape) == 0:
        if len(view):
            raise ProtocolError(f"{what}: an empty tensor has no payload, got {len(view)} bytes")
        return torch.zeros(shape, dtype=torch.float32)
    t, _k, idx, levels, codes = _parts(view, shape, p, what)
    rows = _rows(t)
    out = torch.empty(rows, math.prod(shape) // rows, dtype=torch.float32)
    nc = t._cols // t._tc
    for b0, b1 in _bands(t):
        c0, c1 = b0 * nc, b1 * nc
        r0, r1 = b0 * t._tr, min(rows, b1 * t._tr)
        q = torch.from_numpy(_dequantize(levels[c0:c1], codes[c0:c1]))
        dense = _dct.scatter_chunks(torch.from_numpy(idx[c0:c1]), q, c1 - c0, t.chunk_numel)
        out[r0:r1] = _dct.inverse_band(t, dense, b1 - b0, r1 - r0)
    return out.reshape(shape)


def tensor_sq_norm(
    data: memoryview | bytes, shape: tuple[int, ...], p: SparseParams, what: str = "sparse"
) -> float:
    """Σ of the squared transmitted values, from the levels and codes alone (float64, fixed order:
    the same on every node); the same checks as ``decode_tensor``. It is ‖decoded‖² (the DCT is an
    isometry) except for values that land in the zero padding of a tile grid that does not divide
    the shape, which it counts and the decode crops."""
    view = memoryview(data)
    if math.prod(shape) == 0:
        if len(view):
            raise ProtocolError(f"{what}: an empty tensor has no payload, got {len(view)} bytes")
        return 0.0
    _t, _k, _idx, levels, codes = _parts(view, shape, p, what)
    lf = _bf16_to_f32(levels).astype(np.float64)
    n_hi = (codes & 1).sum(axis=1).astype(np.float64)
    n_lo = codes.shape[1] - n_hi
    return float(np.sum(n_lo * lf[:, 0] ** 2 + n_hi * lf[:, 1] ** 2))


# -- error feedback -------------------------------------------------------------------------------


class ErrorFeedback:
    """The part of past Δs the wire did not carry, per tensor, added to the next Δ before coding.

    ``dtypes`` names the dtype each residual is kept in (the parameter's: bf16 halves the memory of
    float32); a tensor not named is kept in float32. Residuals live on CPU."""

    def __init__(self, dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        self.dtypes = dict(dtypes or {})
        self.residual: dict[str, Tensor] = {}

    def add(self, name: str, delta: Tensor) -> Tensor:
        """Δ + e in float32 (Δ alone for a tensor with no residual yet)."""
        d = delta.detach().to("cpu", torch.float32)
        e = self.residual.get(name)
        if e is None:
            return d
        if e.shape != d.shape:
            raise ValueError(f"{name}: residual {tuple(e.shape)} does not match Δ {tuple(d.shape)}")
        return d + e.to(torch.float32)

    def keep(self, name: str, sent: Tensor, decoded: Tensor) -> None:
        """e ← sent − decoded: what the blob left out of ``sent`` (= Δ + e)."""
        rest = sent.to(torch.float32) - decoded.to(torch.float32)
        dtype = self.dtypes.get(name, torch.float32)
        cur = self.residual.get(name)
        if cur is not None and cur.shape == rest.shape and cur.dtype == dtype:
            cur.copy_(rest)
        else:
            self.residual[name] = rest.to(dtype)

    def clear(self) -> None:
        self.residual = {}

    def sq_norm(self) -> float:
        return float(sum(float(e.to(torch.float32).pow(2).sum()) for e in self.residual.values()))

    def wrap(
        self, delta: Iterator[tuple[str, Tensor]] | list[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor]]:
        """(name, Δ + e) pairs; the encoder reports what it sent through ``keep``."""
        for name, d in delta:
            yield name, self.add(name, d)
