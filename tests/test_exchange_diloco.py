"""DiLoCoExchange alone over the fake host: real int8 pseudo-gradient and state codecs, the real
DiLoCo outer optimiser on a 16-element tensor, real Membership, fake time.

The tests drive the exchange's step hooks the way the node does (``before_step`` / ``after_step``),
so they can choose who is fast, who is dead and who leaves, and check what each replica merged."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import (
    COHORT_A,
    COHORT_B,
    SWARM,
    Bus,
    FakeClock,
    FakeHost,
    TinyLearner,
    eve_presence,
    make_membership,
    run,
    settle,
    with_started,
)
from swarmnode.compression.pseudograd import encode_delta
from swarmnode.protocol import RoundManifest, codec, topics

from swarmnode.exchange.collect import MAX_ROUNDS_PER_AUTHOR
from swarmnode.exchange.diloco import MAX_ROUNDS_AHEAD, DiLoCoExchange
from swarmnode.membership import Membership, Status
from swarmnode.optim.diloco import DiLoCo
from swarmnode.rounds import RoundsConfig

SAMPLES = 2  # groups per inner step: the averaging weight of a step-based round is 3 × 2


@dataclass
class Peer:
    name: str
    host: FakeHost
    learner: TinyLearner
    members: Membership
    ex: DiLoCoExchange
    step: int = 0

    def w(self) -> torch.Tensor:
        return self.learner.w.detach().clone()


def make(
    bus: Bus,
    name: str,
    clock: FakeClock,
    *,
    drift: float = 0.1,
    cohort: str = COHORT_A,
    spill: Path | None = None,
    **rounds: Any,
) -> Peer:
    learner = TinyLearner(drift=drift, fingerprint=cohort)
    host = FakeHost(bus, name)
    holder: list[Peer] = []

    def status() -> Status:
        p = holder[0]
        return Status(
            step=p.step, round=p.ex.round, anchor_hash=p.ex.anchor_hash, samples=0, observing=p.ex.observing
        )

    members = make_membership(host, clock, cohort, status)
    rounds = {"merge_every": 3, "collect_seconds": 10.0, "join_wait_s": 0.0, **rounds}
    config = RoundsConfig(swarm=SWARM, **rounds)
    # lr 1, no momentum: the outer step moves the anchor to the (robust) mean of the replicas
    diloco = DiLoCo(
        learner.model.named_parameters(),
        lr=1.0,
        momentum=0.0,
        spill_dir=None if spill is None else spill / name,
    )
    ex = DiLoCoExchange(
        config,
        host=host,
        membership=members,
        diloco=diloco,
        clock=clock,
        wall_clock=clock,
    )
    holder.append(Peer(name, host, learner, members, ex))
    return holder[0]


async def train(p: Peer, until: int) -> None:
    """The node's loop for one peer, without the node: hooks around a (fake) inner step."""
    while True:
        p.step = await p.ex.before_step(p.step)
        if p.step >= until:
            return
        await asyncio.to_thread(p.learner.train_step, [], [])
        p.step += 1
        await p.ex.after_step(p.step, SAMPLES)


async def running(peers: list[Peer], body: Coroutine[Any, Any, None]) -> None:
    """Start every peer's membership and exchange, let presence flow, run ``body``, stop."""
    await with_started([part for p in peers for part in (p.members, p.ex)], body, settle_first=True)


