"""Coordinator-free round identification.

Every node knows the swarm's genesis time and round length (both part of the shared swarm config),
so round ids are a pure function of the wall clock: no leader, no election, no round-start message.
A round r spans ``[round_start(r), round_start(r+1))``; its collection window closes at
``deadline(r) = round_start(r) + collect_seconds`` — contributions that arrive later are left out so
a node never waits on a slow or dead peer. Clocks are injectable so tests use a fake one.

Step-based rounds (round = step // H) need no clock and live in ``swarmnode.exchange.diloco``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["RoundClock", "RoundsConfig", "genesis_from_swarm_id"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Derived genesis times fall inside the last day before this epoch second, so every node derives the
# same genesis from the swarm id alone and it always lies in the past.
_GENESIS_EPOCH = 1_700_000_000.0


def genesis_from_swarm_id(swarm_id: str) -> float:
    """A genesis time every node derives from the swarm id alone (sha256 → offset within a day)."""
    if not swarm_id:
        raise ValueError("swarm_id must be non-empty")
    offset = int.from_bytes(hashlib.sha256(swarm_id.encode()).digest()[:8], "big") % 86_400
    return _GENESIS_EPOCH - float(offset)


@dataclass(kw_only=True, slots=True)
class RoundClock:
    """Round ids from wall-clock time: round r starts at genesis + r·round_seconds."""

    genesis: float
    round_seconds: float
    collect_seconds: float
    clock: Clock = time.time  # wall clock: rounds must agree across machines, monotonic clocks don't

    def __post_init__(self) -> None:
        if not math.isfinite(self.genesis):
            raise ValueError(f"genesis must be a finite unix time, got {self.genesis}")
        if not (math.isfinite(self.round_seconds) and self.round_seconds > 0):
            raise ValueError(f"round_seconds must be > 0, got {self.round_seconds}")
        if not (math.isfinite(self.collect_seconds) and 0 < self.collect_seconds <= self.round_seconds):
            raise ValueError(
                f"collect_seconds must be in (0, round_seconds={self.round_seconds}], got {self.collect_seconds}"
            )

    @classmethod
    def for_swarm(
        cls,
        swarm_id: str,
        *,
        round_seconds: float,
        collect_seconds: float,
        genesis: float | None = None,
        clock: Clock = time.time,
    ) -> RoundClock:
        """The clock every member of ``swarm_id`` shares: the configured genesis, or one derived
        from the id when none is given."""
        g = genesis_from_swarm_id(swarm_id) if genesis is None else genesis
        return cls(genesis=g, round_seconds=round_seconds, collect_seconds=collect_seconds, clock=clock)

    def round_at(self, t: float) -> int:
        """The round containing time ``t`` (negative before genesis)."""
        return math.floor((t - self.genesis) / self.round_seconds)

    def current(self) -> int:
        return self.round_at(self.clock())

    def round_start(self, r: int) -> float:
        return self.genesis + r * self.round_seconds

    def round_end(self, r: int) -> float:
        return self.round_start(r + 1)

    def deadline(self, r: int) -> float:
        """When collection for round r closes."""
        return self.round_start(r) + self.collect_seconds

    def on_time(self, r: int, t: float) -> bool:
        """Whether a contribution for round r that arrived at ``t`` counts (inside r, not past the
        deadline). Early ones (for a round not yet started) are refused too: a fast clock or a replay."""
        return self.round_start(r) <= t <= self.deadline(r)

    def seconds_until(self, t: float) -> float:
        return max(0.0, t - self.clock())

    async def wait_round_end(self, r: int, *, sleep: Sleep = asyncio.sleep) -> int:
        """Sleep until round r is over; returns the round now running. Bounded: it sleeps at most
        until ``round_end(r)`` as measured by ``clock`` (re-checked, since sleeps can undershoot)."""
        for _ in range(1000):
            remaining = self.round_end(r) - self.clock()
            if remaining <= 0:
                break
            await sleep(remaining)
        return self.current()

    async def wait_deadline(self, r: int, *, sleep: Sleep = asyncio.sleep) -> None:
        """Sleep until collection for round r has closed."""
        for _ in range(1000):
            remaining = self.deadline(r) - self.clock()
            if remaining <= 0:
                return
            await sleep(remaining)


# The collection window covers pulling every expected peer's Δ at the declared link speed this many
# times over (a busy link, a slow peer), and never less than the floor (gossip and scheduling).
COLLECT_SAFETY = 3.0
COLLECT_FLOOR_S = 10.0


def collect_window(delta_bytes: int, peers: int, link_mbps: float, *, round_seconds: float = 0.0) -> float:
    """Default seconds a round waits for pseudo-gradients: ``peers`` pulls of ``delta_bytes`` at
    ``link_mbps`` with a safety factor; capped by the round length for wall-clock rounds (then the
    exchange reports, in its health, rounds whose pulls did not finish)."""
    need = COLLECT_FLOOR_S + COLLECT_SAFETY * max(1, peers) * delta_bytes / (link_mbps * 125_000.0)
    if round_seconds > 0:
        need = min(need, round_seconds)
    return round(need, 1)


@dataclass(kw_only=True, slots=True)
class RoundsConfig:
    swarm: str = "default"
    merge_every: int = 0  # H inner steps per round; 0: wall-clock rounds (round_seconds)
    round_seconds: float = 0.0  # > 0: every node ends round r at the same wall-clock moment
    genesis: float | None = None  # unix time of round 0; None: derived from the swarm id
    collect_seconds: float = 10.0  # how long a round waits for peers' pseudo-gradients at most
    max_blob_bytes: int = 256 * 1024 * 1024
    codec: str = "int8"
    expect_peers: int = 1  # cohort peers to hear before the first step (bounded by join_wait_s)
    join_wait_s: float = 3.0
    # Contributors per round: with more live members, a rotating choice of this many
    # (``exchange.fanin``) contributes and every member pulls only theirs, through a relay tree of
    # this branching; the others carry their whole progress to a later round. 0: every member.
    merge_fanin: int = 8
    relay_branching: int = 2

    def __post_init__(self) -> None:
        if not (self.merge_every > 0) ^ (self.round_seconds > 0):
            raise ValueError("set exactly one of merge_every (steps) and round_seconds (wall clock)")
        if not self.collect_seconds > 0:
            raise ValueError(f"collect_seconds must be > 0, got {self.collect_seconds}")
        if self.merge_fanin < 0 or self.merge_fanin == 1:
            raise ValueError(f"merge_fanin must be 0 (every member) or >= 2, got {self.merge_fanin}")
        if self.relay_branching < 1:
            raise ValueError(f"relay_branching must be >= 1, got {self.relay_branching}")
        if self.round_seconds and self.collect_seconds > self.round_seconds:
            raise ValueError(
                f"collect_seconds must be in (0, round_seconds={self.round_seconds}], got {self.collect_seconds}"
            )
