"""Whose state a node loads: ``DiLoCoExchange.maybe_catch_up`` under ``swarmnode.trust``.

Victims are real exchanges (real Membership, real state stream, the real DiLoCo outer optimiser on
a 16-element weight) on the fake bus. Donors are hosts that only serve a state and announce it: an
attacker and its 3 Sybils sit in one /24 (198.18.0.0/24), honest donors each in a /24 of their own.
The probe is a function of the victim's live weight (``reward``): what a held-out evaluation of the
loaded weights would measure."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fakes import COHORT_A, SWARM, Bus, FakeClock, FakeHost, make_membership, run, settle, with_started
from swarmnode.protocol import Presence, codec, topics

from swarmnode.exchange.catchup import STATE_PROTOCOL, StateServer, snapshot_of
from swarmnode.exchange.diloco import DiLoCoExchange
from swarmnode.membership import Status
from swarmnode.optim.diloco import DiLoCo
from swarmnode.rounds import RoundsConfig

PRESENCE = topics.topic(SWARM, topics.PRESENCE)
H = 3  # inner steps per round
HONEST, EVIL = 0.5, -100.0  # the weight value of honest and of poisoned states


def presence(peer: str, rnd: int, step: int, anchor: str) -> bytes:
    return codec.encode(
        Presence(
            peer_id=peer,
            addrs=[],
            swarm=SWARM,
            cohort=COHORT_A,
            engine="hf",
            hardware="cpu",
            step=step,
            round=rnd,
            samples=0,
            anchor_hash=anchor,
        )
    )


class Donor:
    """A host serving one state (weight ``value`` everywhere) and announcing (round, step, anchor);
    ``served_step`` is what its state manifest says (it may lie differently from its presence)."""

    def __init__(
        self,
        bus: Bus,
        name: str,
        address: str,
        *,
        value: float,
        rnd: int,
        step: int | None = None,
        served_step: int | None = None,
    ) -> None:
        self.name = name
        self.host = FakeHost(bus, name, address)
        self.w = torch.nn.Parameter(torch.full((16,), value))
        diloco = DiLoCo([("w", self.w)], lr=1.0, momentum=0.0)
        self.step = rnd * H if step is None else step
        snap = snapshot_of(diloco, round=rnd, step=self.step if served_step is None else served_step)
        server = StateServer(self.host, COHORT_A)
        server.update(snap)
        self.host.set_request_handler(STATE_PROTOCOL, server.handle)
        self.round, self.anchor = rnd, snap.anchor_hash

    async def announce(self) -> None:
        await self.host.publish(PRESENCE, presence(self.name, self.round, self.step, self.anchor))


def attacker_and_sybils(bus: Bus, *, rnd: int, value: float = EVIL, **kw: Any) -> list[Donor]:
    """One operator: four hosts in 198.18.0.0/24 serving the same poisoned state."""
    names = ["eve", "Sy1", "Sy2", "Sy3"]
    return [Donor(bus, n, f"198.18.0.{i + 1}:4001", value=value, rnd=rnd, **kw) for i, n in enumerate(names)]


def honest_donors(bus: Bus, n: int, *, rnd: int, **kw: Any) -> list[Donor]:
    nets = ["198.51.100.7:4001", "203.0.113.9:4001", "192.0.2.33:4001"]
    return [Donor(bus, f"Honest{'ABC'[i]}", nets[i], value=HONEST, rnd=rnd, **kw) for i in range(n)]


class Victim:
    """An honest node's DiLoCo part; its weight drifts by ``drift`` per inner step."""

    def __init__(
        self,
        bus: Bus,
        name: str,
        clock: FakeClock,
        *,
        drift: float = 0.1,
        probe: Callable[[], float] | None = None,
        step: int = 0,
    ) -> None:
        self.host = FakeHost(bus, name)
        self.w = torch.nn.Parameter(torch.zeros(16))
        self.drift = drift
        self.step = step
        self.members = make_membership(self.host, clock, COHORT_A, self.status)
        config = RoundsConfig(swarm=SWARM, merge_every=H, collect_seconds=10.0, join_wait_s=0.0)
        self.ex = DiLoCoExchange(
            config,
            host=self.host,
            membership=self.members,
            diloco=DiLoCo([("w", self.w)], lr=1.0, momentum=0.0),
            clock=clock,
            wall_clock=clock,
            probe=probe,
        )
        self.steps_back: list[tuple[int, int]] = []  # (step before, step after) where it went back

    def status(self) -> Status:
        return Status(step=self.step, round=self.ex.round, anchor_hash=self.ex.anchor_hash)

    def reward(self) -> float:
        """The probe: higher the closer the weights are to the honest ones (finite or nan)."""
        return 1.0 / (1.0 + float((self.w.detach() - HONEST).abs().mean()))

    async def train(self, until: int) -> None:
        while True:
            before = self.step
            self.step = await self.ex.before_step(self.step)
            if self.step < before:
                self.steps_back.append((before, self.step))
            if self.step >= until:
                return
            with torch.no_grad():
                self.w.add_(self.drift)
            self.step += 1
            await self.ex.after_step(self.step, 2)

    def stats(self) -> dict[str, Any]:
        return self.ex.statistics()


