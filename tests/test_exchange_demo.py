"""DemoExchange alone over the fake host: the real DeMo optimizer on a small linear layer, the real
components codec and protocol records; what peers send is applied, what hostile peers send is
dropped and counted."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from fakes import COHORT_A, COHORT_B, SWARM, Bus, FakeClock, FakeHost, eve_presence, run, settle, with_started
from swarmnode.protocol import codec, topics

from swarmnode.exchange.demo import DemoExchange, DemoGossipConfig, encode_demo
from swarmnode.optim.demo import DeMo

TOPIC = topics.cohort_topic(SWARM, topics.DEMO, COHORT_A)


@dataclass
class Peer:
    model: torch.nn.Linear
    demo: DeMo
    ex: DemoExchange
    data_seed: int

    def step(self) -> None:
        """One inner step in the trainer's thread: backward on this peer's own data, then the
        gossiping optimizer (compute own components, publish, apply own + peers')."""
        g = torch.Generator().manual_seed(self.data_seed + 1000 * self.ex.step_no)
        self.ex.optimizer.zero_grad()
        self.model(torch.randn(4, 70, generator=g)).pow(2).sum().backward()
        self.ex.optimizer.step()


def spec_of(model: torch.nn.Module, demo: DeMo) -> Any:
    def spec(name: str) -> tuple[tuple[int, ...], int, int]:
        t = demo.transforms[name]  # KeyError for a name we do not have
        return tuple(demo._by_name[name].shape), t.n_chunks, t.chunk_numel

    return spec


def make(bus: Bus, name: str, seed: int, cohort: str = COHORT_A, out_features: int = 5, **cfg: Any) -> Peer:
    torch.manual_seed(0)  # the same initial weights everywhere, as after a catch-up
    model = torch.nn.Linear(70, out_features)
    demo = DeMo(model.named_parameters(), k=8)
    ex = DemoExchange(
        DemoGossipConfig(swarm=SWARM, **cfg),
        host=FakeHost(bus, name),
        cohort=cohort,
        demo=demo,
        spec=spec_of(model, demo),
    )
    return Peer(model, demo, ex, seed)


async def running(peers: list[Peer], body: Coroutine[Any, Any, None]) -> None:
    await with_started([p.ex for p in peers], body)


def test_components_are_gossiped_and_applied() -> None:
    clock = FakeClock()
    bus = Bus()
    peers = [make(bus, name, seed) for name, seed in (("peerA", 1), ("peerB", 2), ("peerC", 3))]
    solo = make(Bus(), "solo", 1)  # peerA's data, nobody to talk to (never started)
    used: list[list[int]] = []

    async def body() -> None:
        for _ in range(2):
            for p in peers:  # one at a time, everything delivered in between: deterministic
                await asyncio.to_thread(p.step)
                await settle()
            used.append([p.ex.used for p in peers])

    run(running(peers, body()), clock)
    solo.step()
    solo.step()
    # step 0: A hears nobody yet, B hears A, C hears A and B; step 1: everyone hears both others
    assert used == [[0, 1, 2], [2, 3, 4]]
    for p in peers:
        s = p.ex.statistics()
        assert s["demo_peers_used"] == p.ex.used
        assert s["demo_send_failures"] == 0
        assert s["demo_messages_per_step"] >= 1
        assert s["demo_bytes_per_step"] > 0
        assert s["demo/bytes_sent"] > 0
        assert s["demo/dropped"] == 0
        assert p.ex.step_no == 2
    # the peers' components changed A's update: it no longer matches training alone on A's data
    assert not torch.equal(peers[0].model.weight, solo.model.weight)
    assert solo.ex.used == 0  # an exchange that was never started keeps its components local
    assert solo.ex.traffic.bytes_sent == 0


def test_only_the_newest_step_of_each_peer_is_applied() -> None:
    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", 1), make(bus, "peerB", 2)

    async def body() -> None:
        for _ in range(3):  # three steps of B arrive before A's next step
            await asyncio.to_thread(b.step)
            await settle()
        await asyncio.to_thread(a.step)

    run(running([a, b], body()), clock)
    assert a.ex.used == 1  # one peer, its step 2 only
    assert a.ex.traffic.messages_received == 3 * b.ex.last_messages


def test_components_too_far_from_our_step_are_skipped_with_max_lag() -> None:
    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", 1, max_lag=1), make(bus, "peerB", 2)
    b.ex.step_no = 5  # e.g. a peer that has trained for longer

    async def body() -> None:
        await asyncio.to_thread(b.step)
        await settle()
        await asyncio.to_thread(a.step)  # our step 0: B's step 5 is 5 > 1 away
        await asyncio.to_thread(b.step)
        await settle()
        a.ex.step_no = 5
        await asyncio.to_thread(a.step)  # B's step 6 is within 1 of our step 5

    run(running([a, b], body()), clock)
    assert a.ex.used == 1


def test_hostile_components_are_dropped_and_counted() -> None:
    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", 1), make(bus, "peerB", 2)
    other_shape = make(Bus(), "eve", 3, out_features=6)  # same tensor names, other shapes
    eve = FakeHost(bus, "eve")

    def components_of(peer: Peer) -> Any:
        peer.ex.optimizer.zero_grad()
        peer.model(torch.ones(1, 70)).sum().backward()
        return peer.demo.compute_components()

    b_components, own = components_of(b), components_of(other_shape)

    def demo_msgs(author: str, cohort: str, components: Any, peer: Peer) -> list[bytes]:
        return encode_demo(author, cohort, 0, components, spec_of(peer.model, peer.demo), "int8")

    presence = eve_presence()
    hostile = [
        b"\x00\x01 garbage",
        codec.encode(presence),  # a valid record of the wrong kind
        *demo_msgs("peerB", COHORT_A, b_components, b),  # eve in peerB's name
        *demo_msgs("eve", COHORT_B, b_components, b),  # another cohort's components on our topic
        *demo_msgs("eve", COHORT_A, own, other_shape),  # chunking that differs from our model's
    ]

    async def body() -> None:
        for data in hostile:
            await eve.publish(TOPIC, data)
        await settle()
        await asyncio.to_thread(a.step)

    run(running([a], body()), clock)
    assert a.ex.traffic.messages_received == len(hostile)
    assert a.ex.traffic.dropped == len(hostile)
    assert a.ex.statistics()["demo/dropped"] == len(hostile)
    assert a.ex.used == 0
    assert torch.isfinite(a.model.weight).all()


def test_config_rejects_a_negative_window() -> None:
    with pytest.raises(ValueError, match="window_s"):
        DemoGossipConfig(window_s=-1.0)


def test_a_window_waits_for_a_peers_whole_step_not_its_first_message() -> None:
    # A real-size step is ~15 messages: applying only the first would use a few tensors of the peer.
    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", 1, window_s=30.0), make(bus, "peerB", 2)
    eve_b = FakeHost(bus, "peerB")  # publishes peerB's messages one at a time, under its name
    b.ex.optimizer.zero_grad()
    b.model(torch.ones(2, 70)).pow(2).sum().backward()
    parts = encode_demo(
        "peerB", COHORT_A, 0, b.demo.compute_components(), spec_of(b.model, b.demo), "int8", 200
    )
    assert len(parts) >= 3  # the weight's chunk ranges and the bias, each decodable alone
    waited: list[bool] = []

    async def body() -> None:
        # A plain thread, not the loop's executor: fake time must keep moving (and deliver the parts)
        # while the step waits, which it cannot while an executor job runs.
        stepping = threading.Thread(target=a.step)
        stepping.start()
        for data in parts[:-1]:
            await eve_b.publish(TOPIC, data)
            await settle()
            await asyncio.to_thread(stepping.join, 0.2)
            waited.append(stepping.is_alive())
        await eve_b.publish(TOPIC, parts[-1])
        await settle()
        await asyncio.to_thread(stepping.join, 10)
        assert not stepping.is_alive()

    run(running([a], body()), clock)
    assert waited == [True] * (len(parts) - 1)  # still waiting while parts were missing
    assert a.ex.used == a.ex.statistics()["demo_peers_last_step"] == 1
    assert a.ex.blocked_s < 10  # released by the last part, not by the 30 s window
