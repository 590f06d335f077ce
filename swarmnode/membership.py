"""Who is in the swarm: presence out and in, the peer table, leave notices, the cohort.

Every node publishes a small ``Presence`` record every ``presence_interval_s`` (its step, round,
anchor hash, samples) and keeps the newest one heard from each peer. A peer not heard from for
``peer_timeout_s`` is no longer expected by anyone (rounds stop waiting for it), and is pruned from
the table after a few timeouts, so the table's size is bounded by the live swarm plus ``max_peers``.
A stopping node publishes ``status="leaving"``: it is dropped at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
    max_peers: int = 4096  # peer table bound; the stalest entry goes first

    def __post_init__(self) -> None:
        if not self.presence_interval_s > 0:
            raise ValueError(f"presence_interval_s must be > 0, got {self.presence_interval_s}")
        if not self.peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {self.max_peers}")


@dataclass(kw_only=True, slots=True)
class Status:
    """What this node says about itself in each presence."""

    step: int = 0
    round: int = 0
    anchor_hash: str = ""
    samples: int = 0


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
        self.peers: dict[str, tuple[float, Any]] = {}  # peer id -> (last heard, presence)
        self._members: dict[str, float] = {}  # cohort peers seen through their round manifests
        self._changed = asyncio.Event()
        self.peers_left = 0
        self._heartbeat: asyncio.Task[None] | None = None

    # -- the table --------------------------------------------------------------------------------

    def live_peers(self) -> list[str]:
        now = self.clock()
        return [p for p, (t, _) in self.peers.items() if now - t <= self.config.peer_timeout_s]

    def cohort_peers(self) -> list[str]:
        now = self.clock()
        timeout = self.config.peer_timeout_s
        members = {p for p, t in self._members.items() if now - t <= timeout}
        return sorted(members | set(self.announced_cohort()))

    def presences(self) -> dict[str, Any]:
        return {p: presence for p, (_, presence) in self.peers.items()}

    def presence_of(self, peer: str) -> Any:
        entry = self.peers.get(peer)
        return None if entry is None else entry[1]

    def note_member(self, peer: str) -> None:
        """A cohort peer proved itself active another way (a round manifest)."""
        self._members[peer] = self.clock()
        self._bound(self._members)

    def announced_cohort(self) -> list[str]:
        """Live cohort peers whose presence we hold (what a catch-up decision reads)."""
        now = self.clock()
        return sorted(
            p
            for p, (t, presence) in self.peers.items()
            if now - t <= self.config.peer_timeout_s and getattr(presence, "cohort", None) == self.cohort
        )

    async def wait_cohort(self, n: int, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the presence of ``n`` cohort peers arrived; True if so.
        A round manifest alone does not count: a joiner needs their presence (round, anchor) to
        decide whether to catch up before its first step."""
        deadline = self.clock() + timeout_s
        while len(self.announced_cohort()) < n:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))
        return True

    def observe(self, origin: str, record: Any) -> None:
        if getattr(record, "status", "active") == "leaving":
            # Gone now: rounds in collection stop waiting for it (no peer timeout to sit out).
            self.peers.pop(origin, None)
            self._members.pop(origin, None)
            self.peers_left += 1
        else:
            self.peers[origin] = (self.clock(), record)
            self._bound(self.peers)
        self._changed.set()

    def prune(self) -> None:
        """Forget peers silent for 4 timeouts (they re-enter with their next presence)."""
        horizon = self.clock() - 4 * self.config.peer_timeout_s
        for table in (self.peers, self._members):
            for p in [p for p, v in table.items() if _heard(v) < horizon]:
                del table[p]

    def _bound(self, table: dict[str, Any]) -> None:
        while len(table) > self.config.max_peers:
            stalest = min(table, key=lambda p: _heard(table[p]))
            del table[stalest]

    # -- the wire ---------------------------------------------------------------------------------

    def record(self, status: str = "active") -> Presence:
        s = self.status()
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
        )

    async def publish(self, status: str = "active") -> None:
        data = codec.encode(self.record(status))
        await self.host.publish(self.topic, data)
        self.traffic.bytes_sent += len(data)

    def _handle(self, origin: str, data: bytes) -> None:
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

    def start(self, tg: asyncio.TaskGroup) -> None:
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
            **self.traffic.as_dict("presence"),
        }


def _heard(entry: Any) -> float:
    """When a table entry was last heard: peers hold (time, presence), cohort members a time."""
    return float(entry[0] if isinstance(entry, tuple) else entry)
