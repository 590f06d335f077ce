"""The node's loop end to end: 2-4 nodes in one process over the fake host, with real Membership,
the real rollout and DiLoCo exchanges and codecs, DiLoCo on a 16-element tensor, and fake time
(see ``fakes``). Each exchange is tested alone in ``test_exchange_*``; real processes over real
libp2p are in ``test_localswarm`` / ``test_node_p2p``."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fakes import (
    COHORT_A,
    COHORT_B,
    SWARM,
    Bus,
    FakeClock,
    FakeHost,
    TinyLearner,
    make_group,
    make_membership,
    run,
    verify_batch,
)
from swarmnode.compression import framing
from swarmnode.protocol import codec, topics

from swarmnode.exchange.base import TransportClosed
from swarmnode.exchange.diloco import DiLoCoExchange
from swarmnode.exchange.rollouts import RolloutExchange, RolloutsConfig, encode_batches, to_rollout_group
from swarmnode.membership import Status
from swarmnode.node import LoopConfig, Node
from swarmnode.optim.diloco import DiLoCo
from swarmnode.rounds import RoundsConfig

COLLECT_S = 10.0


def make_node(
    bus: Bus,
    name: str,
    clock: FakeClock,
    *,
    drift: float = 0.1,
    cohort: str = COHORT_A,
    steps: int = 6,
    merge_every: int = 3,
    expect_peers: int = 1,
    metrics: Path | None = None,
    learner: TinyLearner | None = None,
) -> Node:
    learner = learner or TinyLearner(drift=drift, fingerprint=cohort)
    host = FakeHost(bus, name)
    node: Node | None = None
    diloco: DiLoCoExchange | None = None

    def status() -> Status:
        assert node is not None
        assert diloco is not None
        return Status(step=node.step, round=diloco.round, anchor_hash=diloco.anchor_hash, samples=0)

    membership = make_membership(host, clock, cohort, status)
    rollouts = RolloutExchange(
        RolloutsConfig(swarm=SWARM),
        host=host,
        cohort=cohort,
        verify=verify_batch,
        add_external=learner.add_external,
        sample_external=learner.sample_external,
    )
    diloco = DiLoCoExchange(
        RoundsConfig(
            swarm=SWARM,
            merge_every=merge_every,
            collect_seconds=COLLECT_S,
            expect_peers=expect_peers,
            join_wait_s=2.0,
        ),
        host=host,
        membership=membership,
        diloco=DiLoCo(learner.model.named_parameters(), lr=1.0, momentum=0.0),
        clock=clock,
    )
    node = Node(
        LoopConfig(steps=steps, eval_every=2, metrics_path=metrics),
        learner=learner,
        membership=membership,
        exchanges=[rollouts, diloco],
        clock=clock,
        host_statistics=host.statistics,
    )
    return node


async def run_all(nodes: list[Node]) -> None:
    async with asyncio.TaskGroup() as tg:
        for n in nodes:
            tg.create_task(n.run())


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sharing_learners() -> list[TinyLearner]:
    """Drifts 0.1, 0.2, 0.3; each waits in its second step for a peer's verified group, so its
    third step trains on one (whatever the threads' timing)."""
    return [TinyLearner(drift=d, need_external_at=1) for d in (0.1, 0.2, 0.3)]


def learner_of(node: Node) -> TinyLearner:
    assert isinstance(node.learner, TinyLearner)
    return node.learner


def test_loop_config_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="steps"):
        LoopConfig(steps=-1)
    with pytest.raises(ValueError, match="eval_every"):
        LoopConfig(eval_every=0)


def test_three_nodes_share_rollouts_and_merge(tmp_path: Path) -> None:
    clock = FakeClock()
    bus = Bus()
    nodes = [
        make_node(bus, f"peer{c}", clock, expect_peers=2, metrics=tmp_path / f"{c}.jsonl", learner=learner)
        for c, learner in zip("ABC", sharing_learners(), strict=True)
    ]
    run(run_all(nodes), clock)
    for n in nodes:
        s = n.statistics()
        assert s["step"] == 6
        assert s["merges"] == 2
        assert s["merge_contributors"] == 3
        assert s["external_groups"] > 0  # verified peer groups reached the replay buffer ...
        assert learner_of(n).used_external > 0  # ... and were trained on
        assert s["blob_bytes_served"] > 0
    assert len({n.statistics()["anchor_hash"] for n in nodes}) == 1, "replicas must agree after a merge"
    ws = [learner_of(n).w.detach() for n in nodes]
    assert all(bool((w == ws[0]).all()) for w in ws)  # and sit on the anchor after the final merge
    a = rows(tmp_path / "A.jsonl")
    # one row per step, then the final row once the last round (published at step 6) is merged
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6, 6]
    assert a[-1]["train/final"] == 1.0
    assert a[-1]["bytes_sent"] > 0
    assert a[-1]["bytes_received"] > 0
    assert a[-1]["merges"] == 2
    # Δs after 3 steps: -0.3, -0.6, -0.9 per element; mean distance (0.3 + 0 + 0.3) / 3 × √16
    first = next(r for r in a if r["merges"] == 1)
    assert first["replica_distance_before_merge"] == pytest.approx(0.8, rel=1e-5)


def test_a_dead_peer_is_left_out_and_survivors_agree() -> None:
    clock = FakeClock()
    bus = Bus()
    alive = [make_node(bus, name, clock, steps=3, expect_peers=2) for name in ("peerA", "peerB")]
    dead = make_node(bus, "dead", clock, steps=3, expect_peers=2)
    dead.membership.host.dead = True  # type: ignore[attr-defined]  # publishes, never serves a blob
    run(run_all([*alive, dead]), clock)
    for n in alive:
        s = n.statistics()
        assert (s["merges"], s["merge_contributors"]) == (1, 2)
        assert s["blocked_on_network_s"] <= COLLECT_S  # the deadline bounds the wait (fake time)
    assert alive[0].statistics()["anchor_hash"] == alive[1].statistics()["anchor_hash"]