def test_three_replicas_merge_to_one_anchor_and_report_their_spread() -> None:
    clock = FakeClock()
    bus = Bus()
    peers = [make(bus, f"peer{c}", clock, drift=d) for c, d in zip("ABC", (0.1, 0.2, 0.3), strict=True)]

    async def body() -> None:
        for p in peers:  # one after another: each waits for the rest in the background
            await train(p, 3)
        await asyncio.gather(*(p.ex.drain() for p in peers))

    run(running(peers, body()), clock)
    for p in peers:
        s = p.ex.statistics()
        assert (s["round"], s["merges"], s["merge_contributors"]) == (1, 1, 3)
        assert s["diloco/bytes_sent"] > 0
        assert torch.equal(p.w(), peers[0].w())  # every replica sits on the anchor ...
        # Δs are -0.3, -0.6, -0.9 per element (int8-exact for constant tensors): mean distance from
        # the mean Δ is (0.3 + 0 + 0.3) / 3 per element, × √16
        assert s["replica_distance_before_merge"] == pytest.approx(0.8, rel=1e-5)
    assert len({p.ex.anchor_hash for p in peers}) == 1  # ... and the anchors are bit-identical
    assert peers[0].ex.anchor_hash == peers[0].ex.diloco.anchor_hash()
    # each merged, checked and agreeing contribution makes its author a verified peer (trust)
    for p in peers:
        assert p.members.contributors() == sorted(q.members.me for q in peers if q is not p)
    assert not torch.equal(peers[0].w(), torch.zeros(16))
    # every blob was pulled from its author: two peers each
    assert all(p.host.served_bytes > 0 for p in peers)


def test_blobs_pulled_into_files_merge_to_the_same_anchor_as_in_memory_and_leave_no_files(
    tmp_path: Path,
) -> None:
    # Real sizes: each Δ is written to / pulled into a file and merged from a read-only mapping of it.
    def rounds(spill: Path | None) -> list[str]:
        clock = FakeClock()
        bus = Bus()
        peers = [
            make(bus, f"peer{c}", clock, drift=d, spill=spill)
            for c, d in zip("ABC", (0.1, 0.2, 0.3), strict=True)
        ]

        async def body() -> None:
            for until in (3, 6):
                for p in peers:
                    await train(p, until)
                await asyncio.gather(*(p.ex.drain() for p in peers))

        run(running(peers, body()), clock)
        for p in peers:
            assert (p.ex.statistics()["merges"], p.ex.statistics()["merge_contributors"]) == (2, 3)
        return [p.ex.anchor_hash for p in peers]

    in_memory = rounds(None)
    in_files = rounds(tmp_path)
    assert len(set(in_memory)) == 1
    assert in_files == in_memory
    # the mappings unlinked their files at once: nothing is left behind, whatever happens later
    assert [f.name for f in tmp_path.rglob("*.blob*")] == []
    assert [f.name for f in tmp_path.rglob("*.part")] == []


def test_a_dead_peer_is_left_out_at_the_deadline_and_survivors_agree() -> None:
    clock = FakeClock()
    bus = Bus()
    alive = [make(bus, "peerA", clock), make(bus, "peerB", clock, drift=0.2)]
    dead = make(bus, "dead", clock, drift=0.5)
    dead.host.dead = True  # publishes its manifest, never serves the blob

    async def body() -> None:
        await asyncio.gather(*(train(p, 3) for p in [*alive, dead]))
        t0 = clock()
        await asyncio.gather(*(p.ex.drain() for p in alive))
        assert clock() - t0 <= 10.0  # the collection deadline (fake time), never beyond

    run(running([*alive, dead], body()), clock)
    for p in alive:
        assert p.ex.merges == 1
        assert p.ex.merge_contributors == 2
        assert p.ex.blocked_s <= 10.0
        assert p.ex.blocked_s >= 9.0  # it did wait for the dead peer, until the deadline
        assert 9.0 <= p.ex.statistics()["diloco_collect_s"] <= 10.0  # the round's latency, reported
    assert alive[0].ex.anchor_hash == alive[1].ex.anchor_hash


def test_a_leave_notice_stops_the_round_waiting_for_the_leaver() -> None:
    clock = FakeClock()
    bus = Bus()
    peers = [make(bus, f"peer{c}", clock) for c in "ABC"]
    stayers, leaver = peers[:2], peers[2]

    async def body() -> None:
        assert stayers[0].members.cohort_peers() == ["peerB", "peerC"]
        await leaver.members.leave()
        await asyncio.gather(*(train(p, 3) for p in stayers))
        t0 = clock()
        await asyncio.gather(*(p.ex.drain() for p in stayers))
        assert clock() - t0 < 1.0  # without the notice: the 10 s deadline

    run(running(peers, body()), clock)
    for p in stayers:
        assert (p.ex.merges, p.ex.merge_contributors) == (1, 2)
        assert p.members.peers_left == 1
        assert "peerC" not in p.members.cohort_peers()
    assert stayers[0].ex.anchor_hash == stayers[1].ex.anchor_hash


