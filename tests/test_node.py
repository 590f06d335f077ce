"""Node loop tests with in-process fakes: an in-memory gossip bus instead of libp2p, a learner whose
"weights" are one float, and a merger that does DiLoCo on that float. Real processes are in
test_localswarm.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from swarmnode.node import Node, NodeSettings


@dataclass
class Msg:
    topic: str
    origin: str
    data: bytes


class Bus:
    """In-memory gossip: every subscriber of a topic gets every message, including its own."""

    def __init__(self) -> None:
        self.queues: dict[str, list[asyncio.Queue[Msg]]] = {}
        self.blobs: dict[str, dict[str, bytes]] = {}  # peer -> hash -> data
        self.dead: set[str] = set()
        self.handlers: dict[tuple[str, str], Any] = {}


class FakeHost:
    def __init__(self, bus: Bus, peer_id: str) -> None:
        self.bus = bus
        self.peer_id = peer_id
        bus.blobs[peer_id] = {}

    async def publish(self, topic: str, data: bytes) -> None:
        for q in self.bus.queues.get(topic, []):
            q.put_nowait(Msg(topic, self.peer_id, data))

    async def subscribe(self, topic: str, validator: Any = None) -> AsyncIterator[Msg]:
        q: asyncio.Queue[Msg] = asyncio.Queue()
        self.bus.queues.setdefault(topic, []).append(q)
        while True:
            yield await q.get()

    def provide_blob(self, data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        self.bus.blobs[self.peer_id][h] = data
        return h

    def remove_blob(self, content_hash: str) -> None:
        self.bus.blobs[self.peer_id].pop(content_hash, None)

    async def fetch(self, content_hash: str, providers: list[Any], max_size: int) -> bytes:
        for p in providers:
            if p in self.bus.dead:
                await asyncio.sleep(3600)  # a dead peer never answers
            data = self.bus.blobs[p].get(content_hash)
            if data is not None:
                return data
        raise LookupError(content_hash)

    def connected_peers(self) -> list[str]:
        return [p for p in self.bus.blobs if p != self.peer_id]

    def set_request_handler(self, protocol_id: str, handler: Any) -> None:
        self.bus.handlers[(self.peer_id, protocol_id)] = handler

    async def request(self, peer_id: Any, protocol_id: str, data: bytes) -> bytes:
        result: bytes = await self.bus.handlers[(peer_id, protocol_id)](self.peer_id, data)
        return result


@dataclass
class Rec:
    kind: str
    fields: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None


class JsonWire:
    """Records are plain JSON objects with a kind tag; deltas are {name: float}."""

    def presence(self, **fields: Any) -> Rec:
        return Rec("presence", fields)

    def rollout_batch(self, *, author: str, cohort: str, step: int, groups: list[Any]) -> Rec:
        return Rec("rollouts", {"author": author, "cohort": cohort, "policy_step": step, "groups": groups})

    def encode_rollouts(self, *, author: str, cohort: str, step: int, groups: list[Any]) -> list[bytes]:
        return [self.encode(self.rollout_batch(author=author, cohort=cohort, step=step, groups=groups))]

    def round_manifest(self, **fields: Any) -> Rec:
        return Rec("manifest", fields)

    def state_manifest(self, **fields: Any) -> Rec:
        return Rec("state", fields)

    def encode(self, record: Rec) -> bytes:
        return json.dumps({"kind": record.kind, **record.fields}).encode()

    def decode(self, data: bytes) -> Rec:
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(str(exc)) from exc
        return Rec(obj.pop("kind"), obj)

    def kind(self, record: Rec) -> str:
        return record.kind

    def encode_delta(self, delta: dict[str, float]) -> bytes:
        return struct.pack("<d", delta["w"])

    def decode_delta(self, data: bytes, max_bytes: int) -> dict[str, float]:
        return {"w": struct.unpack("<d", data)[0]}

    def encode_demo(self, *, author: str, cohort: str, step: int, components: Any) -> bytes:
        return self.encode(Rec("demo", {"author": author, "cohort": cohort, "step": step, "c": components}))

    def demo_of(self, record: Rec) -> tuple[int, Any]:
        return record.step, record.c

    def groups_of(self, batch: Rec, local_fingerprint: str) -> tuple[list[Any], int]:
        good = [g for g in batch.groups if g != "forged"]
        return good, len(batch.groups) - len(good)


@dataclass
class FakeLearner:
    """The weight w drifts by a node-specific amount each step, so replicas diverge between merges."""

    drift: float
    fingerprint: str = "cohort-a"
    w: float = 0.0
    external: list[Any] = field(default_factory=list)
    used_external: int = 0

    def collect_local(self, step: int) -> list[Any]:
        return [f"g{step}a", f"g{step}b"]

    opt: Any = None  # the DeMo optimizer the trainer steps, when gossiping components

    delay: float = 0.03  # seconds per inner step

    def train_step(self, local: list[Any], external: list[Any]) -> dict[str, float]:
        time.sleep(self.delay)
        if self.opt is not None:
            self.opt.step()  # a step takes time, so gossip (presence) flows between steps
        self.used_external += len(external)
        self.w += self.drift
        return {"reward": 0.5}

    def evaluate(self) -> float:
        return 0.25

    def add_external(self, groups: list[Any], step: int) -> None:
        self.external.extend(groups)

    def sample_external(self, step: int) -> list[Any]:
        out, self.external = self.external[:2], self.external[2:]
        return out


@dataclass
class FakeMerger:
    learner: FakeLearner
    anchor: float = 0.0

    def pseudo_gradient(self) -> dict[str, float]:
        return {"w": self.anchor - self.learner.w}

    def outer_step(self, avg_delta: dict[str, float], *, published: dict[str, float] | None = None) -> float:
        # steps taken since the round was published are carried over, as DiLoCo.outer_step does
        progress = self.learner.w - (self.anchor - published["w"]) if published is not None else 0.0
        self.anchor -= avg_delta["w"]  # outer lr 1, no momentum: plain averaging
        self.learner.w = self.anchor + progress
        return abs(progress)

    def anchor_hash(self) -> str:
        return hashlib.sha256(struct.pack("<d", self.anchor)).hexdigest()[:16]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"w": ()}

    def state_blob(self) -> bytes:
        return struct.pack("<d", self.anchor)

    def load_state_blob(self, blob: bytes) -> None:
        (self.anchor,) = struct.unpack("<d", blob)
        self.learner.w = self.anchor


def mean(contribs: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    total = sum(w for _, w in contribs)
    return {"w": sum(d["w"] * w for d, w in contribs) / total}


def make_node(bus: Bus, name: str, drift: float, tmp: Path | None = None, **kw: Any) -> Node:
    learner = FakeLearner(drift=drift, fingerprint=kw.pop("cohort", "cohort-a"))
    settings = NodeSettings(
        presence_interval_s=0.02,
        collect_seconds=kw.pop("collect_seconds", 1.0),
        join_wait_s=kw.pop("join_wait_s", 0.3),
        metrics_path=(tmp / f"{name}.jsonl") if tmp else None,
        **kw,
    )
    return Node(
        settings=settings,
        host=FakeHost(bus, name),
        learner=learner,
        wire=JsonWire(),
        merger=FakeMerger(learner),
        aggregate=mean,
    )


async def _run_all(nodes: list[Node]) -> None:
    async with asyncio.TaskGroup() as tg:
        for n in nodes:
            tg.create_task(n.run())


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match="merge_every"):
        NodeSettings(merge_every=-1)
    with pytest.raises(ValueError, match="swarm"):
        NodeSettings(swarm="a/b")


def test_three_nodes_share_and_merge(tmp_path: Path) -> None:
    bus = Bus()
    nodes = [
        make_node(bus, f"n{i}", drift=0.1 * (i + 1), tmp=tmp_path, steps=6, merge_every=3) for i in range(3)
    ]

    asyncio.run(_run_all(nodes))
    for n in nodes:
        assert n.stats.step == 6
        assert n.stats.external_groups > 0
        assert n.learner.used_external > 0  # type: ignore[attr-defined]
        assert n.stats.merges == 2
    hashes = {n.merger.anchor_hash() for n in nodes}  # type: ignore[union-attr]
    assert len(hashes) == 1, "replicas must agree on the anchor after a merge"
    # After a full-participation merge every replica sits exactly at the mean.
    ws = [n.learner.w for n in nodes]  # type: ignore[attr-defined]
    assert max(ws) - min(ws) < 1e-12
    rows = [json.loads(line) for line in (tmp_path / "n0.jsonl").read_text().splitlines()]
    # one row per step, then the final row once the last round (published at step 6) is merged
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]
    assert rows[-1]["train/final"] == 1.0
    assert rows[-1]["bytes_sent"] > 0
    # drifts 0.1, 0.2, 0.3 over 3 steps: Δs -0.3, -0.6, -0.9, mean distance (0.3 + 0 + 0.3) / 3
    first = next(r for r in rows if r["merges"] == 1)
    assert first["replica_distance_before_merge"] == pytest.approx(0.2)
    assert rows[-1]["merges"] == 2


def test_dead_peer_does_not_stall_beyond_deadline() -> None:
    bus = Bus()
    alive = [
        make_node(bus, f"n{i}", drift=0.1, steps=3, merge_every=3, collect_seconds=0.5) for i in range(2)
    ]
    dead = make_node(bus, "dead", drift=0.1, steps=3, merge_every=3)
    bus.dead.add("dead")

    # The dead node publishes its manifest but never serves its blob.
    t0 = asyncio.run(_timed(_run_all([*alive, dead])))
    assert t0 < 2.5
    for n in alive:
        assert n.stats.merges == 1
        assert n.stats.blocked_on_network_s <= 0.5 + 0.2
    assert alive[0].merger.anchor_hash() == alive[1].merger.anchor_hash()  # type: ignore[union-attr]


def test_fast_nodes_keep_training_while_a_round_collects(tmp_path: Path) -> None:
    bus = Bus()
    nodes = [
        make_node(bus, f"n{i}", drift=0.1, tmp=tmp_path, steps=8, merge_every=4, collect_seconds=3.0)
        for i in range(3)
    ]
    nodes[2].learner.delay = 0.12  # type: ignore[attr-defined]  # four times slower than the others
    asyncio.run(_run_all(nodes))
    rows = [json.loads(line) for line in (tmp_path / "n0.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["merges"] == 1)
    # n0 published round 1 at step 4 and went on stepping while the slow node caught up ...
    assert first["step"] > 4
    assert first["carried_progress"] > 0  # ... and kept those steps through the outer step
    for n in nodes:
        assert n.stats.merges == 2
        assert n.stats.merge_contributors == 3  # nobody was left out: all arrived before the deadline
    assert len({n.merger.anchor_hash() for n in nodes}) == 1  # type: ignore[union-attr]


def test_a_stopped_node_says_goodbye_and_rounds_stop_waiting_for_it() -> None:
    bus = Bus()
    nodes = [
        make_node(bus, f"n{i}", drift=0.1, steps=6, merge_every=3, collect_seconds=5.0) for i in range(3)
    ]
    leaver = nodes[2]
    leaver.on_step = lambda row: leaver.stop() if row["step"] == 2 else None
    elapsed = asyncio.run(_timed(_run_all(nodes)))
    assert leaver.stats.step == 2
    for n in nodes[:2]:
        assert n.stats.peers_left >= 1  # n2, and the other one if it finished first
        assert "n2" not in n.cohort_peers()
        assert n.stats.merges == 2
        assert n.stats.merge_contributors == 2
    # without the notice each round would wait out the 5 s collection deadline for n2
    assert elapsed < 4.0


def test_wall_clock_rounds_weight_faster_nodes_by_their_samples(tmp_path: Path) -> None:
    bus = Bus()
    seen: dict[str, list[list[float]]] = {}

    def capture(name: str) -> Any:
        def agg(contribs: list[tuple[dict[str, float], float]]) -> dict[str, float]:
            seen.setdefault(name, []).append(sorted(w for _, w in contribs))
            return mean(contribs)

        return agg

    nodes = []
    for i, delay in enumerate([0.01, 0.01, 0.05]):
        n = make_node(
            bus, f"n{i}", drift=0.1, tmp=tmp_path, duration_s=3.0, round_seconds=0.5, collect_seconds=0.4
        )
        n.learner.delay = delay  # type: ignore[attr-defined]
        n.aggregate = capture(f"n{i}")
        nodes.append(n)
    asyncio.run(_run_all(nodes))
    full = [w for w in seen["n0"] if len(w) == 3]
    # the first round a node publishes is partial (it started mid-round): judge the ones after it
    assert len(full) >= 2, seen
    for slow, fast1, fast2 in full[1:]:
        assert fast1 > 2 * slow  # weights are samples trained on in the round
        assert fast2 > 2 * slow
    for n in nodes[:2]:
        assert n.stats.step > 2 * nodes[2].stats.step
        assert n.stats.blocked_on_network_s < 0.5  # at most the final drain; rounds never wait
    by_round: dict[int, set[str]] = {}
    for i in range(3):
        prev = 0
        for r in map(json.loads, (tmp_path / f"n{i}.jsonl").read_text().splitlines()):
            if r["merges"] > prev:
                by_round.setdefault(r["round"], set()).add(r["anchor_hash"])
            prev = r["merges"]
    # rounds every node merged with the same contributions land on one anchor everywhere
    assert sum(len(h) == 1 for h in by_round.values()) >= 2, by_round


def test_different_models_share_rollouts_but_merge_only_within_their_cohort() -> None:
    bus = Bus()
    same = [make_node(bus, f"a{i}", drift=0.1 * (i + 1), steps=6, merge_every=3) for i in range(3)]
    other = make_node(bus, "b0", drift=0.5, steps=6, merge_every=3, cohort="cohort-b")
    asyncio.run(_run_all([*same, other]))
    assert other.stats.external_groups > 0  # rollouts cross cohorts (re-scored by the receiver) ...
    assert all(n.stats.external_groups > 0 for n in same)
    for n in same:
        assert n.stats.merge_contributors == 3  # ... pseudo-gradients do not
        assert "b0" not in n.cohort_peers()
    assert other.stats.merge_contributors == 1
    assert len({n.merger.anchor_hash() for n in same}) == 1  # type: ignore[union-attr]
    assert other.merger.anchor_hash() != same[0].merger.anchor_hash()  # type: ignore[union-attr]


async def _timed(coro: Any) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await coro
    return loop.time() - t0


def test_bad_bytes_are_dropped_and_counted() -> None:
    bus = Bus()
    node = make_node(bus, "n0", drift=0.1, steps=2)
    evil = FakeHost(bus, "evil")

    async def go() -> None:
        async def attack() -> None:
            await asyncio.sleep(0.01)
            await evil.publish(node.topic_rollouts, b"\xff not json")
            batch = JsonWire().rollout_batch(author="evil", cohort="x", step=0, groups=["forged", "ok"])
            await evil.publish(node.topic_rollouts, JsonWire().encode(batch))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(attack())
            tg.create_task(node.run())

    asyncio.run(go())
    assert node.stats.dropped_messages >= 1
    assert node.stats.rejected_groups == 1


def test_late_joiner_catches_up_and_merges() -> None:
    bus = Bus()
    early = [make_node(bus, f"n{i}", drift=0.1 * (i + 1), steps=12, merge_every=3) for i in range(2)]
    joiner = make_node(bus, "late", drift=0.05, steps=12, merge_every=3, join_wait_s=1.0)

    async def go() -> None:
        async with asyncio.TaskGroup() as tg:
            for n in early:
                tg.create_task(n.run())
            while min(n.stats.round for n in early) < 2:  # noqa: ASYNC110 - polling a fake, bounded by steps
                await asyncio.sleep(0.01)
            tg.create_task(joiner.run())

    asyncio.run(go())
    assert joiner.stats.catchups == 1
    assert joiner.stats.merges >= 1  # took part in a round after loading the state
    assert joiner.stats.step == 12
    hashes = {n.merger.anchor_hash() for n in [*early, joiner]}  # type: ignore[union-attr]
    assert len(hashes) == 1


class FakeDemo:
    def __init__(self, value: float) -> None:
        self.value = value
        self.applied: list[list[Any]] = []

    def compute_components(self) -> dict[str, float]:
        return {"w": self.value}

    def apply_components(self, peers: list[Any]) -> None:
        self.applied.append(peers)


def test_demo_components_are_gossiped_and_applied() -> None:
    from swarmnode.gossip import DemoExchange

    bus = Bus()
    nodes = []
    for i in range(3):
        learner = FakeLearner(drift=0.1)
        demo = DemoExchange(FakeDemo(float(i)), publish=lambda s, c: None, window_s=0.05)
        learner.opt = demo
        nodes.append(
            Node(
                settings=NodeSettings(steps=6, presence_interval_s=0.02),
                host=FakeHost(bus, f"n{i}"),
                learner=learner,
                wire=JsonWire(),
                demo=demo,
            )
        )
    asyncio.run(_run_all(nodes))
    for i, n in enumerate(nodes):
        assert n.demo.used > 0
        seen = {c["w"] for peers in n.demo.demo.applied for c in peers}
        assert seen
        assert float(i) not in seen
        assert n.blocked_on_network_s() < 6 * 0.05 + 0.1
