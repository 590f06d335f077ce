"""Hostile peers, in-process and fast: what one attacker (with Sybil identities) can and cannot do
to a node's merges, its DeMo steps, its rounds and its choice of a state donor.

The fakes (``tests/fakes.py``) put every host on one bus, and every host on the bus counts as
connected. A Sybil identity is not a host: its messages are signed with its own key and relayed by
the attacker's host, so here they are delivered with their own origin and no host behind them."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch
from fakes import COHORT_A, SWARM, Bus, FakeClock, FakeHost, Msg, make_membership, run, settle, with_started
from swarmnode.compression.pseudograd import encode_delta
from swarmnode.protocol import Presence, RoundManifest, codec, topics

from swarmnode.exchange.diloco import DiLoCoExchange
from swarmnode.membership import Status
from swarmnode.optim.diloco import DiLoCo
from swarmnode.rounds import RoundsConfig
from swarmnode.trust import Offer, accept_probe, check_claim, choose_donor, network_group

PRESENCE = topics.topic(SWARM, topics.PRESENCE)
ROUNDS = topics.cohort_topic(SWARM, topics.ROUNDS, COHORT_A)


def relay(bus: Bus, topic: str, origin: str, data: bytes) -> None:
    """Deliver a message signed by ``origin`` that an attacker's host relays (no host of its own)."""
    for q in list(bus.queues.get(topic, [])):
        q.put_nowait(Msg(topic, origin, data))


def sybil(i: int) -> str:
    return "Sy" + str(i).replace("0", "z")  # a valid base58 peer id


def presence(peer: str, rnd: int = 0, anchor: str = "") -> bytes:
    return codec.encode(
        Presence(
            peer_id=peer,
            addrs=[],
            swarm=SWARM,
            cohort=COHORT_A,
            engine="hf",
            hardware="cpu",
            step=0,
            round=rnd,
            samples=0,
            anchor_hash=anchor,
        )
    )


# -- DiLoCo replicas on the fake bus --------------------------------------------------------------


def _merge_rule(robust: bool) -> dict[str, Any]:
    """The exchange's merge rule: the coordinate-wise trimmed mean (its default), or the plain
    weighted mean to show what the attack does without it."""
    return {"method": "trimmed" if robust else "mean"}


class Replica:
    """One honest node's DiLoCo part: a 16-element weight that drifts by ``drift`` per step."""

    def __init__(self, bus: Bus, name: str, clock: FakeClock, drift: float, robust: bool = False) -> None:
        self.host = FakeHost(bus, name)
        self.w = torch.nn.Parameter(torch.zeros(16))
        self.drift = drift
        self.step = 0
        self.members = make_membership(self.host, clock, COHORT_A, self.status)
        config = RoundsConfig(swarm=SWARM, merge_every=3, collect_seconds=10.0, join_wait_s=0.0)
        diloco = DiLoCo([("w", self.w)], lr=1.0, momentum=0.0)
        self.ex = DiLoCoExchange(
            config,
            host=self.host,
            membership=self.members,
            diloco=diloco,
            clock=clock,
            wall_clock=clock,
            **_merge_rule(robust),
        )

    def status(self) -> Status:
        return Status(step=self.step, round=self.ex.round, anchor_hash=self.ex.anchor_hash)

    async def train(self, until: int) -> None:
        while True:
            self.step = await self.ex.before_step(self.step)
            if self.step >= until:
                return
            with torch.no_grad():
                self.w.add_(self.drift)
            self.step += 1
            await self.ex.after_step(self.step, 2)


async def _swarm(replicas: list[Replica], body: Any) -> None:
    await with_started([part for r in replicas for part in (r.members, r.ex)], body, settle_first=True)


def _poisoned_round(bus: Bus, weight: float, value: float = 2.0) -> None:
    """Eve serves a Δ of ``value`` per element (the honest ones are -0.3 .. -0.9; +2.0 is a norm
    3.3x the median, under the outlier bar, so clipping and the merge rule must deal with it) and
    claims ``weight``."""
    eve = FakeHost(bus, "eve")
    blob = encode_delta({"w": torch.full((16,), value)}, "int8")
    manifest = RoundManifest(
        round=1,
        author="eve",
        cohort=COHORT_A,
        weight=weight,
        content_hash=eve.provide_blob(blob),
        size=len(blob),
        codec="int8",
        anchor_hash="",
    )
    relay(bus, ROUNDS, "eve", codec.encode(manifest))


def _merge_with_eve(robust: bool, value: float = 2.0) -> list[Replica]:
    clock = FakeClock()
    bus = Bus()
    replicas = [
        Replica(bus, f"peer{c}", clock, d, robust) for c, d in zip("ABC", (0.1, 0.2, 0.3), strict=True)
    ]

    async def body() -> None:
        _poisoned_round(bus, 1e30, value)
        for r in replicas:
            await r.train(3)
        await asyncio.gather(*(r.ex.drain() for r in replicas))

    run(_swarm(replicas, body()), clock)
    return replicas