def test_a_fast_replica_keeps_training_while_collecting_and_keeps_that_progress() -> None:
    clock = FakeClock()
    bus = Bus()
    fast, slow = make(bus, "peerA", clock), make(bus, "peerB", clock, drift=0.2)

    async def body() -> None:
        await train(fast, 5)  # published round 1 at step 3, then two more inner steps
        assert fast.ex.merges == 0  # still collecting: the slow peer has not published
        await train(slow, 3)
        await asyncio.gather(fast.ex.drain(), slow.ex.drain())

    run(running([fast, slow], body()), clock)
    assert fast.ex.merges == slow.ex.merges == 1
    assert fast.ex.merge_contributors == 2
    assert fast.ex.anchor_hash == slow.ex.anchor_hash
    # two steps of 0.1 on 16 elements survived the outer step: θ = anchor' + 0.2
    assert fast.ex.carried_progress == pytest.approx(0.2 * 4, rel=1e-5)
    assert slow.ex.carried_progress == 0.0
    assert torch.allclose(fast.w() - slow.w(), torch.full((16,), 0.2), atol=1e-6)
    assert torch.equal(slow.w(), slow.ex.diloco.anchor["w"])


def test_round_r_plus_one_waits_for_round_r_and_gets_its_own_full_window() -> None:
    clock = FakeClock()
    bus = Bus()
    fast, slow = make(bus, "peerA", clock), make(bus, "peerB", clock)

    async def body() -> None:
        task = asyncio.create_task(train(fast, 6))  # round 2 ends before round 1 is collected
        await settle(9.0)
        assert fast.step == 6
        assert not task.done()  # waiting for the slow peer's round 1 (deadline: 10 s)
        await train(slow, 3)  # just in time
        await task
        await settle(2.0)  # the slow peer takes a while to finish round 2 ...
        await train(slow, 6)
        await asyncio.gather(fast.ex.drain(), slow.ex.drain())

    run(running([fast, slow], body()), clock)
    assert fast.ex.merges == slow.ex.merges == 2
    # ... and still makes the fast peer's round 2: that window opened when round 2 was published,
    # after the wait, not when it ended
    assert fast.ex.merge_contributors == slow.ex.merge_contributors == 2
    assert fast.ex.anchor_hash == slow.ex.anchor_hash
    assert 9.0 <= fast.ex.blocked_s <= 10.0  # the bounded wait for round 1 is blocked time


def test_wall_clock_rounds_weight_contributions_by_samples() -> None:
    clock = FakeClock(start=100.0)  # also the wall clock: genesis 0, 10 s rounds (now: round 10)
    bus = Bus()
    fast, slow = (
        make(
            bus,
            name,
            clock,
            merge_every=0,
            round_seconds=10.0,
            collect_seconds=5.0,
            genesis=0.0,
        )
        for name in ("peerA", "peerB")
    )

    async def body() -> None:
        for p in (fast, slow):
            p.step = await p.ex.before_step(0)
            await p.ex.after_step(1, 8)  # the first step opens round 10 (we joined mid-round)
        for step in range(2, 6):  # the fast node trains four more steps in round 10, the slow one one
            await fast.ex.after_step(step, 8)
        await slow.ex.after_step(2, 8)
        await settle(110.5 - clock())  # round 10 is over (presences keep flowing)
        await fast.ex.after_step(6, 8)  # the first step after a round's end publishes it
        await slow.ex.after_step(3, 8)
        await asyncio.gather(fast.ex.drain(), slow.ex.drain())

    run(running([fast, slow], body()), clock)
    # authors sorted: peerA (six steps of 8 groups since the round opened) then peerB (three)
    assert fast.ex.last_merge_weights == slow.ex.last_merge_weights == [48.0, 24.0]
    stats = [p.ex.statistics() for p in (fast, slow)]  # what the metrics rows and status show
    assert [s["diloco_published_weight"] for s in stats] == [48.0, 24.0]
    assert stats[0]["merge_weights"] == stats[1]["merge_weights"] == [48.0, 24.0]
    assert fast.ex.round == slow.ex.round == 10
    assert fast.ex.anchor_hash == slow.ex.anchor_hash
    # round ids come from the clock: a manifest for a round that cannot have ended is refused
    assert fast.ex.max_plausible_round() == 12


