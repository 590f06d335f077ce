"""DiLoCo rounds within a cohort, overlapped with training.

At the end of round r (every H inner steps, or every ``round_seconds`` of wall time) the node computes
its pseudo-gradient Δ = anchor − θ, serves it as a content-addressed blob, publishes a manifest on the
cohort's rounds topic, and **keeps training**. A background task gathers peers' manifests until every
live cohort peer has published or the collection deadline passes, pulling each blob as soon as its
manifest arrives (bounded by the same deadline). At the next step boundary after that, the outer step
is applied: every replica that merged the same contributions lands on the same anchor bits, and the
inner steps taken while collecting are carried over (θ ← anchor' + (θ − θ_published)). The trainer
only waits when round r+1 ends before round r's collection did: that wait is ``blocked_s``.

Also here: the snapshot served to joiners, joiner catch-up and majority re-sync (``catchup``),
loading only states a quorum of distinct networks attests, or that pass the node's local probe
(``swarmnode.trust``); every refused offer or state is counted (``catchup/refused_*``).
Depends on the host, the membership table and the outer optimizer; never on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarmnode.compression.pseudograd import max_encoded_size
from swarmnode.exchange.addresses import remote_addresses
from swarmnode.exchange.base import BaseExchange, Host, Traffic, receive_loop
from swarmnode.exchange.catchup import (
    STATE_PROTOCOL,
    Decision,
    StateServer,
    StateTransfer,
    choose_source,
    expected_layout,
    load_state_file,
    request_manifest,
    snapshot_of,
)
from swarmnode.exchange.collect import Inbox, admit, collect_round
from swarmnode.exchange.fanin import choose, relay_source, seed_of
from swarmnode.exchange.merge import Contribution, check_delta, mapped_blob, merge
from swarmnode.membership import Membership, step_ema
from swarmnode.protocol import RoundManifest, codec, topics
from swarmnode.rounds import RoundClock, RoundsConfig
from swarmnode.trust import Choice, Offer, accept_probe, check_claim, choose_donor

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
# A state is attested by this many distinct network groups (or verified peers) behind it
# (``swarmnode.trust``); an unattested one is loaded only after the local probe, at most one per
# UNATTESTED_RETRY_S, and only if its held-out reward is within PROBE_TOLERANCE of ours.
CATCHUP_QUORUM = 2
UNATTESTED_RETRY_S = 60.0
PROBE_TOLERANCE = 0.1
# Refused offers and distrusted anchors remembered (each refusal counted once).
REFUSED_MEMORY = 1024
# Presences are seconds old, rounds can be shorter: when they attest nothing, up to LIVE_ASK
# candidates are asked for their current state manifest (a small request), at most once per
# LIVE_RETRY_S, each answer awaited LIVE_TIMEOUT_S.
LIVE_ASK = 8
LIVE_RETRY_S = 1.0
LIVE_TIMEOUT_S = 5.0
LIVE_TRIES = 4  # answers that disagree (replicas mid-merge) are asked again, LIVE_SPACING_S apart
LIVE_SPACING_S = 0.25


# Step rounds collect for at least this many of our own step times (see ``DiLoCoExchange.window``).
STEP_SLACK = 2.5
# ... and of the cohort peers' (a joiner that just loaded state has no step time of its own), but
# never more than MAX_WINDOW_S (or collect_seconds, if larger): presences cannot stretch it unbounded.
MAX_WINDOW_S = 3600.0
# A cohort peer that published no manifest in this many rounds in a row is not waited for any more.
NO_SHOW_ROUNDS = 3
# Rounds whose contributor choice (``RoundsConfig.merge_fanin``) is remembered.
SELECTIONS_KEPT = 8
# A relayed pull tries the blob's parent in its relay tree for at most this share of the time left,
# then its author.
RELAY_SHARE = 0.5
# A relay parent that does not know the blob yet (it has not seen the manifest) refuses at once; the
# pull asks it again every RELAY_RETRY_S for up to RELAY_REFUSALS_S before going to the author.
RELAY_RETRY_S = 0.25
RELAY_REFUSALS_S = 3.0


@dataclass(slots=True)
class _Pending:
    """A published round whose collection runs in the background."""

    round: int
    task: asyncio.Task[dict[str, Contribution]]
    # None for a round we only observe (a joiner merging the round in flight when it loaded state)
    published: dict[str, Any] | None = None  # our weights at publish time (their own dtype)
    own: Contribution | None = None  # our Δ blob as peers pull it: what enters the average
    content_hash: str = ""
    started: float = 0.0  # when the collection began (our publish), on the exchange's clock
    collected_at: float = 0.0  # when it ended (every contribution in, or the deadline)
    # A member not chosen to contribute this round (``merge_fanin``): it merges the chosen ones'
    # Δ and carries its whole progress since the anchor (``published`` is the anchor) to a later round.
    sat_out: bool = False


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
        probe: Callable[[], float] | None = None,
        probe_tolerance: float = PROBE_TOLERANCE,
        quorum: int = CATCHUP_QUORUM,
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
        # Where Δ blobs are written and pulled to, and mapped from (the outer optimiser's spill
        # directory), or None: in memory.
        spill = getattr(diloco, "spill_dir", None)
        self.blob_dir = None if spill is None else Path(spill) / "blobs"
        if self.blob_dir is not None:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.delta_bytes = 0
        self.merged_own = False  # the last merge included our own Δ (False: we only observed it)
        self.last_merge_weights: list[float] = []  # averaging weights of the last merge, by author
        self.published_weight = 0.0  # our last contribution's averaging weight (groups trained on)
        self.collect_s = 0.0  # our last round's collection: publish to every contribution in (or deadline)
        self.incomplete_rounds = 0  # merged with fewer contributors than cohort peers expected
        self.failed_rounds_in_row = 0
        self.last_round_problem = ""
        self._pull_problems: list[str] = []
        self.catchup_failures = 0
        self.catchup_failures_in_row = 0
        self.last_catchup_error = ""
        self.catchup_s = float("nan")
        # Trust in a donor's state (``maybe_catch_up``): ``probe()`` is the held-out reward of the
        # weights loaded now (run in a worker thread; None: unattested states are refused).
        self.probe = probe
        self.probe_tolerance = float(probe_tolerance)
        self.quorum = int(quorum)
        self.refusals: dict[str, int] = {}  # claim / unattested / probe / state -> count
        self.last_refusal = ""
        self.loads_attested = self.loads_probed = 0
        self.probe_rewards = (float("nan"), float("nan"))  # (ours, the candidate's) at the last probe
        self._refused: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._distrusted: OrderedDict[str, None] = OrderedDict()
        self._probe_after = float("-inf")
        self._live_after = float("-inf")
        self.clipped = 0
        # cohort peers that published no manifest for the last rounds they were waited for -> count;
        # from NO_SHOW_ROUNDS on rounds stop waiting for them (a connected peer announcing our cohort
        # and never publishing held every round to its deadline) until their next manifest
        self._no_shows: OrderedDict[str, int] = OrderedDict()
        self.outliers = 0  # contributions left out of merges: a norm over 4x the median
        self.skipped_observed = 0  # observed rounds not merged (a contribution missing)
        self._catch_up_past = 0  # catch up to a state newer than this round (a skipped observed round)
        self.agreeing: list[str] = []  # authors of the last merge whose Δ agreed with the rest
        self.samples_since_publish = 0
        self._inboxes: dict[int, Inbox] = {}
        # round -> (the members it was chosen among, the chosen contributors), or None: every member
        self._selection: OrderedDict[int, tuple[list[str], list[str]] | None] = OrderedDict()
        self.sat_out = 0  # rounds this node was not chosen to contribute in
        self.chosen_last = True
        self.relay_pulls = self.relay_fallbacks = 0
        self._relayed: list[str] = []  # blobs pulled this round and served on to our relay children
        self._relayed_before: list[str] = []
        self._pending: _Pending | None = None
        self._said_observing = False
        self._step_s = 0.0  # moving average of our wall time per step
        self._last_step_at: float | None = None
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
        self._no_shows.pop(origin, None)  # it publishes: rounds wait for it again
        if rnd <= self.round:  # too late: that round is merged already
            return
        pending = self._pending.round if self._pending is not None else None
        admit(self._inboxes, origin, rnd, record, keep=pending)

    def _expected(self, rnd: int | None = None) -> list[str]:
        """The cohort peers a round waits for: ``Membership.cohort_peers`` less those that published
        nothing for the last ``NO_SHOW_ROUNDS`` rounds they were waited for (a manifest from them,
        in time or late, puts them back; a manifest that arrives is pulled either way); of round
        ``rnd``, only those chosen to contribute to it (``_chosen``)."""
        peers = [p for p in self.members.cohort_peers() if self._no_shows.get(p, 0) < NO_SHOW_ROUNDS]
        chosen = self._chosen(rnd) if rnd is not None else None
        if chosen is not None:
            peers = [p for p in peers if p in chosen[1]]
        return peers

    def _chosen(self, rnd: int, *, member: bool = True) -> tuple[list[str], list[str]] | None:
        """(members, contributors) of round ``rnd`` when more members are live than
        ``merge_fanin``: the contributors are a rotating choice of ``merge_fanin`` of them
        (``fanin.choose``, the same on every member with the same view), fixed the first time it is
        asked (at the round's end); None: every member contributes. ``member``: we are one of them
        (an observer is not)."""
        if rnd in self._selection:
            return self._selection[rnd]
        k = self.config.merge_fanin
        view = sorted(set(self.members.cohort_peers()) | ({self.me} if member else set()))
        chosen = None
        if k and len(view) > k:
            chosen = (view, choose(seed_of(self.config.swarm, self.cohort, "merge", rnd), k, view))
        self._selection[rnd] = chosen
        while len(self._selection) > SELECTIONS_KEPT:
            self._selection.popitem(last=False)
        return chosen

    def max_plausible_round(self) -> int:
        """The newest round any honest peer can be in: by the wall clock (one round of skew), or, for
        step-based rounds, a bound on how far ahead of us a peer can be. Claims past it are lies."""
        if self.clock_rounds is not None:
            return self.clock_rounds.current() + 1
        return self.round + MAX_ROUNDS_AHEAD

    # -- the step hooks ---------------------------------------------------------------------------

    @property
    def observing(self) -> bool:
        """Merging the round in flight without a Δ of our own (a joiner that just loaded state)."""
        return self._pending is not None and self._pending.own is None and not self._pending.sat_out

    async def _say_if_observing_changed(self) -> None:
        # The cohort's round must not wait for an observer: say so now, not at the next presence.
        if self.observing != self._said_observing:
            self._said_observing = self.observing
            publish = getattr(self.members, "publish", None)
            if publish is not None:
                try:
                    await publish()
                except Exception as exc:  # the periodic presence carries it too
                    log.info("presence after a catch-up not sent: %s", exc)

    async def before_step(self, step: int) -> int:
        self.step = step
        if not self._ready:
            self._ready = True
            await self._refresh()
            if self.config.join_wait_s:
                await self.members.wait_cohort(self.config.expect_peers, self.config.join_wait_s)
        step = await self.maybe_catch_up(step)
        await self._say_if_observing_changed()
        return step

    async def after_step(self, step: int, samples: int) -> None:
        """Apply a finished collection; start the next round when one ended."""
        now = self.clock()
        if self._last_step_at is not None:
            dt = now - self._last_step_at
            self._step_s = step_ema(self._step_s, dt)
        self._last_step_at = now
        self.step = step
        self.samples_since_publish += samples
        pending = self._pending
        if pending is not None and pending.task.done():
            await self._apply(pending)
            await self._say_if_observing_changed()
        due = self._due(step)
        if due is None or due[0] <= self.round:
            return  # not a round's end, or merged already (a joiner loaded state past it)
        pending = self._pending
        if pending is not None and pending.own is None and due[0] <= pending.round:
            return  # we observe this round: the cohort published it before we joined
        await self.drain()  # round r+1 ended before round r's collection did (bounded wait)
        rnd, deadline = due
        # Step rounds: the window opens when we publish; that wait must not use up round r+1's.
        await self._end_round(rnd, deadline if self.clock_rounds is not None else self._window_from_now(rnd))

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
            await self._end_round(rnd, self.clock() + max(0.0, wall_left))
            await self.drain()
        end = self.clock() + self.config.collect_seconds
        while self.clock() < end and any(  # noqa: ASYNC110 - polls presence, bounded by the window
            int(getattr(self.members.presence_of(p), "round", self.round)) < self.round
            for p in self.members.cohort_peers()
        ):
            await asyncio.sleep(0.05)

    @property
    def step_seconds(self) -> float:
        """Our recent seconds per step (an EMA; 0 before the second step), advertised in presence."""
        return self._step_s

    def window(self) -> float:
        """How long a round collects. Step rounds: peers publish when they reach the same step, so
        a peer a step or two behind us publishes that much later: at least ``STEP_SLACK`` of the
        slowest step time among us and the cohort peers we wait for (a 0.5 B model on a CPU takes
        minutes a step; a joiner that just loaded state may step 4x faster than its donors), else
        ``collect_seconds``. Never more than ``MAX_WINDOW_S``: a peer's presences cannot stretch it
        without bound."""
        if self.clock_rounds is not None:
            return self.config.collect_seconds
        slowest = max(self._step_s, getattr(self.members, "step_seconds", lambda: 0.0)())
        floor = self.config.collect_seconds
        return min(max(floor, STEP_SLACK * slowest), max(floor, MAX_WINDOW_S))

    def _due(self, step: int) -> tuple[int, float] | None:
        """(round to publish, its collection deadline on ``clock``) if a round ended at this step."""
        if self.clock_rounds is None:
            H = self.config.merge_every
            if step % H == 0:
                return step // H, self.clock() + self.window()
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

    def _window_from_now(self, rnd: int | None = None) -> Callable[[], float]:
        """A step round's deadline: ``window()`` from now, re-read while the round collects (the
        cohort's step times are measured from presences, which a fresh joiner is still hearing).
        For round ``rnd`` it also outlasts an expected peer that has not published yet but whose
        presence shows it training toward the round's last step, at most one round of its steps
        behind (``Membership.seconds_to_step`` x ``STEP_SLACK``, then a window from when it got
        there: its manifest may still be in flight): two peers of slightly different
        speeds drift apart by steps every round, and a fixed window left the slower one out of the
        faster one's merges (anchors apart, a heal every few rounds). Never past ``MAX_WINDOW_S``."""
        t0 = self.clock()
        if rnd is None or self.clock_rounds is not None:
            return lambda: t0 + self.window()
        H = self.config.merge_every
        target = rnd * H
        granted = [t0]  # an extension once granted stands: the late peer's pull needs it too

        def deadline() -> float:
            base = max(granted[0], t0 + self.window())
            box = self._inboxes.get(rnd)
            published = box.manifests if box is not None else {}
            wait = 0.0
            ahead = getattr(self.members, "seconds_to_step", None)
            presence_of = getattr(self.members, "presence_of", None)
            if ahead is None or presence_of is None:
                return base
            for p in self._expected(rnd):
                if p in published:
                    continue
                step = int(getattr(presence_of(p), "step", -1))
                if not target - H < step <= target:  # not training toward (or just at) this round's end
                    continue
                left = ahead(p, target, STEP_SLACK)
                if left is not None:
                    wait = max(wait, left + self.window())
            granted[0] = max(
                base, min(self.clock() + wait, t0 + max(self.config.collect_seconds, MAX_WINDOW_S))
            )
            return granted[0]

        return deadline

    async def _end_round(self, rnd: int, deadline: float | Callable[[], float]) -> None:
        """Publish our Δ for round ``rnd``, or, when we are not among its chosen contributors, merge
        theirs and keep our progress for a later round (no blob, no manifest)."""
        chosen = self._chosen(rnd)
        self.chosen_last = chosen is None or self.me in chosen[1]
        if self.chosen_last:
            await self._publish(rnd, deadline)
            return
        self.sat_out += 1
        self._pull_problems = []
        task = self._tg.create_task(self._collect(rnd, deadline))
        # θ' = anchor' + (θ − anchor): everything since the anchor stays ours, on the new anchor
        pending = _Pending(rnd, task, published=self.diloco.anchor, started=self.clock(), sat_out=True)
        task.add_done_callback(lambda _t: setattr(pending, "collected_at", self.clock()))
        self._pending = pending

    async def _publish(self, rnd: int, deadline: float | Callable[[], float]) -> None:
        blob_dir = self.blob_dir

        def encode() -> tuple[dict[str, Any], bytes, float, str]:
            # θ at publish time first, then Δ = anchor − θ streamed into the encoder one tensor at a
            # time (training is paused at a step boundary, so both see the same θ)
            published = self.diloco.local_snapshot()
            if blob_dir is None:
                blob = self.diloco.encode_pseudo_gradient(self.config.codec)  # sparse: error feedback
                digest = ""
            else:  # into a file, served and merged from a read-only mapping of it (page cache)
                path = blob_dir / f"own-{rnd}.blob"
                _, digest = self.diloco.write_pseudo_gradient(path, self.config.codec)
                blob = mapped_blob(path)
            return published, blob, check_delta(blob, self.max_blob_bytes, self.shapes), digest

        published, blob, norm, content_hash = await asyncio.to_thread(encode)
        if content_hash:
            self.host.provide_view(content_hash, len(blob), lambda lo, hi: blob[lo:hi])
        else:
            content_hash = self.host.provide_blob(blob)
        # Averaging weight: groups trained on since the last publish (DiLoCo weights by samples).
        weight = float(max(1, self.samples_since_publish))
        self.samples_since_publish = 0
        self.published_weight = weight
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
        pending = _Pending(rnd, task, published, Contribution(blob, weight, norm), content_hash, self.clock())
        task.add_done_callback(lambda _t: setattr(pending, "collected_at", self.clock()))
        self._pending = pending

    async def _collect(self, rnd: int, deadline: float | Callable[[], float]) -> dict[str, Contribution]:
        inbox = self._inboxes.setdefault(rnd, Inbox())
        if not callable(deadline):
            deadline = functools.partial(float, deadline)
        chosen = self._chosen(rnd)  # fixed at our round's end (or, observing, when we joined it)
        return await collect_round(
            inbox,
            expected=lambda: self._expected(rnd),
            fetch=lambda m: self._fetch_one(m, deadline, rnd),
            deadline=deadline,
            clock=self.clock,
            accept=lambda author: chosen is None or author in chosen[1],
        )

    def _relay_parent(self, rnd: int, author: str) -> str | None:
        """Our parent in the relay tree of ``author``'s round-``rnd`` blob (``fanin.relay_source``),
        or None: pull from the author (every member contributes, or we are near the root)."""
        chosen = self._selection.get(rnd)
        if chosen is None:
            return None
        seed = seed_of(self.config.swarm, self.cohort, "relay", rnd, author)
        parent = relay_source(seed, author, self.me, chosen[0], self.config.relay_branching)
        return None if parent == author else parent

    async def _pull(self, m: Any, providers: list[str], timeout: float) -> bytes:  # noqa: ASYNC109
        blob_dir = self.blob_dir
        if blob_dir is None:
            return await self.host.fetch(m.content_hash, providers, max_size=int(m.size), timeout=timeout)
        # a 0.5 GB Δ goes to disk as it arrives and is merged from a mapping of the file
        path = blob_dir / f"in-{m.content_hash[:32]}.part"
        try:
            await self.host.fetch_file(m.content_hash, providers, path, max_size=int(m.size), timeout=timeout)
            return mapped_blob(path)
        finally:
            path.unlink(missing_ok=True)

    async def _pull_relayed(self, m: Any, parent: str, budget: float) -> bytes | None:
        """The blob from our relay parent, or None (counted) when it failed, was too slow, or kept
        refusing: the author serves it then."""
        end = self.clock() + max(1.0, budget)
        refusals_end = self.clock() + RELAY_REFUSALS_S
        while True:
            started = self.clock()
            try:
                return await self._pull(m, [parent], max(1.0, end - started))
            except Exception as exc:
                quick = self.clock() - started < RELAY_RETRY_S
                if quick and self.clock() + RELAY_RETRY_S < min(end, refusals_end):
                    await asyncio.sleep(RELAY_RETRY_S)  # it has not seen the manifest yet: ask again
                    continue
                self.relay_fallbacks += 1
                log.info("relayed pull of %s's Δ from %s failed: %s", m.author[:16], parent[:16], exc)
                return None

    async def _fetch_one(self, m: Any, deadline: Callable[[], float], rnd: int) -> Contribution | None:
        """(Δ blob, weight, norm) from the manifest's author (or our parent in its relay tree),
        validated against our model, or None (counted) when anything goes wrong. The pull may take
        until the round's collection deadline (a 0.5 GB Δ needs ~40 s at 100 Mbit/s, more from a
        busy peer). A relayed blob is served on to our own relay children as soon as it is here
        (they ask at once; the blob server holds them until then)."""
        limit = self.max_blob_bytes
        parent = self._relay_parent(rnd, str(m.author))
        relayed = False
        try:
            if int(m.size) > limit:
                raise ValueError(f"announces {m.size} bytes, over this model's cap of {limit}")
            timeout = max(1.0, deadline() - self.clock())
            if self._selection.get(rnd) is not None:
                self.host.expect_blob(m.content_hash, timeout)
                relayed = True
            data: bytes | None = None
            if parent is not None:
                self.relay_pulls += 1
                data = await self._pull_relayed(m, parent, RELAY_SHARE * timeout)
            if data is None:
                data = await self._pull(m, [m.author], max(1.0, deadline() - self.clock()))
            self.traffic.bytes_received += len(data)
            norm = await asyncio.to_thread(check_delta, data, limit, self.shapes)
        except Exception as exc:  # any failure leaves this peer out of the round
            if relayed:
                self.host.unexpect_blob(m.content_hash)
            self.traffic.dropped += 1
            self._pull_problems.append(f"pull from {m.author[:16]} failed: {exc}"[:200])
            log.info("pseudo-gradient fetch from %s failed: %s", m.author, exc)
            return None
        if relayed:
            blob = data
            self.host.provide_view(m.content_hash, len(blob), lambda lo, hi: blob[lo:hi])
            self.host.unexpect_blob(m.content_hash)
            self._relayed.append(m.content_hash)
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
        takes_part = pending.own is not None or pending.sat_out  # a member, not a joiner observing
        # Blobs we relayed in the round before stop being served (our children pulled them by now).
        for digest in (
            set(self._relayed_before) - set(self._relayed) - {self._served_blob, pending.content_hash}
        ):
            self.host.remove_blob(digest)
        self._relayed_before, self._relayed = self._relayed, []
        observers = getattr(self.members, "observed", lambda p, r: False)
        expected = {p for p in self._expected(pending.round) if not observers(p, pending.round)}
        if not contributions:
            if pending.sat_out:  # not chosen, and no chosen contribution reached us: nothing moves
                self.incomplete_rounds += 1
                self.failed_rounds_in_row += 1
                self.last_round_problem = (
                    f"round {pending.round}: none of its {len(expected)} chosen contributors' Δ arrived: "
                    + ("; ".join(self._pull_problems[:2]) or "not published or not pulled in time")
                )[:400]
                self.round = pending.round
            return  # observed a round nobody's contribution reached us for
        box = self._inboxes.get(pending.round)
        published = set(box.manifests) if box is not None else set()
        for p in expected - published - {self.me}:
            self._no_shows[p] = self._no_shows.pop(p, 0) + 1
            while len(self._no_shows) > REFUSED_MEMORY:
                self._no_shows.popitem(last=False)
        expected |= ({self.me} if pending.own is not None else set()) | set(contributions)
        missed = sorted(expected - set(contributions) - {self.me})
        if not takes_part and missed:
            # An observer (it loaded its state while this round was in flight) that did not get every
            # contribution would land on an anchor nobody else holds: it merges nothing and catches
            # up to the cohort's state after this round instead (one round behind is enough).
            self.skipped_observed += 1
            self._catch_up_past = max(self._catch_up_past, pending.round)
            log.warning(
                "observed round %d without %s: not merged, catching up to the cohort's state after it",
                pending.round,
                ", ".join(m[:12] for m in missed[:3]),
            )
            for old in [r for r in self._inboxes if r <= pending.round]:
                del self._inboxes[old]
            return
        if takes_part and len(contributions) < len(expected):
            self.incomplete_rounds += 1
            self.failed_rounds_in_row += 1
            missing = sorted(expected - set(contributions))
            why = "; ".join(self._pull_problems[:2]) or (
                f"not published or not pulled within the {self.window():.0f} s collection "
                "window (--collect-seconds, or --link-mbps to size it)"
            )
            self.last_round_problem = (
                f"round {pending.round}: {len(contributions)}/{len(expected)} contributors, missing "
                f"{', '.join(m[:12] for m in missing[:3])}: {why}"
            )[:400]
            log.warning("%s", self.last_round_problem)
        elif takes_part:
            self.failed_rounds_in_row = 0
        if takes_part and pending.collected_at:
            self.collect_s = pending.collected_at - pending.started
        # Sorted by author so every node sums in the same order and lands on the same anchor bits.
        authors = sorted(contributions)
        ordered = [contributions[a] for a in authors]
        await asyncio.to_thread(self._outer_step, ordered, pending, authors)
        # Peers whose Δ we fetched, checked and found in agreement with the rest: they count towards
        # attesting a state from now on (``swarmnode.trust``'s verified peers), outliers never do.
        for author in self.agreeing:
            if author != self.me:
                self.members.note_contributor(author)
        self.round = pending.round
        self.merges += 1
        self.merge_contributors = len(ordered)
        self.merged_own = pending.own is not None
        await self._refresh()
        # Serve our blob until the next round: slower peers may still be fetching it.
        if pending.content_hash:
            if self._served_blob and self._served_blob != pending.content_hash:  # (an unchanged Δ)
                self.host.remove_blob(self._served_blob)
            self._served_blob = pending.content_hash
        for old in [r for r in self._inboxes if r <= pending.round]:
            del self._inboxes[old]

    def _outer_step(self, contributions: list[Contribution], pending: _Pending, authors: list[str]) -> None:
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
        self.agreeing = [authors[i] for i in report.agreeing]
        self.last_merge_weights = [min(c.weight, cap) for c in contributions]
        self.clipped += report.clipped
        self.outliers += report.outliers
        self.carried_progress = report.carried if pending.published is not None else float("nan")
        self.on_weights()

    # -- joiners ----------------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Anchor hash and joiner snapshot after a merge or a load (hashing off the event loop)."""
        snap = await asyncio.to_thread(snapshot_of, self.diloco, round=self.round, step=self.step)
        self.anchor_hash = snap.anchor_hash
        self.state_server.update(snap)

    def _donors(self, choice: Choice) -> list[str]:
        """Whom to ask for the chosen state, in ``trust``'s order (verified peers first, one per
        network group first), live ones only, at most 4: a transfer that loses its donor resumes
        from the next one with the chunks it has."""
        live = set(self.members.live_peers())
        return [p for p in choice.donors if p in live][:4]

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

    def _max_steps_per_round(self) -> int:
        """Steps a round can take (``trust.check_claim``): step rounds H, plus a round of overlap;
        wall-clock rounds have no step schedule (and a joiner keeps its own step count there)."""
        if self.clock_rounds is not None:
            return 1 << 40
        return 2 * self.config.merge_every

    def _refuse(self, kind: str, peer: str, why: str) -> None:
        """Count a refused offer or state once per (kind, peer, reason): a presence repeated every
        step is one rejection, a new lie another."""
        key = (kind, peer, why[:160])
        if key in self._refused:
            self._refused.move_to_end(key)
            return
        self._refused[key] = None
        while len(self._refused) > REFUSED_MEMORY:
            self._refused.popitem(last=False)
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        self.last_refusal = f"{kind} from {peer[:16]}: {why}"[:300]
        log.info("catch-up refused %s", self.last_refusal)

    def _distrust(self, anchor_hash: str) -> None:
        self._distrusted[anchor_hash] = None
        while len(self._distrusted) > REFUSED_MEMORY:
            self._distrusted.popitem(last=False)

    async def maybe_catch_up(self, step: int) -> int:
        """A fresh node, or one two or more rounds behind, loads the cohort state a quorum of
        distinct network groups (or verified peers) attests; a replica whose anchor lost the re-sync
        vote loads the winner (``catchup.choose_source``, ``swarmnode.trust``). Presences are
        seconds old: when they attest nothing, or the chosen donors moved on, the candidates' current
        state manifests are asked for and attest instead. An unattested state is loaded only if the
        local probe passes, and rolled back otherwise. Every refusal is counted
        (``catchup/refused_*``); nothing a donor sends ends the node. Returns the step to continue
        from (a joiner adopts the cohort's step; it never goes back)."""
        if self._pending is not None:
            return step  # decide once the round in flight is merged
        limit = self.max_plausible_round()
        max_steps = self._max_steps_per_round()
        decision = choose_source(
            self.members.plausible_presences(),
            self.members.live_peers(),
            remote_addresses(self.host),
            cohort=self.cohort,
            my_round=self.round,
            my_step=step,
            my_anchor=self.anchor_hash,
            # a fresh node, or an observer that skipped a round, catches up to any newer attested state
            fresh=(step == 0 and self.round == 0) or self.round < self._catch_up_past,
            merged=self.merges > 0,
            max_round=limit,
            max_steps_per_round=max_steps,
            min_steps_per_round=0 if self.clock_rounds is not None else self.config.merge_every,
            verified=self.members.contributors(),
            quorum=self.quorum,
            refused=self._refuse,
        )
        if decision is None:
            return step
        choice: Choice | None = decision.choice
        asked = False
        if choice is not None and not choice.attested and not decision.heal:
            choice, asked = await self._attest_live(decision, step, limit, max_steps, decision.choice), True
        for _attempt in range(2):
            if choice is None or (not choice.attested and not self._may_probe(choice, decision.heal)):
                return step
            moved, step = await self._load_from(choice, decision.heal, step, limit, max_steps)
            if not moved or asked or decision.heal:
                return step
            # every donor merged since its presence: what do they serve now?
            choice, asked = await self._attest_live(decision, step, limit, max_steps, None), True
        return step

    async def _attest_live(
        self, decision: Decision, step: int, limit: int, max_steps: int, fallback: Choice | None
    ) -> Choice | None:
        """The state the candidates serve right now (their state manifests, asked concurrently):
        attested when ``quorum`` network groups serve the same one. At most once per
        ``LIVE_RETRY_S``; otherwise, or when nobody answers, ``fallback``."""
        if self.clock() < self._live_after:
            return fallback
        self._live_after = self.clock() + LIVE_RETRY_S
        peers = list(decision.candidates[:LIVE_ASK])
        my_round = self.round

        def implausible(rnd: int, donor_step: int) -> str | None:
            return check_claim(
                rnd,
                donor_step,
                my_round=my_round,
                my_step=step,
                max_round=limit,
                max_steps_per_round=max_steps,
            )

        async def ask(peer: str) -> Offer | None:
            try:
                m = await asyncio.wait_for(request_manifest(self.host, self.cohort, peer), LIVE_TIMEOUT_S)
                rnd, donor_step, anchor = int(m.round), int(m.step), str(m.anchor_hash)
            except Exception:  # a peer that does not answer attests nothing
                return None
            why = implausible(rnd, donor_step)
            if why is not None:
                self._refuse("claim", peer, why)
                return None
            return Offer(peer, rnd, donor_step, anchor)

        # Replicas merge a round at slightly different moments: answers that disagree are asked
        # again a few times, and a state counts every group seen serving it in these tries.
        seen: dict[tuple[str, int, str], Offer] = {}
        latest: dict[str, tuple[int, str]] = {}
        live: Choice | None = None
        addresses: dict[str, str] = {}
        # A replica a round ahead served the state its peer serves now a round ago: its signed
        # presences say so (peers of one network still count once).
        recent = getattr(self.members, "recent_states", lambda p: ())
        for p in peers:
            for rnd, donor_step, anchor in recent(p):
                if implausible(rnd, donor_step) is None:
                    seen[(p, rnd, anchor)] = Offer(p, rnd, donor_step, anchor)
        for attempt in range(LIVE_TRIES):
            if attempt:
                await asyncio.sleep(LIVE_SPACING_S)
            for o in await asyncio.gather(*(ask(p) for p in peers)):
                if o is not None:
                    seen[(o.peer, o.round, o.anchor_hash)] = o
                    latest[o.peer] = (o.round, o.anchor_hash)
            addresses = remote_addresses(self.host)
            live = choose_donor(
                list(seen.values()),
                addresses,
                verified=self.members.contributors(),
                my_round=decision.min_round,
                max_round=limit,
                quorum=self.quorum,
            )
            if live is None or live.attested or len(latest) < 2:
                break
        if live is not None:  # who serves it now first
            now = [p for p in live.donors if latest.get(p) == (live.round, live.anchor_hash)]
            live = dataclasses.replace(live, donors=(*now, *(p for p in live.donors if p not in now)))
        log.info(
            "state manifests asked of %d candidates: %d answers (%d distinct states, %d peers at known "
            "addresses); best: %s",
            len(peers),
            len(seen),
            len({(r, a) for _, r, a in seen}),
            sum(1 for p in latest if p in addresses),
            "none" if live is None else f"round {live.round} support {live.support}",
        )
        if live is None or (not live.attested and fallback is not None and fallback.support > live.support):
            return fallback
        return live

    def _may_probe(self, choice: Choice, heal: bool) -> bool:
        """Whether an unattested state may be pulled and probed now (counted when not)."""
        why = ""
        if self.probe is None:
            why = "no local probe to check it"
        elif choice.anchor_hash in self._distrusted:
            why = "its probe failed before"
        elif self.clock() < self._probe_after:
            why = f"one probed state per {UNATTESTED_RETRY_S:g} s"
        if why:
            self._refuse(
                "unattested",
                choice.donors[0] if choice.donors else "",
                f"{'re-sync' if heal else 'catch-up'} to round {choice.round} anchor {choice.anchor_hash[:12]}: "
                f"support {choice.support} < quorum {self.quorum} ({why})",
            )
            return False
        # An unattested state costs a full transfer and two probes: at most one per interval.
        self._probe_after = self.clock() + UNATTESTED_RETRY_S
        return True

    async def _load_from(
        self, choice: Choice, heal: bool, step: int, limit: int, max_steps: int
    ) -> tuple[bool, int]:
        """Pull the chosen state from its donors and load it (after the probe when unattested).
        Returns (every donor had moved on to another state, the step to continue from)."""
        donors = self._donors(choice)
        if not donors:
            return False, step
        t0 = self.clock()
        path = self.scratch_dir / f"state-{self.cohort[:16]}-{self.me[-12:]}.part"
        transfer = StateTransfer(self.host, self.cohort, path, expected_layout(self.diloco))
        # Long enough for the whole state at a slow volunteer link (4 GB at 0.5 B params).
        timeout = max(self.config.collect_seconds * 4, transfer.max_total / MIN_STATE_THROUGHPUT)
        my_round = self.round

        def check(manifest: Any) -> None:
            """The donor's state manifest, before any index or chunk is pulled."""
            if manifest.anchor_hash != choice.anchor_hash or int(manifest.round) != choice.round:
                raise _MovedOn(f"serves round {manifest.round} anchor {str(manifest.anchor_hash)[:12]}")
            why = check_claim(
                int(manifest.round),
                int(manifest.step),
                my_round=my_round,
                my_step=step,
                max_round=limit,
                max_steps_per_round=max_steps,
            )
            if why is not None:
                raise _Implausible(why)
            if not heal:
                try:
                    self._plausible_step(manifest, step)
                except ValueError as exc:
                    raise _Implausible(str(exc)) from None

        manifest = None
        moved = 0
        errors: list[str] = []
        try:
            for donor in donors:
                try:
                    manifest, index = await asyncio.wait_for(transfer.pull(donor, check), timeout)
                except _MovedOn as exc:
                    moved += 1
                    errors.append(f"{donor[:16]}: moved on ({exc})")
                    manifest = None
                    continue
                except _Implausible as exc:
                    self._refuse("claim", donor, str(exc))
                    errors.append(f"{donor[:16]}: {exc}")
                    manifest = None
                    continue
                except Exception as exc:  # nothing a donor sends or fails to send may end the node
                    errors.append(f"{donor[:16]}: {_reason(exc)}")
                    manifest = None
                    continue
                new_step = step if heal else self._plausible_step(manifest, step)
                try:
                    # check() made sure the donor serves the chosen anchor
                    if choice.attested:
                        await asyncio.to_thread(self._load_file, path, index, choice.anchor_hash)
                    else:
                        verdict = await asyncio.to_thread(self._load_probed, path, index, choice.anchor_hash)
                        if verdict is not None:  # the probe failed: our own state is back
                            self._distrust(choice.anchor_hash)
                            self._refuse("probe", donor, verdict)
                            self.last_catchup_error = f"{donor[:16]}: {verdict}"[:400]
                            return False, step
                except Exception as exc:  # wrong shapes, non-finite values, a lying anchor hash
                    self._refuse("state", donor, _reason(exc))
                    errors.append(f"{donor[:16]}: {_reason(exc)}")
                    manifest = None
                    transfer.discard()
                    continue
                break
        finally:
            transfer.discard()
            self.blocked_s += self.clock() - t0
        if manifest is None:
            if moved == len(donors):
                return True, step  # every donor merged since its presence
            self.traffic.dropped += 1
            self.catchup_failures += 1
            self.catchup_failures_in_row += 1
            self.last_catchup_error = "; ".join(errors)[:400] or "no donor answered"
            log.warning("catch-up failed: %s", self.last_catchup_error)
            return False, step
        self.catchup_failures_in_row = 0
        self.catchup_s = self.clock() - t0
        self.round = int(manifest.round)
        if choice.attested:
            self.loads_attested += 1
        else:
            self.loads_probed += 1
        if heal:
            self.heals += 1
        else:
            self.catchups += 1
            step = new_step  # a joiner adopts the cohort's step (step rounds), never going back
        self.step = step
        self.samples_since_publish = 0
        self._inboxes = {r: v for r, v in self._inboxes.items() if r > self.round}
        await self._refresh()
        if not heal:
            # The snapshot is the anchor after round r while the cohort may already be collecting
            # round r+1 from it: merge that round with them (our Δ would be empty) so we land on the
            # anchor they land on, then take part from the round after.
            nxt = self.round + 1
            self._chosen(nxt, member=False)
            task = self._tg.create_task(self._collect(nxt, self._window_from_now(nxt)))
            self._pending = _Pending(nxt, task)
        log.info(
            "%s from %s: round %d step %d (%s, support %d)",
            "re-synced" if heal else "caught up",
            donor,
            manifest.round,
            manifest.step,
            "attested" if choice.attested else "probed",
            choice.support,
        )
        return False, step

    def _load_file(self, path: Path, index: Any, anchor_hash: str) -> None:
        load_state_file(self.diloco, path, index, anchor_hash=anchor_hash)
        self.on_weights()

    def _load_probed(self, path: Path, index: Any, anchor_hash: str) -> str | None:
        """Load an unattested state only if the probe (held-out reward) on it is not worse than on
        our own weights by more than ``probe_tolerance``; otherwise put our own state back (anchor,
        momentum, live weights). Returns why it was refused, or None when it is loaded. Holds one
        copy of our state meanwhile (anchor, momentum, weights)."""
        assert self.probe is not None
        try:
            own = float(self.probe())
        except Exception as exc:  # our own probe failing says nothing about the donor
            log.warning("probe of our own weights failed: %s", _reason(exc))
            own = float("nan")
        saved = self.diloco.state_dict()
        local = self.diloco.local_snapshot()
        load_state_file(self.diloco, path, index, anchor_hash=anchor_hash)  # checks before changing
        try:
            self.on_weights()
            candidate = float(self.probe())
            why = f"held-out reward {candidate:.4g} vs ours {own:.4g} (tolerance {self.probe_tolerance:g})"
        except Exception as exc:
            candidate, why = float("nan"), f"probe failed on it: {_reason(exc)}"
        self.probe_rewards = (own, candidate)
        if accept_probe(own, candidate, tolerance=self.probe_tolerance):
            return None
        self.diloco.load_state_dict(saved, reset_local=False)
        with torch.no_grad():
            for name, p in self.diloco.params.items():
                p.copy_(local[name].to(device=p.device, dtype=p.dtype))
        self.on_weights()
        return f"probe refused the state: {why}"

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
            "diloco_outliers": self.outliers,
            "diloco_not_waited_for": sum(1 for v in self._no_shows.values() if v >= NO_SHOW_ROUNDS),
            "diloco_skipped_observed": self.skipped_observed,
            # merge_fanin: rounds this node was not chosen to contribute in, whether it was in the
            # last one, and its pulls through a relay parent (and those the author had to serve)
            "diloco_sat_out": self.sat_out,
            "diloco_chosen_last": self.chosen_last,
            "diloco_relay_pulls": self.relay_pulls,
            "diloco_relay_fallbacks": self.relay_fallbacks,
            "diloco_delta_bytes": self.delta_bytes,
            "diloco_blob_cap": self.max_blob_bytes,
            "catchup_failures": self.catchup_failures,
            **{
                f"catchup/refused_{k}": self.refusals.get(k, 0)
                for k in ("claim", "unattested", "probe", "state")
            },
            "catchup/attested_loads": self.loads_attested,
            "catchup/probed_loads": self.loads_probed,
            "catchup_s": self.catchup_s,
            "round": self.round,
            "anchor_hash": self.anchor_hash,
            "merges": self.merges,
            "merge_contributors": self.merge_contributors,
            # the last merge's averaging weights (capped claims; sorted by author) and our own claim:
            # in wall-clock rounds a node 3x slower contributes about a third of a fast one's weight
            "merge_weights": [round(w, 3) for w in self.last_merge_weights],
            "diloco_published_weight": self.published_weight,
            "heals": self.heals,
            "catchups": self.catchups,
            "replica_distance_before_merge": self.replica_distance,
            "carried_progress": self.carried_progress,
            "diloco_blocked_s": round(self.blocked_s, 4),
            "diloco_collect_s": round(self.collect_s, 4),
            **self.traffic.as_dict("diloco"),
        }


class _MovedOn(Exception):
    """The donor serves another state than the one chosen (it merged since its presence)."""


class _Implausible(Exception):
    """The donor's state manifest claims a round or step that cannot be true."""


def _reason(exc: BaseException) -> str:
    """One line for an error, unwrapping the task group's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:200]
