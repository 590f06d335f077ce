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
    a, _ = make(Bus(), "peerA", clock)
    record = codec.decode(codec.encode(make(Bus(), "peerB", clock)[0].record()))
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
    a, _ = make(Bus(), "peerA", clock)
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
    a, _ = make(Bus(), "peerA", clock)
    a.note_member("peerB")
    assert a.cohort_peers() == ["peerB"]
    results: list[bool] = []

    async def body() -> None:
        results.append(await a.wait_cohort(1, 3.0))

    run(_run_for([a], body()), clock)
    assert results == [False]
    assert a.announced_cohort() == []