async def _run(victims: list[Victim], donors: list[Donor], body: Any) -> None:
    async def with_donors() -> None:
        for d in donors:
            await d.announce()
        await settle()
        await body

    parts = [part for v in victims for part in (v.members, v.ex)]
    await with_started(parts, with_donors(), settle_first=True)


def _anchor_w(v: Victim) -> torch.Tensor:
    return v.ex.diloco.anchor["w"]


# -- Sybils -----------------------------------------------------------------------------------------


def test_an_attacker_and_3_sybils_from_one_network_offering_a_newer_round_do_not_move_a_cohort() -> None:
    clock = FakeClock()
    bus = Bus()
    victims = [Victim(bus, f"peer{c}", clock, drift=d) for c, d in zip("ABC", (0.1, 0.2, 0.3), strict=True)]
    evil: list[Donor] = []

    async def body() -> None:
        await asyncio.gather(*(v.train(6) for v in victims))
        await asyncio.gather(*(v.ex.drain() for v in victims))
        assert [v.ex.round for v in victims] == [2, 2, 2]
        # the attacker announces round 7 (plausible: 5 rounds ahead, steps to match) from 4 identities
        evil.extend(attacker_and_sybils(bus, rnd=7))
        for d in evil:
            await d.announce()
        await settle()
        await asyncio.gather(*(v.train(12) for v in victims))
        await asyncio.gather(*(v.ex.drain() for v in victims))

    run(_run(victims, [], body()), clock)
    assert [v.ex.round for v in victims] == [4, 4, 4]
    assert len({v.ex.anchor_hash for v in victims}) == 1
    assert all(v.ex.anchor_hash != evil[0].anchor for v in victims)
    assert all(bool((_anchor_w(v) > 0).all()) for v in victims)
    assert all((v.ex.catchups, v.ex.heals) == (0, 0) for v in victims)
    # each victim counted the refused offer (once, not once per step)
    assert [v.stats()["catchup/refused_unattested"] for v in victims] == [1, 1, 1]


def test_a_fresh_joiner_facing_only_sybils_refuses_their_state_without_a_probe() -> None:
    clock = FakeClock()
    bus = Bus()
    evil = attacker_and_sybils(bus, rnd=3)
    joiner = Victim(bus, "joiner", clock)

    async def body() -> None:
        await joiner.train(4)
        await joiner.ex.drain()

    run(_run([joiner], evil, body()), clock)
    assert joiner.ex.catchups == 0
    assert joiner.ex.round == 1  # trained from its own model and merged its own round
    assert bool((_anchor_w(joiner) > 0).all())
    stats = joiner.stats()
    assert stats["catchup/refused_unattested"] >= 1
    assert stats["catchup/attested_loads"] == stats["catchup/probed_loads"] == 0


