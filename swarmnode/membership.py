"""Who is in the swarm: presence out and in, the peer table, leave notices, the cohort.

Every node publishes a small ``Presence`` record every ``presence_interval_s`` (its step, round,
anchor hash, samples) and keeps the newest one heard from each peer. A peer not heard from for
``peer_timeout_s`` is no longer expected by anyone (rounds stop waiting for it), and is pruned from
the table after a few timeouts, so the table's size is bounded by the live swarm plus ``max_peers``.
A stopping node publishes ``status="leaving"``: it is dropped at once.

Hostile peers. Identities are free, so nothing here trusts a count of them:

- **Rate limit.** Each peer id has a token bucket (``presence_rate`` per second, ``presence_burst``
  deep); presences beyond it are dropped and counted (``presence/rate_limited``) before decoding.
- **Plausible peers.** A presence counts for the cohort (``announced_cohort``, ``wait_cohort``) only
  if its round is within ``round_bound()`` (set by the DiLoCo exchange: no claims of round 2**62) and
  the peer is either connected to us or has been heard ``min_presences`` times over at least
  ``min_presence_span_s``: a burst of fresh Sybil identities counts for nothing.
- **Who a round waits for** (``cohort_peers``) is narrower still: plausible peers that are connected
  to us, or whose contribution we merged in a recent round (``note_contributor``), and round
  manifest authors that are one of those. 150 Sybil presences relayed by one attacker do not make
  a single round wait.
- **Bounded state.** Every table (presences, manifest authors, contributors, rate buckets) is an LRU
  of at most ``max_peers`` entries, evicted in O(1), and pruned after 4 peer timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swarmnode.exchange.base import Host, Traffic, receive_loop
from swarmnode.protocol import Presence, codec, limits, topics

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class MembershipConfig:
    swarm: str = "default"
    presence_interval_s: float = 2.0
    peer_timeout_s: float = 15.0
    max_peers: int = 4096  # bound of every per-peer table; the stalest entry goes first
    # An honest peer sends one presence per its interval (0.5-2 s in practice) plus a leave notice:
    # 5/s with a burst of 10 never touches one, and drops 95 % of a 100/s flood.
    presence_rate: float = 5.0
    presence_burst: int = 10
    # A peer not connected to us counts after this many presences spread over this long (default:
    # half our interval), so freshly minted identities cost a sustained stream of signed messages.
    min_presences: int = 2
    min_presence_span_s: float | None = None

    def __post_init__(self) -> None:
        if not self.presence_rate > 0 or self.presence_burst < 1:
            raise ValueError(
                f"presence_rate, presence_burst must be > 0, >= 1, got {self.presence_rate}, {self.presence_burst}"
            )
        if self.min_presences < 1:
            raise ValueError(f"min_presences must be >= 1, got {self.min_presences}")
        if not self.presence_interval_s > 0:
            raise ValueError(f"presence_interval_s must be > 0, got {self.presence_interval_s}")
        if not self.peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {self.max_peers}")


RECENT_STATES = 4
MAX_TIMED_STEPS = 8  # a presence further ahead than this was a catch-up, not training
# New cohort peers are connected to ahead of their first pull (``Membership._preconnect``).
PRECONNECT_MAX = 4
PRECONNECT_RETRY_S = 60.0
PRECONNECT_TIMEOUT_S = 30.0


@dataclass(slots=True)
class _Heard:
    """One peer's presence history: enough to judge plausibility, nothing that grows."""

    first: float
    last: float
    count: int
    presence: Any
    observed: int = -1  # the last round it merged as an observer (presence status "observing")
    # the last few (round, step, anchor) it advertised: replicas a round apart still attest a state
    recent: tuple[tuple[int, int, str], ...] = ()
    step_at: float = -1.0  # when we first heard its current step (-1: not seen it change yet)
    step_s: float = 0.0  # its seconds per step, from the steps we saw it take (0: not measured yet)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class _LRU(OrderedDict[str, Any]):
    """A dict that keeps its most recently touched keys last and at most ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass(kw_only=True, slots=True)
class Status:
    """What this node says about itself in each presence."""

    step: int = 0
    round: int = 0
    anchor_hash: str = ""
    samples: int = 0
    observing: bool = False  # merging the round in flight without a contribution (just caught up)
    step_s: float = 0.0  # recent seconds per training step (0: not measured yet)


class Membership:
    def __init__(
        self,
        config: MembershipConfig,
        *,
        host: Host,
        cohort: str,
        engine: str,
        hardware: str,
        addrs: Callable[[], list[str]],
        status: Callable[[], Status],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.host = host
        self.me = str(host.peer_id)
        self.cohort = cohort
        self.engine = engine
        self.hardware = hardware
        self.addrs = addrs
        self.status = status
        self.clock = clock
        self.topic = topics.topic(config.swarm, topics.PRESENCE)
        self.traffic = Traffic()
        limit = config.max_peers
        self.peers: _LRU = _LRU(limit)  # peer id -> _Heard, stalest first
        self._members: _LRU = _LRU(limit)  # cohort peers seen through their round manifests -> time
        self._contributors: _LRU = _LRU(limit)  # peers whose contribution we merged -> time
        self._buckets: _LRU = _LRU(limit)  # peer id -> _Bucket (presence rate limit)
        # The newest round an honest peer can be in (the DiLoCo exchange sets it); None: no bound.
        self.round_bound: Callable[[], int] | None = None
        self._changed = asyncio.Event()
        self.peers_left = 0
        self.rate_limited = 0
        self.implausible = 0  # presences heard with a round past round_bound
        self._heartbeat: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._connecting: set[str] = set()  # cohort peers we are connecting to ahead of any pull
        self._connect_after: _LRU = _LRU(limit)  # peer -> when we may try to connect to it again
        self.preconnects = 0

    # -- the table --------------------------------------------------------------------------------

    def _live(self, t: float, now: float) -> bool:
        return now - t <= self.config.peer_timeout_s

    def _connected(self) -> set[str]:
        try:
            return {str(p) for p in self.host.connected_peers()}
        except Exception:  # a transport shutting down: nobody counts as connected
            return set()

    def live_peers(self) -> list[str]:
        now = self.clock()
        return [p for p, h in self.peers.items() if self._live(h.last, now)]

    def plausible_presences(self, connected: set[str] | None = None) -> dict[str, Any]:
        """{peer: presence} of the live peers whose presence counts: round within ``round_bound``,
        and connected to us or heard ``min_presences`` times over ``min_presence_span_s``."""
        now = self.clock()
        conn = self._connected() if connected is None else connected
        bound = self.round_bound() if self.round_bound is not None else None
        span = self.config.min_presence_span_s
        if span is None:
            span = self.config.presence_interval_s / 2
        out = {}
        for p, h in self.peers.items():
            if not self._live(h.last, now):
                continue
            if bound is not None and int(getattr(h.presence, "round", 0)) > bound:
                continue
            repeated = h.count >= self.config.min_presences and h.last - h.first >= span
            if p in conn or repeated:
                out[p] = h.presence
        return out

    def cohort_peers(self) -> list[str]:
        """The peers a round waits for: plausible cohort peers that are connected to us or whose
        contribution we merged recently, and round manifest authors that are one of those."""
        now = self.clock()
        conn = self._connected()
        horizon = 4 * self.config.peer_timeout_s
        proven = conn | {p for p, t in self._contributors.items() if now - t <= horizon}
        members = {p for p, t in self._members.items() if self._live(t, now) and p in proven}
        announced = {p for p in self._announced(conn) if p in proven}
        observing = {p for p, h in self.peers.items() if getattr(h.presence, "status", "") == "observing"}
        return sorted((members | announced) - observing)

    def presences(self) -> dict[str, Any]:
        """Every presence held (plausible or not); ``plausible_presences`` is what to trust."""
        return {p: h.presence for p, h in self.peers.items()}

    def recent_states(self, peer: str) -> tuple[tuple[int, int, str], ...]:
        """The last few (round, step, anchor hash) ``peer`` advertised, oldest first."""
        entry = self.peers.get(peer)
        return () if entry is None else entry.recent

    def observed(self, peer: str, rnd: int) -> bool:
        """Whether ``peer`` said it merges round ``rnd`` as an observer (a joiner, no Δ of its own)."""
        entry = self.peers.get(peer)
        return entry is not None and entry.observed == rnd

    def step_seconds(self) -> float:
        """The slowest step time among the cohort peers a round waits for (0 when none is known): a
        step round's collection must outlast a peer that publishes one of *its* steps later, not one
        of ours. Per peer, the larger of what its presence says (``step_s``) and what we measured
        from the step changes its presences show (a presence interval coarse); the window that
        reads it is capped, so a peer that overstates it only lengthens rounds it is missing from."""
        return max(
            (
                max(h.step_s, float(getattr(h.presence, "step_s", 0.0)))
                for p in self.cohort_peers()
                if (h := self.peers.get(p)) is not None
            ),
            default=0.0,
        )

    def seconds_to_step(self, peer: str, step: int, slack: float = 1.0) -> float | None:
        """How long until live ``peer`` reaches ``step``, from its last presence: ``slack`` x its
        steps to go x its step time, less how long ago we heard it (so the answer stays put between
        presences); zero or less once it is there (minus how long ago we heard it get there: its
        round manifest may still be in flight). None when we cannot tell (not heard, not live, no
        step time yet). A step round waits this long for a peer a few steps behind."""
        entry = self.peers.get(peer)
        now = self.clock()
        if entry is None or not self._live(entry.last, now):
            return None
        behind = int(step) - int(getattr(entry.presence, "step", 0))
        if behind <= 0:
            return -(now - (entry.step_at if entry.step_at >= 0 else entry.first))
        step_s = max(entry.step_s, _bounded_step_s(getattr(entry.presence, "step_s", 0.0)))
        if step_s <= 0:
            return None
        return max(0.0, slack * behind * step_s - (now - entry.last))

    def presence_of(self, peer: str) -> Any:
        entry = self.peers.get(peer)
        return None if entry is None else entry.presence

    def note_member(self, peer: str) -> None:
        """A cohort peer proved itself active another way (a round manifest)."""
        self._members.touch(peer, self.clock())

    def note_contributor(self, peer: str) -> None:
        """We fetched, checked and merged this peer's contribution: rounds wait for it from now on,
        even when it reaches us only through relays."""
        self._contributors.touch(peer, self.clock())

    def contributors(self) -> list[str]:
        """Peers whose contribution we merged within 4 peer timeouts (``swarmnode.trust``'s
        ``verified``)."""
        horizon = self.clock() - 4 * self.config.peer_timeout_s
        return sorted(p for p, t in self._contributors.items() if t >= horizon)

    def announced_cohort(self) -> list[str]:
        """Live, plausible cohort peers whose presence we hold (what a catch-up decision reads)."""
        return self._announced(self._connected())

    def _announced(self, conn: set[str]) -> list[str]:
        return sorted(
            p
            for p, presence in self.plausible_presences(conn).items()
            if getattr(presence, "cohort", None) == self.cohort
        )

    async def wait_cohort(self, n: int, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the presence of ``n`` plausible cohort peers arrived;
        True if so. A round manifest alone does not count: a joiner needs their presence (round,
        anchor) to decide whether to catch up before its first step."""
        deadline = self.clock() + timeout_s
        while len(self.announced_cohort()) < n:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))
        return True

    def allow(self, origin: str) -> bool:
        """Take one token from ``origin``'s presence bucket; False (counted) when it is empty."""
        now = self.clock()
        rate, burst = self.config.presence_rate, float(self.config.presence_burst)
        b = self._buckets.get(origin)
        if b is None:
            b = _Bucket(tokens=burst, at=now)
        else:
            b.tokens = min(burst, b.tokens + (now - b.at) * rate)
            b.at = now
        self._buckets.touch(origin, b)
        if b.tokens < 1.0:
            self.rate_limited += 1
            return False
        b.tokens -= 1.0
        return True

    def observe(self, origin: str, record: Any) -> None:
        if getattr(record, "status", "active") == "leaving":
            # Gone now: rounds in collection stop waiting for it (no peer timeout to sit out).
            self.peers.pop(origin, None)
            self._members.pop(origin, None)
            self._contributors.pop(origin, None)
            self.peers_left += 1
        else:
            now = self.clock()
            if self.round_bound is not None and int(getattr(record, "round", 0)) > self.round_bound():
                self.implausible += 1
            old = self.peers.get(origin)
            if old is None or not self._live(old.last, now):
                heard = _Heard(first=now, last=now, count=1, presence=record)
            else:
                heard = _Heard(
                    first=old.first,
                    last=now,
                    count=min(old.count + 1, 1 << 20),
                    presence=record,
                    observed=old.observed,
                    recent=old.recent,
                    step_at=old.step_at,
                    step_s=old.step_s,
                )
                _time_steps(
                    heard, int(getattr(old.presence, "step", 0)), int(getattr(record, "step", 0)), now
                )
            if old is None and getattr(record, "cohort", "") == self.cohort:
                self._preconnect(origin)
            if getattr(record, "status", "active") == "observing":
                heard.observed = int(getattr(record, "round", 0)) + 1
            state = (int(getattr(record, "round", 0)), int(getattr(record, "step", 0)), record.anchor_hash)
            if state[2] and all((r, a) != (state[0], state[2]) for r, _, a in heard.recent):
                heard.recent = (*heard.recent, state)[-RECENT_STATES:]
            self.peers.touch(origin, heard)
        self._changed.set()

    def prune(self) -> None:
        """Forget peers silent for 4 timeouts (they re-enter with their next presence)."""
        horizon = self.clock() - 4 * self.config.peer_timeout_s
        for table in (self.peers, self._members, self._contributors):
            while table and _heard(next(iter(table.values()))) < horizon:
                table.popitem(last=False)
        while self._buckets and next(iter(self._buckets.values())).at < horizon:
            self._buckets.popitem(last=False)

    # -- the wire ---------------------------------------------------------------------------------

    def record(self, status: str = "active") -> Presence:
        s = self.status()
        if status == "active" and getattr(s, "observing", False):
            status = "observing"
        return Presence(
            peer_id=self.me,
            addrs=list(self.addrs())[: limits.MAX_ADDRS],
            swarm=self.config.swarm,
            cohort=self.cohort,
            engine=self.engine,  # type: ignore[arg-type]
            hardware=self.hardware[: limits.MAX_HARDWARE_LEN],
            step=int(s.step),
            round=int(s.round),
            samples=int(s.samples),
            anchor_hash=s.anchor_hash,
            status=status,  # type: ignore[arg-type]
            step_s=_bounded_step_s(getattr(s, "step_s", 0.0)),
        )

    async def publish(self, status: str = "active") -> None:
        data = codec.encode(self.record(status))
        await self.host.publish(self.topic, data)
        self.traffic.bytes_sent += len(data)

    def _handle(self, origin: str, data: bytes) -> None:
        if not self.allow(origin):
            self.traffic.dropped += 1  # counted, not logged: a flood would flood the log too
            return
        record = codec.decode(data)
        if not isinstance(record, Presence):
            raise ValueError(f"expected a presence record, got {type(record).__name__}")
        if record.peer_id != origin:
            raise ValueError("presence peer_id does not match the signer")
        self.observe(origin, record)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:  # a failed heartbeat is retried on the next tick
                log.warning("presence publish failed: %s", exc)
            self.prune()
            await asyncio.sleep(self.config.presence_interval_s)

    def _preconnect(self, peer: str) -> None:
        """Open a connection to a cohort peer we just heard of, before its first pull: reaching a peer
        behind NAT goes through a relay and takes seconds the first time (a joiner's first rounds
        missed contributions for it). Bounded: ``PRECONNECT_MAX`` at a time, one try per peer per
        ``PRECONNECT_RETRY_S`` (a burst of Sybil presences costs a few failed dials, nothing more)."""
        connect = getattr(self.host, "connect", None)
        now = self.clock()
        if (
            self._tg is None
            or connect is None
            or peer in self._connecting
            or len(self._connecting) >= PRECONNECT_MAX
            or self._connect_after.get(peer, float("-inf")) > now
            or peer in self._connected()
        ):
            return
        self._connecting.add(peer)
        self._connect_after.touch(peer, now + PRECONNECT_RETRY_S)
        self.preconnects += 1

        async def go() -> None:
            try:
                await connect(peer, timeout=PRECONNECT_TIMEOUT_S)
            except Exception as exc:  # the first pull will try again
                log.debug("pre-connect to %s failed: %s", peer, exc)
            finally:
                self._connecting.discard(peer)

        self._tg.create_task(go())

    def start(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        tg.create_task(receive_loop(self.host, self.topic, self.me, self._handle, self.traffic))
        self._heartbeat = tg.create_task(self._heartbeat_loop())

    async def leave(self) -> None:
        """Stopped or budget spent: tell peers, so no round waits for a contribution we won't send."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()  # no "active" heartbeat may follow the leave notice
        try:
            await asyncio.wait_for(self.publish("leaving"), 1.0)
        except Exception as exc:  # leaving anyway; peers fall back to the peer timeout
            log.info("leave notice not sent: %s", exc)

    def statistics(self) -> dict[str, Any]:
        return {
            "peers": len(self.live_peers()),
            "cohort_peers": len(self.cohort_peers()),
            "peers_left": self.peers_left,
            "presence/rate_limited": self.rate_limited,
            "presence/preconnects": self.preconnects,
            "presence/implausible": self.implausible,
            "presence/table": len(self.peers),
            **self.traffic.as_dict("presence"),
        }


def _bounded_step_s(value: Any) -> float:
    v = float(value)
    return min(v, limits.MAX_STEP_S) if math.isfinite(v) and v > 0 else 0.0


def step_ema(prev: float, dt: float) -> float:
    """Seconds per step, smoothed: the first measurement as it is, then 0.7 old + 0.3 new. Our own
    (``DiLoCoExchange``) and a peer's (from its presences) are smoothed alike."""
    return dt if prev == 0 else 0.7 * prev + 0.3 * dt


def _time_steps(heard: _Heard, old_step: int, new_step: int, now: float) -> None:
    """Update a peer's step time when its presence shows a later step. The first change we see only
    starts the clock (we did not see that step begin); a catch-up that jumps many steps, or a step
    count going back, restarts it."""
    if new_step == old_step:
        return
    if new_step < old_step or new_step - old_step > MAX_TIMED_STEPS or heard.step_at < 0:
        heard.step_at = now
        return
    dt = (now - heard.step_at) / (new_step - old_step)
    heard.step_s = step_ema(heard.step_s, dt)
    heard.step_at = now


def _heard(entry: Any) -> float:
    """When a table entry was last heard: peers hold a ``_Heard``, the other tables a time."""
    return float(entry.last if isinstance(entry, _Heard) else entry)
