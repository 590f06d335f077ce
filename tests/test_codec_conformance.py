"""One conformance suite run against every codec in swarmnode.compression.

Each codec is described by a `Codec`: how to make a sample, encode it, decode it, and how close the
round trip must be. Every codec then faces the same checks: round trip, truncation, bit flips,
appended bytes, oversized input, random bytes. Hostile input may decode (a mutation can form another
valid message) or raise ValueError (ProtocolError is one); anything else is a bug.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarmnode.compression import (
    components,
    dct,
    framing,
    indices,
    pseudograd,
    quant,
    sparsedelta,
    state,
    values,
)
from swarmnode.protocol.errors import ProtocolError

CAP = 1 << 20


@dataclass(kw_only=True, slots=True)
class Codec:
    name: str
    sample: Callable[[random.Random], Any]
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes, Any], Any]
    # Asserts the decoded value matches the original within the codec's stated bound.
    check: Callable[[Any, Any], None]


def _topk_sample(rng: random.Random, n_chunks: int = 6, chunk_numel: int = 4096, k: int = 32) -> Any:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    coeffs = torch.randn(n_chunks, chunk_numel, generator=g)
    idx, vals = dct.topk_chunks(coeffs, k)
    return idx, vals, chunk_numel


def _check_equal_bytes(a: bytes, b: bytes) -> None:
    assert a == b


def _check_indices(orig: Any, got: np.ndarray) -> None:
    assert np.array_equal(orig[0].numpy(), got)


def _check_int8_values(orig: Any, got: torch.Tensor) -> None:
    vals = orig[1]
    # Half a quantisation step; the bfloat16 scale is rounded up by at most 2^-7 relative.
    bound = vals.abs().amax(dim=1, keepdim=True) * (0.5 / 127) * (1 + 2**-7) * (1 + 1e-6)
    assert bool(((got - vals).abs() <= bound + 1e-12).all())


def _check_sign_values(orig: Any, got: torch.Tensor) -> None:
    vals = orig[1]
    assert bool((torch.sign(got) == torch.sign(vals)).all())
    assert math.isclose(float(got.abs().mean()), float(vals.abs().mean()), rel_tol=1e-5)


def _check_components(codec: str) -> Callable[[Any, Any], None]:
    def check(orig: Any, got: Any) -> None:
        assert torch.equal(orig[0], got[0])
        (_check_int8_values if codec == "int8" else _check_sign_values)(orig, got[1])

    return check


def _quant_sample(rng: random.Random) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(rng.randrange(1, 40), rng.randrange(1, 300), generator=g) * rng.choice(
        [1e-3, 1.0, 50.0]
    )


def _check_quant(orig: torch.Tensor, got: torch.Tensor) -> None:
    assert got.shape == orig.shape
    flat = orig.reshape(-1)
    n_blocks = -(-flat.numel() // 4096)
    amax = (
        torch.nn.functional.pad(flat.abs(), (0, n_blocks * 4096 - flat.numel()))
        .reshape(n_blocks, 4096)
        .amax(1)
    )
    bound = (amax / 127 * 0.5 * (1 + 1e-5)).repeat_interleave(4096)[: flat.numel()]
    assert bool(((got.reshape(-1) - flat).abs() <= bound + 1e-12).all())


def _dict_sample(rng: random.Random) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return {
        "w": torch.randn(rng.randrange(0, 9), 5, generator=g),
        "b16": torch.randn(7, generator=g).to(torch.bfloat16),
        "h": torch.randn(3, 2, 2, generator=g).half(),
        "i": torch.randint(-100, 100, (4,), generator=g),
        "m": torch.rand(6, generator=g) > 0.5,
        "s": torch.tensor(float(rng.random())),
    }


def _check_dict(orig: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(orig)
    for name, t in orig.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name], t)


def _delta_sample(rng: random.Random) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    delta = {
        "layer.w": torch.randn(rng.randrange(1, 40), 33, generator=g) * 1e-3,
        "layer.b": torch.randn(rng.randrange(0, 300), generator=g),
        "scalar": torch.randn((), generator=g),
    }
    delta["layer.w"][0, 0] = 0.5  # an outlier coarsens only its own block of 256
    return delta


def _check_delta(orig: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(orig)
    for name, t in orig.items():
        assert got[name].shape == t.shape
        assert got[name].dtype == torch.float32
        blocks = torch.nn.functional.pad(t.reshape(-1), (0, (-t.numel()) % pseudograd.QUANT_BLOCK))
        bound = blocks.reshape(-1, pseudograd.QUANT_BLOCK).abs().amax(dim=1) / 127 * 0.5 + 1e-12
        err = torch.nn.functional.pad((got[name] - t).reshape(-1).abs(), (0, blocks.numel() - t.numel()))
        assert bool((err.reshape(-1, pseudograd.QUANT_BLOCK) <= bound[:, None] * 1.0001).all())


def _shapes(d: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in d.items()}


def _sparse_sample(rng: random.Random) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return {
        "layer.w": torch.randn(rng.randrange(1, 200), 64, generator=g) * 1e-3,
        "layer.b": torch.randn(rng.randrange(0, 300), generator=g),
        "odd": torch.randn(67, 3, generator=g),  # a prime row count: zero-padded tiles
        "scalar": torch.randn((), generator=g),
    }


def _check_sparse(params: sparsedelta.SparseParams) -> Callable[[Any, Any], None]:
    """The decode is what the encoder said it sends (it returns the same tensor), and top-k keeps at
    least its share of every chunk's energy."""

    def check(orig: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
        assert sorted(got) == sorted(orig)
        for name, t in orig.items():
            assert got[name].shape == t.shape
            assert got[name].dtype == torch.float32
            _, sent = sparsedelta.encode_tensor(t, params)
            assert torch.equal(got[name], sent)
            if t.numel() and float(t.pow(2).sum()) > 0:
                cos = float((got[name] * t).sum()) / (float(got[name].norm()) * float(t.norm()) + 1e-30)
                assert cos > 0.1, (name, cos)

    return check


def _state_sample(rng: random.Random) -> state.StateIndex:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    tensors = {
        "anchor.w": torch.randn(rng.randrange(1, 30), 4, generator=g),
        "momentum.w": torch.randn(rng.randrange(1, 30) * 1000, generator=g),
    }
    scalars = {"outer_steps": rng.randrange(100), "lr": 0.7, "nesterov": True}
    return state.build_index(tensors, scalars, chunk=state.MIN_CHUNK)


def _check_state(orig: state.StateIndex, got: state.StateIndex) -> None:
    assert got == orig
    for name, v in orig.scalars.items():
        assert type(got.scalars[name]) is type(v)


def _geometry(sample: Any) -> tuple[int, int, int]:
    return sample[0].shape[0], sample[0].shape[1], sample[2]


CODECS = [
    Codec(
        name="framing",
        sample=lambda rng: rng.randbytes(rng.randrange(0, 3000)) + b"ab" * rng.randrange(0, 5000),
        encode=lambda x: framing.compress(x),
        decode=lambda data, x: framing.decompress(data, max_size=CAP),
        check=_check_equal_bytes,
    ),
    Codec(
        name="indices",
        sample=_topk_sample,
        encode=lambda s: indices.encode_indices(s[0], s[2]),
        decode=lambda data, s: indices.decode_indices(data, *_geometry(s)),
        check=_check_indices,
    ),
    Codec(
        name="values-int8",
        sample=_topk_sample,
        encode=lambda s: values.encode_values(s[1], "int8"),
        decode=lambda data, s: values.decode_values(data, s[0].shape[0], s[0].shape[1], "int8"),
        check=_check_int8_values,
    ),
    Codec(
        name="values-sign",
        sample=_topk_sample,
        encode=lambda s: values.encode_values(s[1], "sign"),
        decode=lambda data, s: values.decode_values(data, s[0].shape[0], s[0].shape[1], "sign"),
        check=_check_sign_values,
    ),
    *[
        Codec(
            name=f"components-{vc}",
            sample=_topk_sample,
            encode=lambda s, vc=vc: components.encode_components(
                s[0], s[1], chunk_numel=s[2], value_codec=vc
            ),
            decode=lambda data, s, vc=vc: components.decode_components(
                data, n_chunks=s[0].shape[0], k=s[0].shape[1], chunk_numel=s[2], value_codec=vc
            ),
            check=_check_components(vc),
        )
        for vc in ("int8", "sign")
    ],
    Codec(
        name="quant-int8",
        sample=_quant_sample,
        encode=lambda t: quant.quantize_int8(t),
        decode=lambda data, t: quant.dequantize_int8(data, shape=t.shape, max_bytes=CAP),
        check=_check_quant,
    ),
    Codec(
        name="tensor-dict",
        sample=_dict_sample,
        encode=quant.encode_tensor_dict,
        decode=lambda data, d: quant.decode_tensor_dict(data, max_bytes=CAP),
        check=_check_dict,
    ),
    Codec(
        name="pseudograd-int8",
        sample=_delta_sample,
        encode=lambda d: pseudograd.encode_delta(d, "int8"),
        decode=lambda data, d: pseudograd.decode_delta(data, max_bytes=CAP),
        check=_check_delta,
    ),
    *[
        Codec(
            name=f"pseudograd-sparse-{domain}",
            sample=_sparse_sample,
            encode=lambda d, p=p: pseudograd.encode_delta(d, "sparse", params=p),
            decode=lambda data, d: pseudograd.decode_delta(data, max_bytes=CAP, shapes=_shapes(d)),
            check=_check_sparse(p),
        )
        for domain in sparsedelta.DOMAINS
        for p in [sparsedelta.SparseParams(domain=domain)]
    ],
    Codec(
        name="state-index",
        sample=_state_sample,
        encode=state.encode_index,
        decode=lambda data, s: state.decode_index(data, max_bytes=CAP, max_total=CAP),
        check=_check_state,
    ),
]
IDS = [c.name for c in CODECS]


def _hostile(codec: Codec, data: bytes, sample: Any) -> None:
    """Decoding hostile bytes may succeed or raise ValueError; nothing else is allowed."""
    with contextlib.suppress(ValueError):
        codec.decode(data, sample)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_round_trip(codec: Codec) -> None:
    rng = random.Random(1)
    for _ in range(5):
        sample = codec.sample(rng)
        codec.check(sample, codec.decode(codec.encode(sample), sample))


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_encoding_is_deterministic(codec: Codec) -> None:
    sample = codec.sample(random.Random(2))
    assert codec.encode(sample) == codec.encode(sample)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_every_truncation_is_rejected(codec: Codec) -> None:
    sample = codec.sample(random.Random(3))
    data = codec.encode(sample)
    cuts = sorted(
        {*range(min(len(data), 40)), *random.Random(4).sample(range(len(data)), min(len(data), 60))}
    )
    for cut in cuts:
        with pytest.raises(ValueError):
            codec.decode(data[:cut], sample)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_bit_flips_never_crash(codec: Codec) -> None:
    rng = random.Random(5)
    sample = codec.sample(rng)
    data = bytearray(codec.encode(sample))
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        _hostile(codec, bytes(mutated), sample)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_appended_bytes_are_rejected(codec: Codec) -> None:
    sample = codec.sample(random.Random(6))
    data = codec.encode(sample)
    for tail in (b"\x00", b"\xff" * 3, b"x" * 64):
        with pytest.raises(ValueError):
            codec.decode(data + tail, sample)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_oversized_input_is_rejected_cheaply(codec: Codec) -> None:
    sample = codec.sample(random.Random(7))
    with pytest.raises(ValueError):
        codec.decode(b"\x00" * (CAP + 1) + codec.encode(sample), sample)


def test_framing_zip_bomb_is_rejected_before_decompressing() -> None:
    bomb = framing.compress(b"\x00" * (CAP + 1))
    assert len(bomb) < 1000
    with pytest.raises(ProtocolError, match="exceeds max_size"):
        framing.decompress(bomb, max_size=CAP)


def test_framing_lying_size_is_rejected() -> None:
    frame = bytearray(framing.compress(b"\x00" * 100_000))
    # Declare 10 bytes: the window zstd needs is above what 10 bytes allow, so it is refused
    # before decoding; with a window that fits, the reader stops one byte past the declared size.
    frame[3:11] = (10).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="memory"):
        framing.decompress(bytes(frame), max_size=CAP)
    frame[3:11] = (70_000).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="declared size"):
        framing.decompress(bytes(frame), max_size=CAP)