def test_fast_nodes_keep_training_while_a_round_collects(tmp_path: Path) -> None:
    clock = FakeClock()
    bus = Bus()
    gate = threading.Event()  # the slow node's third step waits until the fast one reached step 6
    slow = TinyLearner(drift=0.1, gate=gate, gate_step=2)
    nodes = [
        make_node(bus, "peerA", clock, steps=8, merge_every=4, expect_peers=2, metrics=tmp_path / "A.jsonl"),
        make_node(bus, "peerB", clock, steps=8, merge_every=4, expect_peers=2),
        make_node(bus, "peerC", clock, steps=8, merge_every=4, expect_peers=2, learner=slow),
    ]
    nodes[0].on_step = lambda row: gate.set() if row["step"] >= 6 else None
    run(run_all(nodes), clock)
    a = rows(tmp_path / "A.jsonl")
    first = next(r for r in a if r["merges"] == 1)
    # peerA published round 1 at step 4 and went on stepping while the slow node caught up ...
    assert first["step"] > 4
    assert first["carried_progress"] > 0  # ... and kept those steps through the outer step
    for n in nodes:
        assert n.statistics()["merges"] == 2
        assert n.statistics()["merge_contributors"] == 3  # nobody was left out
    assert len({n.statistics()["anchor_hash"] for n in nodes}) == 1


def test_a_stopped_node_says_goodbye_and_rounds_stop_waiting_for_it() -> None:
    clock = FakeClock()
    bus = Bus()
    nodes = [make_node(bus, f"peer{c}", clock, expect_peers=2) for c in "ABC"]
    leaver = nodes[2]
    leaver.on_step = lambda row: leaver.stop() if row["step"] == 2 else None
    run(run_all(nodes), clock)
    assert leaver.step == 2
    for n in nodes[:2]:
        s = n.statistics()
        assert s["peers_left"] >= 1  # peerC, and the other one if it finished first
        assert "peerC" not in n.membership.cohort_peers()
        assert (s["merges"], s["merge_contributors"]) == (2, 2)
        # without the notice each round would wait out the collection deadline for peerC
        assert s["blocked_on_network_s"] < 1.0


def test_different_cohorts_share_rollouts_but_never_merge() -> None:
    clock = FakeClock()
    bus = Bus()
    same = [
        make_node(bus, f"peer{c}", clock, expect_peers=2, learner=learner)
        for c, learner in zip("ABC", sharing_learners(), strict=True)
    ]
    other = make_node(bus, "other", clock, drift=0.5, cohort=COHORT_B)
    run(run_all([*same, other]), clock)
    assert other.statistics()["external_groups"] > 0  # rollouts cross cohorts (re-scored on arrival) ...
    for n in same:
        s = n.statistics()
        assert s["external_groups"] > 0
        assert s["merge_contributors"] == 3  # ... pseudo-gradients do not
        assert "other" not in n.membership.cohort_peers()
    assert other.statistics()["merge_contributors"] == 1
    assert len({n.statistics()["anchor_hash"] for n in same}) == 1
    assert other.statistics()["anchor_hash"] != same[0].statistics()["anchor_hash"]


def test_malformed_bytes_on_every_topic_are_dropped_and_counted() -> None:
    clock = FakeClock()
    bus = Bus()
    node = make_node(bus, "peerA", clock, steps=2, merge_every=1)
    eve = FakeHost(bus, "eve")
    presence_t = topics.topic(SWARM, topics.PRESENCE)
    rollouts_t = topics.topic(SWARM, topics.ROLLOUTS)
    rounds_t = topics.cohort_topic(SWARM, topics.ROUNDS, COHORT_A)

    def batch(author: str, *groups: Any) -> bytes:
        (raw,) = encode_batches(author, COHORT_A, 0, [to_rollout_group(g) for g in groups])
        return framing.compress(raw)

    async def attack() -> None:
        await bus.wait_subscribed(presence_t, rollouts_t, rounds_t)
        for topic in (presence_t, rollouts_t, rounds_t):
            await eve.publish(topic, b"\xff\xfe not a record")
        await eve.publish(rollouts_t, batch("peerB", make_group(0)))  # author is not the signer
        await eve.publish(rollouts_t, batch("eve", make_group(1, family="forged"), make_group(2)))
        await eve.publish(presence_t, codec.encode(node.membership.record()))  # peerA's, signed by eve

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(attack())
            tg.create_task(node.run())  # alone: waits join_wait_s for a peer first, hearing eve

    run(main(), clock)
    s = node.statistics()
    assert s["step"] == 2  # nothing a peer sent stopped it
    assert s["presence/dropped"] == 2
    assert s["rollouts/dropped"] == 2
    assert s["diloco/dropped"] == 1
    assert s["rejected_groups"] == 1  # the forged group; its honest neighbour was kept
    assert s["external_groups"] == 1
    assert s["peers"] == 0


def test_a_transport_that_dies_stops_the_node() -> None:
    clock = FakeClock()
    bus = Bus()
    node = make_node(bus, "peerA", clock, steps=0)  # no budget: runs until stopped
    host = node.membership.host
    node.on_step = lambda row: host.close() if row["step"] == 2 else None  # type: ignore[attr-defined]
    with pytest.raises(ExceptionGroup) as info:
        run(node.run(), clock)
    assert info.value.subgroup(TransportClosed) is not None
    assert node.step <= 3  # it did not train on without a network