def test_a_node_whose_budget_ends_mid_round_still_merges_that_round_with_the_cohort() -> None:
    """Wall-clock rounds: one node's last step crosses the round's end (it publishes the round), the
    other's budget is spent before it; the finishing node publishes its part at finish, so both land
    on one anchor instead of the cohort ending on two."""
    clock = FakeClock(start=100.0)
    bus = Bus()
    a, b = (
        make(bus, name, clock, merge_every=0, round_seconds=10.0, collect_seconds=5.0, genesis=0.0)
        for name in ("peerA", "peerB")
    )

    async def body() -> None:
        for p in (a, b):
            p.step = await p.ex.before_step(0)
            await p.ex.after_step(1, 8)  # opens round 10
        await a.ex.after_step(2, 8)
        await b.ex.after_step(2, 8)

        async def b_finishes_now() -> None:
            await b.ex.finish(stopped=False)  # budget spent inside round 10

        async def a_crosses_the_round_end() -> None:
            clock.advance(110.5 - clock())
            await a.ex.after_step(3, 8)  # the first step after round 10 ended publishes it
            await a.ex.finish(stopped=False)

        await asyncio.gather(b_finishes_now(), a_crosses_the_round_end())

    run(running([a, b], body()), clock)
    assert a.ex.round == b.ex.round == 10
    assert a.ex.merge_contributors == b.ex.merge_contributors == 2
    assert a.ex.anchor_hash == b.ex.anchor_hash


def test_another_cohort_never_merges_with_us() -> None:
    clock = FakeClock()
    bus = Bus()
    ours = [make(bus, "peerA", clock), make(bus, "peerB", clock, drift=0.2)]
    theirs = make(bus, "peerC", clock, drift=0.9, cohort=COHORT_B)

    async def body() -> None:
        await asyncio.gather(*(train(p, 3) for p in [*ours, theirs]))
        await asyncio.gather(*(p.ex.drain() for p in [*ours, theirs]))

    run(running([*ours, theirs], body()), clock)
    assert [p.ex.merge_contributors for p in ours] == [2, 2]
    assert theirs.ex.merge_contributors == 1
    assert ours[0].ex.anchor_hash == ours[1].ex.anchor_hash != theirs.ex.anchor_hash
    assert "peerC" not in ours[0].members.cohort_peers()


def _manifest(
    author: str, rnd: int, content_hash: str = "cd" * 32, cohort: str = COHORT_A, size: int = 10
) -> bytes:
    return codec.encode(
        RoundManifest(
            round=rnd,
            author=author,
            cohort=cohort,
            weight=6.0,
            content_hash=content_hash,
            size=size,
            codec="int8",
            anchor_hash="",
        )
    )


