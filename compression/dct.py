"""DeMo's chunked DCT-II and top-k selection (reference: bloc97/DeMo).

A tensor of two or more dims is viewed as 2-D (first dim x the rest) and cut into tiles of at most
`chunk` x `chunk`; a vector (or scalar) into pieces of at most `chunk`. Each tile gets an orthonormal
DCT-II, so the transform is an isometry: squared norms, top-k energy and error-feedback subtraction
mean the same thing in both domains.

Dims not divisible by `chunk`: like the reference we use the largest divisor of the dim that is
<= chunk, as long as it is at least chunk/2 (no padding, no wasted coefficients). A dim with no such
divisor (e.g. a prime) is zero-padded up to a multiple of min(chunk, dim) instead, because the
reference rule would degrade to 1-wide tiles where top-k keeps everything or nothing.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=64)
def _dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix D (n x n): y = D @ x, x = D.T @ y. float64 built, float32 kept."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi / n * (i[None, :] + 0.5) * i[:, None]) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(torch.float32)


def _tile(dim: int, chunk: int) -> tuple[int, int]:
    """(tile size, padded dim) for one axis; see the module docstring for the rule."""
    if dim <= chunk:
        return dim, dim
    for size in range(chunk, chunk // 2 - 1, -1):
        if size > 0 and dim % size == 0:
            return size, dim
    return chunk, -(-dim // chunk) * chunk


class ChunkedDCT:
    """Per-tile orthonormal DCT-II for a fixed parameter shape; forward gives [n_chunks, chunk_numel]."""

    __slots__ = ("_cols", "_rows", "_tc", "_tr", "chunk", "chunk_numel", "n_chunks", "shape", "use_dct")

    def __init__(self, shape: tuple[int, ...], *, chunk: int = 64, use_dct: bool = True) -> None:
        if chunk < 1:
            raise ValueError(f"chunk: expected >= 1, got {chunk}")
        if any(int(d) < 1 for d in shape):
            raise ValueError(f"shape: every dim must be >= 1, got {tuple(shape)}")
        self.shape = tuple(int(d) for d in shape)
        self.chunk = chunk
        self.use_dct = use_dct
        if len(self.shape) >= 2:
            rows, cols = self.shape[0], math.prod(self.shape[1:])
            self._tr, self._rows = _tile(rows, chunk)
        else:
            cols = math.prod(self.shape)  # scalar: a 1-element vector
            self._tr, self._rows = 1, 1
        self._tc, self._cols = _tile(cols, chunk)
        self.chunk_numel = self._tr * self._tc
        self.n_chunks = (self._rows // self._tr) * (self._cols // self._tc)

    def _as_2d(self, x: Tensor) -> Tensor:
        rows = self.shape[0] if len(self.shape) >= 2 else 1
        m = x.reshape(rows, -1)
        pad_r, pad_c = self._rows - m.shape[0], self._cols - m.shape[1]
        if pad_r or pad_c:
            m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r))
        return m

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape) != self.shape:
            raise ValueError(f"x: expected shape {self.shape}, got {tuple(x.shape)}")
        m = self._as_2d(x.to(torch.float32))
        nr, nc = self._rows // self._tr, self._cols // self._tc
        tiles = m.reshape(nr, self._tr, nc, self._tc).permute(0, 2, 1, 3)
        if self.use_dct:
            dr, dc = _dct_matrix(self._tr).to(x.device), _dct_matrix(self._tc).to(x.device)
            tiles = dr @ tiles @ dc.T
        return tiles.reshape(self.n_chunks, self.chunk_numel).contiguous()

    def inverse(self, coeffs: Tensor) -> Tensor:
        if tuple(coeffs.shape) != (self.n_chunks, self.chunk_numel):
            raise ValueError(
                f"coeffs: expected shape {(self.n_chunks, self.chunk_numel)}, got {tuple(coeffs.shape)}"
            )
        nr, nc = self._rows // self._tr, self._cols // self._tc
        tiles = coeffs.to(torch.float32).reshape(nr, nc, self._tr, self._tc)
        if self.use_dct:
            dr, dc = _dct_matrix(self._tr).to(coeffs.device), _dct_matrix(self._tc).to(coeffs.device)
            tiles = dr.T @ tiles @ dc
        m = tiles.permute(0, 2, 1, 3).reshape(self._rows, self._cols)
        rows = self.shape[0] if len(self.shape) >= 2 else 1
        return m[:rows, : math.prod(self.shape) // rows].reshape(self.shape).contiguous()


def row_bands(t: ChunkedDCT, max_numel: int) -> list[tuple[int, int]]:
    """Ranges of tile rows [b0, b1) covering the tensor, each at most ~``max_numel`` values: a large
    tensor (a 136 M-value embedding) is transformed band by band so its fp32 temporaries stay
    bounded. Chunks are numbered row-major by tile, so band [b0, b1) is chunks [b0·nc, b1·nc)."""
    nr, nc = t._rows // t._tr, t._cols // t._tc
    per_row = nc * t.chunk_numel
    step = max(1, max_numel // per_row)
    return [(b, min(nr, b + step)) for b in range(0, nr, step)]


def forward_band(t: ChunkedDCT, m: Tensor, nb: int) -> Tensor:
    """Coefficients of ``nb`` tile rows from their values ``m`` (the band's rows of the tensor viewed
    as 2-D, unpadded): the same numbers ``t.forward`` gives for those chunks."""
    m = m.to(torch.float32)
    pad_r, pad_c = nb * t._tr - m.shape[0], t._cols - m.shape[1]
    if pad_r or pad_c:
        m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r))
    nc = t._cols // t._tc
    tiles = m.reshape(nb, t._tr, nc, t._tc).permute(0, 2, 1, 3)
    if t.use_dct:
        dr, dc = _dct_matrix(t._tr).to(m.device), _dct_matrix(t._tc).to(m.device)
        tiles = dr @ tiles @ dc.T
    return tiles.reshape(nb * nc, t.chunk_numel).contiguous()


def inverse_band(t: ChunkedDCT, coeffs: Tensor, nb: int, rows: int) -> Tensor:
    """The inverse of ``forward_band``: the band's first ``rows`` rows, unpadded, fp32."""
    nc = t._cols // t._tc
    tiles = coeffs.to(torch.float32).reshape(nb, nc, t._tr, t._tc)
    if t.use_dct:
        dr, dc = _dct_matrix(t._tr).to(coeffs.device), _dct_matrix(t._tc).to(coeffs.device)
        tiles = dr.T @ tiles @ dc
    m = tiles.permute(0, 2, 1, 3).reshape(nb * t._tr, t._cols)
    full_rows = t.shape[0] if len(t.shape) >= 2 else 1
    return m[:rows, : math.prod(t.shape) // full_rows]


def topk_chunks(coeffs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k by magnitude per chunk: (int64 indices sorted ascending per chunk, values), both [n_chunks, k]."""
    if coeffs.dim() != 2:
        raise ValueError(f"coeffs: expected 2-D [n_chunks, chunk_numel], got {tuple(coeffs.shape)}")
    if not 1 <= k <= coeffs.shape[1]:
        raise ValueError(f"k: expected 1..{coeffs.shape[1]}, got {k}")
    idx = torch.topk(coeffs.abs(), k, dim=1, sorted=False).indices
    idx = torch.sort(idx, dim=1).values.to(torch.int64)
    return idx, torch.gather(coeffs, 1, idx)


def scatter_chunks(indices: Tensor, values: Tensor, n_chunks: int, chunk_numel: int) -> Tensor:
    """Dense [n_chunks, chunk_numel] coefficients with `values` at `indices`, zeros elsewhere."""
    if indices.shape != values.shape or indices.dim() != 2 or indices.shape[0] != n_chunks:
        raise ValueError(
            f"indices/values: expected equal shapes [{n_chunks}, k], got {tuple(indices.shape)} / {tuple(values.shape)}"
        )
    idx = indices.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= chunk_numel):
        raise ValueError(f"indices: expected values in [0, {chunk_numel})")
    out = torch.zeros(
        n_chunks, chunk_numel, dtype=values.dtype if values.is_floating_point() else torch.float32
    )
    return out.scatter_(1, idx, values.to(out.dtype))


def energy_ratio(coeffs: Tensor, indices: Tensor) -> float:
    """Fraction of the squared norm of `coeffs` held by the coefficients at `indices` (1.0 for all-zero)."""
    total = float(coeffs.double().square().sum())
    if total == 0.0:
        return 1.0
    kept = float(torch.gather(coeffs, 1, indices.to(torch.int64)).double().square().sum())
    return kept / total
