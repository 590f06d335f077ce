"""Wire glue of the node: pseudo-gradient blobs, catch-up state, rollout batches on real protocol records."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import safetensors.torch
import torch
from swarmnode.protocol import ProtocolError, RolloutBatch, codec, limits

from swarmnode.gossip import (
    DiLoCoMerger,
    ProtocolWire,
    decode_delta,
    encode_batches,
    encode_delta,
    to_rollout_group,
)
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
    wrong_dtype = bytes(safetensors.torch.save({"w::q": torch.ones(2, 256), "w::scale": torch.ones(2)}))
    return [b"", blob[:7], blob[:100], blob[:-5], b"\xff" * 64, wrong_dtype]


@pytest.mark.parametrize("bad", _corruptions())
def test_corrupt_delta_is_protocol_error(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_delta(bad, max_bytes=1 << 20)


def test_oversized_delta_is_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_delta(encode_delta({"w": torch.ones(300)}), max_bytes=10)


def test_state_blob_restores_diloco_exactly() -> None:
    src_model = torch.nn.Linear(4, 3)
    src = DiLoCo(src_model.named_parameters())
    with torch.no_grad():
        src_model.weight.add_(0.1)
    src.outer_step(src.pseudo_gradient())
    pushed = []
    dst_model = torch.nn.Linear(4, 3)
    dst = DiLoCoMerger(DiLoCo(dst_model.named_parameters()), on_weights=lambda: pushed.append(1))
    dst.load_state_blob(DiLoCoMerger(src).state_blob())
    assert dst.anchor_hash() == src.anchor_hash()
    assert torch.equal(dst_model.weight, src_model.weight)
    assert dst.diloco.outer_steps == 1
    assert pushed == [1]


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


def test_protocol_wire_presence_and_kinds() -> None:
    wire = ProtocolWire(
        swarm="local",
        addrs=lambda: ["/ip4/127.0.0.1/tcp/1"],
        engine="hf",
        hardware="cpu",
        verifier=lambda batch: (list(batch.groups), 0),
    )
    rec = wire.decode(wire.encode(wire.presence(peer_id=PEER, cohort=FP, step=2, round=1, anchor_hash="")))
    assert wire.kind(rec) == "presence"
    assert (rec.step, rec.round, rec.swarm) == (2, 1, "local")
    with pytest.raises(ProtocolError):
        wire.decode(b"\x00garbage")


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

    wire = ProtocolWire(
        swarm="t", addrs=lambda: [], engine="hf", hardware="cpu", verifier=lambda b: ([], 0), demo_spec=spec
    )
    data = wire.encode_demo(author=PEER, cohort=FP, step=4, components=own)
    step, back = wire.demo_of(wire.decode(data))
    assert step == 4
    for name, (idx, vals) in own.items():
        assert torch.equal(back[name][0].long().sort(dim=-1).values, idx.long().sort(dim=-1).values)
        assert (
            back[name][1].float().abs().sum() - vals.float().abs().sum()
        ).abs() < 0.05 * vals.abs().sum() + 1e-6
    before = model.weight.detach().clone()
    demo.apply_components([back])
    assert not torch.equal(before, model.weight)
    other = ProtocolWire(
        swarm="t",
        addrs=lambda: [],
        engine="hf",
        hardware="cpu",
        verifier=lambda b: ([], 0),
        demo_spec=lambda name: ((1, 1), 1, 1),
    )
    with pytest.raises(ProtocolError, match="chunking"):
        other.demo_of(wire.decode(data))


def test_demo_exchange_uses_what_arrived_since_the_last_step_whatever_the_peers_step() -> None:
    from swarmnode.gossip import DemoExchange

    class Demo:
        def __init__(self) -> None:
            self.applied: list[list[str]] = []

        def compute_components(self) -> str:
            return "mine"

        def apply_components(self, peers: list[str]) -> None:
            self.applied.append(list(peers))

    demo = Demo()
    sent: list[tuple[int, str]] = []
    ex = DemoExchange(demo, publish=lambda step, c: sent.append((step, c)))
    ex.receive("a", 5000, "far-ahead")  # wall-clock rounds: step counters drift apart
    ex.receive("b", 3, "old")
    ex.receive("b", 4, "newer")  # newest per peer wins
    ex.step()
    ex.step()  # nothing new arrived: only our own components
    assert sent == [(0, "mine"), (1, "mine")]
    assert sorted(demo.applied[0]) == ["far-ahead", "newer"]
    assert demo.applied[1] == []
    assert ex.used == 2
    assert ex.blocked_s < 0.05  # the default never waits for peers
