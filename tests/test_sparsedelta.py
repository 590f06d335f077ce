"""The sparse pseudo-gradient codec (compression.sparsedelta through compression.pseudograd): round
trip, bytes per parameter at a real-size-like layout, error feedback, hostile input, and its wiring
into DiLoCo's state, the merge, the exchange and the config."""

from __future__ import annotations

import asyncio
import math
import random
import struct
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import torch
from fakes import Bus, FakeClock, run
from swarmnode.compression import pseudograd, sparsedelta
from swarmnode.compression.pseudograd import (
    decode_delta,
    delta_codec,
    delta_sq_norms,
    encode_delta,
    iter_decode_delta,
)
from swarmnode.compression.sparsedelta import ErrorFeedback, SparseParams
from swarmnode.protocol.errors import ProtocolError
from test_exchange_diloco import make, running, train

from swarmnode.config import ConfigError, load_config
from swarmnode.exchange.merge import Contribution, check_delta, merge
from swarmnode.optim.diloco import DiLoCo

CAP = 1 << 30
H, INTER, KV = 896, 4864, 128


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small tensors: torch's thread pool only costs time here (tens of ms per tiny matmul on a
    loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _shapes(d: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in d.items()}


def _cos(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    na = math.sqrt(sum(float(a[n].double().pow(2).sum()) for n in a))
    nb = math.sqrt(sum(float(b[n].double().pow(2).sum()) for n in b))
    return num / (na * nb)


def _small(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(256, 192, generator=g) * 1e-3,
        "a.bias": torch.randn(192, generator=g),
        "b.odd": torch.randn(67, 5, generator=g),
        "c.scalar": torch.randn((), generator=g),
        "d.empty": torch.zeros(0, 4),
    }


# -- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", sparsedelta.DOMAINS)
def test_round_trip_decodes_what_the_encoder_says_it_sent(domain: str) -> None:
    d = _small()
    p = SparseParams(domain=domain)
    blob = encode_delta(d, "sparse", params=p)
    assert delta_codec(blob) == "sparse"
    got = decode_delta(blob, CAP, shapes=_shapes(d))
    assert list(got) == sorted(d)
    for name, t in d.items():
        _, sent = sparsedelta.encode_tensor(t, p)
        assert got[name].shape == t.shape
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], sent)
    # top-k of 1.4 % of the values keeps far more than 1.4 % of a Gaussian's energy
    assert _cos(got, {n: t for n, t in d.items()}) > 0.2


def test_kept_values_are_the_largest_with_their_signs() -> None:
    x = torch.zeros(64, 64)
    x[3, 5], x[10, 20], x[63, 63] = 5.0, -4.0, 4.5
    x += torch.randn(64, 64) * 1e-3
    p = SparseParams(domain="value")
    got = decode_delta(encode_delta({"w": x}, "sparse", params=p), CAP, shapes={"w": (64, 64)})["w"]
    assert got[3, 5] > 4
    assert got[10, 20] < -3.5
    assert got[63, 63] > 4
    assert int((got != 0).sum()) == sparsedelta.DEFAULT_K


@pytest.mark.parametrize(("domain", "rel"), [("value", 1e-6), ("wht", 1e-4)])
def test_norm_from_the_codes_equals_the_decoded_norm(domain: str, rel: float) -> None:
    # no zero padding: "b.odd" pads tiles, a.bias pads its WHT chunk (192 of 256)
    d = {k: v for k, v in _small(1).items() if k not in ("b.odd", "a.bias")}
    blob = encode_delta(d, "sparse", params=SparseParams(domain=domain))
    norms = {n: sq for n, _, sq in delta_sq_norms(blob, CAP, shapes=_shapes(d))}
    for name, t in decode_delta(blob, CAP, shapes=_shapes(d)).items():
        assert norms[name] == pytest.approx(float(t.double().pow(2).sum()), rel=rel, abs=1e-30)


