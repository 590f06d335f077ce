"""The exchanges' wire: pseudo-gradient blobs, catch-up state, rollout batches, DeMo components."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import torch
from swarmnode.compression.pseudograd import decode_delta, encode_delta
from swarmnode.compression.state import build_index, decode_index, encode_index, read_range
from swarmnode.protocol import ProtocolError, RolloutBatch, codec, limits

from swarmnode.exchange.catchup import CatchupError, load_state_file
from swarmnode.exchange.demo import decode_demo, encode_demo
from swarmnode.exchange.rollouts import encode_batches, to_rollout_group
from swarmnode.optim.diloco import DiLoCo

PEER = "12D3KooWQmFakePeer"
FP = "ab" * 16


def test_delta_round_trip_is_close_and_int8_sized() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(64, 33, generator=g) * 1e-3, "b": torch.randn(7, generator=g)}
    delta["w"][0, 0] = 0.5  # an outlier must not flatten the rest of the tensor
    blob = encode_delta(delta)
    back = decode_delta(blob, max_bytes=1 << 20)
    assert back["w"].shape == (64, 33)
    assert back["b"].shape == (7,)
    for k in delta:
        err = (back[k] - delta[k]).abs().max().item()
        assert err <= delta[k].abs().max().item() / 127 + 1e-9
    assert len(blob) < 64 * 33 * 4 / 2


def _corruptions() -> list[bytes]:
    blob = encode_delta({"w": torch.ones(300)})
    prefix, hlen = blob[:5], int.from_bytes(blob[5:9], "little")
    header = msgpack.unpackb(blob[9 : 9 + hlen])
    header["t"][0][1] = [301]  # the payload is for 300 values
    wrong = msgpack.packb(header)
    wrong_shape = prefix + len(wrong).to_bytes(4, "little") + wrong + blob[9 + hlen :]
    return [b"", blob[:7], blob[:100], blob[:-5], blob + b"\0", b"\xff" * 64, wrong_shape]


@pytest.mark.parametrize("bad", _corruptions())
def test_corrupt_delta_is_protocol_error(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_delta(bad, max_bytes=1 << 20)


def test_oversized_delta_is_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_delta(encode_delta({"w": torch.ones(300)}), max_bytes=10)


def test_state_stream_restores_diloco_exactly(tmp_path: Any) -> None:
    src_model = torch.nn.Linear(4, 3)
    src = DiLoCo(src_model.named_parameters())
    with torch.no_grad():
        src_model.weight.add_(0.1)
    src.outer_step(src.pseudo_gradient())
    tensors = src.state_tensors()
    index = build_index(tensors, src.scalars(), chunk=64 << 10)
    raw = encode_index(index)
    back = decode_index(raw, max_bytes=len(raw), max_total=index.total)
    assert back == index
    path = tmp_path / "state"
    path.write_bytes(read_range(tensors, index, 0, index.total))
    dst_model = torch.nn.Linear(4, 3)
    dst = DiLoCo(dst_model.named_parameters())
    load_state_file(dst, path, back, anchor_hash=src.anchor_hash())
    assert dst.anchor_hash() == src.anchor_hash()
    assert torch.equal(dst_model.weight, src_model.weight)
    assert dst.outer_steps == 1
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_index(raw, max_bytes=len(raw) - 1, max_total=index.total)
    with pytest.raises(ProtocolError, match="total"):
        decode_index(raw, max_bytes=len(raw), max_total=index.total - 1)
    with pytest.raises(CatchupError, match="anchor hashes"):
        load_state_file(dst, path, back, anchor_hash="0" * 64)
    for bad in (b"", raw[:20], b"\x81\xa1v\x02", msgpack.packb({"v": 2, "chunk": 1, "total": 0})):
        with pytest.raises(ProtocolError):
            decode_index(bad, max_bytes=1 << 20, max_total=1 << 20)


@dataclass
class P:
    family: str = "add"
    seed: int = 3
    index: int = 5


@dataclass
class S:
    text: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class G:
    problem: P
    samples: list[S]
    rewards: list[float]


def _group(n_tokens: int) -> G:
    samples = [
        S(text="x" * 10, token_ids=list(range(n_tokens)), logprobs=[-0.5] * n_tokens) for _ in range(8)
    ]
    return G(problem=P(), samples=samples, rewards=[1.0, 0.0] * 4)


def test_rollout_batches_fit_under_the_gossip_limit() -> None:
    groups = [to_rollout_group(_group(600)) for _ in range(16)]
    msgs = encode_batches(PEER, FP, 3, groups)
    assert len(msgs) > 1  # had to split: 16 groups x 8 x 600 tokens is over 512 KiB
    back = [codec.decode(m, RolloutBatch) for m in msgs]
    assert sum(len(b.groups) for b in back) == 16
    assert all(len(m) <= limits.MAX_GOSSIP_BYTES for m in msgs)
    assert back[0].groups[0].task.index == 5
    small = encode_batches(PEER, FP, 3, [to_rollout_group(_group(20)) for _ in range(4)])
    assert len(small) == 1


def test_demo_components_round_trip_through_the_wire() -> None:
    from swarmnode.optim.demo import DeMo

    torch.manual_seed(0)
    model = torch.nn.Linear(70, 5)
    demo = DeMo(model.named_parameters(), k=8)
    model(torch.randn(4, 70)).pow(2).sum().backward()
    own = demo.compute_components()

    def spec(name: str) -> tuple[tuple[int, ...], int, int]:
        t = demo.transforms[name]
        return tuple(demo._by_name[name].shape), t.n_chunks, t.chunk_numel

    (data,) = encode_demo(PEER, FP, 4, own, spec, "int8")  # small: one message
    record = codec.decode(data)
    assert record.step == 4
    back = {name: piece for name, piece in decode_demo(record, spec)}
    for name, (idx, vals) in own.items():
        assert back[name][2] == 0  # the whole tensor
        assert torch.equal(back[name][0].long().sort(dim=-1).values, idx.long().sort(dim=-1).values)
        assert (
            back[name][1].float().abs().sum() - vals.float().abs().sum()
        ).abs() < 0.05 * vals.abs().sum() + 1e-6
    before = model.weight.detach().clone()
    demo.apply_components([back])
    assert not torch.equal(before, model.weight)
    with pytest.raises(ProtocolError, match="chunking"):
        decode_demo(record, lambda name: ((1, 1), 1, 1))


def test_large_demo_components_travel_as_several_messages_each_decodable_alone() -> None:
    """A tensor whose components exceed one message is split into chunk ranges; aggregating the
    parts gives exactly what the whole tensor's components give, and any subset still applies."""
    from swarmnode.aggregate import aggregate_components
    from swarmnode.optim.demo import DeMo

    torch.manual_seed(1)
    model = torch.nn.Linear(512, 384)  # 48 chunks of 64x64 with k=32
    demo = DeMo(model.named_parameters(), k=32)
    model(torch.randn(8, 512)).pow(2).sum().backward()
    own = demo.compute_components()

    def spec(name: str) -> tuple[tuple[int, ...], int, int]:
        t = demo.transforms[name]
        return tuple(demo._by_name[name].shape), t.n_chunks, t.chunk_numel

    budget = 1200
    messages = encode_demo(PEER, FP, 7, own, spec, "int8", budget=budget)
    assert len(messages) > 3
    assert all(len(m) <= budget + 512 for m in messages)
    pieces = [p for m in messages for p in decode_demo(codec.decode(m), spec)]
    starts = sorted(p[2] for name, p in pieces if name == "weight")
    assert len(starts) > 1
    assert starts[0] == 0
    geometry = {n: demo.transforms[n] for n in own}
    kw = {
        "n_chunks": {n: t.n_chunks for n, t in geometry.items()},
        "chunk_numel": {n: t.chunk_numel for n, t in geometry.items()},
    }
    whole = aggregate_components(
        {n: (torch.zeros(t.n_chunks, 0), torch.zeros(t.n_chunks, 0)) for n, t in geometry.items()},
        [own],
        **kw,
    )
    parted = aggregate_components(
        {n: (torch.zeros(t.n_chunks, 0), torch.zeros(t.n_chunks, 0)) for n, t in geometry.items()},
        [{name: piece} for name, piece in pieces],
        **kw,
    )
    for n in own:
        assert torch.allclose(whole[n], parted[n], atol=0.02 * float(whole[n].abs().max()))
    # only one message with a part of the weight arrived: its chunks vote, the rest gets no vote
    decoded = [decode_demo(codec.decode(m), spec) for m in messages]
    first = next(d for d in decoded if any(name == "weight" for name, _ in d))
    partial = aggregate_components(
        {n: (torch.zeros(t.n_chunks, 0), torch.zeros(t.n_chunks, 0)) for n, t in geometry.items()},
        [{name: piece} for name, piece in first],
        **kw,
    )
    assert 0 < int((partial["weight"] != 0).sum()) < int((whole["weight"] != 0).sum())


def test_delta_norms_from_the_codes_match_the_decoded_tensors_and_reject_what_decode_rejects() -> None:
    from swarmnode.compression.pseudograd import delta_sq_norms

    g = torch.Generator().manual_seed(3)
    delta = {"a": torch.randn(70, 301, generator=g), "b": torch.randn(5, generator=g) * 7}
    blob = encode_delta(delta)
    decoded = decode_delta(blob, max_bytes=len(blob))
    for name, shape, sq in delta_sq_norms(blob, len(blob)):
        want = float(decoded[name].to(torch.float64).pow(2).sum())
        assert shape == tuple(delta[name].shape)
        assert abs(sq - want) <= 1e-6 * want
    for bad in _corruptions():
        with pytest.raises(ProtocolError):
            delta_sq_norms(bad, max_bytes=1 << 20)
