"""Peer discovery and re-dialing: bootstrap addresses with exponential backoff, plus Kademlia lookups."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import multiaddr
import trio
from libp2p.abc import INotifee
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 3.0
# Re-dial backoff: fast while a swarm forms, capped so a restarted bootstrap node is found within ~5 s.
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 5.0


def forget_failure(host: Any, peer_id: ID) -> None:
    """Lift the library's negative dial cache for one peer.

    A peer whose addresses all failed once is refused for 60 s, before even checking for a live connection:
    a restarted bootstrap stayed unreachable for a minute and streams to a peer that had reconnected to us
    failed. Our own re-dial loop and the callers' timeouts bound retries instead.
    """
    with contextlib.suppress(Exception):
        host.get_network().unblock_peer(peer_id)


class ReconnectNotifee(INotifee):
    """Forgets a peer's dial failures as soon as it connects (in either direction)."""

    def __init__(self, host: Any) -> None:
        self._host = host

    async def connected(self, network: Any, conn: Any) -> None:
        forget_failure(self._host, conn.muxed_conn.peer_id)

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class Dialer:
    """Runs in the trio thread. `new_host(bootstrap=...)` gives up for good after 3 failed re-dials; this never does."""

    def __init__(self, host: Any, dht: KadDHT | None, bootstrap: list[str], target_peers: int) -> None:
        self.host = host
        self.dht = dht
        self._bootstrap_addrs = bootstrap
        self.target_peers = target_peers
        self.stats = {"attempts": 0, "failures": 0, "dht_lookups": 0}
        self._lookup_due = 0.0
        host.get_network().register_notifee(ReconnectNotifee(host))

    def statistics(self) -> dict[str, int]:
        return dict(self.stats)

    async def run(self) -> None:
        """Keep dialing bootstrap (and DHT-discovered) peers while below target_peers; never give up."""
        me = self.host.get_id()
        bootstrap = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in self._bootstrap_addrs]
        bootstrap = [b for b in bootstrap if b.peer_id != me]
        backoff = BACKOFF_MIN_S
        while True:
            try:
                backoff = await self._dial_round(me, bootstrap, backoff)
            except Exception:
                # The loop must never die: a node below target keeps trying for as long as it runs.
                log.exception("peer dialing round failed; retrying")
                backoff = BACKOFF_MAX_S
            await trio.sleep(backoff)

    async def _dial_round(self, me: ID, bootstrap: list[PeerInfo], backoff: float) -> float:
        """One round of dialing; returns how long to wait before the next one."""
        before = set(self.host.get_connected_peers())
        if len(before) >= self.target_peers:
            return 1.0
        candidates: dict[ID, PeerInfo] = {b.peer_id: b for b in bootstrap if b.peer_id not in before}
        if self.dht is not None:
            peerstore = self.host.get_peerstore()
            with_addrs = set(peerstore.peers_with_addrs())
            for pid in self.dht.routing_table.get_peer_ids():
                if pid != me and pid not in before and pid not in candidates and pid in with_addrs:
                    candidates[pid] = PeerInfo(pid, peerstore.addrs(pid))
        room = self.target_peers - len(before)
        async with trio.open_nursery() as dials:
            for info in list(candidates.values())[: max(room, len(bootstrap))]:
                dials.start_soon(self._dial, info)
        if self.dht is not None and before and trio.current_time() >= self._lookup_due:
            # A lookup of our own id returns the peers nearest to us and fills the routing table.
            self._lookup_due = trio.current_time() + BACKOFF_MAX_S
            self.stats["dht_lookups"] += 1
            with trio.move_on_after(DIAL_TIMEOUT_S), contextlib.suppress(Exception):
                for pid in before:
                    await self.dht.add_peer(pid)
                await self.dht.peer_routing.find_closest_peers_network(me.to_bytes())
        after = set(self.host.get_connected_peers())
        return BACKOFF_MIN_S if after - before else min(backoff * 2, BACKOFF_MAX_S)

    async def _dial(self, info: PeerInfo) -> None:
        self.stats["attempts"] += 1
        forget_failure(self.host, info.peer_id)
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self.host.connect(info)
        except Exception as exc:  # any dial failure is retried with backoff
            self.stats["failures"] += 1
            log.debug("dial %s failed: %r", info.peer_id, exc)