def test_hostile_manifests_and_blobs_are_dropped_and_counted() -> None:
    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", clock), make(bus, "peerB", clock, drift=0.2)
    eve = FakeHost(bus, "eve")
    topic = topics.cohort_topic(SWARM, topics.ROUNDS, COHORT_A)
    presence = eve_presence()
    garbage_blob = b"\x93 not a pseudo-gradient"
    trudy = FakeHost(bus, "trudy")

    async def body() -> None:
        for data in (
            b"\xff\xfe garbage",
            codec.encode(presence),  # a valid record of the wrong kind
            _manifest("peerB", 1),  # eve signs a manifest in peerB's name
            _manifest("eve", 1, cohort=COHORT_B),  # another cohort's manifest on our topic
            _manifest("eve", MAX_ROUNDS_AHEAD + 1),  # a round that cannot have ended yet
        ):
            await eve.publish(topic, data)
        await settle()
        assert a.ex.traffic.dropped == 5
        # a flood of future rounds: one author holds at most MAX_ROUNDS_PER_AUTHOR open rounds
        # (its newest), and an older claim than those is refused
        for rnd in range(10, 20):
            await eve.publish(topic, _manifest("eve", rnd))
        await settle()
        eves = sorted(r for r, box in a.ex._inboxes.items() if "eve" in box.manifests)
        assert eves == list(range(20 - MAX_ROUNDS_PER_AUTHOR, 20))
        await eve.publish(topic, _manifest("eve", 12))
        await settle()
        assert a.ex.traffic.dropped == 5 + 1
        # round 1: trudy's blob is not a pseudo-gradient
        bad = trudy.provide_blob(garbage_blob)
        await trudy.publish(topic, _manifest("trudy", 1, bad, size=len(garbage_blob)))
        await asyncio.gather(train(a, 3), train(b, 3))
        await asyncio.gather(a.ex.drain(), b.ex.drain())

    run(running([a, b], body()), clock)
    assert a.ex.merge_contributors == b.ex.merge_contributors == 2  # eve and trudy left out
    assert a.ex.traffic.dropped == 5 + 1 + 1  # the failed blob decode counts too
    assert a.ex.anchor_hash == b.ex.anchor_hash


def test_a_blob_of_the_wrong_shape_is_left_out_on_arrival() -> None:
    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", clock), make(bus, "peerB", clock, drift=0.2)
    eve = FakeHost(bus, "eve")
    topic = topics.cohort_topic(SWARM, topics.ROUNDS, COHORT_A)
    blob = encode_delta({"w": torch.full((5,), 100.0)})

    async def body() -> None:
        h = eve.provide_blob(blob)
        await eve.publish(topic, _manifest("eve", 1, h, size=len(blob)))
        await asyncio.gather(train(a, 3), train(b, 3))
        await asyncio.gather(a.ex.drain(), b.ex.drain())

    run(running([a, b], body()), clock)
    assert a.ex.merge_contributors == b.ex.merge_contributors == 2  # checked against our model on arrival
    assert a.ex.traffic.dropped == b.ex.traffic.dropped == 1
    assert a.ex.incomplete_rounds == 1
    assert "does not match our model" in a.ex.last_round_problem
    assert a.ex.anchor_hash == b.ex.anchor_hash
    assert torch.allclose(a.w(), torch.full((16,), 0.3), atol=1e-2)  # robust mean of 0.3 and 0.6