def test_tensor_dict_refuses_unknown_dtype_and_bad_sizes() -> None:
    import msgpack

    for entry in (
        ["x", "complex64", [2], b"\x00" * 16],
        ["x", "float32", [3], b"\x00" * 8],
        ["x", "float32", [-1], b""],
    ):
        data = msgpack.packb({"v": 1, "t": [entry]})
        with pytest.raises(ProtocolError):
            quant.decode_tensor_dict(data, max_bytes=CAP)
    # A header claiming a huge array must not allocate it.
    with pytest.raises(ProtocolError):
        quant.decode_tensor_dict(b"\x82\xa1v\x01\xa1t\xdd\xff\xff\xff\xff", max_bytes=CAP)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_random_bytes_never_crash(codec: Codec, data: bytes) -> None:
    _hostile(codec, data, codec.sample(random.Random(8)))


@settings(max_examples=80, deadline=None)
@given(
    n_chunks=st.integers(0, 6),
    chunk_numel=st.integers(1, 300),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_indices_round_trip_any_geometry(n_chunks: int, chunk_numel: int, k_frac: float, seed: int) -> None:
    k = max(1, round(k_frac * chunk_numel))
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(chunk_numel, k, replace=False)) for _ in range(n_chunks)]
    idx = np.stack(rows) if rows else np.zeros((0, k), dtype=np.int64)
    data = indices.encode_indices(idx, chunk_numel)
    assert len(data) <= indices.max_encoded_size(n_chunks, k, chunk_numel)
    assert np.array_equal(indices.decode_indices(data, n_chunks, k, chunk_numel), idx)


