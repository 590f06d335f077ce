"""``sparse``: a compressed DiLoCo pseudo-gradient codec, top-k per 4096-value chunk with 2-bit values
and local error feedback, 0.0176 B/param on the wire all overhead included (dense int8 is ~1.016).

Per tensor: the values are cut into chunks and transformed per chunk in one of three domains
(``SparseParams.domain``, named in the blob header): ``wht`` (default) chunks of 4096 contiguous values
of the flattened tensor (a smaller tensor: one chunk of the next power of two; the last chunk zero
padded), each through an orthonormal Walsh-Hadamard transform; ``value`` and ``dct``: the tensor viewed
as 2-D and cut into ``tile`` x ``tile`` tiles (``dct.ChunkedDCT``, 4096 values at the default tile of
64), as they are or DCT-II'd per tile. The ``k`` largest magnitudes of every chunk are kept (``k`` is
given per 4096 values and scaled to the chunk's size, at least 1). Their positions are coded by
``indices.encode_indices`` (Rice-coded gaps); their values with 2 bits each, a sign and one magnitude
bit choosing between two per-chunk levels ``lo <= hi`` (bfloat16, fitted by a few rounds of 1-D
2-means: each level is the mean magnitude of the values it stands for). Payload of one tensor:
indices | n_chunks x (lo, hi) bfloat16 | 2 bits per kept value, packed MSB first, zero padded. The
values part has a size fixed by the geometry, so the indices part is what precedes it.

Bytes (Rice indices 7.69 bits, 1.02x the bound of 7.55; 2 value bits; 32 level bits per chunk) at the
default k = 56 per 4096: 56 x 9.69 + 32 = 575 bits per 4096 values = 0.0176 B/param. Measured with
every header byte counted (``python scripts/bench_compression.py --sparse-only``, section
``sparse_delta``): 0.017577 B/param (wht; value 0.017586) on 49.96 M parameters of Qwen2.5-0.5B
shapes (3 layers + a 6016 x 896 embedding slice; 878 kB, header 1848 bytes), projected 0.017568
B/param (8.68 MB) for the full 494 M layout from the measured bytes of each shape. Small models pay
more for the header: 0.0279 on the 135 k-parameter tiny model. The 0.02 budget leaves room for k up
to 64 (0.0195 B/param on a 4864 x 896 tensor).

Which domain (same 50 M layout, k = 56, one round, no error feedback; cosine of the decoded Δ with Δ,
value / dct / wht): i.i.d. Gaussian Δ 0.327 / 0.327 / 0.328 (nothing to gather); a sum of 10 soft-sign
steps of a shared direction plus noise, like AdamW's inner steps, 0.260 / 0.328 / 0.327 (a rotation
turns a flat-topped distribution into a Gaussian one, whose top-k holds more energy); rank-4 random
walks plus 10 % noise (smooth) 0.163 / 0.984 / 0.896; a real AdamW Δ (the tiny model between 20 and 60
warm-up steps) 0.316 / 0.451 / 0.454. The WHT keeps nearly what the DCT keeps, and unlike the DCT (a
float32 matmul, whose rounding differs between BLAS builds, ISAs and thread counts) it is a fixed
sequence of elementwise float32 adds and subtracts: every replica decodes the same bits, so replicas
that merged the same blobs still land on bit-identical anchors. ``sparse-dct`` (config) is for a
cohort on one build; ``value`` is kept for comparison. Error feedback is what makes any of them work:
over 20 rounds of a persistent AdamW-like Δ plus fresh noise of twice its scale (one 14.9 M-parameter
layer, wht), the sum of what was sent has cosine 0.760 with the sum of the Δs with error feedback and
0.446 without; a single Δ followed by empty rounds is sent whole (``tests/test_sparsedelta.py``).

Learning (the ``diloco_proxy`` of the same bench: 4 replicas of a 98 k-parameter MLP, 30 rounds of
25 AdamW steps, the real codec and trimmed-mean merge; gain = held-out MSE of isolated replicas minus
the arm's, seeds 0 / 1): int8 with the default outer step (lr 0.7, Nesterov 0.9) 0.00280 / 0.00298;
int8 with lr 1, no momentum 0.00561 / 0.00565; sparse (wht) with lr 1, no momentum 0.00524 / 0.00533,
i.e. 1.87x / 1.79x int8's default gain and 0.93x / 0.94x int8's with the same outer step; sparse with
Nesterov 0.9 -0.219 / -0.214 (23x worse than not merging): error feedback already accumulates what
was not sent, momentum on top overshoots. So ``diloco.outer_lr`` / ``momentum`` default to 1.0 / 0 for
the sparse codecs (SparseLoCo's recipe). Speed (one 4864 x 896 tensor, 2 threads on a loaded 2-core
machine): wht 0.08 s/M params to encode (40 s at 494 M), 0.023 s/M to decode.

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
DOMAINS = ("value", "dct", "wht")
DEFAULT_DOMAIN = "wht"
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

    tile: int = DEFAULT_TILE  # tile side of the value and dct domains
    k: int = DEFAULT_K  # kept values per 4096 (scaled to each chunk's size)
    domain: str = DEFAULT_DOMAIN  # one of DOMAINS

    def __post_init__(self) -> None:
        check_params(self.tile, self.k, self.domain, error=ValueError)


def check_params(tile: object, k: object, domain: object, *, error: type[ValueError]) -> None:
    for name, v in (("tile", tile), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise error(f"sparse {name}: expected an integer, got {v!r:.40}")
    assert isinstance(tile, int)
    assert isinstance(k, int)
    if not MIN_TILE <= tile <= MAX_TILE:
        raise error(f"sparse tile: expected {MIN_TILE}..{MAX_TILE}, got {tile}")
    if not 1 <= k <= CHUNK_REF * MAX_DENSITY:
        raise error(f"sparse k: expected 1..{int(CHUNK_REF * MAX_DENSITY)} per {CHUNK_REF}, got {k}")
    if domain not in DOMAINS:
        raise error(f"sparse domain: expected one of {DOMAINS}, got {domain!r:.40}")


def _fwht(m: Tensor) -> Tensor:
    """Orthonormal Walsh-Hadamard transform of each row of ``m`` [n, 2^j] (its own inverse): j
    butterfly stages of elementwise float32 adds and subtracts in a fixed order, then one scaling,
    so every machine computes the same bits (no matmul, no reduction whose order a BLAS picks).
    Two buffers ping-pong between the stages; ``m`` is not modified."""
    n, c = m.shape
    if c == 1:
        return m.clone()
    bufs = [torch.empty_like(m), torch.empty_like(m)]
    src = m.contiguous()
    h, i = 1, 0
    while h < c:
        dst = bufs[i]
        s4 = src.view(n, c // (2 * h), 2, h)
        d4 = dst.view(n, c // (2 * h), 2, h)
        torch.add(s4[:, :, 0], s4[:, :, 1], out=d4[:, :, 0])
        torch.sub(s4[:, :, 0], s4[:, :, 1], out=d4[:, :, 1])
        src, i, h = dst, 1 - i, h * 2
    return src.mul_(1.0 / math.sqrt(c))


class _Geom:
    """How a tensor of ``shape`` is cut into chunks, and each band of chunks transformed.

    value / dct: ``dct.ChunkedDCT`` tiles of ``tile`` x ``tile`` (rows x columns of the 2-D view),
    band by band of tile rows. wht: the flattened tensor in chunks of 4096 contiguous values (a
    smaller tensor: one chunk of the next power of two), the last one zero padded."""

    def __init__(self, shape: tuple[int, ...], p: SparseParams) -> None:
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.t: _dct.ChunkedDCT | None = None
        if p.domain == "wht":
            c = CHUNK_REF if self.numel >= CHUNK_REF else 1 << max(0, (self.numel - 1).bit_length())
            self.chunk_numel, self.n_chunks = c, -(-self.numel // c)
        else:
            t = _dct.ChunkedDCT(self.shape or (1,), chunk=p.tile, use_dct=p.domain == "dct")
            self.t, self.chunk_numel, self.n_chunks = t, t.chunk_numel, t.n_chunks
            self.rows = t.shape[0] if len(t.shape) >= 2 else 1
            self.nc = t._cols // t._tc
        self.k = max(1, min(self.chunk_numel, round(p.k * self.chunk_numel / CHUNK_REF)))

    def bands(self) -> list[tuple[int, int]]:
        """Chunk ranges [c0, c1) of at most ~``BAND_NUMEL`` values each, in order."""
        if self.t is None:
            step = max(1, BAND_NUMEL // self.chunk_numel)
            return [(c, min(self.n_chunks, c + step)) for c in range(0, self.n_chunks, step)]
        return [(b0 * self.nc, b1 * self.nc) for b0, b1 in _dct.row_bands(self.t, BAND_NUMEL)]

    def view(self, x: Tensor) -> Tensor:
        return x.reshape(-1) if self.t is None else x.reshape(self.rows, -1)

    def forward(self, v: Tensor, c0: int, c1: int) -> Tensor:
        """Coefficients [c1 - c0, chunk_numel] of chunks [c0, c1) of ``view(x)``."""
        if self.t is None:
            c = self.chunk_numel
            seg = v[c0 * c : min(self.numel, c1 * c)]
            m = torch.nn.functional.pad(seg, (0, (c1 - c0) * c - seg.numel())).reshape(c1 - c0, c)
            return _fwht(m)
        t = self.t
        b0, b1 = c0 // self.nc, c1 // self.nc
        return _dct.forward_band(t, v[b0 * t._tr : min(self.rows, b1 * t._tr)], b1 - b0)

    def inverse_into(self, out: Tensor, dense: Tensor, c0: int, c1: int) -> None:
        """Write the values of chunks [c0, c1) with coefficients ``dense`` into ``out`` (a ``view``)."""
        if self.t is None:
            c = self.chunk_numel
            end = min(self.numel, c1 * c)
            out[c0 * c : end] = _fwht(dense).reshape(-1)[: end - c0 * c]
            return
        t = self.t
        b0, b1 = c0 // self.nc, c1 // self.nc
        r0, r1 = b0 * t._tr, min(self.rows, b1 * t._tr)
        out[r0:r1] = _dct.inverse_band(t, dense, b1 - b0, r1 - r0)


def values_size(n_chunks: int, k: int) -> int:
    """Exact size of the values part: two bfloat16 levels per chunk, then 2 bits per kept value."""
    return 4 * n_chunks + -(-(2 * n_chunks * k) // 8)


def payload_bounds(shape: tuple[int, ...], p: SparseParams) -> tuple[int, int]:
    """(smallest, largest) valid payload length of a tensor of ``shape`` (0 for an empty tensor)."""
    if math.prod(shape) == 0:
        return 0, 0
    g = _Geom(shape, p)
    vals = values_size(g.n_chunks, g.k)
    return vals + _indices.HEADER_SIZE + 1, vals + _indices.max_encoded_size(g.n_chunks, g.k, g.chunk_numel)


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


def encode_tensor(x: Tensor, p: SparseParams) -> tuple[bytes, Tensor]:
    """(payload, the float32 tensor every receiver decodes from it): the caller's error feedback
    keeps ``x - decoded``. ``x`` must be finite."""
    shape = tuple(x.shape)
    if x.numel() == 0:
        return b"", torch.zeros(shape, dtype=torch.float32)
    x32 = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x32).all()):
        raise ValueError("x: non-finite entries cannot be coded")
    g = _Geom(shape, p)
    v = g.view(x32)
    out = g.view(torch.empty(shape, dtype=torch.float32))
    all_idx: list[np.ndarray] = []
    all_levels: list[np.ndarray] = []
    all_codes: list[np.ndarray] = []
    for c0, c1 in g.bands():
        coeffs = g.forward(v, c0, c1)
        idx, vals = _dct.topk_chunks(coeffs, g.k)
        levels, codes = _quantize(vals.numpy())
        q = torch.from_numpy(_dequantize(levels, codes))
        g.inverse_into(out, _dct.scatter_chunks(idx, q, c1 - c0, g.chunk_numel), c0, c1)
        all_idx.append(idx.numpy())
        all_levels.append(levels)
        all_codes.append(codes)
    payload = _indices.encode_indices(np.concatenate(all_idx), g.chunk_numel) + _encode_values(
        np.concatenate(all_levels), np.concatenate(all_codes)
    )
    return payload, out.reshape(shape)


def _parts(
    data: memoryview, shape: tuple[int, ...], p: SparseParams, what: str
) -> tuple[_Geom, np.ndarray, np.ndarray, np.ndarray]:
    """(geometry, indices [n, k], levels [n, 2], codes [n, k]) of a payload, all checked."""
    lo, hi = payload_bounds(shape, p)
    if not lo <= len(data) <= hi:
        raise ProtocolError(f"{what}: payload of {len(data)} bytes, {list(shape)} allows {lo}..{hi}")
    g = _Geom(shape, p)
    split = len(data) - values_size(g.n_chunks, g.k)
    levels, codes = _decode_values(data[split:], g.n_chunks, g.k, what)
    try:
        idx = _indices.decode_indices(bytes(data[:split]), g.n_chunks, g.k, g.chunk_numel)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    return g, idx, levels, codes


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
    g, idx, levels, codes = _parts(view, shape, p, what)
    out = g.view(torch.empty(shape, dtype=torch.float32))
    for c0, c1 in g.bands():
        q = torch.from_numpy(_dequantize(levels[c0:c1], codes[c0:c1]))
        dense = _dct.scatter_chunks(torch.from_numpy(idx[c0:c1]), q, c1 - c0, g.chunk_numel)
        g.inverse_into(out, dense, c0, c1)
    return out.reshape(shape)


def tensor_sq_norm(
    data: memoryview | bytes, shape: tuple[int, ...], p: SparseParams, what: str = "sparse"
) -> float:
    """Σ of the squared transmitted values, from the levels and codes alone (float64, fixed order:
    the same on every node); the same checks as ``decode_tensor``. It is ‖decoded‖² (the DCT and
    the WHT are isometries) except for values that land in zero padding (a tile grid that does not
    divide the shape, the last WHT chunk), which it counts and the decode crops."""
    view = memoryview(data)
    if math.prod(shape) == 0:
        if len(view):
            raise ProtocolError(f"{what}: an empty tensor has no payload, got {len(view)} bytes")
        return 0.0
    _g, _idx, levels, codes = _parts(view, shape, p, what)
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