def test_a_poisoned_delta_with_weight_1e30_is_trimmed_away_and_replicas_stay_equal() -> None:
    replicas = _merge_with_eve(robust=True)
    assert all(r.ex.merge_contributors == 4 for r in replicas)  # eve's Δ was merged, and trimmed
    assert len({r.ex.anchor_hash for r in replicas}) == 1
    w = replicas[0].w.detach()
    # the anchor moved the honest way (+), inside the honest replicas' range, not toward eve (-)
    assert bool((w > 0.3 - 1e-3).all())
    assert bool((w < 0.9 + 1e-3).all())


def test_with_the_plain_mean_the_same_attack_takes_the_anchor() -> None:
    """The attack the trimmed merge stops: the median-norm clip bounds the norm, not the direction,
    and an unchecked manifest weight makes the attacker's (clipped) Δ the whole average."""
    replicas = _merge_with_eve(robust=False)  # the exchange's default merge rule
    assert len({r.ex.anchor_hash for r in replicas}) == 1
    assert bool((replicas[0].w.detach() < 0).all())


@pytest.mark.parametrize("robust", [True, False])
def test_a_delta_with_over_4x_the_median_norm_is_left_out_whatever_the_merge_rule(robust: bool) -> None:
    # +100 per element: clipped to the median norm it would still pull every weight eve's way
    replicas = _merge_with_eve(robust=robust, value=100.0)
    assert len({r.ex.anchor_hash for r in replicas}) == 1
    assert all(r.ex.statistics()["diloco_outliers"] == 1 for r in replicas)
    # the three honest replicas alone (0.3, 0.6, 0.9; 0.9 clipped to the median norm, 0.6): their
    # median 0.6 (the trimmed mean of three), or their plain mean 0.5
    want = 0.6 if robust else 0.5
    assert torch.allclose(replicas[0].w.detach(), torch.full((16,), want), atol=1e-2)


# -- 150 Sybil presences do not stretch a round ---------------------------------------------------


def _round_latency(sybils: int) -> float:
    """Fake seconds from the first replica's publish to the last replica's merge."""
    clock = FakeClock()
    bus = Bus()
    replicas = [Replica(bus, f"peer{c}", clock, 0.1) for c in "ABC"]
    marks: list[float] = []

    async def flood() -> None:
        for _ in range(20):  # a fresh presence from every Sybil every 0.5 s: they look alive
            for i in range(sybils):
                relay(bus, PRESENCE, sybil(i), presence(sybil(i)))
            await asyncio.sleep(0.5)

    async def body() -> None:
        flooding = asyncio.create_task(flood())
        await settle(3.0)
        assert all(len(r.members.announced_cohort()) == 2 + sybils for r in replicas)
        marks.append(clock())
        await asyncio.gather(*(r.train(3) for r in replicas))
        await asyncio.gather(*(r.ex.drain() for r in replicas))
        marks.append(clock())
        assert all(r.ex.merges == 1 and r.ex.merge_contributors == 3 for r in replicas)
        await flooding

    run(_swarm(replicas, body()), clock)
    return marks[1] - marks[0]


def test_150_sybil_presences_add_nothing_to_round_latency() -> None:
    honest = _round_latency(0)
    with_sybils = _round_latency(150)
    # (fake time: the honest round takes no timer wait at all; before, the Sybils held it to the
    # 10 s deadline) the round ends when the three contributions are in, +10 % or one 0.25 s poll
    assert honest < 10.0
    assert with_sybils <= max(honest * 1.1, honest + 0.25)


# -- DeMo: a peer pushing one DC coefficient 40 times a step ---------------------------------------


