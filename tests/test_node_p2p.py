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

from swarmnode.build import build_node
from swarmnode.config import load_config
from swarmnode.node import Node
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
        self.diloco = DiLoCo(self.model.named_parameters())
        self.samples_seen = 0

    def verify(self, batch: Any) -> tuple[list[Any], int]:
        return list(batch.groups), 0

    def push_weights(self) -> None:
        pass

    def resume(self) -> None:
        return None

    def checkpoint(self, step: int, round_: int) -> None:
        pass

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


def _node(host: Any, learner: PerturbLearner, tmp: Path, **settings: Any) -> Node:
    cfg = load_config(
        None,
        {
            "swarm.id": "t",
            "network.presence_interval_s": 0.3,
            "network.join_wait_s": 8.0,
            "diloco.enabled": True,
            "train.eval_every": 100,
            "checkpoint.every": 0,
            **settings,
        },
    )
    return build_node(cfg, host, learner, data_dir=tmp)  # type: ignore[arg-type]


def test_three_nodes_share_rollouts_and_merge_over_libp2p(tmp_path: Path) -> None:
    async def main() -> list[Node]:
        async with open_host(HostConfig(data_dir=tmp_path / "0")) as h0:
            boot = h0.listen_addrs
            async with (
                open_host(HostConfig(data_dir=tmp_path / "1", bootstrap=boot)) as h1,
                open_host(HostConfig(data_dir=tmp_path / "2", bootstrap=boot)) as h2,
            ):
                settings = {
                    "train.steps": 8,
                    "diloco.inner_steps": 4,
                    "diloco.collect_seconds": 6.0,
                    "network.expect_peers": 2,
                }
                nodes = [
                    _node(h, PerturbLearner(i), tmp_path / f"n{i}", **settings)
                    for i, h in enumerate([h0, h1, h2])
                ]
                async with asyncio.TaskGroup() as tg:
                    for n in nodes:
                        tg.create_task(n.run())
                return nodes

    nodes = asyncio.run(asyncio.wait_for(main(), 90))
    for n in nodes:
        row = n.statistics()
        assert row["external_groups"] > 0, "rollouts were shared"
        assert row["merges"] == 2
        assert row["merge_contributors"] == 3
    assert len({n.statistics()["anchor_hash"] for n in nodes}) == 1
    w = [n.learner.model.weight for n in nodes]  # type: ignore[attr-defined]
    assert torch.equal(w[0], w[1])
    assert torch.equal(w[0], w[2])
