"""Circuit relay v2 for nodes behind NAT: a bounded relay service on reachable nodes, reservations on NATed ones.

Measured in the namespace bed (tests/netns.py) with py-libp2p 0.8.1: a NATed node that reserves a slot on
a public node is reachable through `/p2p/<relay>/p2p-circuit/p2p/<it>`; the first request from a node
behind another router took 2.2 s (the direct dial gets a 2 s head start), and a 2 MiB blob pull rides the
same relayed connection. The library does not dial circuit addresses by itself (the swarm skips them), so
`connect` races a direct dial against an explicit circuit dial; after that every stream to the peer (blob
pulls, requests) rides whichever connection came up. The transport hides it: exchanges see a peer that
answers (Host._open_stream is the only caller).

A direct dial to a NATed peer's private address does not fail fast: the SYN goes nowhere and the kernel
retries for ~2 minutes. So the path that reached a peer last starts first, the other SECOND_PATH_AFTER_S
later (or as soon as the first fails), and the direct dial is bounded by DIRECT_DIAL_S.

Every node runs the STOP side (accepts relayed connections). The HOP side (relaying for others) answers
only while this node's reachability probe says it is public and `HostConfig.relay_service` is on, within
the configured limits (reservations, circuits per peer, bytes and seconds per circuit). A node that learns
it is behind NAT keeps `relay_reservations` reservations on connected peers that relay, replacing any it
loses (relay gone, restarted, or expired) within CHECK_S.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import multiaddr
import trio
from libp2p.abc import INotifee
from libp2p.connection_types import ConnectionType
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

log = logging.getLogger(__name__)


class _QuietReservationEnd(logging.Filter):
    """The library's HOP handler reads on after a RESERVE and logs the client's ordinary close as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Error reading from hop stream") and text.endswith(": "))


logging.getLogger("libp2p.relay.circuit_v2.protocol").addFilter(_QuietReservationEnd())

# How often reservations are checked; a lost relay is replaced within this (plus a reservation round trip).
CHECK_S = 2.0
# Reserve again well before the relay's TTL (3600 s by default) runs out.
REFRESH_S = 600.0
# A peer that refused a reservation (not a relay, full, not public yet) is asked again after 5 s, then after
# twice as long each time, up to 5 minutes: a public node refuses until its own probe says it is public.
REFUSED_COOLDOWN_S = (5.0, 300.0)
# A circuit attempt through a relay the destination has no reservation on fails in ~0.5 s (NO_RESERVATION).
CIRCUIT_TIMEOUT_S = 10.0
MAX_RELAYS_TRIED = 4
# The path that worked last for a peer starts at once, the other after this (or as soon as the first fails).
SECOND_PATH_AFTER_S = 2.0
# A direct dial to a NATed peer's private address can hang until the kernel's SYN timeout (~2 min).
DIRECT_DIAL_S = 10.0
# A peer reached only through a relay is dialled through one first for this long.
RELAYED_FIRST_S = 600.0
MAX_REMEMBERED = 4096
# A relay that vanishes without closing its connections (power cut, link loss) is not noticed by TCP for
# ~15 minutes (py-libp2p sets no keepalive): each reserved relay is pinged this often, and its connection
# is closed after PING_FAILURES missed pongs (so a dead relay is dropped within ~15 s).
PING_S = 5.0
PING_TIMEOUT_S = 5.0
PING_FAILURES = 2


