"""The p2p host: py-libp2p (TCP + noise + yamux, gossipsub, Kademlia) in its own trio thread, used from asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.tools.anyio_service import background_trio_service

from swarmnode.p2p.bridge import BridgeClosed, TrioBridge, open_trio_bridge
from swarmnode.p2p.config import HostConfig, Message
from swarmnode.p2p.dialer import Dialer, forget_failure
from swarmnode.p2p.gossip import (
    PACING_MAX_WAIT_S,
    PACING_SMALL_BYTES,
    PACING_SMALL_WAIT_S,
    SUBSCRIPTION_CHANNEL,
    DigestEquivocation,
    GossipStats,
    Validator,
    build_gossipsub,
    make_topic_validator,
    wait_queues_low,
)
from swarmnode.p2p.identity import load_or_create_identity
from swarmnode.p2p.reachability import BEHIND_NAT, UNKNOWN, Reachability
from swarmnode.p2p.relay import Relay
from swarmnode.p2p.streams import (
    BLOB_PROTOCOL,
    BlobStats,
    BlobStore,
    BlobView,
    FileSink,
    TransportError,
    fetch_from,
    read_frame,
    read_header,
    write_frame,
    write_header,
)
from swarmnode.p2p.subscription import Subscription

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 << 20
DEFAULT_MAX_RESPONSE_BYTES = 64 << 20


@dataclass(slots=True)
class _Trio:
    """Library objects; touched only from the trio thread (reads of counters excepted)."""

    host: Any
    pubsub: Any
    router: Any
    dht: KadDHT | None
    equivocation: DigestEquivocation


class Host:
    """Use `open_host(config)`; see the package docstring for the API."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.peer_id = ""
        self.listen_addrs: list[str] = []
        self._bridge: TrioBridge | None = None
        self._trio: _Trio | None = None
        self._gossip = GossipStats()
        self._blob_stats = BlobStats()
        self._blobs = BlobStore(self._blob_stats)
        self._subs: dict[str, list[Subscription]] = {}
        self._validators: dict[str, list[Validator]] = {}
        self._dialer: Dialer | None = None
        self._reachability: Reachability | None = None
        self._relay: Relay | None = None
        self._requests = {"served": 0, "failed": 0, "sent": 0, "send_failed": 0}

    # -- gossip ----------------------------------------------------------------------------------------------
    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > self.config.max_message_bytes:
            raise ValueError(
                f"message of {len(data)} bytes exceeds max_message_bytes={self.config.max_message_bytes}; "
                "send large payloads with provide_blob() and gossip a manifest"
            )
        await self._b().run(self._trio_publish, topic, bytes(data))

    async def _trio_publish(self, topic: str, data: bytes) -> None:
        state = self._t()
        small = len(data) <= PACING_SMALL_BYTES
        await wait_queues_low(state.pubsub, self._gossip, PACING_SMALL_WAIT_S if small else PACING_MAX_WAIT_S)
        await state.pubsub.publish(topic, data)
        stats = self._gossip.topic(topic)
        stats.sent += 1
        stats.bytes_out += len(data)

    def subscribe(
        self, topic: str, *, validator: Validator | None = None, maxsize: int = 1024
    ) -> Subscription:
        sub = Subscription(self, topic, maxsize)
        first = topic not in self._subs
        self._subs.setdefault(topic, []).append(sub)
        validators = self._validators.setdefault(topic, [])
        if validator is not None:
            validators.append(validator)
        if first:
            future = self._b().start_soon(self._trio_subscribe, topic, validators)
            future.add_done_callback(lambda f: self._reader_ended(topic, f))
        return sub

    async def _trio_subscribe(self, topic: str, validators: list[Validator]) -> None:
        state = self._t()
        state.pubsub.set_topic_validator(
            topic, make_topic_validator(topic, self.config.max_message_bytes, validators, self._gossip), False
        )
        await state.pubsub.subscribe(topic)
        # Swap in a larger channel: the library's holds 32 messages and drops the rest with only a warning.
        send, receive = trio.open_memory_channel[Any](SUBSCRIPTION_CHANNEL)
        state.pubsub.subscribed_topics_send[topic] = send
        stats = self._gossip.topic(topic)
        bridge = self._b()
        async with receive:
            async for msg in receive:
                stats.received += 1
                stats.bytes_in += len(msg.data)
                origin = ID(msg.from_id).to_base58()
                if origin == self.peer_id:
                    stats.own_filtered += 1
                    continue
                message = Message(topic=topic, origin=origin, data=msg.data, received_at=time.time())
                if not bridge.call_soon_in_asyncio(self._deliver, message):
                    stats.dropped += 1

    def _deliver(self, message: Message) -> None:
        stats = self._gossip.topic(message.topic)
        for sub in self._subs.get(message.topic, ()):
            try:
                sub.queue.put_nowait(message)
                stats.delivered += 1
            except asyncio.QueueFull:
                stats.dropped += 1
                if stats.dropped in (1, 10, 100) or stats.dropped % 1000 == 0:
                    log.warning(
                        "subscriber queue for %s full: %d messages dropped so far",
                        message.topic,
                        stats.dropped,
                    )

    def _reader_ended(self, topic: str, future: concurrent.futures.Future[Any]) -> None:
        # Runs in the trio thread: a reader that died (not a normal close) ends its subscriptions on
        # the asyncio side, so their consumers see the transport is gone instead of waiting forever.
        _log_reader_end(topic, future)
        if future.cancelled() or future.exception() is None or isinstance(future.exception(), BridgeClosed):
            return
        bridge = self._bridge
        if bridge is not None:
            bridge.call_soon_in_asyncio(self._end_topic, topic)

    def _end_topic(self, topic: str) -> None:
        for sub in list(self._subs.get(topic, ())):
            sub.end()

    def _drop_subscription(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)

    # -- request / response ------------------------------------------------------------------------------------
    def set_request_handler(
        self, protocol_id: str, handler: Callable[[str, bytes], Awaitable[bytes]]
    ) -> None:
        bridge = self._b()
        loop = bridge.loop

        async def on_stream(stream: Any) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            try:
                data = await read_frame(stream, MAX_REQUEST_BYTES)

                async def call() -> bytes:
                    return await handler(peer, data)

                future = asyncio.run_coroutine_threadsafe(call(), loop)
                done = trio.Event()
                future.add_done_callback(lambda _f: bridge.run_sync_soon(done.set))
                try:
                    await done.wait()
                except trio.Cancelled:
                    future.cancel()
                    raise
                try:
                    response = future.result()
                except Exception as exc:  # reported to the requester
                    log.warning("request handler for %s failed: %r", protocol_id, exc)
                    self._requests["failed"] += 1
                    await write_header(stream, {"ok": False, "err": f"{type(exc).__name__}: {exc}"})
                    return
                await write_header(stream, {"ok": True})
                await write_frame(stream, bytes(response))
                self._requests["served"] += 1
            except Exception as exc:  # a bad peer must never take the handler down
                self._requests["failed"] += 1
                log.info("request on %s from %s failed: %s", protocol_id, peer, exc)
            finally:
                with trio.move_on_after(1.0), contextlib.suppress(Exception):
                    await stream.close()

        bridge.run_sync_soon(lambda: self._t().host.set_stream_handler(TProtocol(protocol_id), on_stream))

    async def request(
        self,
        peer_id: str,
        protocol_id: str,
        data: bytes,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - part of the public API
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> bytes:
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
        try:
            result = await self._b().run(
                self._trio_request, peer_id, protocol_id, bytes(data), timeout, max_response_bytes
            )
        except TransportError:
            self._requests["send_failed"] += 1
            raise
        except Exception as exc:
            self._requests["send_failed"] += 1
            raise TransportError(f"request {protocol_id} to {peer_id} failed: {exc!r}") from exc
        self._requests["sent"] += 1
        return result

    async def _trio_request(
        self,
        peer_id: str,
        protocol_id: str,
        data: bytes,
        timeout: float,  # noqa: ASYNC109
        max_response_bytes: int,
    ) -> bytes:
        try:
            with trio.fail_after(timeout):
                stream = await self._open_stream(peer_id, protocol_id)
                try:
                    await write_frame(stream, data)
                    header = await read_header(stream)
                    if not header.get("ok"):
                        raise TransportError(
                            f"{peer_id} answered {protocol_id} with an error: {header.get('err')}"
                        )
                    return await read_frame(stream, max_response_bytes)
                finally:
                    with trio.move_on_after(1.0), contextlib.suppress(Exception):
                        await stream.close()
        except trio.TooSlowError:
            raise TransportError(f"request {protocol_id} to {peer_id} timed out after {timeout} s") from None

    # -- blobs -----------------------------------------------------------------------------------------------
    def provide_blob(self, data: bytes) -> str:
        if len(data) > self.config.max_blob_bytes:
            raise ValueError(f"blob of {len(data)} bytes exceeds max_blob_bytes={self.config.max_blob_bytes}")
        return self._blobs.provide(data)

    def provide_view(self, content_hash: str, size: int, read: Callable[[int, int], bytes]) -> None:
        """Serve ``size`` bytes under ``content_hash``, read on demand (see ``BlobView``)."""
        if size > self.config.max_blob_bytes:
            raise ValueError(f"blob of {size} bytes exceeds max_blob_bytes={self.config.max_blob_bytes}")
        self._blobs.provide_view(content_hash, BlobView(size, read))

    def remove_blob(self, content_hash: str) -> None:
        self._blobs.remove(content_hash)

    def expect_blob(self, content_hash: str, timeout: float) -> None:
        """We are pulling ``content_hash`` for up to ``timeout`` s: a peer asking us for it waits for
        it (a relay tree's child asks its parent at once; see ``BlobStore``)."""
        self._blobs.expect(content_hash, time.monotonic() + timeout)

    def unexpect_blob(self, content_hash: str) -> None:
        self._blobs.unexpect(content_hash)

    async def fetch(
        self,
        content_hash: str,
        providers: list[str],
        *,
        max_size: int,
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> bytes:
        if not providers:
            raise ValueError("fetch needs at least one provider")
        cap = min(max_size, self.config.max_blob_bytes)
        return await self._b().run(self._trio_fetch, content_hash, list(providers), cap, timeout)

    async def fetch_file(
        self,
        content_hash: str,
        providers: list[str],
        path: str | os.PathLike[str],
        *,
        max_size: int,
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> int:
        """``fetch`` into the file at ``path`` (hashed as it is written; created or truncated), for blobs
        too large to hold in memory. Returns the size; on failure the file holds no verified data."""
        if not providers:
            raise ValueError("fetch needs at least one provider")
        cap = min(max_size, self.config.max_blob_bytes)
        sink = FileSink(path)
        try:
            await self._b().run(self._trio_fetch, content_hash, list(providers), cap, timeout, sink)
        finally:
            sink.close()
        return len(sink)

    async def _trio_fetch(
        self,
        digest: str,
        providers: list[str],
        max_size: int,
        timeout: float,  # noqa: ASYNC109
        sink: FileSink | None = None,
    ) -> bytes:
        errors: list[str] = []
        buf: bytearray | FileSink = bytearray() if sink is None else sink
        with trio.move_on_after(timeout):
            for provider in providers:
                if provider == self.peer_id:
                    continue
                try:
                    await fetch_from(self._open_stream, digest, provider, buf, max_size)
                except Exception as exc:  # try the next provider; the reason is reported
                    self._blob_stats.provider_failures += 1
                    errors.append(f"{provider}: {exc}")
                    log.info("blob %s from %s failed: %s", digest[:12], provider, exc)
                    continue
                got = buf.hexdigest() if isinstance(buf, FileSink) else hashlib.sha256(buf).hexdigest()
                if got == digest:
                    self._blob_stats.fetched += 1
                    self._blob_stats.fetched_bytes += len(buf)
                    return b"" if isinstance(buf, FileSink) else bytes(buf)
                self._blob_stats.provider_failures += 1
                errors.append(f"{provider}: content does not match the hash")
                buf.clear()
        if not errors:
            errors.append(f"timed out after {timeout} s")
        self._blob_stats.fetch_failures += 1
        raise TransportError(f"could not fetch blob {digest[:16]}: " + "; ".join(errors))

    async def _open_stream(self, peer_id: str, protocol_id: str) -> Any:
        state = self._t()
        pid = ID.from_base58(peer_id)
        forget_failure(state.host, pid)
        if self._relay is not None and not _has_live_connection(state.host, pid):
            # Behind NAT (ours or theirs) a direct dial fails, often only after a long SYN timeout; the relay
            # races it and a relayed connection carries the stream instead. Callers see a stream either way.
            await self._relay.connect(pid, lambda: self._dial_direct(pid))
        elif not _has_live_connection(state.host, pid):
            await self._find_addrs(pid)
        try:
            return await state.host.new_stream(pid, [TProtocol(protocol_id)])
        except Exception as exc:
            cause = f"{exc} {exc.__cause__}"
            if self._relay is None or "not supported" in cause:
                raise  # no other path, or the peer answered and refused the protocol
            # The connection we held no longer carries streams (a hole-punched path the NAT forgot, a
            # relayed one whose relay died): drop it and reach the peer afresh, relay racing direct.
            self._requests["stream_retries"] = self._requests.get("stream_retries", 0) + 1
            log.info("stream to %s failed on its connection (%s); reconnecting", peer_id[:16], exc)
            with contextlib.suppress(Exception):
                await state.host.get_network().close_peer(pid)
            forget_failure(state.host, pid)
            await self._relay.connect(pid, lambda: self._dial_direct(pid))
            return await state.host.new_stream(pid, [TProtocol(protocol_id)])

    async def connect(self, peer_id: str, *, timeout: float = 30.0) -> bool:  # noqa: ASYNC109
        """Make sure we hold a connection to ``peer_id`` (direct, or through a relay where either of
        us is behind NAT), bounded by ``timeout``; whether we do. Never raises for an unreachable peer."""
        try:
            return bool(await self._b().run(self._trio_connect, peer_id, timeout))
        except Exception as exc:
            log.debug("connect to %s failed: %s", peer_id[:16], exc)
            return False

    async def _trio_connect(self, peer_id: str, timeout: float) -> bool:  # noqa: ASYNC109
        state = self._t()
        pid = ID.from_base58(peer_id)
        if _has_live_connection(state.host, pid):
            return True
        with trio.move_on_after(timeout):
            forget_failure(state.host, pid)
            if self._relay is not None:
                await self._relay.connect(pid, lambda: self._dial_direct(pid))
            else:
                await self._dial_direct(pid)
        return _has_live_connection(state.host, pid)

    async def _find_addrs(self, pid: ID) -> None:
        # A manifest can reach us through gossip relays from a peer we never dialled: without known
        # addresses a dial fails at once, so ask the DHT where it is first.
        state = self._t()
        try:
            known = bool(state.host.get_peerstore().addrs(pid))
        except Exception:  # PeerStoreError: never heard of this peer
            known = False
        if not known and state.dht is not None:
            with trio.move_on_after(10.0):
                info = await state.dht.find_peer(pid)
                if info is not None and info.addrs:
                    state.host.get_peerstore().add_addrs(pid, info.addrs, 3600)

    async def _dial_direct(self, pid: ID) -> None:
        await self._find_addrs(pid)
        await self._t().host.get_network().dial_peer(pid)

    # -- peers and counters ----------------------------------------------------------------------------------
    def connected_peers(self) -> list[str]:
        if self._trio is None:
            return []
        return [p.to_base58() for p in list(self._trio.host.get_connected_peers())]

    def remote_addresses(self) -> dict[str, str]:
        """{peer id: "ip:port"} of the peers we are connected to now, as the transport sees them (each
        muxed connection's remote address, which a peer cannot claim; a relayed connection shows the
        relay's). What ``swarmnode.trust`` groups a state's support by."""
        if self._trio is None:
            return {}
        network = self._trio.host.get_network()
        out: dict[str, str] = {}
        for pid, conns in list(network.get_connections_map().items()):
            for conn in list(conns):
                muxed = getattr(conn, "muxed_conn", None)
                where = muxed.get_remote_address() if muxed is not None else None
                if where:
                    ip, port = where[0], where[1]
                    out[pid.to_base58()] = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
                    break
        return out

    def statistics(self) -> dict[str, Any]:
        depths: dict[str, int] = {}
        if self._trio is not None:
            for peer, queue in list(self._trio.pubsub.peer_queues.items()):
                depths[peer.to_base58()] = len(queue)
        topics = {}
        for name, stats in list(self._gossip.topics.items()):
            entry: dict[str, Any] = stats.as_dict()
            entry["subscriber_queue_depths"] = [s.queue.qsize() for s in self._subs.get(name, [])]
            topics[name] = entry
        return {
            "peer_id": self.peer_id,
            "connected_peers": len(self.connected_peers()),
            "topics": topics,
            "peer_queue_depths": depths,
            "max_peer_queue_depth": max(depths.values(), default=0),
            "bytes_out": sum(t.bytes_out for t in self._gossip.topics.values()),
            "bytes_in": sum(t.bytes_in for t in self._gossip.topics.values()),
            "equivocations": self._trio.equivocation.detected if self._trio else 0,
            "paced_waits": self._gossip.paced_waits,
            "pacing_timeouts": self._gossip.pacing_timeouts,
            # publishes that did not wait for a peer whose queue stopped draining (a slow or hostile peer)
            "pacing_stalled_skips": self._gossip.stalled_skips,
            "outbound_dropped": dict(self._gossip.outbound_dropped),
            "blobs": self._blob_stats.as_dict(),
            "requests": dict(self._requests),
            "dial": self._dialer.statistics() if self._dialer else {},
            # "public <multiaddr>" once a peer dialled us back, "behind NAT" when peers could not, or "unknown"
            "reachability": self._reachability_text(),
            "reachability_probes": dict(self._reachability.stats) if self._reachability else {},
            "relay": self._relay.statistics() if self._relay else {},
        }

    def _reachability_text(self) -> str:
        status = self._reachability.status() if self._reachability else UNKNOWN
        if status == BEHIND_NAT and self._relay is not None and self._relay.reserved:
            return f"{BEHIND_NAT}, reachable through relay {', '.join(self._relay.relays())}"
        return status

    # -- lifecycle (trio side) -------------------------------------------------------------------------------
    @asynccontextmanager
    async def _run(self, bridge: TrioBridge, nursery: trio.Nursery) -> AsyncIterator[None]:
        key_pair = load_or_create_identity(self.config.data_dir)
        listen = multiaddr.Multiaddr(f"/ip4/{self.config.listen_host}/tcp/{self.config.port}")
        host = new_host(key_pair=key_pair, listen_addrs=[listen], enable_mDNS=self.config.enable_mdns)
        pubsub, router, equivocation = build_gossipsub(host, self._gossip, self.config.data_dir)
        _guard_pubsub_streams(host, pubsub, router)
        host.set_stream_handler(TProtocol(BLOB_PROTOCOL), self._blobs.serve)
        reachability = Reachability(host)
        cfg = self.config
        relay = Relay(
            host,
            serve=cfg.relay_service,
            limits=RelayLimits(
                duration=cfg.relay_max_circuit_s,
                data=cfg.relay_max_circuit_bytes,
                max_circuit_conns=cfg.relay_max_circuits,
                max_reservations=cfg.relay_max_reservations,
            ),
            reservations=cfg.relay_reservations,
            is_public=lambda: reachability.status().startswith("public"),
            is_behind_nat=lambda: reachability.status() == BEHIND_NAT,
            hole_punching=cfg.hole_punching,
        )
        # The pubsub services must run before host.run(): an incoming pubsub stream crashes a node otherwise.
        async with (
            background_trio_service(pubsub),
            background_trio_service(router),
            background_trio_service(relay.protocol),
            background_trio_service(relay.dcutr) if relay.dcutr else contextlib.nullcontext(),
        ):
            await pubsub.wait_until_ready()
            async with host.run(listen_addrs=[listen]):
                dht = KadDHT(host, DHTMode.SERVER) if self.config.enable_dht else None
                async with background_trio_service(dht) if dht else contextlib.nullcontext():
                    self._trio = _Trio(
                        host=host, pubsub=pubsub, router=router, dht=dht, equivocation=equivocation
                    )
                    self.peer_id = host.get_id().to_base58()
                    self.listen_addrs = [_full_addr(a, self.peer_id) for a in host.get_addrs()]
                    self._dialer = Dialer(host, dht, self.config.bootstrap, self.config.target_peers)
                    nursery.start_soon(self._dialer.run)
                    self._reachability = reachability
                    nursery.start_soon(reachability.run)
                    self._relay = relay
                    nursery.start_soon(relay.run)
                    yield

    def _b(self) -> TrioBridge:
        if self._bridge is None:
            raise RuntimeError("host is not open; use `async with open_host(config) as host`")
        return self._bridge

    def _t(self) -> _Trio:
        assert self._trio is not None, "trio state is set before open_host yields"
        return self._trio


def _log_reader_end(topic: str, future: concurrent.futures.Future[Any]) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None and not isinstance(exc, BridgeClosed):
        log.error("subscription to %s stopped: %r; no more messages will arrive on it", topic, exc)


def _guard_pubsub_streams(host: Any, pubsub: Any, router: Any) -> None:
    """py-libp2p's pubsub handler lets a protobuf DecodeError (a peer's undecodable RPC frame) escape, and an
    exception out of a stream handler tears the whole host down: end that peer's stream instead."""

    async def guarded(stream: Any) -> None:
        try:
            await pubsub.stream_handler(stream)
        except Exception as exc:
            peer = stream.muxed_conn.peer_id
            log.warning("pubsub stream from %s ended: %r", peer, exc)
            with contextlib.suppress(Exception):
                await stream.reset()
            with contextlib.suppress(Exception):
                pubsub._handle_dead_peer(peer)

    for protocol in router.get_protocols():
        host.set_stream_handler(protocol, guarded)


def _has_live_connection(host: Any, pid: ID) -> bool:
    try:
        return any(not conn.is_closed for conn in host.get_network().get_connections(pid))
    except Exception:  # a connection torn down while we looked
        return False


def _full_addr(addr: multiaddr.Multiaddr, peer_id: str) -> str:
    text = str(addr)
    return text if "/p2p/" in text else f"{text}/p2p/{peer_id}"


@asynccontextmanager
async def open_host(config: HostConfig) -> AsyncIterator[Host]:
    """Start a libp2p host in its own trio thread; leaving the block stops it and joins the thread (~1 s)."""
    host = Host(config)
    async with open_trio_bridge(host._run) as (bridge, _):
        host._bridge = bridge
        try:
            yield host
        finally:
            for subs in host._subs.values():
                for sub in subs:
                    sub.end()
