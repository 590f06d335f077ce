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
