"""Nodes over real libp2p on 127.0.0.1 (in one process, one trio thread per host), real protocol
records, real DiLoCo on a small torch model; the learner is a stand-in that perturbs the weights."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmnode.gossip import DiLoCoMerger, ProtocolWire
from swarmnode.node import Node, NodeSettings
from swarmnode.optim.diloco import DiLoCo
from swarmnode.p2p import HostConfig, open_host

pytestmark = pytest.mark.slow
FP = "c0ffee" * 4


@dataclass
class P:
    family: str = "add"
    seed: int = 0
    index: int = 0


@dataclass
class S:
    text: str = "12"
    token_ids: list[int] = field(default_factory=lambda: [5, 6])
    logprobs: list[float] = field(default_factory=lambda: [-0.1, -0.2])


@dataclass
class G:
    problem: P
    samples: list[S]
    rewards: list[float]


class PerturbLearner:
    fingerprint = FP

    def __init__(self, seed: int, step_s: float = 0.1) -> None:
        torch.manual_seed(0)  # same init on every replica, as from one checkpoint
        self.model = torch.nn.Linear(16, 16)
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.step_s = step_s
        self.external: list[Any] = []
        self.used_external = 0

    def collect_local(self, step: int) -> list[Any]:
        return [G(problem=P(seed=self.seed, index=step), samples=[S(), S()], rewards=[1.0, 0.0])]

    def train_step(self, local: list[Any], external: list[Any]) -> dict[str, float]:
        time.sleep(self.step_s)
        self.used_external += len(external)
        with torch.no_grad():
            self.model.weight.add_(torch.randn(16, 16, generator=self.gen) * 0.01)
        return {"reward": 0.5}

    def evaluate(self) -> float:
        return 0.0

    def add_external(self, groups: list[Any], step: int) -> None:
        self.external.extend(groups)

    def sample_external(self, step: int) -> list[Any]:
        out, self.external = self.external[:1], self.external[1:]
        return out


def _node(host: Any, learner: PerturbLearner, **kw: Any) -> Node:
    settings = NodeSettings(swarm="t", presence_interval_s=0.3, join_wait_s=kw.pop("join_wait_s", 8.0), **kw)
    wire = ProtocolWire(
        swarm="t",
        addrs=lambda: list(host.listen_addrs),
        engine="hf",
        hardware="cpu",
        verifier=lambda batch: (list(batch.groups), 0),
    )
    merger = DiLoCoMerger(DiLoCo(learner.model.named_parameters()))
    return Node(settings=settings, host=host, learner=learner, wire=wire, merger=merger)


def test_three_nodes_share_rollouts_and_merge_over_libp2p(tmp_path: Path) -> None:
    async def main() -> list[Node]:
        async with open_host(HostConfig(data_dir=tmp_path / "0")) as h0:
            boot = h0.listen_addrs
            async with (
                open_host(HostConfig(data_dir=tmp_path / "1", bootstrap=boot)) as h1,
                open_host(HostConfig(data_dir=tmp_path / "2", bootstrap=boot)) as h2,
            ):
                nodes = [
                    _node(h, PerturbLearner(i), steps=8, merge_every=4, collect_seconds=6.0, expect_peers=2)
                    for i, h in enumerate([h0, h1, h2])
                ]
                async with asyncio.TaskGroup() as tg:
                    for n in nodes:
                        tg.create_task(n.run())
                return nodes

    nodes = asyncio.run(asyncio.wait_for(main(), 90))
    for n in nodes:
        assert n.stats.external_groups > 0, "rollouts were shared"
        assert n.stats.merges == 2
        assert n.stats.merge_contributors == 3
    assert len({n.merger.anchor_hash() for n in nodes}) == 1  # type: ignore[union-attr]
    w = [n.learner.model.weight for n in nodes]  # type: ignore[attr-defined]
    assert torch.equal(w[0], w[1])
    assert torch.equal(w[0], w[2])