def test_the_walsh_hadamard_transform_is_orthonormal_and_its_own_inverse() -> None:
    x = torch.randn(3, 4096)
    y = sparsedelta._fwht(x)
    assert float(y.norm() / x.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(sparsedelta._fwht(y), x, atol=1e-5)
    h = sparsedelta._fwht(torch.eye(8)) * math.sqrt(8)  # the Sylvester Hadamard matrix
    assert torch.allclose(h.abs(), torch.ones(8, 8))
    assert torch.allclose(h @ h.T, 8 * torch.eye(8), atol=1e-5)


def test_sparse_dct_is_the_sparse_codec_with_dct_in_its_header() -> None:
    d = _small()
    blob = encode_delta(d, "sparse-dct")
    assert delta_codec(blob) == "sparse"
    hlen = struct.unpack_from("<I", blob, 5)[0]
    assert msgpack.unpackb(blob[9 : 9 + hlen])["domain"] == "dct"
    assert blob == encode_delta(d, "sparse", params=SparseParams(domain="dct"))
    assert msgpack.unpackb(encode_delta(d, "sparse")[9 : 9 + hlen])["domain"] == "wht"
    with pytest.raises(ValueError, match="codec"):
        encode_delta(d, "zip")


def test_int8_blobs_still_decode_without_shapes_and_name_their_codec() -> None:
    d = _small()
    blob = encode_delta(d)
    assert delta_codec(blob) == "int8"
    assert sorted(decode_delta(blob, CAP)) == sorted(d)
    assert sorted(decode_delta(blob, CAP, shapes=_shapes(d))) == sorted(d)
    with pytest.raises(ValueError, match="sparse codec only"):
        encode_delta(d, "int8", feedback=ErrorFeedback())


# -- bytes per parameter --------------------------------------------------------------------------


def _layer_shapes(embed_rows: int) -> dict[str, tuple[int, ...]]:
    """One Qwen2.5-0.5B layer plus an embedding slice and the final norm (hidden 896)."""
    return {
        "embed.weight": (embed_rows, H),
        "l0.q.weight": (H, H),
        "l0.q.bias": (H,),
        "l0.k.weight": (KV, H),
        "l0.k.bias": (KV,),
        "l0.v.weight": (KV, H),
        "l0.v.bias": (KV,),
        "l0.o.weight": (H, H),
        "l0.gate.weight": (INTER, H),
        "l0.up.weight": (INTER, H),
        "l0.down.weight": (H, INTER),
        "l0.ln1.weight": (H,),
        "l0.ln2.weight": (H,),
        "norm.weight": (H,),
    }


def test_bytes_per_param_at_a_real_size_layout_is_under_0_02() -> None:
    shapes = _layer_shapes(embed_rows=64)
    shapes.pop("l0.up.weight")  # 10.6 M parameters
    g = torch.Generator().manual_seed(0)
    d = {n: torch.randn(s, generator=g) * 1e-3 for n, s in sorted(shapes.items())}
    n_params = sum(t.numel() for t in d.values())
    assert 9e6 < n_params < 11e6
    blob = encode_delta(d, "sparse")
    assert len(blob) / n_params <= 0.02
    assert len(blob) <= pseudograd.encoded_size(shapes, "sparse")
    assert len(blob) <= pseudograd.max_encoded_size(shapes)
    assert check_delta(blob, pseudograd.max_encoded_size(shapes), shapes) > 0


def test_k_out_of_budget_is_refused_and_bounds_hold() -> None:
    with pytest.raises(ValueError, match="k"):
        SparseParams(k=0)
    with pytest.raises(ValueError, match="k"):
        SparseParams(k=513)
    with pytest.raises(ValueError, match="tile"):
        SparseParams(tile=4)
    lo, hi = sparsedelta.payload_bounds((64, 64), SparseParams())
    assert lo < hi
    assert sparsedelta.payload_bounds((0, 4), SparseParams()) == (0, 0)


# -- error feedback -------------------------------------------------------------------------------


def test_error_feedback_sends_the_whole_signal_over_rounds() -> None:
    g = torch.Generator().manual_seed(3)
    target = {"w": torch.randn(128, 256, generator=g), "b": torch.randn(300, generator=g)}
    ef = ErrorFeedback()
    sent = {n: torch.zeros_like(t) for n, t in target.items()}
    shapes = _shapes(target)
    # the whole Δ once, then nothing: error feedback keeps sending what is left of it
    for r in range(150):
        d = target if r == 0 else {n: torch.zeros_like(t) for n, t in target.items()}
        for n, t in decode_delta(encode_delta(d, "sparse", feedback=ef), CAP, shapes=shapes).items():
            sent[n] += t
        # invariant: what was sent plus what is kept is exactly what was given
        for n in target:
            assert torch.allclose(sent[n] + ef.residual[n], target[n], atol=1e-5)
    one_round = decode_delta(encode_delta(target, "sparse"), CAP, shapes=shapes)
    assert _cos(one_round, target) < 0.5
    assert _cos(sent, target) > 0.99
    rest = math.sqrt(ef.sq_norm()) / math.sqrt(sum(float(t.pow(2).sum()) for t in target.values()))
    assert rest < 0.1


def test_error_feedback_tracks_a_steady_signal_in_noise() -> None:
    g = torch.Generator().manual_seed(4)
    signal = torch.randn(64, 512, generator=g)
    ef = ErrorFeedback()
    total = torch.zeros_like(signal)
    rounds = 80
    for _ in range(rounds):
        d = {"w": signal + 0.5 * torch.randn(64, 512, generator=g)}
        total += decode_delta(encode_delta(d, "sparse", feedback=ef), CAP, shapes={"w": (64, 512)})["w"]
    assert _cos({"w": total}, {"w": signal * rounds}) > 0.9


def test_error_feedback_keeps_the_parameter_dtype() -> None:
    ef = ErrorFeedback({"w": torch.bfloat16})
    encode_delta({"w": torch.randn(64, 64), "x": torch.randn(10)}, "sparse", feedback=ef)
    assert ef.residual["w"].dtype == torch.bfloat16
    assert ef.residual["x"].dtype == torch.float32
    with pytest.raises(ValueError, match="residual"):
        ef.add("w", torch.zeros(3))


# -- hostile input --------------------------------------------------------------------------------


def _rebuild(blob: bytes, edit: object) -> bytes:
    hlen = struct.unpack_from("<I", blob, 5)[0]
    header = msgpack.unpackb(blob[9 : 9 + hlen])
    edit(header)  # type: ignore[operator]
    packed = msgpack.packb(header, use_bin_type=True)
    return blob[:5] + struct.pack("<I", len(packed)) + packed + blob[9 + hlen :]


def _blob_and_shapes() -> tuple[bytes, dict[str, tuple[int, ...]]]:
    d = _small()
    return encode_delta(d, "sparse"), _shapes(d)


def test_sparse_blobs_are_decoded_only_against_expected_shapes() -> None:
    blob, _ = _blob_and_shapes()
    with pytest.raises(ProtocolError, match="expected shapes"):
        decode_delta(blob, CAP)
    with pytest.raises(ProtocolError, match="expected shapes"):
        delta_sq_norms(blob, CAP)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h.update(k=0), "sparse k"),
        (lambda h: h.update(k=10**9), "sparse k"),
        (lambda h: h.update(k=True), "sparse k"),
        (lambda h: h.update(tile=1), "sparse tile"),
        (lambda h: h.update(tile="64"), "sparse tile"),
        (lambda h: h.update(domain="fft"), "sparse domain"),
        (lambda h: h.update(domain=1), "sparse domain"),
        (lambda h: h.pop("k"), "keys"),
        (lambda h: h.update(extra=1), "keys"),
        (lambda h: h.update(codec="zip"), "expected"),
        (lambda h: h["t"][0].__setitem__(1, [2**39]), "does not match our model"),
        (lambda h: h["t"][0].__setitem__(0, "zz"), "unsorted|does not match"),
        (lambda h: h["t"].pop(), "do not match our model"),
        (lambda h: h["t"][1].__setitem__(2, h["t"][1][2] + 1), "bytes|ends at"),
        (lambda h: h["t"][1].__setitem__(2, 10**12), "bytes"),
        (lambda h: h["t"][1].__setitem__(2, -1), "bytes"),
    ],
)
def test_header_lies_are_rejected_naming_what_is_wrong(edit: object, match: str) -> None:
    blob, shapes = _blob_and_shapes()
    bad = _rebuild(blob, edit)
    with pytest.raises(ProtocolError, match=match):
        decode_delta(bad, CAP, shapes=shapes)
    with pytest.raises(ProtocolError, match=match):
        check_delta(bad, CAP, shapes)


