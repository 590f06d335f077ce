"""Coordinator-free rounds with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from swarmnode.rounds import RoundClock, genesis_from_swarm_id


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def test_round_ids_from_time() -> None:
    rc = RoundClock(genesis=1000.0, round_seconds=60.0, collect_seconds=20.0)
    assert rc.round_at(1000.0) == 0
    assert rc.round_at(1059.999) == 0
    assert rc.round_at(1060.0) == 1
    assert rc.round_at(999.0) == -1
    assert rc.round_start(3) == 1180.0
    assert rc.deadline(3) == 1200.0
    assert rc.round_end(3) == 1240.0


def test_two_nodes_agree_without_talking() -> None:
    g = genesis_from_swarm_id("demo-swarm")
    assert g == genesis_from_swarm_id("demo-swarm")
    assert g != genesis_from_swarm_id("other-swarm")
    a = RoundClock(genesis=g, round_seconds=30, collect_seconds=10, clock=lambda: g + 95.0)
    b = RoundClock(genesis=g, round_seconds=30, collect_seconds=10, clock=lambda: g + 95.5)
    assert a.current() == b.current() == 3


def test_on_time() -> None:
    rc = RoundClock(genesis=0.0, round_seconds=60.0, collect_seconds=20.0)
    assert rc.on_time(1, 61.0)
    assert rc.on_time(1, 80.0)
    assert not rc.on_time(1, 80.01)  # late
    assert not rc.on_time(2, 61.0)  # early: round 2 has not started


def test_wait_round_end_with_fake_clock() -> None:
    fake = FakeClock(125.0)
    rc = RoundClock(genesis=0.0, round_seconds=60.0, collect_seconds=20.0, clock=fake)
    assert rc.current() == 2
    now = asyncio.run(rc.wait_round_end(2, sleep=fake.sleep))
    assert now == 3
    assert fake.t == 180.0
    assert fake.slept == [55.0]
    asyncio.run(rc.wait_deadline(3, sleep=fake.sleep))
    assert fake.t == 200.0
    # already past: returns without sleeping
    asyncio.run(rc.wait_deadline(3, sleep=fake.sleep))
    assert fake.slept == [55.0, 20.0]


def test_validation() -> None:
    with pytest.raises(ValueError, match="round_seconds"):
        RoundClock(genesis=0.0, round_seconds=0.0, collect_seconds=1.0)
    with pytest.raises(ValueError, match="collect_seconds"):
        RoundClock(genesis=0.0, round_seconds=10.0, collect_seconds=11.0)


def test_for_swarm_uses_given_or_derived_genesis() -> None:
    derived = RoundClock.for_swarm("lab", round_seconds=10, collect_seconds=5)
    assert derived.genesis == genesis_from_swarm_id("lab")
    given = RoundClock.for_swarm("lab", round_seconds=10, collect_seconds=5, genesis=123.0)
    assert given.genesis == 123.0
