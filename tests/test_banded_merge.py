"""A 0.5 B-parameter merge band by band: decoding a band of an int8 or sparse Δ, the outer step fed
bands, and the whole merge are bit-equal to their whole-tensor versions whatever the band size."""

from __future__ import annotations

import pytest
import torch
from swarmnode.compression import quant
from swarmnode.compression.pseudograd import (
    band_ranges,
    decode_delta,
    encode_delta,
    iter_decode_bands,
    write_delta,
)

from swarmnode.exchange.merge import Contribution, check_delta, mapped_blob, merge
from swarmnode.optim.diloco import DiLoCo

SHAPES = {"a.weight": (37, 29), "b.bias": (5,), "c.empty": (0,), "d.weight": (3, 300)}


def _delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * (1 + seed) for n, s in SHAPES.items()}


@pytest.mark.parametrize("block", [1, 7, 256, 5000])
def test_an_int8_range_is_the_same_slice_of_the_whole_decode(block: int) -> None:
    x = torch.randn(1234, generator=torch.Generator().manual_seed(block))
    data = quant.quantize_int8(x, block=block)
    whole = quant.dequantize_int8(data, shape=(1234,), max_bytes=len(data))
    for lo, hi in [(0, 1234), (0, 1), (3, 300), (256, 512), (1000, 1234), (700, 700)]:
        part = quant.dequantize_int8_range(data, shape=(1234,), max_bytes=len(data), lo=lo, hi=hi)
        assert torch.equal(part, whole[lo:hi])
    with pytest.raises(ValueError, match="outside"):
        quant.dequantize_int8_range(data, shape=(1234,), max_bytes=len(data), lo=10, hi=2000)


def test_band_ranges_cover_every_value_once() -> None:
    assert band_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert band_ranges(8, 4) == [(0, 4), (4, 8)]
    assert band_ranges(0, 4) == [(0, 0)]
    with pytest.raises(ValueError, match="band"):
        band_ranges(10, 0)


@pytest.mark.parametrize("codec", ["int8", "sparse", "sparse-dct"])
def test_bands_of_a_blob_concatenate_to_its_whole_decode(codec: str) -> None:
    blob = encode_delta(_delta(0), codec)
    whole = decode_delta(blob, len(blob), shapes=SHAPES)
    got: dict[str, list[torch.Tensor]] = {}
    for name, lo, hi, t in iter_decode_bands(blob, len(blob), shapes=SHAPES, band=100):
        assert t.numel() == hi - lo <= 100
        got.setdefault(name, []).append(t)
    assert sorted(got) == sorted(SHAPES)
    for name, parts in got.items():
        assert torch.equal(torch.cat(parts), whole[name].reshape(-1))


@pytest.mark.parametrize("codec", ["int8", "sparse"])
def test_write_delta_writes_the_same_blob_encode_delta_returns(tmp_path, codec: str) -> None:
    import hashlib

    path = tmp_path / "own.blob"
    size, digest = write_delta(_delta(3), path, codec)
    blob = encode_delta(_delta(3), codec)
    assert path.read_bytes() == blob
    assert (size, digest) == (len(blob), hashlib.sha256(blob).hexdigest())
    assert [p.name for p in tmp_path.iterdir()] == ["own.blob"]  # the scratch file is gone
    mapped = mapped_blob(path)
    assert not path.exists()  # unlinked at once; the mapping keeps the pages
    assert bytes(mapped[:]) == blob
    assert check_delta(mapped, len(blob), SHAPES) == pytest.approx(check_delta(blob, len(blob), SHAPES))


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        for name, shape in SHAPES.items():
            self.register_parameter(
                name.replace(".", "_"), torch.nn.Parameter(torch.randn(shape, generator=g))
            )


def _outer(spill=None) -> tuple[_Model, DiLoCo]:
    m = _Model()
    named = [(n.replace("_", ".", 1), p) for n, p in m.named_parameters()]
    return m, DiLoCo(named, lr=0.7, momentum=0.9, spill_dir=spill)


@pytest.mark.parametrize("method", ["mean", "trimmed"])
def test_a_banded_merge_lands_on_the_bits_of_a_whole_tensor_merge(tmp_path, method: str) -> None:
    def rounds(band: int, spill) -> tuple[str, list[torch.Tensor]]:
        m, outer = _outer(spill)
        for r in range(3):  # three rounds: the momentum buffer's first step and later ones
            blobs = [encode_delta(_delta(10 * r + i), "int8" if i % 2 else "sparse") for i in range(3)]
            contribs = [
                Contribution(b, 1.0 + i, check_delta(b, 1 << 20, outer.shapes())) for i, b in enumerate(blobs)
            ]
            published = outer.local_snapshot()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.01)  # progress after publishing, carried over
            merge(
                contribs,
                outer,
                max_bytes=1 << 20,
                max_weight=10.0,
                published_local=published,
                method=method,
                band=band,
            )
        return outer.anchor_hash(), [p.detach().clone() for p in m.parameters()]

    whole = rounds(1 << 30, None)
    for band, spill in [(64, None), (1000, tmp_path / "spill"), (1, None)]:
        got = rounds(band, spill)
        assert got[0] == whole[0]
        assert all(torch.equal(x, y) for x, y in zip(got[1], whole[1], strict=True))
    # the momentum lives in a memory-mapped file beside the anchor when there is a spill directory
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    assert (tmp_path / "spill" / "momentum.f32").stat().st_size == 4 * numel


def test_outer_step_bands_refuses_bands_that_do_not_tile_a_parameter() -> None:
    _, outer = _outer()
    d = {n: torch.zeros(s).reshape(-1) for n, s in SHAPES.items()}

    def feed(items):
        return outer.outer_step_bands(iter(items))

    ok = [(n, 0, t.numel(), t) for n, t in sorted(d.items())]
    with pytest.raises(ValueError, match="band 5:"):  # a gap
        feed([("a.weight", 0, 3, d["a.weight"][:3]), ("a.weight", 5, 9, d["a.weight"][5:9])])
    with pytest.raises(ValueError, match="covers 3 of"):  # stops short
        feed([("a.weight", 0, 3, d["a.weight"][:3]), *ok[1:]])
    with pytest.raises(ValueError, match="repeated"):
        feed([*ok, ok[0]])
    with pytest.raises(ValueError, match="missing"):
        feed(ok[:-1])
    with pytest.raises(ValueError, match="non-finite"):
        feed([("a.weight", 0, d["a.weight"].numel(), torch.full_like(d["a.weight"], float("nan")))])
    assert outer.outer_steps == 0
    feed(ok)
    assert outer.outer_steps == 1


def test_only_contributors_that_agree_with_the_rest_are_reported_as_verified() -> None:
    # An outlier (100x the norm, clipped) or a contribution far from the others never becomes a
    # "verified" peer whose word counts towards attesting a state.
    _, outer = _outer()
    base = _delta(0)
    g = torch.Generator().manual_seed(5)
    honest = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(3)]
    huge = {n: 100 * t for n, t in _delta(1).items()}
    blobs = [encode_delta(d) for d in [*honest, huge]]
    contribs = [Contribution(b, 1.0, check_delta(b, 1 << 20, outer.shapes())) for b in blobs]
    report = merge(contribs, outer, max_bytes=1 << 20, max_weight=10.0, published_local=None)
    assert report.agreeing == [0, 1, 2]
    assert report.clipped >= 1  # the outlier (honest peers above the median norm are clipped a little)