def test_a_huge_claimed_shape_is_refused_before_any_allocation() -> None:
    blob = encode_delta({"w": torch.randn(64, 64)}, "sparse")
    bad = _rebuild(blob, lambda h: h["t"][0].__setitem__(1, [2**20, 2**19]))
    # even a receiver whose model had that shape: the payload length cannot fit it
    with pytest.raises(ProtocolError, match="bytes"):
        decode_delta(bad, CAP, shapes={"w": (2**20, 2**19)})


def _payload_offset(blob: bytes, index: int) -> tuple[int, int]:
    hlen = struct.unpack_from("<I", blob, 5)[0]
    header = msgpack.unpackb(blob[9 : 9 + hlen])
    off = 9 + hlen
    for _name, _shape, length in header["t"][:index]:
        off += length
    return off, header["t"][index][2]


def test_bad_levels_and_padding_bits_are_rejected() -> None:
    w = torch.randn(64, 64)
    blob = encode_delta({"w": w}, "sparse")
    off, length = _payload_offset(blob, 0)
    vals = sparsedelta.values_size(1, sparsedelta.DEFAULT_K)
    levels_at = off + length - vals
    for lo, hi, match in (
        (0x3F80, 0x3F00, "lo <= hi"),
        (0x7FC0, 0x7FC0, "finite"),
        (0xBF80, 0x3F80, "lo <= hi"),
    ):
        bad = bytearray(blob)
        bad[levels_at : levels_at + 4] = struct.pack("<HH", lo, hi)
        with pytest.raises(ProtocolError, match=match):
            decode_delta(bytes(bad), CAP, shapes={"w": (64, 64)})
    # 2 x 56 bits = 14 bytes exactly: use a geometry with padding bits (k=3 on 16 values)
    small = encode_delta({"v": torch.randn(16)}, "sparse", params=SparseParams(k=512))
    k = max(1, round(512 * 16 / 4096))
    assert (2 * k) % 8
    bad = bytearray(small)
    bad[-1] |= 1
    with pytest.raises(ProtocolError, match="padding"):
        decode_delta(bytes(bad), CAP, shapes={"v": (16,)})


