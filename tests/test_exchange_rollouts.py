"""RolloutExchange alone over the fake host, with the real codec and zstd framing: informative groups
out, verified groups in, hostile batches dropped or rejected and counted."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from fakes import (
    COHORT_A,
    COHORT_B,
    SWARM,
    Bus,
    FakeClock,
    FakeHost,
    TinyLearner,
    eve_presence,
    make_group,
    run,
    settle,
    verify_batch,
    with_started,
)
from swarmnode.compression import framing
from swarmnode.protocol import RolloutBatch, codec, topics

from swarmnode.exchange.rollouts import RolloutExchange, RolloutsConfig, encode_batches, to_rollout_group

TOPIC = topics.topic(SWARM, topics.ROLLOUTS)


def make(
    bus: Bus, name: str, cohort: str = COHORT_A, verify: Any = verify_batch, **cfg: Any
) -> tuple[RolloutExchange, TinyLearner]:
    learner = TinyLearner(drift=0.1, fingerprint=cohort)
    ex = RolloutExchange(
        RolloutsConfig(swarm=SWARM, **cfg),
        host=FakeHost(bus, name),
        cohort=cohort,
        verify=verify,
        add_external=learner.add_external,
        sample_external=learner.sample_external,
    )
    return ex, learner


async def _running(exchanges: list[RolloutExchange], body: Coroutine[Any, Any, None]) -> None:
    await with_started(exchanges, body)


def test_informative_groups_reach_peers_of_any_cohort_and_are_sampled() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA")
    b, b_learner = make(bus, "peerB")
    c, c_learner = make(bus, "peerC", cohort=COHORT_B)  # another model: rollouts still cross
    sampled: list[Any] = []

    async def body() -> None:
        local = [make_group(0), make_group(1, rewards=(0.5, 0.5)), make_group(2, rewards=(0.0, 1.0, 1.0))]
        assert await a.on_collected(0, local) == []  # nothing from peers yet
        await settle()
        sampled.extend(await b.on_collected(1, []))

    run(_running([a, b, c], body()), clock)
    # the all-equal group carries no GRPO signal and is not sent
    assert [g.task.index for g in sampled] == [0, 2]
    assert [len(g.completions) for g in sampled] == [2, 3]
    assert sampled[0].completions[0].reward == 1.0
    assert sampled[0].completions[0].token_ids == [1, 2, 3]
    assert b.external_groups == 2
    assert c.external_groups == 2
    assert len(c_learner.external) == 2
    assert b_learner.external == []  # sampled out of the fake replay buffer
    stats = a.statistics()
    assert stats["rollouts/bytes_sent"] > 0
    assert b.statistics()["rollouts/bytes_received"] == stats["rollouts/bytes_sent"]
    assert a.external_groups == 0  # its own echo is skipped


def test_hostile_batches_are_dropped_or_rejected_and_counted() -> None:
    clock = FakeClock()
    bus = Bus()
    a, learner = make(bus, "peerA")
    eve = FakeHost(bus, "eve")

    def batch(author: str, *groups: Any) -> bytes:
        (raw,) = encode_batches(author, COHORT_A, 3, [to_rollout_group(g) for g in groups])
        return framing.compress(raw)

    presence = eve_presence()

    async def body() -> None:
        await eve.publish(TOPIC, b"\x00garbage")  # not a zstd frame
        await eve.publish(TOPIC, framing.compress(b"\xc1\xc1 not msgpack"))
        await eve.publish(TOPIC, framing.compress(codec.encode(presence)))  # wrong record kind
        await eve.publish(TOPIC, batch("peerB", make_group(0)))  # author is not the signer
        await eve.publish(TOPIC, batch("eve", make_group(1, family="forged"), make_group(2)))
        await settle()

    run(_running([a], body()), clock)
    assert a.traffic.messages_received == 5
    assert a.traffic.dropped == 4
    assert a.rejected_groups == 1  # the forged group fails verification ...
    assert a.external_groups == 1  # ... its honest neighbour in the batch is kept
    assert [g.task.index for g in learner.external] == [2]
    stats = a.statistics()
    assert (stats["rollouts/dropped"], stats["rejected_groups"]) == (4, 1)


def test_a_verifier_bug_loses_the_batch_not_the_exchange() -> None:
    clock = FakeClock()
    bus = Bus()
    calls: list[int] = []

    def flaky(batch: RolloutBatch) -> tuple[list[Any], int]:
        calls.append(batch.policy_step)
        if len(calls) == 1:
            raise RuntimeError("verifier bug")
        return verify_batch(batch)

    a, learner = make(bus, "peerA", verify=flaky)
    b, _ = make(bus, "peerB")

    async def body() -> None:
        await b.on_collected(0, [make_group(0)])
        await settle()
        await b.on_collected(1, [make_group(1)])
        await settle()

    run(_running([a, b], body()), clock)
    assert calls == [0, 1]
    assert a.traffic.dropped == 1
    assert [g.task.index for g in learner.external] == [1]


def test_a_full_verification_queue_drops_and_counts() -> None:
    clock = FakeClock()
    bus = Bus()
    release = threading.Event()

    def slow(batch: RolloutBatch) -> tuple[list[Any], int]:
        assert release.wait(30)
        return verify_batch(batch)

    a, _ = make(bus, "peerA", verify=slow, queue=1)
    b, _ = make(bus, "peerB")

    async def body() -> None:
        for step in range(4):  # all four arrive while the first is still being verified
            await b.on_collected(step, [make_group(step)])
        await asyncio.sleep(0)
        release.set()
        await settle()

    run(_running([a, b], body()), clock)
    assert a.traffic.messages_received == 4
    assert a.external_groups + a.traffic.dropped == 4
    assert a.traffic.dropped >= 2  # one in verification, one queued, the rest over the bound


def test_sharing_off_sends_nothing_and_takes_nothing() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", share=False)
    b, _ = make(bus, "peerB")

    async def body() -> None:
        assert await a.on_collected(0, [make_group(0)]) == []
        await b.on_collected(0, [make_group(1)])
        await settle()

    run(_running([a, b], body()), clock)
    assert a.traffic.bytes_sent == 0
    assert a.traffic.messages_received == 0
    assert b.traffic.messages_received == 0


def test_a_batch_replayed_100_times_counts_once() -> None:
    clock = FakeClock()
    bus = Bus()
    a, learner = make(bus, "peerA")
    eve = FakeHost(bus, "eve")
    (raw,) = encode_batches("eve", COHORT_B, 3, [to_rollout_group(make_group(i)) for i in range(2)])
    # the same groups under a new step and timestamp are the same experience
    (again,) = encode_batches("eve", COHORT_B, 4, [to_rollout_group(make_group(1))])

    async def body() -> None:
        for _ in range(100):
            await eve.publish(TOPIC, framing.compress(raw))
        await eve.publish(TOPIC, framing.compress(again))
        await settle()

    run(_running([a], body()), clock)
    assert a.external_groups == 2
    assert len(learner.external) == 2
    stats = a.statistics()
    assert (stats["duplicate_groups"], stats["duplicate_batches"]) == (2 * 99 + 1, 100)


def test_the_seen_set_is_bounded_and_old_batches_are_refused() -> None:
    from swarmnode.exchange.rollouts import SeenSet

    seen = SeenSet(3)
    assert all(seen.add(bytes([i])) for i in range(5))
    assert len(seen) == 3
    assert bytes([4]) in seen
    assert bytes([0]) not in seen  # forgotten: a replay of it is refused by age instead

    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA", max_age_s=60.0)
    a.wall_clock = lambda: 1e12  # the batch below was created "now" by the real clock: long ago here
    b, _ = make(bus, "peerB")

    async def body() -> None:
        await b.on_collected(0, [make_group(0)])
        await settle()

    run(_running([a, b], body()), clock)
    assert a.external_groups == 0
    assert a.statistics()["old_batches"] == 1


def _trainer_group(index: int, answer: str, rewards: tuple[float, ...]) -> Any:
    from swarmnode.tasks.base import Problem
    from swarmnode.trainer import Group

    problem = Problem(family="reverse", seed=1, index=index, prompt="p", answer=answer)
    return Group(problem=problem, samples=[], rewards=list(rewards))


def test_policy_prefers_other_cohorts_and_problems_this_node_fails_on() -> None:
    from swarmnode.exchange.rollouts import SharingPolicy

    policy = SharingPolicy(RolloutsConfig(swarm=SWARM), COHORT_A)
    # we solve 3-letter words and fail 6-letter ones
    policy.observe_local([_trainer_group(0, "abc", (1.0, 1.0)), _trainer_group(1, "abcdef", (0.0, 0.0))])
    easy_other = _trainer_group(10, "xyz", (1.0, 0.0))
    hard_same = _trainer_group(11, "uvwxyz", (1.0, 0.0))
    hard_other = _trainer_group(12, "uvwxyz", (0.0, 1.0))
    policy.add("peerB", COHORT_A, [hard_same], step=5)
    policy.add("peerC", COHORT_B, [easy_other, hard_other], step=5)
    assert hard_other.meta == {"arrival_step": 5, "cohort": "other"}
    assert policy.take(5, 2) == [hard_other, hard_same]
    # another cohort's sender did worse on it (1 of 2) than we do on 3-letter words: not borrowed
    assert policy.take(5, 2) == []
    assert len(policy) == 1
    assert policy.counts["borrowed_other_cohort"] == 1
    assert policy.counts["borrowed_same_cohort"] == 1


def test_pooled_groups_go_stale_and_same_cohort_weight_0_never_borrows() -> None:
    from swarmnode.exchange.rollouts import SharingPolicy

    policy = SharingPolicy(RolloutsConfig(swarm=SWARM, staleness_steps=2), COHORT_A)
    policy.add("peerC", COHORT_B, [_trainer_group(1, "ab", (1.0, 0.0))], step=0)
    assert policy.take(3, 4) == []
    assert policy.counts["pool_stale"] == 1
    own = SharingPolicy(RolloutsConfig(swarm=SWARM, same_cohort_weight=0.0), COHORT_A)
    own.add("peerB", COHORT_A, [_trainer_group(1, "ab", (1.0, 0.0))], step=0)
    assert len(own) == 0


def test_config_bounds_are_checked() -> None:
    import pytest

    with pytest.raises(ValueError, match="same_cohort_weight"):
        RolloutsConfig(same_cohort_weight=2.0)
    with pytest.raises(ValueError, match="seen_groups"):
        RolloutsConfig(seen_groups=0)


def test_pool_staleness_default_is_the_train_sections() -> None:
    from swarmnode.config import TrainSection

    assert RolloutsConfig().staleness_steps == TrainSection().staleness_steps


def test_the_learner_decides_how_many_and_the_policy_which() -> None:
    clock = FakeClock()
    bus = Bus()
    a, _ = make(bus, "peerA")
    a.sample_external = lambda step: []  # a learner with external_groups 0
    b, _ = make(bus, "peerB", cohort=COHORT_B)
    taken: list[Any] = []

    async def body() -> None:
        await b.on_collected(0, [make_group(0), make_group(1)])
        await settle()
        taken.extend(await a.on_collected(1, []))

    run(_running([a, b], body()), clock)
    assert a.external_groups == 2  # verified and pooled ...
    assert taken == []  # ... but a learner that takes none gets none
    assert a.statistics()["pooled_groups"] == 2