def test_a_late_joiner_catches_up_never_goes_back_and_merges() -> None:
    clock = FakeClock()
    bus = Bus()
    early = [make(bus, "peerA", clock), make(bus, "peerB", clock, drift=0.2)]
    joiner = make(bus, "joiner", clock, drift=0.05)
    ahead = make(bus, "ahead", clock, drift=0.05)  # a restarted node whose step counter is ahead

    async def body() -> None:
        await asyncio.gather(*(train(p, 6) for p in early))
        await asyncio.gather(*(p.ex.drain() for p in early))
        assert [p.ex.round for p in early] == [2, 2]

        async def joined() -> None:  # once the joiners heard the cohort's presence (round 2)
            assert await joiner.ex.before_step(0) == 6  # adopts the cohort's step
            assert await ahead.ex.before_step(50) == 50  # never moves backwards
            joiner.step, ahead.step = 6, 50
            assert joiner.ex.anchor_hash == early[0].ex.anchor_hash
            assert torch.equal(joiner.w(), early[0].ex.diloco.anchor["w"])
            # it says so at once: the cohort's round 3 does not wait for a Δ it will never send
            assert joiner.ex.observing
            await asyncio.sleep(0)
            assert early[0].members.presence_of("joiner").status == "observing"
            assert "joiner" not in early[0].members.cohort_peers()
            await ahead.members.leave()
            # Round 3 was in flight from the state the joiner loaded: it merges it as an observer
            # (its Δ would be empty) and takes part from round 4. Training takes no fake time, so
            # the joiner trains on after the others, as it would (it started later).
            await asyncio.gather(*(train(p, 9) for p in early))
            await train(joiner, 9)
            await asyncio.gather(*(train(p, 12) for p in early))
            await train(joiner, 12)
            await asyncio.gather(*(p.ex.drain() for p in [*early, joiner]))

        parts = [joiner.members, joiner.ex, ahead.members, ahead.ex]
        await with_started(parts, joined(), settle_first=True)

    run(running(early, body()), clock)
    assert (joiner.ex.catchups, ahead.ex.catchups) == (1, 1)
    assert ahead.ex.round == 2
    # round 3 the joiner merged as an observer (its Δ would be empty), round 4 as a contributor
    assert joiner.ex.round == 4
    assert not joiner.ex.observing
    assert not any("round 3" in p.ex.last_round_problem for p in early)  # the observer is not missed
    assert early[0].members.observed("joiner", 3)
    assert joiner.ex.merges == 2
    assert joiner.ex.merge_contributors == 3
    assert len({p.ex.anchor_hash for p in [*early, joiner]}) == 1
    served = early[0].ex.state_server.served + early[1].ex.state_server.served
    assert served == 2


def test_step_rounds_require_exactly_one_schedule() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RoundsConfig(merge_every=3, round_seconds=10.0)
    with pytest.raises(ValueError, match="collect_seconds"):
        RoundsConfig(merge_every=3, collect_seconds=0)


def test_a_model_whose_delta_can_never_fit_the_ceiling_fails_at_start_naming_the_setting() -> None:
    clock = FakeClock()
    bus = Bus()
    with pytest.raises(ValueError, match=r"max-blob-bytes"):
        make(bus, "peerA", clock, max_blob_bytes=40)  # the 16-value model's int8 Δ is larger


def test_rounds_that_keep_missing_a_peer_are_reported_in_the_health_field() -> None:
    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", clock), make(bus, "peerB", clock)
    b.host.dead = True  # its manifests arrive, its blobs never do

    async def body() -> None:
        await asyncio.gather(train(a, 12), train(b, 12))
        await asyncio.gather(a.ex.drain(), b.ex.drain())

    run(running([a, b], body()), clock)
    assert a.ex.incomplete_rounds >= 3
    assert a.ex.statistics()["diloco_health"].startswith("merges incomplete")


def test_step_rounds_collect_for_at_least_a_few_of_our_own_step_times() -> None:
    # A 0.5 B model on a CPU takes minutes a step: a peer one step behind publishes that much later.
    from swarmnode.exchange.diloco import STEP_SLACK

    clock = FakeClock()
    p = make(Bus(), "peerA", clock, merge_every=10)

    async def body() -> None:
        base = p.ex.window()
        assert base == p.ex.config.collect_seconds
        for step in range(1, 4):
            clock.advance(200.0)  # a slow step, no round ends (H > 3)
            await p.ex.after_step(step, 4)
        assert p.ex.window() == pytest.approx(STEP_SLACK * 200.0)

    run(body(), clock)