def test_a_lone_malicious_donor_fails_the_probe_and_the_joiner_keeps_its_own_state() -> None:
    clock = FakeClock()
    bus = Bus()
    evil = attacker_and_sybils(bus, rnd=3)
    holder: list[Victim] = []
    joiner = Victim(bus, "joiner", clock, probe=lambda: holder[0].reward())
    holder.append(joiner)
    own_anchor: list[str] = []

    async def body() -> None:
        own_anchor.append(joiner.ex.anchor_hash)
        joiner.step = await joiner.ex.before_step(0)
        assert joiner.step == 0
        assert torch.equal(joiner.w.detach(), torch.zeros(16))  # rolled back: weights and anchor
        assert torch.equal(_anchor_w(joiner), torch.zeros(16))
        await joiner.train(4)  # and trains on; the refused anchor is not pulled again
        await joiner.ex.drain()

    run(_run([joiner], evil, body()), clock)
    assert joiner.ex.catchups == 0
    stats = joiner.stats()
    assert stats["catchup/refused_probe"] == 1
    assert stats["catchup/probed_loads"] == 0
    own, candidate = joiner.ex.probe_rewards
    assert own > candidate
    assert joiner.ex.round == 1
    assert bool((_anchor_w(joiner) > 0).all())


def test_a_lone_honest_donor_passes_the_probe_and_is_loaded() -> None:
    clock = FakeClock()
    bus = Bus()
    donors = honest_donors(bus, 1, rnd=3)
    holder: list[Victim] = []
    joiner = Victim(bus, "joiner", clock, probe=lambda: holder[0].reward())
    holder.append(joiner)

    async def body() -> None:
        assert await joiner.ex.before_step(0) == 9  # the donor's step, round 3 of H = 3

    run(_run([joiner], donors, body()), clock)
    assert (joiner.ex.catchups, joiner.ex.round) == (1, 3)
    assert joiner.ex.anchor_hash == donors[0].anchor
    assert joiner.stats()["catchup/probed_loads"] == 1


def test_two_honest_networks_move_a_fresh_joiner_and_outrank_a_newer_sybil_round() -> None:
    clock = FakeClock()
    bus = Bus()
    honest = honest_donors(bus, 2, rnd=5)
    evil = attacker_and_sybils(bus, rnd=7)
    joiner = Victim(bus, "joiner", clock)  # no probe needed: the state is attested

    async def body() -> None:
        assert await joiner.ex.before_step(0) == 15

    run(_run([joiner], [*evil, *honest], body()), clock)
    assert (joiner.ex.catchups, joiner.ex.round) == (1, 5)
    assert joiner.ex.anchor_hash == honest[0].anchor
    assert torch.equal(joiner.w.detach(), torch.full((16,), HONEST))
    stats = joiner.stats()
    assert (stats["catchup/attested_loads"], stats["catchup/probed_loads"]) == (1, 0)


def test_sybils_at_our_own_round_with_a_smaller_anchor_do_not_win_the_resync() -> None:
    clock = FakeClock()
    bus = Bus()
    victims = [Victim(bus, f"peer{c}", clock, drift=d) for c, d in zip("AB", (0.1, 0.2), strict=True)]
    evil: list[Donor] = []

    async def body() -> None:
        await asyncio.gather(*(v.train(3) for v in victims))
        await asyncio.gather(*(v.ex.drain() for v in victims))
        assert [v.ex.round for v in victims] == [1, 1]
        # an anchor "00…" would win any tie; 4 identities from one /24 hold it
        for d in attacker_and_sybils(bus, rnd=1):
            d.anchor = "00" * 32
            evil.append(d)
            await d.announce()
        await settle()
        await asyncio.gather(*(v.train(4) for v in victims))

    run(_run(victims, [], body()), clock)
    assert all(v.ex.heals == 0 for v in victims)
    assert len({v.ex.anchor_hash for v in victims}) == 1


