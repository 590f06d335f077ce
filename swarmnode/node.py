"""The swarm node: one asyncio task group owning every long-lived task of one participant.

The node glues together components it is handed (p2p host, learner, optional DiLoCo outer optimizer,
wire codec); it does no tensor maths of its own. Heavy torch work runs in ``asyncio.to_thread`` so
gossip keeps flowing while the node computes. Every wait on the network is bounded by a deadline and
added to ``blocked_on_network_s`` so the cost of collaboration is visible in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from swarmnode.catchup import STATE_PROTOCOL
from swarmnode.merge import MergeRounds
from swarmnode.replay import is_informative

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class NodeSettings:
    """What the node loop needs to know; the daemon maps ``NodeConfig`` onto this."""

    swarm: str = "default"
    steps: int = 0  # 0: run until stopped
    duration_s: float = 0.0  # 0: no wall-clock limit
    eval_every: int = 5
    share_rollouts: bool = True
    merge_every: int = 0  # H inner steps per DiLoCo round; 0: no step-based rounds
    round_seconds: float = 0.0  # > 0: wall-clock DiLoCo rounds of this length instead (merge_every unused)
    collect_seconds: float = 5.0  # how long a round waits for peers' pseudo-gradients at most
    presence_interval_s: float = 2.0
    peer_timeout_s: float = 15.0  # a peer not heard from for this long is no longer expected
    max_blob_bytes: int = 256 * 1024 * 1024
    # A fresh node listens this long for a cohort peer's presence so a late joiner can load the
    # current state before its first step instead of training a stale replica.
    join_wait_s: float = 3.0
    expect_peers: int = 1  # cohort peers to hear before the first step (bounded by join_wait_s)
    metrics_path: Path | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9-]{1,64}", self.swarm):
            raise ValueError(f"swarm must be 1-64 characters from a-z, 0-9 and '-', got {self.swarm!r}")
        for name in ("steps", "eval_every", "merge_every", "expect_peers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "duration_s",
            "collect_seconds",
            "join_wait_s",
            "presence_interval_s",
            "peer_timeout_s",
            "round_seconds",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_every == 0:
            raise ValueError("eval_every must be >= 1")
        if self.round_seconds and not 0 < self.collect_seconds <= self.round_seconds:
            raise ValueError(
                f"collect_seconds must be in (0, round_seconds={self.round_seconds}], got {self.collect_seconds}"
            )

    @property
    def merges(self) -> bool:
        return bool(self.merge_every or self.round_seconds)


class Host(Protocol):
    """The part of ``swarmnode.p2p.Host`` the node uses."""

    peer_id: Any

    async def publish(self, topic: str, data: bytes) -> None: ...
    def subscribe(self, topic: str) -> AsyncIterator[Any]: ...
    def set_request_handler(
        self, protocol_id: str, handler: Callable[[str, bytes], Awaitable[bytes]]
    ) -> None: ...
    async def request(self, peer_id: str, protocol_id: str, data: bytes) -> bytes: ...
    def provide_blob(self, data: bytes) -> str: ...
    def remove_blob(self, content_hash: str) -> None: ...
    async def fetch(self, content_hash: str, providers: list[str], *, max_size: int) -> bytes: ...
    def connected_peers(self) -> list[str]: ...


class Learner(Protocol):
    """Local RL: the trainer plus the policy weights it updates (adapters live in ``daemon``)."""

    fingerprint: str

    def collect_local(self, step: int) -> list[Any]: ...
    def train_step(self, local: list[Any], external: list[Any]) -> dict[str, float]: ...
    def evaluate(self) -> float: ...
    def add_external(self, groups: list[Any], step: int) -> None: ...
    def sample_external(self, step: int) -> list[Any]: ...


class Merger(Protocol):
    """DiLoCo outer optimiser plus weight push; see ``swarmnode.optim.diloco``."""

    def pseudo_gradient(self) -> dict[str, Any]: ...
    def outer_step(self, avg_delta: dict[str, Any], *, published: dict[str, Any] | None = None) -> Any:
        """Returns ‖progress carried over‖ (steps taken since ``published`` was computed) or None."""

    def anchor_hash(self) -> str: ...
    def shapes(self) -> dict[str, tuple[int, ...]]: ...
    def state_blob(self) -> bytes: ...
    def load_state_blob(self, blob: bytes) -> None: ...


class Wire(Protocol):
    """Record construction + codec; ``gossip.ProtocolWire`` is the real one."""

    def presence(self, **fields: Any) -> Any: ...
    def encode_rollouts(self, *, author: str, cohort: str, step: int, groups: list[Any]) -> list[bytes]: ...
    def round_manifest(self, **fields: Any) -> Any: ...
    def state_manifest(self, **fields: Any) -> Any: ...
    def encode(self, record: Any) -> bytes: ...
    def decode(self, data: bytes) -> Any: ...
    def kind(self, record: Any) -> str: ...
    def encode_demo(self, *, author: str, cohort: str, step: int, components: Any) -> bytes: ...
    def demo_of(self, record: Any) -> tuple[int, Any]: ...
    def encode_delta(self, delta: dict[str, Any]) -> bytes: ...
    def decode_delta(self, data: bytes, max_bytes: int) -> dict[str, Any]: ...
    def groups_of(self, batch: Any, local_fingerprint: str) -> tuple[list[Any], int]: ...


@dataclass(slots=True)
class NodeStats:
    step: int = 0
    round: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    blocked_on_network_s: float = 0.0
    external_groups: int = 0
    rejected_groups: int = 0
    merges: int = 0
    catchups: int = 0
    heals: int = 0  # anchor re-synced from the majority after a divergent merge
    merge_contributors: int = 0
    last_reward: float = float("nan")
    last_eval: float = float("nan")
    dropped_messages: int = 0
    peers_left: int = 0  # leave notices heard
    # mean ‖θ_i − θ̄‖ over this round's contributors just before the merge: with a shared anchor,
    # θ_i = anchor − Δ_i, so the spread of the Δs is exactly the spread of the replicas.
    replica_distance: float = float("nan")
    # ‖θ − θ_published‖ carried over the last merge: the inner steps taken while the round collected.
    carried_progress: float = float("nan")


class Node:
    """One swarm participant. ``await node.run()`` returns when the step/time budget is spent or
    ``stop()`` is called; cancelling the task group is the shutdown."""

    def __init__(
        self,
        *,
        settings: NodeSettings,
        host: Host,
        learner: Learner,
        wire: Wire,
        merger: Merger | None = None,
        demo: Any = None,
        aggregate: Callable[[list[tuple[dict[str, Any], float]]], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.learner = learner
        self.wire = wire
        self.merger = merger
        # gossip.DemoExchange wrapping the DeMo optimizer the trainer steps, or None (no DeMo gossip).
        self.demo = demo
        self._demo_out: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=4)
        if demo is not None:
            demo.publish = self._publish_demo_threadsafe
        self.clock = clock
        self.wall_clock = wall_clock  # names wall-clock rounds; everything else uses ``clock``
        self.aggregate = aggregate
        self.on_step = on_step
        self.stats = NodeStats()
        self.me = str(host.peer_id)
        self.cohort = learner.fingerprint
        self.peers: dict[str, tuple[float, Any]] = {}  # peer id -> (last heard, presence)
        self._cohort_members: dict[str, float] = {}  # peer id -> last heard on the cohort topic
        self._stop = asyncio.Event()
        self._cohort_seen = asyncio.Event()
        self.rounds = MergeRounds(self) if merger is not None else None
        if self.rounds is not None:
            host.set_request_handler(STATE_PROTOCOL, self.rounds.state_server.handle)
        self._metrics_file: Any = None
        swarm = settings.swarm
        self.topic_presence = f"/swarmnode/{swarm}/presence/1"
        self.topic_rollouts = f"/swarmnode/{swarm}/rollouts/1"
        # The cohort topic carries the model fingerprint: different models share rollouts, never merge.
        self.topic_rounds = f"/swarmnode/{swarm}/rounds/{self.cohort}/1"
        self.topic_demo = f"/swarmnode/{swarm}/demo/{self.cohort}/1"

    # -- lifecycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> NodeStats:
        self._loop = asyncio.get_running_loop()
        if self.settings.metrics_path is not None:
            self.settings.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self._metrics_file = self.settings.metrics_path.open("a", encoding="utf-8")
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(self._presence_loop()),
                    tg.create_task(self._receive_loop(self.topic_presence)),
                    tg.create_task(self._receive_loop(self.topic_rollouts)),
                    tg.create_task(self._receive_loop(self.topic_rounds)),
                    tg.create_task(self._receive_loop(self.topic_demo)),
                    tg.create_task(self._demo_publisher()),
                ]
                await self._train_loop()
                if self.rounds is not None and not self._stop.is_set():
                    await self._linger(self.settings.collect_seconds)
                background[0].cancel()  # no "active" heartbeat may follow the leave notice
                await self._say_goodbye()
                for task in background:
                    task.cancel()
        finally:
            if self._metrics_file is not None:
                self._metrics_file.close()
        return self.stats

    def live_peers(self) -> list[str]:
        now = self.clock()
        return [p for p, (t, _) in self.peers.items() if now - t <= self.settings.peer_timeout_s]

    def cohort_peers(self) -> list[str]:
        now = self.clock()
        timeout = self.settings.peer_timeout_s
        members = {p for p, t in self._cohort_members.items() if now - t <= timeout}
        for p, (t, presence) in self.peers.items():
            if now - t <= timeout and getattr(presence, "cohort", None) == self.cohort:
                members.add(p)
        return sorted(members)

    def _blob_bytes_served(self) -> int:
        stats = getattr(self.host, "statistics", None)
        if stats is None:
            return 0
        return int(stats().get("blobs", {}).get("served_bytes", 0))

    def blocked_on_network_s(self) -> float:
        return self.stats.blocked_on_network_s + (self.demo.blocked_s if self.demo is not None else 0.0)

    def _publish_demo_threadsafe(self, step: int, components: Any) -> None:
        # Called from the trainer's worker thread inside the optimizer step; never blocks it.
        def put() -> None:
            if self._demo_out.full():
                self._demo_out.get_nowait()  # a newer step supersedes an unsent older one
                self.stats.dropped_messages += 1
            self._demo_out.put_nowait((step, components))

        self._loop.call_soon_threadsafe(put)

    async def _demo_publisher(self) -> None:
        while True:
            step, components = await self._demo_out.get()
            try:
                data = await asyncio.to_thread(
                    self.wire.encode_demo,
                    author=self.me,
                    cohort=self.cohort,
                    step=step,
                    components=components,
                )
                await self.host.publish(self.topic_demo, data)
                self.stats.bytes_sent += len(data)
            except Exception as exc:  # e.g. over the gossip limit: that step's components stay local
                log.warning("DeMo components for step %d not sent: %s", step, exc)

    # -- background tasks ------------------------------------------------------------------------

    async def publish_record(self, topic: str, record: Any) -> None:
        data = self.wire.encode(record)
        await self.host.publish(topic, data)
        self.stats.bytes_sent += len(data)

    def _presence(self, status: str = "active") -> Any:
        return self.wire.presence(
            peer_id=self.me,
            cohort=self.cohort,
            step=self.stats.step,
            round=self.stats.round,
            anchor_hash=self.merger.anchor_hash() if self.merger is not None else "",
            status=status,
        )

    async def _linger(self, limit_s: float) -> None:
        """Budget spent: keep serving our last pseudo-gradient until every cohort peer has merged our
        final round or left (or ``limit_s`` passed), so nobody merges that round without us."""
        end = self.clock() + limit_s
        while self.clock() < end and any(  # noqa: ASYNC110 - polls presence, bounded by limit_s
            int(getattr(self.peers[p][1], "round", 0)) < self.stats.round
            for p in self.cohort_peers()
            if p in self.peers
        ):
            await asyncio.sleep(0.05)

    async def _say_goodbye(self) -> None:
        """Stopped or budget spent: tell peers, so no round waits for a contribution we won't send."""
        try:
            await asyncio.wait_for(self.publish_record(self.topic_presence, self._presence("leaving")), 1.0)
        except Exception as exc:  # leaving anyway; peers fall back to the peer timeout
            log.info("leave notice not sent: %s", exc)

    async def _presence_loop(self) -> None:
        while True:
            record = self._presence()
            try:
                await self.publish_record(self.topic_presence, record)
            except Exception as exc:  # a failed heartbeat is retried on the next tick
                log.warning("presence publish failed: %s", exc)
            await asyncio.sleep(self.settings.presence_interval_s)

    async def _receive_loop(self, topic: str) -> None:
        async for message in self.host.subscribe(topic):
            origin = str(message.origin)
            if origin == self.me:  # own messages come back on our own subscription
                continue
            self.stats.bytes_received += len(message.data)
            try:
                record = self.wire.decode(message.data)
                self._handle(origin, record)
            except ValueError as exc:  # ProtocolError is a ValueError: bad bytes from a peer
                self.stats.dropped_messages += 1
                log.info("dropped message from %s on %s: %s", origin, topic, exc)
            except Exception:  # nothing a peer sends may take the node down
                self.stats.dropped_messages += 1
                log.exception("error handling a message from %s on %s", origin, topic)

    def _handle(self, origin: str, record: Any) -> None:
        kind = self.wire.kind(record)
        now = self.clock()
        if kind == "presence":
            if getattr(record, "status", "active") == "leaving":
                # Gone now: rounds in collection stop waiting for it (no peer timeout to sit out).
                self.peers.pop(origin, None)
                self._cohort_members.pop(origin, None)
                self.stats.peers_left += 1
                return
            self.peers[origin] = (now, record)
            if len(self.cohort_peers()) >= self.settings.expect_peers:
                self._cohort_seen.set()
        elif kind == "rollouts":
            if not self.settings.share_rollouts:
                return
            groups, rejected = self.wire.groups_of(record, self.cohort)
            self.stats.rejected_groups += rejected
            if groups:
                self.learner.add_external(groups, self.stats.step)
                self.stats.external_groups += len(groups)
        elif kind == "demo":
            if self.demo is None or getattr(record, "cohort", self.cohort) != self.cohort:
                return
            step, components = self.wire.demo_of(record)
            self.demo.receive(origin, step, components)
        elif kind == "manifest":
            if self.rounds is None:
                return
            if not self.rounds.on_manifest(origin, record):
                self.stats.dropped_messages += 1
                return
            self._cohort_members[origin] = now

    # -- the training loop -----------------------------------------------------------------------

    async def _train_loop(self) -> None:
        s = self.settings
        start = self.clock()
        rounds = self.rounds if s.merges else None
        if self.rounds is not None:
            self.rounds.refresh_snapshot()
        if rounds is not None and s.join_wait_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cohort_seen.wait(), s.join_wait_s)
        try:
            while not self._stop.is_set():
                if rounds is not None:
                    await rounds.maybe_catch_up()
                step = self.stats.step
                if s.steps and step >= s.steps:
                    break
                if s.duration_s and self.clock() - start >= s.duration_s:
                    break
                t0 = self.clock()
                metrics = await self._inner_step(step)
                step = self.stats.step
                if rounds is not None:
                    await rounds.at_step_boundary(step)
                if step % s.eval_every == 0 or (s.steps and step == s.steps):
                    self.stats.last_eval = await asyncio.to_thread(self.learner.evaluate)
                self._record(metrics, step_seconds=self.clock() - t0, elapsed=self.clock() - start)
            if rounds is not None and not self._stop.is_set():
                # Budget spent: merge the round in flight so every replica ends on the same anchor.
                await rounds.drain()
                self._record({"final": 1.0}, step_seconds=0.0, elapsed=self.clock() - start)
        finally:
            if rounds is not None:
                rounds.cancel()

    async def _inner_step(self, step: int) -> dict[str, float]:
        s = self.settings
        local = await asyncio.to_thread(self.learner.collect_local, step)
        # Groups whose completions all scored the same teach no one anything (zero advantage): not sent.
        shared = [g for g in local if is_informative(g)] if s.share_rollouts else []
        if shared:
            # Batched: one message per step (split only if it would pass the gossip limit).
            for data in self.wire.encode_rollouts(
                author=self.me, cohort=self.cohort, step=step, groups=shared
            ):
                await self.host.publish(self.topic_rollouts, data)
                self.stats.bytes_sent += len(data)
        external = self.learner.sample_external(step) if s.share_rollouts else []
        metrics = await asyncio.to_thread(self.learner.train_step, local, external)
        self.stats.step = step + 1
        if self.rounds is not None:
            self.rounds.samples_since_publish += len(local) + len(external)
        self.stats.last_reward = float(metrics.get("reward", float("nan")))
        return metrics

    def _record(self, metrics: dict[str, float], *, step_seconds: float, elapsed: float) -> None:
        st = self.stats
        row: dict[str, Any] = {
            "step": st.step,
            "time": time.time(),
            "elapsed_s": round(elapsed, 3),
            "step_s": round(step_seconds, 3),
            "reward": st.last_reward,
            "eval_acc": st.last_eval,
            "bytes_sent": st.bytes_sent,
            "bytes_received": st.bytes_received,
            # pseudo-gradient and state blobs our peers pulled from us (served by the p2p host)
            "blob_bytes_served": self._blob_bytes_served(),
            "blocked_on_network_s": round(self.blocked_on_network_s(), 4),
            "demo_peers_used": self.demo.used if self.demo is not None else 0,
            "round": st.round,
            "anchor_hash": self.merger.anchor_hash() if self.merger is not None else "",
            "peers": len(self.live_peers()),
            "external_groups": st.external_groups,
            "rejected_groups": st.rejected_groups,
            "merges": st.merges,
            "merge_contributors": st.merge_contributors,
            "heals": st.heals,
            "replica_distance_before_merge": st.replica_distance,
            "carried_progress": st.carried_progress,
            "catchups": st.catchups,
        }
        for key, value in metrics.items():
            row.setdefault(f"train/{key}", value)
        if self._metrics_file is not None:
            # NaN is not JSON; null keeps the file parseable by strict readers.
            clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            self._metrics_file.write(json.dumps(clean) + "\n")
            self._metrics_file.flush()
        if self.on_step is not None:
            self.on_step(row)
