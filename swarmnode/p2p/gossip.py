"""Gossipsub set-up and the pieces that replace py-libp2p defaults that lose messages silently."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

log = logging.getLogger(__name__)

# The library's per-peer outbound queue holds 32 RPCs and drops the rest without a log above DEBUG; a burst
# of 100 publishes lost 84. Publishing waits while any peer's queue is above this mark.
PACING_HIGH_WATER = 8
# A peer whose queue never drains (stuck connection) must not block publishing forever.
PACING_MAX_WAIT_S = 5.0
# ... nor delay every publish: a peer whose queue above the mark has not shrunk for this long is
# stalled (a starved or hostile peer that stops reading) and is not waited for until it drains again;
# the library drops what does not fit its queue (counted in ``outbound_dropped``). Without this, one
# such peer held each of our round manifests back ~5 s and honest peers missed them.
PACING_STALL_S = 1.0
# A small message (a round manifest, a presence) waits at most PACING_SMALL_WAIT_S: it fits any queue,
# and held 5 s behind a slowly draining relayed queue of DeMo components it missed its round's window.
PACING_SMALL_BYTES = 16 * 1024
PACING_SMALL_WAIT_S = 0.25
# Forwarded messages are not paced (only our own publishes are), and the library's 32-packet per-peer queue
# dropped ~1200 RPCs during a 1000-message burst across 8 nodes. A larger queue absorbs relay bursts; memory
# stays bounded at OUTBOUND_QUEUE × max_message_bytes per peer.
OUTBOUND_QUEUE = 128
# Heartbeat drives mesh formation and IHAVE gossip; the default 120 s makes a fresh swarm take minutes.
HEARTBEAT_S = 0.5
# Digests remembered for equivocation detection (32 bytes each instead of a full payload each).
EQUIVOCATION_MEMORY = 4096
# The library's subscription channel holds 32 messages and drops the rest with only a warning; our
# reader drains it into asyncio at once, but a larger channel absorbs scheduling hiccups.
SUBSCRIPTION_CHANNEL = 4096
# Message ids are (origin, seqno). The library seeds seqno with whole seconds and adds one per message, so a
# node that sent 300 messages and restarted 5 s later re-issued 295 ids its peers had seen (dropped as
# duplicates, then flagged as equivocation). We seed with nanoseconds and persist a floor reserved this far
# ahead, so ids keep rising across restarts even if the clock steps back.
SEQNO_FILE = "seqno"
SEQNO_RESERVE = 1 << 32


@dataclass(slots=True)
class TopicStats:
    sent: int = 0
    received: int = 0
    delivered: int = 0
    dropped: int = 0  # local subscriber queue full
    rejected: int = 0  # failed the size cap or a validator
    own_filtered: int = 0
    bytes_out: int = 0
    bytes_in: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(slots=True)
class GossipStats:
    topics: dict[str, TopicStats] = field(default_factory=dict)
    equivocations: int = 0
    paced_waits: int = 0
    pacing_timeouts: int = 0
    stalled_skips: int = 0  # publishes that did not wait for a stalled peer's queue
    # peer -> (queue length, when it last shrank or was at/below the mark), for the stall rule
    queue_progress: dict[Any, tuple[int, float]] = field(default_factory=dict)
    outbound_dropped: dict[str, int] = field(default_factory=dict)  # reason -> RPCs the library dropped

    def topic(self, name: str) -> TopicStats:
        stats = self.topics.get(name)
        if stats is None:
            stats = self.topics[name] = TopicStats()
        return stats


def build_gossipsub(
    host: Any, stats: GossipStats, data_dir: Path
) -> tuple[Pubsub, GossipSub, DigestEquivocation]:
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        # Typed int upstream but only passed to trio.sleep, so a float works.
        heartbeat_interval=HEARTBEAT_S,  # type: ignore[arg-type]
        # Spam protection counts the publisher's own messages (10/s per topic) and drops them: rate limits
        # belong in our topic validators instead.
        spam_protection_enabled=False,
        # Adaptive gossip stretches a 0.5 s heartbeat to 30 s on a quiet swarm.
        adaptive_gossip_enabled=False,
        # Loopback swarms share one IP; the diversity check would keep meshes empty.
        eclipse_protection_enabled=False,
    )
    pubsub = Pubsub(host, router, strict_signing=True)
    pubsub.peer_queues = _RoomyQueues()
    seqnos = SeqnoCounter(data_dir / SEQNO_FILE)
    pubsub.counter = seqnos.value
    pubsub._next_seqno = seqnos.take  # type: ignore[method-assign]
    equivocation = DigestEquivocation(router)
    router._check_equivocation = equivocation.check  # type: ignore[method-assign]
    _count_outbound_drops(router, stats)
    return pubsub, router, equivocation


class SeqnoCounter:
    """Message sequence numbers that never repeat for one identity, across restarts and clock steps."""

    def __init__(self, path: Path) -> None:
        self._path = path
        floor = 0
        try:
            floor = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("seqno floor %s unreadable (%s); seeding from the clock alone", path, exc)
        self.value = max(time.time_ns(), floor)
        self._reserved = 0
        self._reserve()

    def take(self) -> bytes:
        self.value += 1
        if self.value >= self._reserved:
            self._reserve()
        return self.value.to_bytes(8, "big")

    def _reserve(self) -> None:
        self._reserved = self.value + SEQNO_RESERVE
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{self._reserved}\n")
            os.replace(tmp, self._path)
        except OSError as exc:  # the nanosecond seed alone still keeps ids apart unless the clock steps back
            log.warning("could not persist the seqno floor to %s: %s", self._path, exc)


class _RoomyQueues(dict[Any, Any]):
    """`Pubsub.peer_queues` whose new per-peer queues get OUTBOUND_QUEUE slots (the library hard-codes 32)."""

    def __setitem__(self, peer_id: Any, queue: Any) -> None:
        queue._queue.max_size = OUTBOUND_QUEUE
        super().__setitem__(peer_id, queue)


def _count_outbound_drops(router: GossipSub, stats: GossipStats) -> None:
    """The library drops RPCs to a full (or oversized for) peer queue with a DEBUG log only; count and warn."""
    original = router._handle_dropped_rpc

    def counted(peer_id: ID, rpc: rpc_pb2.RPC, reason: str) -> None:
        total = stats.outbound_dropped[reason] = stats.outbound_dropped.get(reason, 0) + 1
        if total in (1, 10, 100) or total % 1000 == 0:
            log.warning("libp2p dropped %d outbound RPCs so far (%s), latest to %s", total, reason, peer_id)
        original(peer_id, rpc, reason)

    router._handle_dropped_rpc = counted  # type: ignore[method-assign]


class DigestEquivocation:
    """Same (origin, seqno) with different content is equivocation.

    The library keeps every full message of the last 1000 (GBs with MB payloads); this keeps a bounded
    LRU of 32-byte digests.
    """

    def __init__(self, router: GossipSub, memory: int = EQUIVOCATION_MEMORY) -> None:
        self._router = router
        self._memory = memory
        self._seen: OrderedDict[bytes, bytes] = OrderedDict()
        self.detected = 0

    def check(self, msg: rpc_pb2.Message) -> bool:
        key = msg.from_id + msg.seqno
        digest = hashlib.sha256(msg.data + b"\x00".join(t.encode() for t in msg.topicIDs)).digest()
        known = self._seen.get(key)
        if known is not None:
            if known != digest:
                self.detected += 1
                log.warning("equivocation from peer %s: same seqno, different content", ID(msg.from_id))
                if self._router.scorer is not None:
                    self._router.scorer.penalize_equivocation(ID(msg.from_id), 100.0)
                return False
            return True
        self._seen[key] = digest
        if len(self._seen) > self._memory:
            self._seen.popitem(last=False)
        return True


def max_peer_queue(pubsub: Pubsub) -> int:
    return max((len(q) for q in pubsub.peer_queues.values()), default=0)


def _queues_to_wait_for(pubsub: Pubsub, stats: GossipStats, now: float) -> tuple[int, int]:
    """(peers whose queue is above the mark and drains, peers above it that stalled), updating each
    peer's progress: a queue counts as draining while it shrank (or was at/below the mark) within
    ``PACING_STALL_S``."""
    progress = stats.queue_progress
    waiting = stalled = 0
    current: dict[Any, tuple[int, float]] = {}
    for peer, queue in list(pubsub.peer_queues.items()):
        n = len(queue)
        last = progress.get(peer)
        if last is None or n <= PACING_HIGH_WATER or n < last[0]:
            current[peer] = (n, now)
        else:
            current[peer] = (n, last[1])
        if n > PACING_HIGH_WATER:
            if now - current[peer][1] > PACING_STALL_S:
                stalled += 1
            else:
                waiting += 1
    stats.queue_progress = current  # peers that left are forgotten
    return waiting, stalled


async def wait_queues_low(pubsub: Pubsub, stats: GossipStats, max_wait: float = PACING_MAX_WAIT_S) -> None:
    """Back-pressure: wait while any draining per-peer outbound queue is above the high-water mark
    (a stalled one is not waited for: ``PACING_STALL_S``)."""
    waiting, stalled = _queues_to_wait_for(pubsub, stats, trio.current_time())
    if not waiting:
        if stalled:
            stats.stalled_skips += 1
        return
    stats.paced_waits += 1
    with trio.move_on_after(max_wait):
        # The library signals nothing when a queue drains, so poll (2 ms is far below a send's latency).
        while waiting:
            await trio.sleep(0.002)
            waiting, stalled = _queues_to_wait_for(pubsub, stats, trio.current_time())
        if stalled:
            stats.stalled_skips += 1
        return
    stats.pacing_timeouts += 1
    if max_wait < PACING_MAX_WAIT_S:
        return  # a small message: sent after its short wait, nothing to warn about
    log.warning(
        "a peer's outbound queue stayed above %d for %.0f s; publishing anyway",
        PACING_HIGH_WATER,
        PACING_MAX_WAIT_S,
    )


Validator = Callable[[str, bytes], bool]


def make_topic_validator(
    topic: str, max_bytes: int, validators: list[Validator], stats: GossipStats
) -> Callable[[ID, rpc_pb2.Message], bool]:
    """Library-facing validator: size cap, then every user validator. Rejection stops delivery and forwarding."""

    def validate(_forwarder: ID, msg: rpc_pb2.Message) -> bool:
        if len(msg.data) > max_bytes:
            stats.topic(topic).rejected += 1
            log.info("rejected %d-byte message on %s: over the %d-byte cap", len(msg.data), topic, max_bytes)
            return False
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:
            stats.topic(topic).rejected += 1
            return False
        for validator in validators:
            try:
                ok = validator(origin, msg.data)
            except Exception:
                log.exception("validator for %s raised; rejecting the message", topic)
                ok = False
            if not ok:
                stats.topic(topic).rejected += 1
                return False
        return True

    return validate