@settings(max_examples=60, deadline=None)
@given(
    vals=st.lists(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32), min_size=1, max_size=64),
    codec=st.sampled_from(["int8", "sign"]),
)
def test_values_round_trip_property(vals: list[float], codec: str) -> None:
    v = torch.tensor(vals, dtype=torch.float32).reshape(1, -1)
    got = values.decode_values(values.encode_values(v, codec), 1, v.shape[1], codec)
    if codec == "int8":
        _check_int8_values((None, v), got)
    else:
        assert bool(((got < 0) == (v < 0)).all())


def test_indices_reject_unsorted_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        indices.encode_indices(np.array([[3, 2]]), 10)
    with pytest.raises(ValueError):
        indices.encode_indices(np.array([[3, 10]]), 10)


def test_index_bits_near_bound() -> None:
    idx, _, c = _topk_sample(random.Random(9), n_chunks=200)
    bits = len(indices.encode_indices(idx, c)) * 8 / idx.numel()
    assert bits <= 1.1 * indices.index_bits_bound(32, c)


def test_int8_values_keep_tiny_magnitudes() -> None:
    # lr-scaled momentum can sit far below float16's normal range; it must not flush to zero.
    v = torch.randn(4, 32) * 1e-9
    got = values.decode_values(values.encode_values(v, "int8"), 4, 32, "int8")
    _check_int8_values((None, v), got)
    assert bool((got != 0).any())


def test_int8_quant_header_block_cannot_inflate_allocation() -> None:
    data = quant.quantize_int8(torch.ones(3), block=1 << 20)
    got = quant.dequantize_int8(data, shape=(3,), max_bytes=CAP)
    assert torch.equal(got, torch.ones(3))