def test_every_truncation_and_random_mutation_is_refused_or_decodes_to_our_shapes() -> None:
    blob, shapes = _blob_and_shapes()
    for cut in range(0, len(blob), max(1, len(blob) // 300)):
        with pytest.raises(ValueError):
            decode_delta(blob[:cut], CAP, shapes=shapes)
    rng = random.Random(0)
    decoded = 0
    for _ in range(400):
        bad = bytearray(blob)
        for _ in range(rng.randrange(1, 4)):
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        try:
            got = decode_delta(bytes(bad), CAP, shapes=shapes)
        except ValueError:
            continue
        decoded += 1
        assert _shapes(got) == shapes
        assert all(bool(torch.isfinite(t).all()) for t in got.values())
    assert decoded < 400  # most flips hit a checked field
    for _ in range(200):
        junk = rng.randbytes(rng.randrange(0, 400))
        with pytest.raises(ValueError):
            decode_delta(junk, CAP, shapes=shapes)


def test_decoding_is_lazy_but_the_header_is_checked_first() -> None:
    blob, shapes = _blob_and_shapes()
    off, _ = _payload_offset(blob, 1)
    bad = bytearray(blob)
    bad[off] = 200  # an impossible Rice parameter in the second tensor's indices
    it = iter_decode_delta(bytes(bad), CAP, shapes=shapes)
    next(it)  # the first tensor is fine
    with pytest.raises(ProtocolError, match="tensor"):
        next(it)


# -- DiLoCo state, merge, exchange, config --------------------------------------------------------


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8)).to(dtype)