def test_a_step_round_collects_for_the_slowest_cohort_peer_s_step_not_only_ours() -> None:
    # A joiner that just loaded state has no step time of its own (and then steps faster than its
    # donors): its window must outlast a donor that publishes one of *its* steps later.
    from swarmnode.exchange.diloco import STEP_SLACK

    clock = FakeClock()
    bus = Bus()
    fast = make(bus, "peerA", clock, merge_every=10)
    slow = make(bus, "peerB", clock, merge_every=10)

    async def body() -> None:
        assert fast.ex.window() == fast.ex.config.collect_seconds
        for step in range(1, 5):
            await settle(8.0)  # 8 s a step (presences every 0.5 s carry it)
            slow.step = step
            await slow.members.publish()
            await asyncio.sleep(0)
        assert fast.members.step_seconds() == pytest.approx(8.0, abs=0.6)
        assert fast.ex.config.collect_seconds < STEP_SLACK * 7.0
        assert fast.ex.window() == pytest.approx(STEP_SLACK * 8.0, abs=1.5)

    run(running([fast, slow], body()), clock)


def test_a_step_round_waits_for_a_slower_peer_still_training_toward_its_end() -> None:
    # Two peers of different speeds drift apart by steps every round. The faster one publishes while
    # the slower one (8 s a step) is 3 steps short: 24 s, past the 20 s window (2.5 step times).
    # Its presences show it training toward the round's end, so the round waits for it.
    clock = FakeClock()
    bus = Bus()
    fast = make(bus, "peerA", clock, merge_every=10)
    slow = make(bus, "peerB", clock, merge_every=10)
    waited: list[float] = []

    async def body() -> None:
        for step in range(1, 8):  # the slow peer reaches step 7 at 8 s a step
            await settle(8.0)
            slow.step = step
            await slow.members.publish()
            await asyncio.sleep(0)
        assert fast.ex.window() == pytest.approx(20.0, abs=1.5)
        await train(fast, 10)  # publishes round 1 at once
        t0 = clock()
        for target in (8, 9, 10):  # 24 s more; its step 10 publishes round 1
            await settle(8.0)
            await train(slow, target)
        await asyncio.gather(fast.ex.drain(), slow.ex.drain())
        waited.append(clock() - t0)

    run(running([fast, slow], body()), clock)
    assert waited[0] >= 24.0
    for p in (fast, slow):
        assert (p.ex.round, p.ex.merge_contributors, p.ex.incomplete_rounds) == (1, 2, 0)
    assert fast.ex.anchor_hash == slow.ex.anchor_hash


def test_a_cohort_peer_that_never_publishes_stops_holding_rounds_to_their_deadline() -> None:
    # Connected and announcing our cohort, it is waited for; after NO_SHOW_ROUNDS rounds without a
    # manifest from it, rounds end when the others are in. Its next manifest puts it back.
    from swarmnode.exchange.diloco import NO_SHOW_ROUNDS

    clock = FakeClock()
    bus = Bus()
    a, b = make(bus, "peerA", clock), make(bus, "peerB", clock, drift=0.2)
    silent = make(bus, "peerC", clock)  # its presence runs, its exchange never publishes
    waits: list[float] = []

    async def body() -> None:
        for r in range(1, NO_SHOW_ROUNDS + 3):
            t0 = clock()
            await asyncio.gather(*(train(p, 3 * r) for p in (a, b)))
            await asyncio.gather(*(p.ex.drain() for p in (a, b)))
            waits.append(clock() - t0)
        assert a.ex.statistics()["diloco_not_waited_for"] == 1
        manifest = RoundManifest(
            round=a.ex.round + 1,
            author="peerC",
            cohort=COHORT_A,
            weight=1.0,
            content_hash="ab" * 32,
            size=10,
            codec="int8",
            anchor_hash="",
        )
        await silent.host.publish(a.ex.topic, codec.encode(manifest))
        await asyncio.sleep(0)
        assert a.ex.statistics()["diloco_not_waited_for"] == 0

    parts = [a.members, a.ex, b.members, b.ex, silent.members]
    run(with_started(parts, body(), settle_first=True), clock)
    assert all(w >= 9.0 for w in waits[:NO_SHOW_ROUNDS])  # held to the 10 s deadline
    assert all(w < 1.0 for w in waits[NO_SHOW_ROUNDS:])
    assert a.ex.incomplete_rounds == NO_SHOW_ROUNDS  # the operator saw those rounds incomplete
    assert a.ex.anchor_hash == b.ex.anchor_hash
