"""DiLoCo rounds for one node, overlapped with training.

At the end of round r (every H inner steps, or every ``round_seconds`` of wall time) the node computes its pseudo-gradient Δ = anchor − θ,
serves it as a blob, publishes a manifest, and **keeps training**. A background task gathers peers'
manifests until every live cohort peer has published or the collection deadline passes, then pulls
their blobs (bounded by the same deadline). At the next step boundary after that task finishes the
outer step is applied: every replica lands on the same new anchor, and the inner steps this node took
while collecting are carried over on top of it (θ ← anchor' + (θ − θ_published)) so nothing learned
during the wait is thrown away. The trainer only ever waits when round r+1 ends before round r's
collection did, which is the time counted as blocked on the network.

Also here: joiner catch-up and majority re-sync (``maybe_catch_up``), and the snapshot a node serves
to joiners. ``Node`` owns the gossip and calls ``on_manifest`` for each round manifest it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarmnode.catchup import CatchupError, Snapshot, StateServer, choose_source, fetch_state
from swarmnode.rounds import RoundClock

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

Contribution = tuple[dict[str, Any], float]


@dataclass(slots=True)
class _Inbox:
    manifests: dict[str, Any] = field(default_factory=dict)  # author -> manifest
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Pending:
    """A published round whose collection runs in the background."""

    round: int
    task: asyncio.Task[dict[str, Contribution]]
    # None for a round we only observe (a joiner merging the round in flight when it loaded state)
    published: dict[str, Any] | None = None  # our exact Δ at publish time (θ_published = anchor − Δ)
    own: dict[str, Any] | None = None  # our Δ as peers will decode it (int8): what enters the average
    weight: float = 0.0
    content_hash: str = ""


class MergeRounds:
    def __init__(self, node: Node) -> None:
        assert node.merger is not None
        self.node = node
        self.merger = node.merger
        self.settings = node.settings
        self.stats = node.stats
        self.state_server = StateServer(node.host, node.wire, node.cohort)
        self._inboxes: dict[int, _Inbox] = {}
        self._pending: _Pending | None = None
        self._served_blob = ""
        self.samples_since_publish = 0
        # Wall-clock rounds (``round_seconds`` > 0): every node ends round r at the same time whatever
        # its speed, so a faster node contributes more inner steps (weighted by samples) and nobody
        # waits for a slower one. Otherwise round r ends after H = ``merge_every`` inner steps.
        self.clock_rounds: RoundClock | None = None
        self._open_round: int | None = None
        if node.settings.round_seconds > 0:
            self.clock_rounds = RoundClock.for_swarm(
                node.settings.swarm,
                round_seconds=node.settings.round_seconds,
                collect_seconds=node.settings.collect_seconds,
                clock=node.wall_clock,
            )

    # -- gossip in -------------------------------------------------------------------------------

    def on_manifest(self, origin: str, record: Any) -> bool:
        """Store a peer's round manifest; False when it is not for us (wrong cohort, forged author)."""
        if getattr(record, "cohort", self.node.cohort) != self.node.cohort or str(record.author) != origin:
            return False
        rnd = int(record.round)
        if rnd <= self.stats.round:  # too late: that round is merged already
            return True
        inbox = self._inboxes.setdefault(rnd, _Inbox())
        inbox.manifests[origin] = record
        inbox.arrived.set()
        return True

    # -- the round -------------------------------------------------------------------------------

    def _due(self, step: int) -> tuple[int, float] | None:
        """(round to publish, its collection deadline on ``node.clock``) if a round ended at this step."""
        if self.clock_rounds is None:
            H = self.settings.merge_every
            if H and step % H == 0:
                return step // H, self.node.clock() + self.settings.collect_seconds
            return None
        now = self.clock_rounds.current()
        if self._open_round is None:  # first step: we joined mid-round, take part from the next one
            self._open_round = now
            return None
        if now <= self._open_round:
            return None
        # Every node names the round by the wall clock, so ids agree without a coordinator; a step
        # longer than a round skips ids rather than publishing a stale one.
        rnd, self._open_round = now - 1, now
        wall_left = (
            self.clock_rounds.round_end(rnd) + self.settings.collect_seconds - self.clock_rounds.clock()
        )
        return rnd, self.node.clock() + max(0.0, wall_left)

    async def at_step_boundary(self, step: int) -> None:
        """Called between inner steps: apply a finished collection; start the next round when due."""
        pending = self._pending
        if pending is not None and pending.task.done():
            await self._apply(pending)
        due = self._due(step)
        if due is None or due[0] <= self.stats.round:
            return  # not a round's end, or merged already (a joiner loaded state past it)
        pending = self._pending
        if pending is not None and pending.own is None and due[0] <= pending.round:
            return  # we observe this round: the cohort published it before we joined
        # Round r+1 ended before round r's collection did: wait for it (bounded by its deadline).
        await self.drain()
        await self._publish(*due)

    async def drain(self) -> None:
        """Finish the round in flight (bounded by its deadline) and apply it; the wait is counted as
        blocked on the network."""
        pending = self._pending
        if pending is None:
            return
        t0 = self.node.clock()
        with contextlib.suppress(Exception):
            await asyncio.shield(pending.task)
        self.stats.blocked_on_network_s += self.node.clock() - t0
        await self._apply(pending)

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.task.cancel()
            self._pending = None

    async def _publish(self, rnd: int, deadline: float) -> None:
        node = self.node
        delta = await asyncio.to_thread(self.merger.pseudo_gradient)
        blob = await asyncio.to_thread(node.wire.encode_delta, delta)
        own = await asyncio.to_thread(node.wire.decode_delta, blob, self.settings.max_blob_bytes)
        content_hash = node.host.provide_blob(blob)
        # Averaging weight: groups trained on since the last publish (DiLoCo weights by samples).
        weight = float(max(1, self.samples_since_publish))
        self.samples_since_publish = 0
        manifest = node.wire.round_manifest(
            round=rnd,
            author=node.me,
            cohort=node.cohort,
            weight=weight,
            content_hash=content_hash,
            size=len(blob),
            codec="int8",
            anchor_hash=self.merger.anchor_hash(),
        )
        await node.publish_record(node.topic_rounds, manifest)
        task = asyncio.create_task(self._collect(rnd, deadline))
        self._pending = _Pending(rnd, task, delta, own, weight, content_hash)

    async def _collect(self, rnd: int, deadline: float) -> dict[str, Contribution]:
        """Peers' (Δ, weight) for round ``rnd``.

        Manifests count until every live cohort peer has published or the deadline passes. Each blob
        is pulled as soon as its manifest arrives, so waiting for a peer that never publishes does not
        eat the time to fetch the ones that did; every pull is bounded by the same deadline.
        """
        node = self.node
        inbox = self._inboxes.setdefault(rnd, _Inbox())
        fetches: dict[str, asyncio.Task[Contribution]] = {}
        try:
            while True:
                for author, manifest in inbox.manifests.items():
                    if author not in fetches:
                        fetches[author] = asyncio.create_task(self._fetch_one(manifest))
                expected = set(node.cohort_peers())
                if expected <= set(inbox.manifests):
                    break
                remaining = deadline - node.clock()
                if remaining <= 0:
                    break
                inbox.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(inbox.arrived.wait(), timeout=min(remaining, 0.25))
            if not fetches:
                return {}
            await asyncio.wait(fetches.values(), timeout=max(0.0, deadline - node.clock()))
        finally:
            for task in fetches.values():  # a slow or dead peer is left out of this round
                task.cancel()
        out: dict[str, Contribution] = {}
        for author, task in fetches.items():
            if not task.done() or task.cancelled():
                continue
            if task.exception() is not None:
                log.info("pseudo-gradient fetch from %s failed: %s", author, task.exception())
                continue
            out[author] = task.result()
        return out

    async def _fetch_one(self, m: Any) -> Contribution:
        node = self.node
        limit = self.settings.max_blob_bytes
        data = await node.host.fetch(m.content_hash, [m.author], max_size=min(int(m.size), limit))
        self.stats.bytes_received += len(data)
        delta = await asyncio.to_thread(node.wire.decode_delta, data, limit)
        return delta, float(m.weight)

    async def _apply(self, pending: _Pending) -> None:
        self._pending = None
        try:
            fetched = pending.task.result()
        except Exception as exc:  # collection itself failed: merge what we have (our own Δ)
            log.warning("round %d collection failed: %s", pending.round, exc)
            fetched = {}
        contributions: dict[str, Contribution] = dict(fetched)
        if pending.own is not None:
            contributions[self.node.me] = (pending.own, pending.weight)
        if not contributions:  # observed a round nobody's contribution reached us for: nothing to do
            return
        # Sorted by author so every node sums in the same order and lands on the same anchor bits.
        ordered = [contributions[a] for a in sorted(contributions)]
        await asyncio.to_thread(self._outer_step, ordered, pending)
        self.stats.round = pending.round
        self.stats.merges += 1
        self.stats.merge_contributors = len(ordered)
        self.refresh_snapshot()
        # Serve our blob until the next round: slower peers may still be fetching it.
        if pending.content_hash:
            if self._served_blob:
                self.node.host.remove_blob(self._served_blob)
            self._served_blob = pending.content_hash
        for old in [r for r in self._inboxes if r <= pending.round]:
            del self._inboxes[old]

    def _outer_step(self, contributions: list[Contribution], pending: _Pending) -> None:
        from swarmnode.gossip import replica_spread

        self.stats.replica_distance = replica_spread([d for d, _ in contributions])
        if self.node.aggregate is not None:
            avg = self.node.aggregate(contributions)
        else:
            from swarmnode.aggregate import robust_mean

            # Our model defines the expected names/shapes: a peer's mismatching blob is dropped.
            avg = robust_mean(contributions, expected=self.merger.shapes())
        carried = self.merger.outer_step(avg, published=pending.published)
        self.stats.carried_progress = float(carried) if carried is not None else float("nan")

    # -- joiners ---------------------------------------------------------------------------------

    def refresh_snapshot(self) -> None:
        snap = Snapshot(
            round=self.stats.round,
            step=self.stats.step,
            anchor_hash=self.merger.anchor_hash(),
            blob=self.merger.state_blob(),
        )
        self.state_server.update(snap)

    async def maybe_catch_up(self) -> None:
        """A fresh node, or one two or more rounds behind, loads the cohort state from a peer that
        advertises a newer round; one round behind is ordinary skew and merges normally. A replica
        whose anchor lost the majority vote after a merge re-syncs to the winner."""
        node = self.node
        if self._pending is not None:
            return  # decide once the round in flight is merged
        peers = {p: presence for p, (_, presence) in node.peers.items()}
        choice = choose_source(
            peers,
            set(node.live_peers()),
            cohort=node.cohort,
            my_round=self.stats.round,
            my_step=self.stats.step,
            merged=self.stats.merges > 0,
            my_anchor=self.merger.anchor_hash(),
        )
        if choice is None:
            return
        source, target = choice
        t0 = node.clock()
        try:
            manifest, blob = await asyncio.wait_for(
                fetch_state(
                    node.host, node.wire, source, node.cohort, max_bytes=self.settings.max_blob_bytes
                ),
                timeout=max(self.settings.collect_seconds, 1.0) * 4,
            )
        except (TimeoutError, CatchupError, ValueError, OSError) as exc:
            log.warning("catch-up from %s failed: %s", source, exc)
            return
        finally:
            self.stats.blocked_on_network_s += node.clock() - t0
        if target and manifest.anchor_hash != target:
            return  # the peer moved on since its presence; the next presence decides again
        await asyncio.to_thread(self.merger.load_state_blob, blob)
        self.stats.heals += 1 if target else 0
        if self.merger.anchor_hash() != manifest.anchor_hash:
            log.warning("state from %s loaded but its anchor hash differs from the manifest", source)
        self.stats.round = int(manifest.round)
        if not target:  # a joiner adopts the cohort's step; a healed replica keeps its own count
            self.stats.step = int(manifest.step)
        self.stats.catchups += 0 if target else 1
        self.samples_since_publish = 0
        self._inboxes = {r: v for r, v in self._inboxes.items() if r > self.stats.round}
        self.refresh_snapshot()
        if not target:
            # The snapshot is the anchor after round r while the cohort may already be collecting
            # round r+1 from that anchor: merge that round with them (our Δ would be empty) so we
            # land on the anchor they land on, then take part from the round after.
            nxt = self.stats.round + 1
            task = asyncio.create_task(self._collect(nxt, self.node.clock() + self.settings.collect_seconds))
            self._pending = _Pending(nxt, task)
        log.info("caught up from %s: round %d step %d", source, manifest.round, manifest.step)
