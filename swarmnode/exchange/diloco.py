"""DiLoCo rounds within a cohort, overlapped with training.

At the end of round r (every H inner steps, or every ``round_seconds`` of wall time) the node computes
its pseudo-gradient Δ = anchor − θ, serves it as a content-addressed blob, publishes a manifest on the
cohort's rounds topic, and **keeps training**. A background task gathers peers' manifests until every
live cohort peer has published or the collection deadline passes, pulling each blob as soon as its
manifest arrives (bounded by the same deadline). At the next step boundary after that, the outer step
is applied: every replica that merged the same contributions lands on the same anchor bits, and the
inner steps taken while collecting are carried over (θ ← anchor' + (θ − θ_published)). The trainer
only waits when round r+1 ends before round r's collection did: that wait is ``blocked_s``.

Also here: the snapshot served to joiners, joiner catch-up and majority re-sync (``catchup``).
Depends on the host, the membership table and the outer optimizer; never on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmnode.compression.pseudograd import max_encoded_size
from swarmnode.exchange.base import BaseExchange, Host, Traffic, receive_loop
from swarmnode.exchange.catchup import (
    STATE_PROTOCOL,
    StateServer,
    StateTransfer,
    choose_source,
    expected_layout,
    load_state_file,
    snapshot_of,
)
from swarmnode.exchange.collect import Inbox, admit, collect_round
from swarmnode.exchange.merge import Contribution, check_delta, merge
from swarmnode.membership import Membership
from swarmnode.protocol import RoundManifest, codec, topics
from swarmnode.rounds import RoundClock, RoundsConfig

log = logging.getLogger(__name__)

# Step-based rounds accept claims at most this many rounds ahead of ours (wall-clock rounds check
# the clock instead).
MAX_ROUNDS_AHEAD = 1000
# A contribution's averaging weight (samples trained on in the round) is capped at this multiple of
# the round's median claim: a peer on 4x faster hardware still counts fully, a weight of 1e30 does
# not. The median of the claims is the same on every replica, so the cap keeps anchors bit-equal.
MAX_WEIGHT_OVER_MEDIAN = 4.0
# Bytes/s a state transfer is given at least (a 100 Mbit/s link moves ~12 MB/s).
MIN_STATE_THROUGHPUT = 4e6
# A channel that failed this many rounds in a row is reported as failing (status, metrics).
FAILING_AFTER = 3


@dataclass(slots=True)
class _Pending:
    """A published round whose collection runs in the background."""

    round: int
    task: asyncio.Task[dict[str, Contribution]]
    # None for a round we only observe (a joiner merging the round in flight when it loaded state)
    published: dict[str, Any] | None = None  # our weights at publish time (their own dtype)
    own: Contribution | None = None  # our Δ blob as peers pull it: what enters the average
    content_hash: str = ""


class DiLoCoExchange(BaseExchange):
    name = "diloco"

    def __init__(
        self,
        config: RoundsConfig,
        *,
        host: Host,
        membership: Membership,
        diloco: Any,
        on_weights: Callable[[], None] = lambda: None,
        method: str = "trimmed",
        scratch_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.host = host
        self.members = membership
        self.me = membership.me
        self.cohort = membership.cohort
        self.diloco = diloco
        self.on_weights = on_weights
        self.method = method  # how contributions combine per coordinate (swarmnode.aggregate.METHODS)
        self.scratch_dir = scratch_dir or Path(tempfile.gettempdir())
        self.clock = clock
        self.topic = topics.cohort_topic(config.swarm, topics.ROUNDS, self.cohort)
        self.traffic = Traffic()
        self.state_server = StateServer(host, self.cohort)
        host.set_request_handler(STATE_PROTOCOL, self.state_server.handle)
        self.round = 0
        self.step = 0
        self.merges = self.catchups = self.heals = self.merge_contributors = 0
        self.blocked_s = 0.0
        self.replica_distance = float("nan")  # mean ‖θ_i − θ̄‖ over the last merge's contributors
        self.carried_progress = float("nan")  # ‖θ − θ_published‖ carried over the last merge
        self.anchor_hash = ""  # computed once per merge or load, off the event loop
        # Caps from the model: the largest Δ blob our own model's shapes can encode to in any codec
        # a peer may use (dense int8: a merge accepts int8 and sparse blobs alike, by their header),
        # under the operator's ceiling. A model whose Δ can never fit fails here, before any training.
        self.shapes = diloco.shapes()
        self.max_blob_bytes = max_encoded_size(self.shapes)
        if self.max_blob_bytes > config.max_blob_bytes:
            raise ValueError(
                f"this model's pseudo-gradient is up to {self.max_blob_bytes} bytes (dense int8), over the "
                f"ceiling of {config.max_blob_bytes}: raise --max-blob-bytes (network.max_blob_bytes)"
            )
        self.delta_bytes = 0
        self.merged_own = False  # the last merge included our own Δ (False: we only observed it)
        self.last_merge_weights: list[float] = []  # averaging weights of the last merge, by author
        self.incomplete_rounds = 0  # merged with fewer contributors than cohort peers expected
        self.failed_rounds_in_row = 0
        self.last_round_problem = ""
        self._pull_problems: list[str] = []
        self.catchup_failures = 0
        self.catchup_failures_in_row = 0
        self.last_catchup_error = ""
        self.catchup_s = float("nan")
        self.clipped = 0
        self.samples_since_publish = 0
        self._inboxes: dict[int, Inbox] = {}
        self._pending: _Pending | None = None
        self._served_blob = ""
        self._ready = False
        self.clock_rounds: RoundClock | None = None
        self._open_round: int | None = None
        if config.round_seconds > 0:
            self.clock_rounds = RoundClock.for_swarm(
                config.swarm,
                round_seconds=config.round_seconds,
                collect_seconds=config.collect_seconds,
                genesis=config.genesis,
                clock=wall_clock,
            )

    def start(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        tg.create_task(receive_loop(self.host, self.topic, self.me, self._handle, self.traffic))

    # -- gossip in --------------------------------------------------------------------------------

    def _handle(self, origin: str, data: bytes) -> None:
        record = codec.decode(data)
        if not isinstance(record, RoundManifest):
            raise ValueError(f"expected a round manifest, got {type(record).__name__}")
        if record.cohort != self.cohort or record.author != origin:
            raise ValueError("round manifest for another cohort, or not signed by its author")
        rnd = int(record.round)
        if rnd > self.max_plausible_round():
            raise ValueError(f"round manifest for round {rnd}, which cannot have ended yet")
        self.members.note_member(origin)
        if rnd <= self.round:  # too late: that round is merged already
            return
        pending = self._pending.round if self._pending is not None else None
        admit(self._inboxes, origin, rnd, record, keep=pending)

    def max_plausible_round(self) -> int:
        """The newest round any honest peer can be in: by the wall clock (one round of skew), or, for
        step-based rounds, a bound on how far ahead of us a peer can be. Claims past it are lies."""
        if self.clock_rounds is not None:
            return self.clock_rounds.current() + 1
        return self.round + MAX_ROUNDS_AHEAD

    # -- the step hooks ---------------------------------------------------------------------------

    async def before_step(self, step: int) -> int:
        self.step = step
        if not self._ready:
            self._ready = True
            await self._refresh()
            if self.config.join_wait_s:
                await self.members.wait_cohort(self.config.expect_peers, self.config.join_wait_s)
        return await self.maybe_catch_up(step)

    async def after_step(self, step: int, samples: int) -> None:
        """Apply a finished collection; start the next round when one ended."""
        self.step = step
        self.samples_since_publish += samples
        pending = self._pending
        if pending is not None and pending.task.done():
            await self._apply(pending)
        due = self._due(step)
        if due is None or due[0] <= self.round:
            return  # not a round's end, or merged already (a joiner loaded state past it)
        pending = self._pending
        if pending is not None and pending.own is None and due[0] <= pending.round:
            return  # we observe this round: the cohort published it before we joined
        await self.drain()  # round r+1 ended before round r's collection did (bounded wait)
        rnd, deadline = due
        if self.clock_rounds is None:
            # Step rounds: the window opens when we publish; that wait must not use up round r+1's.
            deadline = self.clock() + self.config.collect_seconds
        await self._publish(rnd, deadline)

    async def finish(self, stopped: bool) -> None:
        """Budget spent: merge the round in flight so every replica ends on the same anchor, then
        keep serving our last contribution until every cohort peer merged it (or the window ends)."""
        if stopped:
            self.cancel()
            return
        await self.drain()
        rnd = self._open_round
        if (
            self.clock_rounds is not None
            and rnd is not None
            and rnd > self.round
            and self.samples_since_publish
        ):
            # Wall-clock rounds: peers whose last step crossed the round's end publish it; so do we,
            # with the steps we took in it, or the cohort would end on two anchors.
            rc = self.clock_rounds
            wall_left = rc.round_end(rnd) + self.config.collect_seconds - rc.clock()
            await self._publish(rnd, self.clock() + max(0.0, wall_left))
            await self.drain()
        end = self.clock() + self.config.collect_seconds
        while self.clock() < end and any(  # noqa: ASYNC110 - polls presence, bounded by the window
            int(getattr(self.members.presence_of(p), "round", self.round)) < self.round
            for p in self.members.cohort_peers()
        ):
            await asyncio.sleep(0.05)

    def _due(self, step: int) -> tuple[int, float] | None:
        """(round to publish, its collection deadline on ``clock``) if a round ended at this step."""
        if self.clock_rounds is None:
            H = self.config.merge_every
            if step % H == 0:
                return step // H, self.clock() + self.config.collect_seconds
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
        wall_left = self.clock_rounds.round_end(rnd) + self.config.collect_seconds - self.clock_rounds.clock()
        return rnd, self.clock() + max(0.0, wall_left)

    async def drain(self) -> None:
        """Finish the round in flight (bounded by its deadline) and apply it; the wait is blocked time."""
        pending = self._pending
        if pending is None:
            return
        t0 = self.clock()
        with contextlib.suppress(Exception):
            await asyncio.shield(pending.task)
        self.blocked_s += self.clock() - t0
        await self._apply(pending)

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.task.cancel()
            self._pending = None

    # -- publish and collect ----------------------------------------------------------------------

    async def _publish(self, rnd: int, deadline: float) -> None:
        def encode() -> tuple[dict[str, Any], bytes, float]:
            # θ at publish time first, then Δ = anchor − θ streamed into the encoder one tensor at a
            # time (training is paused at a step boundary, so both see the same θ)
            published = self.diloco.local_snapshot()
            blob = self.diloco.encode_pseudo_gradient(self.config.codec)  # sparse: error feedback
            return published, blob, check_delta(blob, self.max_blob_bytes, self.shapes)

        published, blob, norm = await asyncio.to_thread(encode)
        content_hash = self.host.provide_blob(blob)
        # Averaging weight: groups trained on since the last publish (DiLoCo weights by samples).
        weight = float(max(1, self.samples_since_publish))
        self.samples_since_publish = 0
        self.delta_bytes = len(blob)
        manifest = RoundManifest(
            round=rnd,
            author=self.me,
            cohort=self.cohort,
            weight=weight,
            content_hash=content_hash,
            size=len(blob),
            codec=self.config.codec,  # type: ignore[arg-type]
            anchor_hash=self.anchor_hash,
        )
        data = codec.encode(manifest)
        await self.host.publish(self.topic, data)
        self.traffic.bytes_sent += len(data)
        self._pull_problems = []
        task = self._tg.create_task(self._collect(rnd, deadline))
        self._pending = _Pending(rnd, task, published, Contribution(blob, weight, norm), content_hash)

    async def _collect(self, rnd: int, deadline: float) -> dict[str, Contribution]:
        inbox = self._inboxes.setdefault(rnd, Inbox())
        return await collect_round(
            inbox,
            expected=self.members.cohort_peers,
            fetch=self._fetch_one,
            deadline=deadline,
            clock=self.clock,
        )

    async def _fetch_one(self, m: Any) -> Contribution | None:
        """(Δ blob, weight, norm) from the manifest's author, validated against our model, or None
        (counted) when anything goes wrong."""
        limit = self.max_blob_bytes
        try:
            if int(m.size) > limit:
                raise ValueError(f"announces {m.size} bytes, over this model's cap of {limit}")
            data = await self.host.fetch(m.content_hash, [m.author], max_size=int(m.size))
            self.traffic.bytes_received += len(data)
            norm = await asyncio.to_thread(check_delta, data, limit, self.shapes)
        except Exception as exc:  # any failure leaves this peer out of the round
            self.traffic.dropped += 1
            self._pull_problems.append(f"pull from {m.author[:16]} failed: {exc}"[:200])
            log.info("pseudo-gradient fetch from %s failed: %s", m.author, exc)
            return None
        return Contribution(data, float(m.weight), norm)

    async def _apply(self, pending: _Pending) -> None:
        self._pending = None
        try:
            fetched = pending.task.result()
        except Exception as exc:  # collection itself failed: merge what we have (our own Δ)
            log.warning("round %d collection failed: %s", pending.round, exc)
            fetched = {}
        contributions: dict[str, Contribution] = dict(fetched)
        if pending.own is not None:
            contributions[self.me] = pending.own
        if not contributions:  # observed a round nobody's contribution reached us for
            return
        expected = set(self.members.cohort_peers()) | {self.me} | set(contributions)
        if pending.own is not None and len(contributions) < len(expected):
            self.incomplete_rounds += 1
            self.failed_rounds_in_row += 1
            missing = sorted(expected - set(contributions))
            why = "; ".join(self._pull_problems[:2]) or (
                f"not published or not pulled within the {self.config.collect_seconds:g} s collection "
                "window (--collect-seconds, or --link-mbps to size it)"
            )
            self.last_round_problem = (
                f"round {pending.round}: {len(contributions)}/{len(expected)} contributors, missing "
                f"{', '.join(m[:12] for m in missing[:3])}: {why}"
            )[:400]
            log.warning("%s", self.last_round_problem)
        elif pending.own is not None:
            self.failed_rounds_in_row = 0
        # Sorted by author so every node sums in the same order and lands on the same anchor bits.
        ordered = [contributions[a] for a in sorted(contributions)]
        await asyncio.to_thread(self._outer_step, ordered, pending)
        self.round = pending.round
        self.merges += 1
        self.merge_contributors = len(ordered)
        self.merged_own = pending.own is not None
        await self._refresh()
        # Serve our blob until the next round: slower peers may still be fetching it.
        if pending.content_hash:
            if self._served_blob:
                self.host.remove_blob(self._served_blob)
            self._served_blob = pending.content_hash
        for old in [r for r in self._inboxes if r <= pending.round]:
            del self._inboxes[old]

    def _outer_step(self, contributions: list[Contribution], pending: _Pending) -> None:
        weights = sorted(c.weight for c in contributions)
        cap = weights[(len(weights) - 1) // 2] * MAX_WEIGHT_OVER_MEDIAN
        report = merge(
            contributions,
            self.diloco,
            max_bytes=self.max_blob_bytes,
            max_weight=cap,
            published_local=pending.published,
            method=self.method,
        )
        self.replica_distance = report.replica_distance
        self.last_merge_weights = [min(c.weight, cap) for c in contributions]
        self.clipped += report.clipped
        self.carried_progress = report.carried if pending.published is not None else float("nan")
        self.on_weights()

    # -- joiners ----------------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Anchor hash and joiner snapshot after a merge or a load (hashing off the event loop)."""
        snap = await asyncio.to_thread(snapshot_of, self.diloco, round=self.round, step=self.step)
        self.anchor_hash = snap.anchor_hash
        self.state_server.update(snap)

    def _donors(self, source: str, plausible: dict[str, Any]) -> list[str]:
        """``source`` first, then every other live peer advertising the same round and anchor: a
        transfer that loses its donor resumes from them."""
        first = plausible[source]
        live = set(self.members.live_peers())
        others = sorted(
            p
            for p, r in plausible.items()
            if p != source
            and p in live
            and getattr(r, "cohort", None) == self.cohort
            and int(getattr(r, "round", -1)) == int(first.round)
            and getattr(r, "anchor_hash", "") == getattr(first, "anchor_hash", "")
        )
        return [source, *others]

    def _plausible_step(self, manifest: Any, step: int) -> int:
        """The step a joiner continues from: the donor's, if it fits the donor's round (step rounds:
        round r ends at step r·H; a catch-up can be at most a round of overlap past that), else ours.
        It never goes back."""
        if self.clock_rounds is not None:
            return step  # wall-clock rounds: the round does not depend on the step; keep our count
        H = self.config.merge_every
        rnd, donor_step = int(manifest.round), int(manifest.step)
        if not rnd * H <= donor_step <= (rnd + 2) * H:
            raise ValueError(f"donor's step {donor_step} does not fit its round {rnd} (H={H})")
        return max(step, donor_step)

    async def maybe_catch_up(self, step: int) -> int:
        """A fresh node, or one two or more rounds behind, loads the cohort state from a peer that
        advertises a newer round; a replica whose anchor lost the majority vote re-syncs to the winner.
        Returns the step to continue from (a joiner adopts the cohort's step; it never goes back)."""
        if self._pending is not None:
            return step  # decide once the round in flight is merged
        limit = self.max_plausible_round()
        plausible = {
            p: r for p, r in self.members.presences().items() if int(getattr(r, "round", 0)) <= limit
        }
        choice = choose_source(
            plausible,
            set(self.members.live_peers()),
            cohort=self.cohort,
            my_round=self.round,
            my_step=step,
            merged=self.merges > 0,
            my_anchor=self.anchor_hash,
        )
        if choice is None:
            return step
        source, target = choice
        t0 = self.clock()
        donors = self._donors(source, plausible)
        path = self.scratch_dir / f"state-{self.cohort[:16]}-{self.me[-12:]}.part"
        transfer = StateTransfer(self.host, self.cohort, path, expected_layout(self.diloco))
        # Long enough for the whole state at a slow volunteer link (4 GB at 0.5 B params).
        timeout = max(self.config.collect_seconds * 4, transfer.max_total / MIN_STATE_THROUGHPUT)
        manifest = None
        errors: list[str] = []
        try:
            for donor in donors[:4]:
                try:
                    manifest, index = await asyncio.wait_for(transfer.pull(donor), timeout)
                except Exception as exc:  # nothing a donor sends or fails to send may end the node
                    errors.append(f"{donor[:16]}: {_reason(exc)}")
                    manifest = None
                    continue
                if target and manifest.anchor_hash != target:
                    return step  # the peer moved on since its presence; the next presence decides again
                if not self.round <= int(manifest.round) <= limit:
                    errors.append(
                        f"{donor[:16]}: state for round {manifest.round}, outside [{self.round}, {limit}]"
                    )
                    manifest = None
                    continue
                try:
                    new_step = self._plausible_step(manifest, step)
                    await asyncio.to_thread(self._load_file, path, index, manifest.anchor_hash)
                except Exception as exc:
                    errors.append(f"{donor[:16]}: {_reason(exc)}")
                    manifest = None
                    transfer.discard()
                    continue
                break
        finally:
            transfer.discard()
            self.blocked_s += self.clock() - t0
        if manifest is None:
            self.traffic.dropped += 1
            self.catchup_failures += 1
            self.catchup_failures_in_row += 1
            self.last_catchup_error = "; ".join(errors)[:400] or "no donor answered"
            log.warning("catch-up failed: %s", self.last_catchup_error)
            return step
        self.catchup_failures_in_row = 0
        self.catchup_s = self.clock() - t0
        self.round = int(manifest.round)
        if target:
            self.heals += 1
        else:
            self.catchups += 1
            step = new_step  # a joiner adopts the cohort's step (step rounds), never going back
        self.step = step
        self.samples_since_publish = 0
        self._inboxes = {r: v for r, v in self._inboxes.items() if r > self.round}
        await self._refresh()
        if not target:
            # The snapshot is the anchor after round r while the cohort may already be collecting
            # round r+1 from it: merge that round with them (our Δ would be empty) so we land on the
            # anchor they land on, then take part from the round after.
            nxt = self.round + 1
            task = self._tg.create_task(self._collect(nxt, self.clock() + self.config.collect_seconds))
            self._pending = _Pending(nxt, task)
        log.info("caught up from %s: round %d step %d", source, manifest.round, manifest.step)
        return step

    def _load_file(self, path: Path, index: Any, anchor_hash: str) -> None:
        load_state_file(self.diloco, path, index, anchor_hash=anchor_hash)
        self.on_weights()

    def health(self) -> str:
        """ "ok", or what keeps failing: what the status table, metrics and MQTT show."""
        problems = []
        if self.failed_rounds_in_row >= FAILING_AFTER:
            problems.append(
                f"merges incomplete {self.failed_rounds_in_row} rounds in a row ({self.last_round_problem})"
            )
        if self.catchup_failures_in_row >= FAILING_AFTER:
            problems.append(f"catch-up failing ({self.last_catchup_error})")
        return "; ".join(problems)[:500] or "ok"

    def statistics(self) -> dict[str, Any]:
        return {
            "diloco_health": self.health(),
            "diloco_incomplete_rounds": self.incomplete_rounds,
            "diloco_merged_own": self.merged_own,
            "diloco_clipped": self.clipped,
            "diloco_delta_bytes": self.delta_bytes,
            "diloco_blob_cap": self.max_blob_bytes,
            "catchup_failures": self.catchup_failures,
            "catchup_s": self.catchup_s,
            "round": self.round,
            "anchor_hash": self.anchor_hash,
            "merges": self.merges,
            "merge_contributors": self.merge_contributors,
            "heals": self.heals,
            "catchups": self.catchups,
            "replica_distance_before_merge": self.replica_distance,
            "carried_progress": self.carried_progress,
            "diloco_blocked_s": round(self.blocked_s, 4),
            **self.traffic.as_dict("diloco"),
        }


def _reason(exc: BaseException) -> str:
    """One line for an error, unwrapping the task group's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:200]