def test_a_dc_push_repeated_40_times_a_step_gets_one_vote_through_the_exchange() -> None:
    from swarmnode.exchange.demo import DemoExchange, DemoGossipConfig, encode_demo
    from swarmnode.optim.demo import DeMo

    def victim(bus: Bus) -> tuple[torch.nn.Linear, DemoExchange]:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64, bias=False)
        demo = DeMo(model.named_parameters(), k=8)

        def spec(name: str) -> tuple[tuple[int, ...], int, int]:
            t = demo.transforms[name]
            return tuple(demo._by_name[name].shape), t.n_chunks, t.chunk_numel

        ex = DemoExchange(
            DemoGossipConfig(swarm=SWARM), host=FakeHost(bus, "peerA"), cohort=COHORT_A, demo=demo, spec=spec
        )
        return model, ex

    def step(model: torch.nn.Linear, ex: DemoExchange) -> None:
        ex.optimizer.zero_grad()
        g = torch.Generator().manual_seed(1)
        model(torch.randn(4, 64, generator=g)).pow(2).sum().backward()
        ex.optimizer.step()

    clock = FakeClock()
    alone_model, alone_ex = victim(Bus())
    step(alone_model, alone_ex)

    bus = Bus()
    model, ex = victim(bus)
    t = ex.optimizer.demo.transforms["weight"]
    push = {"weight": (torch.zeros(t.n_chunks, 1, dtype=torch.int64), torch.full((t.n_chunks, 1), 1e30))}
    messages = encode_demo("eve", COHORT_A, 0, push, ex.spec, "int8")
    topic = topics.cohort_topic(SWARM, topics.DEMO, COHORT_A)

    async def body() -> None:
        for _ in range(40):
            for m in messages:
                relay(bus, topic, "eve", m)
        await settle()
        await asyncio.to_thread(step, model, ex)

    run(with_started([ex], body()), clock)
    # one vote against ours is a tie everywhere, and a tie keeps our own sign
    assert torch.equal(model.weight, alone_model.weight)


# -- trust: choosing a state donor ----------------------------------------------------------------


def test_network_groups() -> None:
    assert network_group("/ip4/203.0.113.7/tcp/4001/p2p/Qm") == "203.0.113.0/24"
    assert network_group("203.0.113.200:9") == "203.0.113.0/24"
    assert network_group("198.51.100.1") == "198.51.100.0/24"
    assert network_group("/ip6/2001:db8:1:2::5/tcp/1") == "2001:db8:1::/48"
    assert network_group("[2001:db8:1:2::5]:7") == "2001:db8:1::/48"
    assert network_group("/ip4/127.0.0.1/tcp/4001") == "127.0.0.1:4001"  # a local swarm: one per port
    assert network_group("") is None
    assert network_group("/dns4/example.org/tcp/1") is None


def test_four_sybils_from_one_network_claiming_a_newer_round_lose_to_two_honest_networks() -> None:
    honest = [Offer("peerB", 5, 500, "aa" * 32), Offer("peerC", 5, 500, "aa" * 32)]
    sybils = [Offer(sybil(i), 6, 600, "ee" * 32) for i in range(4)]
    addresses = {"peerB": "/ip4/198.51.100.4/tcp/1", "peerC": "/ip4/203.0.113.9/tcp/1"}
    addresses |= {sybil(i): f"/ip4/198.18.0.{i + 1}/tcp/1" for i in range(4)}
    choice = choose_donor([*sybils, *honest], addresses, my_round=4, max_round=7)
    assert choice is not None
    assert (choice.anchor_hash, choice.round, choice.attested, choice.support) == ("aa" * 32, 5, True, 2)
    assert set(choice.donors) == {"peerB", "peerC"}


def test_a_verified_peer_attests_and_is_asked_first() -> None:
    offers = [Offer("peerB", 3, 30, "aa" * 32), Offer("peerC", 3, 30, "aa" * 32)]
    addresses = {"peerB": "198.51.100.4:1", "peerC": "198.51.100.5:1"}  # one network
    unverified = choose_donor(offers, addresses, my_round=0, max_round=4)
    assert unverified is not None
    assert not unverified.attested
    choice = choose_donor(offers, addresses, verified={"peerC"}, my_round=0, max_round=4)
    assert choice is not None
    assert choice.attested
    assert choice.donors == ("peerC", "peerB")


def test_a_lone_malicious_bootstrap_is_never_attested() -> None:
    offers = [Offer("eve", 2**62, 10**12, "ee" * 32)]
    assert choose_donor(offers, {"eve": "203.0.113.1:1"}, my_round=0, max_round=3) is None  # 2**62
    offers = [Offer("eve", 3, 300, "ee" * 32)]
    choice = choose_donor(offers, {"eve": "203.0.113.1:1"}, my_round=0, max_round=3)
    assert choice is not None
    assert not choice.attested  # the caller loads it only if the probe passes
    assert choice.donors == ("eve",)


def test_claims_and_the_probe() -> None:
    kw = {"my_round": 4, "my_step": 100, "max_round": 6, "max_steps_per_round": 50}
    assert check_claim(5, 180, **kw) is None
    assert "past the newest" in (check_claim(2**62, 200, **kw) or "")
    assert "steps past" in (check_claim(5, 123_919, **kw) or "")
    assert "older" in (check_claim(3, 100, **kw) or "")
    assert accept_probe(0.40, 0.35)
    assert not accept_probe(0.40, 0.002)  # the attacker's weights: reward 0.23 -> 0.002
    assert not accept_probe(0.40, math.nan)
    assert accept_probe(math.nan, 0.1)