class Relay:
    """Both halves of circuit relay v2 for one host; runs in the trio thread."""

    def __init__(
        self,
        host: Any,
        *,
        serve: bool,
        limits: RelayLimits,
        reservations: int,
        is_public: Callable[[], bool],
        is_behind_nat: Callable[[], bool],
        hole_punching: bool = True,
    ) -> None:
        self.host = host
        self._serve = serve
        self._is_public = is_public
        self._is_behind_nat = is_behind_nat
        self._wanted = reservations
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=False)
        config = RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT, limits=limits)
        self.transport = CircuitV2Transport(host, self.protocol, config)
        # DCUtR: over a relayed connection both sides swap their predicted public addresses and dial each
        # other at once (TCP simultaneous open from the listen port); the library drives it by itself for
        # every relayed connection and closes the relayed one 60 s after a direct one verifies.
        self.dcutr = DCUtRProtocol(host, dial_timeout=5) if hole_punching else None
        # An exception out of a stream handler tears down the connection's nursery and with it the host; the
        # library's handlers can raise while closing a stream that was reset. The services register these
        # attributes when they start, so the guarded versions are the ones that run.
        self.protocol._handle_stop_stream = _guarded(self.protocol._handle_stop_stream)  # type: ignore[method-assign,assignment]
        self.protocol.handle_incoming_connection = self._incoming  # type: ignore[method-assign]
        if self.dcutr is not None:
            self.dcutr._handle_dcutr_stream = _guarded(self.dcutr._handle_dcutr_stream)  # type: ignore[method-assign,assignment]
        self.reserved: dict[ID, float] = {}  # relay -> when reserved
        self._refused: dict[ID, tuple[float, float]] = {}  # peer -> (when it refused, cooldown)
        self._relayed_first: dict[ID, float] = {}  # peer -> when only a relay reached it
        self.stats = {
            "reservations_made": 0,
            "reservations_failed": 0,
            "circuits_dialed": 0,
            "circuit_failures": 0,
            "direct_connects": 0,
            "connect_failures": 0,
            "bytes_relayed": 0,
            "relays_dropped_silent": 0,
        }
        self._missed_pongs: dict[ID, int] = {}
        self._count_relayed_bytes()
        host.get_network().register_notifee(_RelayLost(self))
        # Handlers are set before the host runs: a peer may try either protocol as soon as it connects.
        host.set_stream_handler(HOP_PROTOCOL, _guarded(self._handle_hop))
        host.set_stream_handler(STOP_PROTOCOL_ID, self.protocol._handle_stop_stream)

    def _count_relayed_bytes(self) -> None:
        # The library counts a circuit's bytes only inside its copy loop; every chunk it forwards passes here.
        original = self.protocol._read_stream_with_retry

        async def counted(stream: Any, *args: Any, **kwargs: Any) -> bytes | None:
            data = await original(stream, *args, **kwargs)
            if data:
                self.stats["bytes_relayed"] += len(data)
            return data

        self.protocol._read_stream_with_retry = counted  # type: ignore[method-assign,assignment]

    async def _incoming(self, stream: Any, remote_peer_id: bytes) -> None:
        """The library's STOP side, with the relay's id in the connection's address.

        py-libp2p 0.8.1 names the *local* host as the relay of an inbound circuit
        (`/p2p/<self>/p2p-circuit/p2p/<remote>`); the relay is the peer the STOP stream came from.
        """
        peer = ID(remote_peer_id)
        relay = stream.muxed_conn.peer_id
        addr = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{peer.to_base58()}")
        raw = RawConnection(
            stream=stream, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[addr]
        )
        try:
            muxed = await self.host.upgrade_inbound_connection(raw, addr)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await stream.close()
            raise ConnectionError(f"relayed connection from {peer} failed: {exc}") from exc
        # The generic upgrade cannot derive a relayed stream's transport addresses; tag the swarm connection
        # (DCUtR and statistics tell relayed from direct connections by "/p2p-circuit").
        for conn in self.host.get_network().get_connections(peer):
            if getattr(conn, "muxed_conn", None) is muxed:
                with contextlib.suppress(Exception):
                    conn.set_transport_info([addr], ConnectionType.RELAYED)

    async def _handle_hop(self, stream: Any) -> None:
        # The library's HOP handler never checks allow_hop: refuse here unless this node relays now (only
        # while it knows it is public).
        if not (self._serve and self._is_public()):
            try:
                await self.protocol._send_status(
                    stream, StatusCode.PERMISSION_DENIED, "this node does not relay"
                )
            finally:
                with trio.move_on_after(1.0):
                    await stream.close()
            return
        await self.protocol._handle_hop_stream(stream)

    def lost(self, peer: ID) -> None:
        # A relay that restarts forgets our reservation: a closed connection to it ends the reservation here
        # too, and the next round reserves again (on it, once it is back, or on another relay).
        if self.reserved.pop(peer, None) is not None:
            log.info("lost relay %s; looking for another", peer)

    def relays(self) -> list[str]:
        return [r.to_base58() for r in self.reserved]

    def connection_kinds(self) -> dict[str, int]:
        """Connected peers by how we reach them: direct only, relayed only, or both (upgrade in progress)."""
        kinds = {"direct": 0, "relayed": 0, "both": 0}
        for peer in list(self.host.get_connected_peers()):
            paths = self._paths(peer)
            if paths:
                kinds["both" if len(paths) == 2 else paths.pop()] += 1
        return kinds

    def _paths(self, peer: ID) -> set[str]:
        """{"direct", "relayed"}: the kinds of open connection we have to `peer`."""
        paths = set()
        for conn in self.host.get_network().get_connections(peer):
            try:
                if conn.is_closed:
                    continue
                relayed = any("p2p-circuit" in str(a) for a in conn.get_transport_addresses())
            except Exception:  # closing underneath us
                continue
            paths.add("relayed" if relayed else "direct")
        return paths

    def statistics(self) -> dict[str, Any]:
        return {
            **self.stats,
            "peers": self.connection_kinds(),
            "hole_punching": self.dcutr is not None,
            "serving": self._serve and self._is_public(),
            # Slots this node holds for NATed peers, and the bounds it relays within (HostConfig.relay_*).
            "reservations_served": len(getattr(self.protocol.resource_manager, "_reservations", {})),
            "limits": {
                "max_reservations": self.protocol.limits.max_reservations,
                "max_circuits_per_peer": self.protocol.limits.max_circuit_conns,
                "max_circuit_bytes": self.protocol.limits.data,
                "max_circuit_s": self.protocol.limits.duration,
            },
            "reservations": len(self.reserved),
            "relays": self.relays(),
        }

    # -- reservations (NATed side) -------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ping_relays)
            while True:
                try:
                    await self._keep_reservations()
                except Exception:  # the loop must outlive any one relay's misbehaviour
                    log.exception("relay reservation round failed; retrying")
                await trio.sleep(CHECK_S)

    async def _ping_relays(self) -> None:
        while True:
            await trio.sleep(PING_S)
            async with trio.open_nursery() as nursery:
                for relay in list(self.reserved):
                    nursery.start_soon(self._ping, relay)
            for relay in [r for r in self._missed_pongs if r not in self.reserved]:
                del self._missed_pongs[relay]

    async def _ping(self, relay: ID) -> None:
        try:
            with trio.fail_after(PING_TIMEOUT_S):
                stream = await self.host.new_stream(relay, [PING_PROTOCOL])
                try:
                    await perform_ping_roundtrip(stream)
                finally:
                    with trio.move_on_after(1.0):
                        await stream.close()
        except Exception as exc:  # silent, slow or gone: count it
            missed = self._missed_pongs.get(relay, 0) + 1
            self._missed_pongs[relay] = missed
            log.debug("ping to relay %s failed (%d in a row): %r", relay, missed, exc)
            if missed >= PING_FAILURES:
                log.info("relay %s stopped answering; closing its connection", relay)
                self.stats["relays_dropped_silent"] += 1
                self._missed_pongs.pop(relay, None)
                self.lost(relay)
                with trio.move_on_after(2.0), contextlib.suppress(Exception):
                    await self.host.disconnect(relay)
            return
        self._missed_pongs.pop(relay, None)

    async def _keep_reservations(self) -> None:
        connected = set(self.host.get_connected_peers())
        for relay in [r for r in self.reserved if r not in connected]:
            log.info("lost relay %s; looking for another", relay)
            del self.reserved[relay]
        if not self._is_behind_nat():
            return
        now = time.monotonic()
        for relay, since in list(self.reserved.items()):
            if now - since > REFRESH_S:
                await self._reserve(relay)
        for peer in sorted(connected, key=str):
            if len(self.reserved) >= self._wanted:
                break
            refused_at, cooldown = self._refused.get(peer, (-1e9, 0.0))
            if peer in self.reserved or now - refused_at < cooldown or "direct" not in self._paths(peer):
                # Relays refuse reservations over relayed connections (spec), and a peer we reach only
                # through a relay is behind NAT itself.
                continue
            await self._reserve(peer)

    async def _reserve(self, relay: ID) -> bool:
        ok = False
        try:
            with trio.fail_after(CIRCUIT_TIMEOUT_S):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
                try:
                    ok = await self.transport._make_reservation(stream, relay)
                finally:
                    with trio.move_on_after(1.0):
                        await stream.close()
        except Exception as exc:  # not a relay, or gone: try another
            log.debug("reservation on %s failed: %r", relay, exc)
        if ok:
            if relay not in self.reserved:
                log.info(
                    "reserved a relay slot on %s; behind NAT, reachable through relay %s",
                    relay,
                    ", ".join([*self.relays(), relay.to_base58()]),
                )
            self.reserved[relay] = time.monotonic()
            self.stats["reservations_made"] += 1
        else:
            self.reserved.pop(relay, None)
            _, last = self._refused.pop(relay, (0.0, 0.0))
            low, high = REFUSED_COOLDOWN_S
            self._refused[relay] = (time.monotonic(), min(high, max(low, 2 * last)))
            self.stats["reservations_failed"] += 1
            while len(self._refused) > 1024:
                self._refused.pop(next(iter(self._refused)))
        return ok

    # -- circuits (dialing side) ---------------------------------------------------------------------------
    async def connect(self, peer: ID, direct: Callable[[], Awaitable[None]]) -> None:
        """Open a connection to `peer`: a direct dial and a circuit through a relay, raced.

        The path that reached the peer last time starts first, the other after SECOND_PATH_AFTER_S or as
        soon as the first fails; the first connection up wins and the other attempt is cancelled. Raises
        ConnectionError when neither path reaches the peer.
        """
        now = time.monotonic()
        relayed_first = now - self._relayed_first.get(peer, -1e9) < RELAYED_FIRST_S
        errors: list[str] = []
        first_failed = trio.Event()

        async def attempt_direct(nursery: trio.Nursery) -> None:
            if relayed_first:
                with trio.move_on_after(SECOND_PATH_AFTER_S):
                    await first_failed.wait()
            try:
                with trio.fail_after(DIRECT_DIAL_S):
                    await direct()
            except Exception as exc:  # unreachable directly: the circuit may still work
                errors.append(f"direct: {exc!r}"[:300])
                first_failed.set()
                return
            self.stats["direct_connects"] += 1
            self._relayed_first.pop(peer, None)
            nursery.cancel_scope.cancel()

        async def attempt_relayed(nursery: trio.Nursery) -> None:
            if not relayed_first:
                with trio.move_on_after(SECOND_PATH_AFTER_S):
                    await first_failed.wait()
            if await self.connect_via_relay(peer):
                self._relayed_first[peer] = time.monotonic()
                while len(self._relayed_first) > MAX_REMEMBERED:
                    self._relayed_first.pop(next(iter(self._relayed_first)))
                nursery.cancel_scope.cancel()
                return
            errors.append("relay: no connected relay holds a reservation for it")
            first_failed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt_direct, nursery)
            nursery.start_soon(attempt_relayed, nursery)
        if not any(not c.is_closed for c in self.host.get_network().get_connections(peer)):
            self.stats["connect_failures"] += 1
            raise ConnectionError(f"cannot reach {peer}: " + "; ".join(errors))

    async def connect_via_relay(self, peer: ID) -> bool:
        """Open a relayed connection to `peer` through one of our connected relays; True when one is open."""
        network = self.host.get_network()
        peerstore = self.host.get_peerstore()
        candidates = [r for r in self.reserved if r != peer]
        for other in sorted(self.host.get_connected_peers(), key=str):
            if other != peer and other not in candidates and _offers_hop(peerstore, other):
                candidates.append(other)
        for relay in candidates[:MAX_RELAYS_TRIED]:
            addrs = [a for a in peerstore.addrs(relay) if "p2p-circuit" not in str(a)]
            if not addrs:
                continue
            circuit = multiaddr.Multiaddr(f"{addrs[0]}/p2p/{relay}/p2p-circuit/p2p/{peer}")
            try:
                with trio.fail_after(CIRCUIT_TIMEOUT_S):
                    await self.transport.dial(circuit)
            except Exception as exc:  # this relay does not hold a reservation for the peer: try the next
                self.stats["circuit_failures"] += 1
                log.debug("circuit to %s via %s failed: %r", peer, relay, exc)
                continue
            if network.get_connections(peer):
                self.stats["circuits_dialed"] += 1
                log.info("connected to %s through relay %s", peer, relay)
                return True
        return False


def _guarded(handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Coroutine[Any, Any, None]]:
    async def guarded(stream: Any) -> None:
        try:
            await handler(stream)
        except Exception as exc:  # the peer reset the stream or went away: its stream ends, nothing else
            log.debug("%s: %r", getattr(handler, "__name__", "handler"), exc)
            with contextlib.suppress(Exception):
                await stream.reset()

    return guarded


class _RelayLost(INotifee):
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._relay.lost(conn.muxed_conn.peer_id)

    async def connected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


def _offers_hop(peerstore: Any, peer: ID) -> bool:
    try:
        return HOP_PROTOCOL in peerstore.get_protocols(peer)
    except Exception:  # no identify record yet
        return False