# -- claims -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "rnd", "step", "served_step"),
    [
        ("round 2**62 in the presence", 2**62, 10**12, None),
        ("step 123919 in the presence", 5, 123_919, None),
        ("step 123919 in the state manifest", 5, 15, 123_919),
    ],
)
def test_donors_claiming_an_impossible_round_or_step_are_refused(
    claim: str, rnd: int, step: int, served_step: int | None
) -> None:
    clock = FakeClock()
    bus = Bus()
    # two networks: attested, so only the claim checks stand between the lie and the joiner
    donors = honest_donors(bus, 2, rnd=rnd, step=step, served_step=served_step)
    joiner = Victim(bus, "joiner", clock)

    async def body() -> None:
        assert await joiner.ex.before_step(0) == 0, claim
        await joiner.train(4)
        await joiner.ex.drain()

    run(_run([joiner], donors, body()), clock)
    assert joiner.ex.catchups == 0
    assert joiner.ex.round == 1
    assert joiner.step == 4
    assert joiner.stats()["catchup/refused_claim"] >= 1


def test_a_non_finite_state_is_refused_and_counted() -> None:
    clock = FakeClock()
    bus = Bus()
    donors = [
        Donor(bus, f"NaN{'AB'[i]}", addr, value=math.nan, rnd=3)
        for i, addr in enumerate(["198.51.100.7:1", "203.0.113.9:1"])
    ]
    joiner = Victim(bus, "joiner", clock)

    async def body() -> None:
        assert await joiner.ex.before_step(0) == 0
        await joiner.train(2)

    run(_run([joiner], donors, body()), clock)
    assert joiner.ex.catchups == 0
    assert bool(torch.isfinite(joiner.w.detach()).all())
    stats = joiner.stats()
    assert stats["catchup/refused_state"] >= 1
    assert stats["catchup_failures"] >= 1


def test_the_step_never_goes_back() -> None:
    clock = FakeClock()
    bus = Bus()
    donors = honest_donors(bus, 2, rnd=3)  # step 9
    ahead = Victim(bus, "ahead", clock, step=50)  # a restarted node whose step counter is ahead

    async def body() -> None:
        assert await ahead.ex.before_step(50) == 50
        assert (ahead.ex.catchups, ahead.ex.round) == (1, 3)
        ahead.step = 50
        await ahead.train(56)

    run(_run([ahead], donors, body()), clock)
    assert ahead.ex.catchups == 1
    assert ahead.steps_back == []
    assert ahead.step == 56


def test_stale_presences_are_re_attested_by_the_donors_current_state() -> None:
    """Rounds shorter than the presence interval: the two honest donors' presences name different
    rounds (one is a round old), so they attest nothing; their state manifests, asked for now, agree."""
    clock = FakeClock()
    bus = Bus()
    donors = honest_donors(bus, 2, rnd=6)
    donors[0].round, donors[0].step, donors[0].anchor = 5, 15, "ab" * 32  # its presence is a round old
    joiner = Victim(bus, "joiner", clock)  # no probe: only an attested state may be loaded

    async def body() -> None:
        assert await joiner.ex.before_step(0) == 18

    run(_run([joiner], donors, body()), clock)
    assert (joiner.ex.catchups, joiner.ex.round) == (1, 6)
    assert joiner.ex.anchor_hash == donors[1].anchor
    assert joiner.stats()["catchup/attested_loads"] == 1