def test_diloco_keeps_the_residual_in_its_checkpoint_but_not_in_what_joiners_pull() -> None:
    model = _model(torch.bfloat16)
    dl = DiLoCo(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    blob = dl.encode_pseudo_gradient("sparse")
    assert delta_codec(blob) == "sparse"
    assert set(dl.feedback.residual) == set(dl.params)
    assert all(e.dtype == torch.bfloat16 for e in dl.feedback.residual.values())
    sd = dl.state_dict()
    assert {k for k in sd if k.startswith("residual.")} == {f"residual.{n}" for n in dl.params}
    assert not any(k.startswith("residual.") for k in dl.state_tensors())
    other = DiLoCo(_model(torch.bfloat16).named_parameters())
    other.load_state_dict(sd)
    for n, e in dl.feedback.residual.items():
        assert torch.equal(other.feedback.residual[n], e)
    # a peer's state (what catch-up loads) has no residual: ours is cleared
    other.load_state_dict({k: v for k, v in sd.items() if not k.startswith("residual.")})
    assert other.feedback.residual == {}
    bad = dict(sd)
    bad["residual.nope"] = torch.zeros(1)
    with pytest.raises(ValueError, match="residuals for unknown"):
        other.load_state_dict(bad)
    bad = dict(sd)
    bad["residual.0.weight"] = torch.full((96, 64), float("nan"))
    with pytest.raises(ValueError, match="residual"):
        other.load_state_dict(bad)
    # int8 drops the residual (it carries everything to within its quantisation)
    dl.encode_pseudo_gradient("int8")
    assert dl.feedback.residual == {}


def test_merge_takes_int8_and_sparse_contributions_together() -> None:
    models = [_model() for _ in range(3)]
    dls = [DiLoCo(m.named_parameters(), lr=1.0, momentum=0.0) for m in models]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    blobs = [dls[0].encode_pseudo_gradient("int8"), *(d.encode_pseudo_gradient("sparse") for d in dls[1:])]
    assert [delta_codec(b) for b in blobs] == ["int8", "sparse", "sparse"]
    shapes = dls[0].shapes()
    cap = pseudograd.max_encoded_size(shapes)
    contribs = [Contribution(b, 1.0, check_delta(b, cap, shapes)) for b in blobs]
    results = []
    for d in dls:
        merge(contribs, d, max_bytes=cap, max_weight=1.0, published_local=None, method="mean")
        results.append(d.anchor_hash())
    assert len(set(results)) == 1  # every replica lands on the same anchor bits


@pytest.mark.parametrize("codecs", [("sparse", "sparse"), ("int8", "sparse"), ("sparse-dct", "int8")])
def test_exchange_replicas_with_the_sparse_codec_merge_to_one_anchor(codecs: tuple[str, str]) -> None:
    clock = FakeClock()
    bus = Bus()
    a = make(bus, "peerA", clock, drift=0.1, codec=codecs[0])
    b = make(bus, "peerB", clock, drift=0.2, codec=codecs[1])

    async def body() -> None:
        for until in (3, 6):
            await asyncio.gather(train(a, until), train(b, until))
        await asyncio.gather(a.ex.drain(), b.ex.drain())

    run(running([a, b], body()), clock)
    for p in (a, b):
        s = p.ex.statistics()
        assert (s["round"], s["merge_contributors"]) == (2, 2)
    assert a.ex.anchor_hash == b.ex.anchor_hash
    assert torch.equal(a.w(), b.w())
    for p, c in ((a, codecs[0]), (b, codecs[1])):
        assert bool(p.ex.diloco.feedback.residual) == (c != "int8")  # it kept what its blobs left out


def test_config_and_flag_select_the_codec() -> None:
    assert load_config(None).diloco.delta_codec == "int8"
    assert load_config(None, {"diloco.delta_codec": "sparse"}).diloco.delta_codec == "sparse"
    assert load_config(None, {"diloco.delta_codec": "sparse-dct"}).diloco.delta_codec == "sparse-dct"
    with pytest.raises(ConfigError, match="delta_codec"):
        load_config(None, {"diloco.delta_codec": "zip"})
    import argparse

    from swarmnode.flags import SETTING_FLAGS, add_config_arguments, config_from_args

    assert SETTING_FLAGS["diloco.delta_codec"] == "--delta-codec"
    ap = argparse.ArgumentParser()
    add_config_arguments(ap)
    assert config_from_args(ap.parse_args(["--delta-codec", "sparse"])).diloco.delta_codec == "sparse"
    with pytest.raises(SystemExit):
        ap.parse_args(["--delta-codec", "zip"])


def test_numpy_levels_round_to_nearest_bfloat16() -> None:
    x = np.array([1.0, 1.00390625, 3.0e-39, 3.0e38], dtype=np.float32)
    back = sparsedelta._bf16_to_f32(sparsedelta._bf16_nearest(x))
    assert back[0] == 1.0
    assert np.isfinite(back).all()
    assert np.allclose(back, x, rtol=2**-8)
