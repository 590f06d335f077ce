"""DCT and top-k specifics (the byte codecs are in test_codec_conformance.py)."""

from __future__ import annotations

import math

import pytest
import torch
from swarmnode.compression import ChunkedDCT
from swarmnode.compression.dct import _dct_matrix, energy_ratio, scatter_chunks, topk_chunks


@pytest.mark.parametrize("n", [1, 2, 7, 37, 64])
def test_dct_matrix_is_orthonormal(n: int) -> None:
    d = _dct_matrix(n).double()
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-6)


def test_dct_matches_scipy_style_definition() -> None:
    # DCT-II, orthonormal: X_k = s_k * sum_n x_n cos(pi/N (n + 1/2) k), s_0 = sqrt(1/N), s_k = sqrt(2/N).
    x = torch.randn(8, dtype=torch.float64)
    want = [
        (math.sqrt(1 / 8) if k == 0 else math.sqrt(2 / 8))
        * sum(float(x[n]) * math.cos(math.pi / 8 * (n + 0.5) * k) for n in range(8))
        for k in range(8)
    ]
    got = ChunkedDCT((8,), chunk=8).forward(x.float())[0]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "n_chunks", "chunk_numel"),
    [
        ((128, 256), 8, 4096),
        ((896, 4864), 14 * 76, 4096),
        ((4, 8, 32), 4, 256),  # rows 4, cols 256 -> four 4x64 tiles
        ((896,), 14, 64),
        ((100, 37), 2, 50 * 37),  # 100 -> largest divisor <= 64 is 50: no padding
        ((131, 70), 3 * 2, 64 * 35),  # 131 is prime: zero-padded to 192; 70 -> 35
        ((), 1, 1),
        ((5,), 1, 5),
    ],
)
def test_chunk_geometry_and_exact_inverse(shape: tuple[int, ...], n_chunks: int, chunk_numel: int) -> None:
    t = ChunkedDCT(shape)
    assert (t.n_chunks, t.chunk_numel) == (n_chunks, chunk_numel)
    x = torch.randn(shape)
    c = t.forward(x)
    assert c.shape == (n_chunks, chunk_numel)
    # Orthonormal: the norm is preserved (padding adds zeros only).
    assert math.isclose(float(c.norm()), float(x.norm()), rel_tol=1e-5, abs_tol=1e-6)
    assert torch.allclose(t.inverse(c), x, atol=1e-5)


def test_use_dct_false_is_a_reshape_into_tiles() -> None:
    x = torch.arange(128 * 128, dtype=torch.float32).reshape(128, 128)
    t = ChunkedDCT((128, 128), use_dct=False)
    c = t.forward(x)
    assert torch.equal(c[1], x[:64, 64:].reshape(-1))
    assert torch.equal(t.inverse(c), x)


def test_dct_concentrates_smooth_matrices() -> None:
    i = torch.linspace(0, 1, 128)
    smooth = torch.sin(3 * i)[:, None] * torch.cos(2 * i)[None, :]
    for use_dct, low, high in ((True, 0.99, 1.0), (False, 0.0, 0.2)):
        t = ChunkedDCT((128, 128), use_dct=use_dct)
        c = t.forward(smooth)
        idx, _ = topk_chunks(c, 32)
        assert low <= energy_ratio(c, idx) <= high


def test_topk_sorted_and_largest() -> None:
    c = torch.randn(5, 300)
    idx, vals = topk_chunks(c, 10)
    assert idx.dtype == torch.int64
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    assert torch.equal(vals, torch.gather(c, 1, idx))
    threshold = c.abs().sort(dim=1, descending=True).values[:, 9:10]
    assert bool((vals.abs() >= threshold).all())


def test_scatter_and_energy_ratio() -> None:
    c = torch.randn(3, 64)
    idx, vals = topk_chunks(c, 64)
    assert torch.equal(scatter_chunks(idx, vals, 3, 64), c)
    assert math.isclose(energy_ratio(c, idx), 1.0, rel_tol=1e-9)
    idx, vals = topk_chunks(c, 8)
    dense = scatter_chunks(idx, vals, 3, 64)
    assert math.isclose(energy_ratio(c, idx), float(dense.square().sum() / c.square().sum()), rel_tol=1e-5)
    assert energy_ratio(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64)) == 1.0
    with pytest.raises(ValueError):
        scatter_chunks(torch.tensor([[64]]), torch.tensor([[1.0]]), 1, 64)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chunk"):
        ChunkedDCT((4, 4), chunk=0)
    with pytest.raises(ValueError, match="shape"):
        ChunkedDCT((4, 4)).forward(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="k"):
        topk_chunks(torch.zeros(2, 4), 5)
