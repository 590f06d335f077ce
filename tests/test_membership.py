"""Membership alone over the fake host: presence out and in (real protocol codec), the peer table,
timeouts and leave notices on a fake clock, hostile presence dropped and counted."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from fakes import COHORT_A, COHORT_B, SWARM, Bus, FakeClock, FakeHost, run, settle, with_started
from swarmnode.protocol import RoundManifest, codec, topics

from swarmnode.exchange.base import TransportClosed
from swarmnode.membership import Membership, MembershipConfig, Status


def make(
    bus: Bus, name: str, clock: FakeClock, cohort: str = COHORT_A, **cfg: float
) -> tuple[Membership, FakeHost]:
    host = FakeHost(bus, name)
    config = MembershipConfig(swarm=SWARM, presence_interval_s=1.0, peer_timeout_s=5.0, **cfg)  # type: ignore[arg-type]
    m = Membership(
        config,
        host=host,
        cohort=cohort,
        engine="hf",
        hardware="cpu",
        addrs=lambda: ["/ip4/127.0.0.1/tcp/4001"],
        status=lambda: Status(step=3, round=1, anchor_hash="ab" * 32, samples=12),
        clock=clock,
    )
    return m, host


async def _run_for(members: list[Membership], body: Coroutine[Any, Any, None]) -> None:
    """Start ``members`` in a task group, await ``body``, then cancel the heartbeats."""
    await with_started(members, body)


def test_config_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="presence_interval_s"):
        MembershipConfig(presence_interval_s=0)
    with pytest.raises(ValueError, match="peer_timeout_s"):
        MembershipConfig(peer_timeout_s=-1)
    with pytest.raises(ValueError, match="max_peers"):
        MembershipConfig(max_peers=0)


def test_peers_hear_each_others_presence_and_split_by_cohort() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    b, _ = make(bus, "peerB", clock)
    c, _ = make(bus, "peerC", clock, cohort=COHORT_B)

    run(_run_for([a, b, c], settle(2.5)), clock)
    assert sorted(a.live_peers()) == ["peerB", "peerC"]
    assert a.cohort_peers() == ["peerB"]  # another model's node is a peer, not a cohort member
    presence = a.presence_of("peerB")
    assert (presence.step, presence.round, presence.samples, presence.cohort) == (3, 1, 12, COHORT_A)
    stats = a.statistics()
    assert stats["peers"] == 2
    assert stats["cohort_peers"] == 1
    assert stats["presence/bytes_sent"] > 0
    assert stats["presence/bytes_received"] > 0
    assert stats["presence/dropped"] == 0


def test_a_silent_peer_times_out_and_is_pruned_later() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    record = codec.decode(codec.encode(make(bus, "peerB", clock)[0].record()))  # peerB: connected
    a.observe("peerB", record)
    assert a.cohort_peers() == ["peerB"]
    clock.advance(5.0)
    assert a.live_peers() == ["peerB"]  # exactly at the timeout it still counts
    clock.advance(0.1)
    assert a.live_peers() == []
    assert a.cohort_peers() == []  # rounds stop expecting it
    a.prune()
    assert a.presence_of("peerB") is not None  # still in the table: it may come back
    clock.advance(15.0)
    a.prune()
    assert a.presence_of("peerB") is None


def test_a_round_manifest_counts_as_membership_until_the_timeout() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    FakeHost(bus, "peerD")  # connected to us
    a.note_member("peerD")
    assert a.cohort_peers() == ["peerD"]
    clock.advance(5.1)
    assert a.cohort_peers() == []


def test_leave_notice_drops_the_peer_at_once() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    b, _ = make(bus, "peerB", clock)

    async def body() -> None:
        await settle(1.5)
        assert a.cohort_peers() == ["peerB"]
        t0 = clock()
        await b.leave()
        await asyncio.sleep(0)
        assert a.cohort_peers() == []  # no peer timeout to sit out
        assert clock() == t0
        await settle(3.0)  # b's heartbeat was cancelled: no "active" presence follows the notice
        assert a.cohort_peers() == []

    run(_run_for([a, b], body()), clock)
    assert a.peers_left == 1
    assert a.statistics()["peers_left"] == 1


def test_wait_cohort_returns_when_peers_arrive_or_the_timeout_passes() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    results: list[tuple[bool, float]] = []

    async def alone() -> None:
        t0 = clock()
        results.append((await a.wait_cohort(1, 4.0), clock() - t0))

    run(_run_for([a], alone()), clock)
    ok, waited = results.pop()
    assert not ok
    assert 4.0 <= waited <= 4.25  # bounded by the timeout (fake time), not longer

    bus = Bus()  # a fresh swarm on a fresh event loop
    a, _ = make(bus, "peerA", clock)
    b, _ = make(bus, "peerB", clock)

    async def together() -> None:
        t0 = clock()
        results.append((await a.wait_cohort(1, 4.0), clock() - t0))

    run(_run_for([a, b], together()), clock)
    ok, waited = results.pop()
    assert ok
    assert waited < 1.0  # b's first presence, not the timeout


def test_malformed_presence_is_dropped_and_counted() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    b, _ = make(bus, "peerB", clock)
    eve = FakeHost(bus, "eve")
    topic = topics.topic(SWARM, topics.PRESENCE)
    forged = codec.encode(b.record())  # peerB's presence, published by eve
    manifest = RoundManifest(
        round=1,
        author="eve",
        cohort=COHORT_A,
        weight=1.0,
        content_hash="cd" * 32,
        size=10,
        codec="int8",
        anchor_hash="",
    )

    async def body() -> None:
        await eve.publish(topic, b"\xff\x00 not msgpack")
        await eve.publish(topic, forged)
        await eve.publish(topic, codec.encode(manifest))  # valid record, wrong kind for this topic
        await settle()

    run(_run_for([a], body()), clock)
    assert a.traffic.dropped == 3
    assert a.statistics()["presence/dropped"] == 3
    assert a.live_peers() == []


def test_the_peer_table_is_bounded() -> None:
    clock = FakeClock()
    a, _ = make(Bus(), "peerA", clock, max_peers=3)
    for i in range(1, 6):
        clock.advance(1.0)
        record = make(Bus(), f"peer{i}", clock)[0].record()
        a.observe(f"peer{i}", record)
    assert sorted(a.presences()) == ["peer3", "peer4", "peer5"]  # the stalest went first


def test_an_ended_subscription_raises_transport_closed() -> None:
    clock = FakeClock()
    a, host = make(Bus(), "peerA", clock)

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            a.start(tg)
            await settle()
            host.close()

    with pytest.raises(ExceptionGroup) as info:
        run(main(), clock)
    assert info.value.subgroup(TransportClosed) is not None


def test_wait_cohort_needs_their_presence_not_only_a_round_manifest() -> None:
    """A joiner decides whether to catch up from its peers' presence (round, anchor): a round
    manifest makes a peer a cohort member, but is not enough to end the join wait."""
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    FakeHost(bus, "peerB")
    a.note_member("peerB")
    assert a.cohort_peers() == ["peerB"]
    results: list[bool] = []

    async def body() -> None:
        results.append(await a.wait_cohort(1, 3.0))

    run(_run_for([a], body()), clock)
    assert results == [False]
    assert a.announced_cohort() == []


# -- hostile peers --------------------------------------------------------------------------------


def _presence_from(name: str, clock: FakeClock, rnd: int = 1) -> Any:
    m = Membership(
        MembershipConfig(swarm=SWARM),
        host=FakeHost(Bus(), name),
        cohort=COHORT_A,
        engine="hf",
        hardware="cpu",
        addrs=lambda: [],
        status=lambda: Status(step=3, round=rnd),
        clock=clock,
    )
    return codec.encode(m.record())


def test_a_peer_flooding_100_presences_a_second_is_counted_and_its_excess_dropped() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    FakeHost(bus, "eve")
    data = _presence_from("eve", clock)
    for _ in range(10):  # ten seconds at 100 presences/s
        for _ in range(100):
            a._handle("eve", data)
            clock.advance(0.01)
    stats = a.statistics()
    # a burst of 10, then 5 a second: 59-60 of 1,000 taken, the rest dropped without decoding
    limited = stats["presence/rate_limited"]
    assert 940 <= limited <= 941
    assert stats["presence/dropped"] == limited
    assert a.presence_of("eve") is not None
    # an honest peer at its interval is never limited
    b = _presence_from("peerB", clock)
    for _ in range(50):
        a._handle("peerB", b)
        clock.advance(1.0)
    assert a.statistics()["presence/rate_limited"] == limited


def test_150_sybil_presences_do_not_join_the_set_a_round_waits_for() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    FakeHost(bus, "peerB")  # one honest, connected peer
    a.observe("peerB", codec.decode(_presence_from("peerB", clock)))
    sybils = [_sybil(i) for i in range(150)]  # relayed by an attacker: not connected to us
    for _ in range(5):  # they keep repeating, so they become plausible presences
        for s in sybils:
            a.observe(s, codec.decode(_presence_from(s, clock)))
            a.note_member(s)  # and even publish round manifests
        clock.advance(1.0)
    assert len(a.announced_cohort()) == 151  # their presences count as heard ...
    assert a.cohort_peers() == ["peerB"]  # ... but no round waits for them
    # a peer whose contribution we merged is waited for, connected or not
    a.note_contributor(_sybil(7))
    assert a.cohort_peers() == sorted(["peerB", _sybil(7)])


def test_a_fresh_identity_counts_only_after_repeated_presences_unless_connected() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    a.observe("far", codec.decode(_presence_from("far", clock)))
    assert a.announced_cohort() == []  # once is not enough for a peer we are not connected to
    clock.advance(0.1)
    a.observe("far", codec.decode(_presence_from("far", clock)))
    assert a.announced_cohort() == []  # twice within a blink is not "repeatedly"
    clock.advance(1.0)
    a.observe("far", codec.decode(_presence_from("far", clock)))
    assert a.announced_cohort() == ["far"]
    FakeHost(bus, "near")
    a.observe("near", codec.decode(_presence_from("near", clock)))
    assert a.announced_cohort() == ["far", "near"]


def test_a_presence_claiming_round_2_62_is_not_plausible() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    a.round_bound = lambda: 10
    FakeHost(bus, "Liar")
    a.observe("Liar", codec.decode(_presence_from("Liar", clock, rnd=2**62)))
    a.observe("peerB", codec.decode(_presence_from("peerB", clock, rnd=10)))
    FakeHost(bus, "peerB")
    assert a.announced_cohort() == ["peerB"]
    assert a.cohort_peers() == ["peerB"]
    assert "Liar" not in a.plausible_presences()
    assert a.statistics()["presence/implausible"] == 1
    assert a.presence_of("Liar") is not None  # held (bounded), never trusted


def test_every_table_stays_bounded_and_pruned_under_sybil_churn() -> None:
    clock = FakeClock()
    a, _ = make(Bus(), "peerA", clock, max_peers=100)
    record = codec.decode(_presence_from("peerB", clock))
    for i in range(5000):  # 5,000 identities come and go
        name = _sybil(i)
        assert a.allow(name)
        a.observe(name, record)
        a.note_member(name)
        a.note_contributor(name)
        clock.advance(0.01)
    assert len(a.peers) <= 100
    assert len(a._members) <= 100
    assert len(a._contributors) <= 100
    assert len(a._buckets) <= 100
    clock.advance(4 * 5.0 + 1)
    a.prune()
    assert (len(a.peers), len(a._members), len(a._contributors), len(a._buckets)) == (0, 0, 0, 0)


def _sybil(i: int) -> str:
    """A valid (base58) peer id per number."""
    return "Sy" + str(i).replace("0", "z")


def test_an_observing_joiner_is_live_but_not_waited_for() -> None:
    # A joiner that loaded state merges the round in flight without a Δ: rounds must not wait for it.
    clock = FakeClock()
    bus = Bus()
    observing = [True]
    a, _ = make(bus, "peerA", clock)
    b, _ = make(bus, "peerB", clock)
    b.status = lambda: Status(step=3, round=1, anchor_hash="ab" * 32, observing=observing[0])

    async def body() -> None:
        await settle(1.5)
        assert a.presence_of("peerB").status == "observing"
        assert a.cohort_peers() == []
        assert "peerB" in a.live_peers()
        assert a.observed("peerB", 2)  # its presence says round 1: it merges round 2 as an observer
        observing[0] = False
        await b.publish()
        await asyncio.sleep(0)
        assert a.cohort_peers() == ["peerB"]

    run(_run_for([a, b], body()), clock)


def test_a_peer_s_last_few_advertised_states_are_kept() -> None:
    # A replica a round ahead still attests the state its peer serves now.
    clock = FakeClock()
    bus = Bus()
    rnd = [1]
    a, _ = make(bus, "peerA", clock)
    b, _ = make(bus, "peerB", clock)
    b.status = lambda: Status(step=3 * rnd[0], round=rnd[0], anchor_hash=f"{rnd[0]:02d}" * 32)

    async def body() -> None:
        for r in range(1, 8):
            rnd[0] = r
            await settle(1.5)  # a presence or two each round: the same state twice is kept once
        assert a.recent_states("peerB") == tuple((r, 3 * r, f"{r:02d}" * 32) for r in range(4, 8))
        assert a.recent_states("nobody") == ()

    run(_run_for([a, b], body()), clock)


def test_a_cohort_peer_s_step_time_is_measured_from_the_steps_its_presences_show() -> None:
    # A step round must outlast the slowest cohort peer's step, not ours (a joiner steps faster).
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    make(bus, "peerB", clock)  # connected, so a cohort peer

    def hear(step: int) -> None:
        b = make(Bus(), "peerB", clock)[0]
        b.status = lambda: Status(step=step, round=0, anchor_hash="ab" * 32)
        a.observe("peerB", codec.decode(codec.encode(b.record())))

    # peers time out after 5 s of silence (this test's config): presences every 2 s or less
    hear(3)
    clock.advance(1.0)
    hear(4)  # the first change only starts the clock: we did not see step 4 begin at step 3's end
    assert a.step_seconds() == 0.0
    clock.advance(2.0)
    hear(4)
    clock.advance(2.0)
    hear(5)
    assert a.step_seconds() == pytest.approx(4.0)
    clock.advance(4.0)
    hear(6)
    clock.advance(4.0)
    hear(7)  # 4 s a step again, with a presence heard between the steps
    assert a.step_seconds() == pytest.approx(4.0)
    clock.advance(1.0)
    hear(500)  # a catch-up jump is not a step time
    assert a.step_seconds() == pytest.approx(4.0)


def test_a_peer_s_advertised_step_time_counts_before_we_could_measure_one() -> None:
    # A fresh joiner has heard a donor for less than a step: the donor's presence says its step time.
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", clock)
    b, _ = make(bus, "peerB", clock)
    b.status = lambda: Status(step=3, round=1, anchor_hash="ab" * 32, step_s=200.0)
    a.observe("peerB", codec.decode(codec.encode(b.record())))
    assert a.presence_of("peerB").step_s == 200.0
    assert a.step_seconds() == 200.0
    for bad in (float("nan"), float("inf"), -1.0):
        b.status = lambda bad=bad: Status(step=3, round=1, anchor_hash="ab" * 32, step_s=bad)
        assert b.record().step_s == 0.0  # never advertised: it could not be encoded
    b.status = lambda: Status(step=3, round=1, anchor_hash="ab" * 32, step_s=1e12)
    assert b.record().step_s == 86400.0


def test_a_new_cohort_peer_is_connected_to_before_its_first_pull_and_bounded() -> None:
    # Reaching a peer behind NAT takes a relay and seconds the first time: the first presence of a
    # cohort peer we are not connected to starts a connection, once per peer per retry interval, a
    # few at a time, never for another cohort's peers.
    from swarmnode.membership import PRECONNECT_MAX, PRECONNECT_RETRY_S

    clock = FakeClock()
    bus = Bus()
    a, host = make(bus, "peerA", clock)
    calls: list[str] = []
    release = asyncio.Event()

    async def connect(peer: str, *, timeout: float) -> bool:  # noqa: ASYNC109 - Host.connect's shape
        calls.append(peer)
        await release.wait()
        return True

    host.connect = connect  # type: ignore[attr-defined]
    host.connected_peers = lambda: []  # type: ignore[method-assign]
    sender = make(bus, "peerX", clock)[0]
    other = make(bus, "peerY", clock, cohort=COHORT_B)[0]

    async def body() -> None:
        a.observe("peerB", codec.decode(codec.encode(sender.record())))
        a.observe("peerB", codec.decode(codec.encode(sender.record())))  # heard again: no second try
        a.observe("peerC", codec.decode(codec.encode(other.record())))  # another cohort: none
        for i in range(2 * PRECONNECT_MAX):  # a burst of new identities: a few at a time
            a.observe(f"sybil{i}", codec.decode(codec.encode(sender.record())))
        await asyncio.sleep(0)
        assert calls[0] == "peerB"
        assert "peerC" not in calls
        assert len(calls) == PRECONNECT_MAX
        release.set()
        await asyncio.sleep(0)
        clock.advance(PRECONNECT_RETRY_S / 2)
        a.peers.pop("peerB")  # forgotten and heard anew within the retry interval: not tried again
        a.observe("peerB", codec.decode(codec.encode(sender.record())))
        await asyncio.sleep(0)
        assert calls.count("peerB") == 1

    run(_run_for([a], body()), clock)
    assert a.statistics()["presence/preconnects"] == PRECONNECT_MAX