def test_remote_addresses_from_the_host_or_from_libp2p_connections() -> None:
    from types import SimpleNamespace

    from swarmnode.exchange.addresses import remote_addresses

    bus = Bus()
    a, b = FakeHost(bus, "peerA", "198.51.100.7:1"), FakeHost(bus, "peerB", "203.0.113.9:2")
    assert remote_addresses(a) == {"peerB": "203.0.113.9:2"}
    assert remote_addresses(b) == {"peerA": "198.51.100.7:1"}

    # swarmnode.p2p.Host.remote_addresses: read from py-libp2p's connection table (what
    # Swarm.get_connections_map and each SwarmConn.muxed_conn.get_remote_address() return)
    from swarmnode.p2p.host import Host

    def conn(where: Any) -> Any:
        return SimpleNamespace(muxed_conn=SimpleNamespace(get_remote_address=lambda: where))

    class pid(str):  # stands in for libp2p's ID (hashable, to_base58)
        def to_base58(self) -> str:
            return str(self)

    table = {pid("QmV4"): [conn(("198.51.100.7", 4001))], pid("QmV6"): [conn(None), conn(("2001:db8::1", 7))]}
    network = SimpleNamespace(get_connections_map=lambda: table)
    state = SimpleNamespace(_trio=SimpleNamespace(host=SimpleNamespace(get_network=lambda: network)))
    host = SimpleNamespace(remote_addresses=lambda: Host.remote_addresses(state))  # type: ignore[arg-type]
    assert remote_addresses(host) == {"QmV4": "198.51.100.7:4001", "QmV6": "[2001:db8::1]:7"}
    assert Host.remote_addresses(SimpleNamespace(_trio=None)) == {}  # type: ignore[arg-type]  # not open yet
    assert remote_addresses(SimpleNamespace()) == {}  # a host that cannot say

    def broken() -> Any:
        raise RuntimeError("dictionary changed size during iteration")

    assert remote_addresses(SimpleNamespace(remote_addresses=broken)) == {}


def test_a_replica_does_not_follow_a_lone_divergent_anchor_while_a_peer_is_still_a_round_behind() -> None:
    # Seen in a real-size run: replica B merged round 3 (anchor "ee"), replica A had not yet, a
    # joiner held a divergent round-3 anchor "33": a 1-vs-1 tie broken by hash moved B to the joiner's.
    from swarmnode.exchange.catchup import choose_source
    from swarmnode.trust import Offer, choose_resync

    addresses = {"peerA": "198.51.100.1:1", "joiner": "203.0.113.2:2"}
    offers = [Offer("joiner", 3, 7, "33" * 32)]
    assert choose_resync(offers, addresses, my_round=3, my_anchor="ee" * 32) is not None  # the old tie
    assert choose_resync(offers, addresses, my_round=3, my_anchor="ee" * 32, undecided=1) is None
    # two peers on the other anchor out-vote ours even if the undecided one joins us: we move
    two = [*offers, Offer("peerC", 3, 7, "33" * 32)]
    addresses["peerC"] = "192.0.2.3:3"
    assert choose_resync(two, addresses, my_round=3, my_anchor="ee" * 32, undecided=1) is None
    three = [*two, Offer("peerD", 3, 7, "33" * 32)]
    addresses["peerD"] = "198.18.0.4:4"
    assert choose_resync(three, addresses, my_round=3, my_anchor="ee" * 32, undecided=1) is not None

    def p(rnd: int, anchor: str) -> Presence:
        return Presence(
            peer_id="x", addrs=[], swarm=SWARM, cohort=COHORT_A, engine="hf", hardware="cpu",
            step=2 * rnd + 1, round=rnd, samples=8, anchor_hash=anchor,
        )  # fmt: skip

    def decide(peers: dict[str, Presence]) -> Any:
        return choose_source(
            peers, list(peers), addresses, cohort=COHORT_A, my_round=3, my_step=7, my_anchor="ee" * 32,
            fresh=False, merged=True, max_round=100, max_steps_per_round=100,
        )  # fmt: skip

    # peerA still at round 2: we keep our anchor; once peerA shows round 3 on our anchor, still ours
    assert decide({"peerA": p(2, "dd" * 32), "joiner": p(3, "33" * 32)}) is None
    assert decide({"peerA": p(3, "ee" * 32), "joiner": p(3, "33" * 32)}) is None
