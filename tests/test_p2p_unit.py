"""Unit tier for swarmnode.p2p: the asyncio↔trio bridge, identity, pacing, validators, two in-process hosts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.pubsub.pb import rpc_pb2

from swarmnode.p2p import BridgeClosed, HostConfig, TransportError, open_host
from swarmnode.p2p.bridge import TrioBridge, open_trio_bridge
from swarmnode.p2p.gossip import (
    PACING_HIGH_WATER,
    PACING_STALL_S,
    DigestEquivocation,
    GossipStats,
    make_topic_validator,
    wait_queues_low,
)
from swarmnode.p2p.identity import KEY_FILE, load_or_create_identity
from swarmnode.p2p.streams import BlobStats, BlobStore

# -- bridge ---------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _nothing(_bridge: TrioBridge, _nursery: trio.Nursery) -> AsyncIterator[str]:
    yield "state"


async def _add(a: int, b: int) -> int:
    await trio.lowlevel.checkpoint()
    return a + b


async def _fail() -> None:
    raise KeyError("from trio")


def test_bridge_calls_exceptions_cancellation_and_shutdown() -> None:
    async def main() -> None:
        cancelled_in_trio = threading.Event()

        async def sleeper() -> None:
            try:
                await trio.sleep(30)
            finally:
                cancelled_in_trio.set()

        async with open_trio_bridge(_nothing) as (bridge, state):
            assert state == "state"
            assert await bridge.run(_add, 2, 3) == 5
            with pytest.raises(KeyError, match="from trio"):
                await bridge.run(_fail)
            task = asyncio.create_task(bridge.run(sleeper))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(cancelled_in_trio.wait, 2.0)
            long_call = bridge.start_soon(trio.sleep, 30)
            start = time.perf_counter()
        assert time.perf_counter() - start < 1.0
        # A call still running at shutdown is failed, not left hanging.
        with pytest.raises(BridgeClosed):
            long_call.result(timeout=1)
        with pytest.raises(BridgeClosed):
            await bridge.run(_add, 1, 1)

    asyncio.run(main())


def test_bridge_setup_failure_propagates() -> None:
    @contextlib.asynccontextmanager
    async def broken(_b: TrioBridge, _n: trio.Nursery) -> AsyncIterator[None]:
        raise OSError("port in use")
        yield

    async def main() -> None:
        with pytest.raises(OSError, match="port in use"):
            async with open_trio_bridge(broken):
                pass

    asyncio.run(main())


# -- identity and config ---------------------------------------------------------------------------------------


def test_identity_persists_with_private_mode(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path / "node")
    second = load_or_create_identity(tmp_path / "node")
    assert first.public_key.serialize() == second.public_key.serialize()
    assert stat.S_IMODE(os.stat(tmp_path / "node" / KEY_FILE).st_mode) == 0o600


def test_corrupt_identity_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(ValueError, match="corrupt"):
        load_or_create_identity(tmp_path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 70000),
        ("target_peers", 0),
        ("max_message_bytes", 2 << 20),
        ("bootstrap", ["/ip4/1.2.3.4/tcp/1"]),
    ],
)
def test_config_rejects_bad_values(tmp_path: Path, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        HostConfig(data_dir=tmp_path, **{field: value})


# -- gossip pieces -------------------------------------------------------------------------------------------


def _msg(data: bytes, seqno: bytes = b"\x00" * 8, topic: str = "t") -> rpc_pb2.Message:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    peer = ID.from_pubkey(create_new_key_pair().public_key)
    return rpc_pb2.Message(data=data, topicIDs=[topic], from_id=peer.to_bytes(), seqno=seqno)


class _FakeRouter:
    scorer = None


def test_digest_equivocation_is_bounded_and_detects() -> None:
    check = DigestEquivocation(_FakeRouter(), memory=4)  # type: ignore[arg-type]
    msg = _msg(b"a")
    assert check.check(msg)
    assert check.check(msg)  # a duplicate is not equivocation
    twin = rpc_pb2.Message()
    twin.CopyFrom(msg)
    twin.data = b"b"
    assert not check.check(twin)
    assert check.detected == 1
    for i in range(10):
        check.check(_msg(b"x", seqno=i.to_bytes(8, "big")))
    assert len(check._seen) == 4


def test_topic_validator_size_cap_user_validator_and_exceptions() -> None:
    stats = GossipStats()

    def only_ok(_origin: str, data: bytes) -> bool:
        if data == b"boom":
            raise RuntimeError("bug in validator")
        return data.startswith(b"OK")

    validate = make_topic_validator("t", 10, [only_ok], stats)
    assert validate(None, _msg(b"OK fine"))  # type: ignore[arg-type]
    assert not validate(None, _msg(b"OK but far too long"))  # type: ignore[arg-type]
    assert not validate(None, _msg(b"nope"))  # type: ignore[arg-type]
    assert not validate(None, _msg(b"boom"))  # type: ignore[arg-type]
    assert stats.topic("t").rejected == 3


class _FakePubsub:
    def __init__(self) -> None:
        self.peer_queues: dict[str, list[int]] = {"a": [], "b": []}


def test_pacing_waits_until_queues_drain() -> None:
    pubsub, stats = _FakePubsub(), GossipStats()

    async def main() -> float:
        pubsub.peer_queues["b"].extend(range(PACING_HIGH_WATER + 5))

        async def drain() -> None:
            await trio.sleep(0.05)
            pubsub.peer_queues["b"].clear()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            start = trio.current_time()
            await wait_queues_low(pubsub, stats)  # type: ignore[arg-type]
            return trio.current_time() - start

    waited = trio.run(main)
    assert waited >= 0.04
    assert stats.paced_waits == 1
    assert stats.pacing_timeouts == 0


def test_pacing_does_not_wait_for_a_peer_that_stopped_reading() -> None:
    # A peer whose queue stays full (starved, or hostile and not reading) must not hold every publish
    # back PACING_MAX_WAIT_S: after PACING_STALL_S without progress it is not waited for, while a
    # peer that drains still is.
    pubsub, stats = _FakePubsub(), GossipStats()

    async def main() -> list[float]:
        pubsub.peer_queues["b"].extend(range(PACING_HIGH_WATER + 5))  # never drains
        waits = []
        for _ in range(3):
            start = trio.current_time()
            await wait_queues_low(pubsub, stats)  # type: ignore[arg-type]
            waits.append(trio.current_time() - start)
        pubsub.peer_queues["a"].extend(range(PACING_HIGH_WATER + 5))  # a new backlog that drains

        async def drain() -> None:
            await trio.sleep(0.05)
            pubsub.peer_queues["a"].clear()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            start = trio.current_time()
            await wait_queues_low(pubsub, stats)  # type: ignore[arg-type]
            waits.append(trio.current_time() - start)
        return waits

    waits = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert PACING_STALL_S <= waits[0] < PACING_STALL_S + 0.1  # waited for it once, then gave up on it
    assert waits[1] == waits[2] == 0.0  # later publishes do not wait for the stalled peer
    assert 0.04 <= waits[3] < PACING_STALL_S  # a draining peer is still waited for
    assert stats.pacing_timeouts == 0
    assert stats.stalled_skips >= 2


def test_blob_store_accounting() -> None:
    store = BlobStore(BlobStats())
    digest = store.provide(b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.provide(b"hello") == digest
    assert store.stats.bytes_held == 5
    store.remove(digest)
    assert store.stats.bytes_held == 0


class _TrioStream:
    """Adapts a trio in-memory stream to the read/write/close surface of a libp2p stream."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def read(self, n: int) -> bytes:
        return bytes(await self.inner.receive_some(n))

    async def write(self, data: bytes) -> None:
        await self.inner.send_all(data)

    async def close(self) -> None:
        await self.inner.send_eof()

    async def reset(self) -> None:
        await self.inner.aclose()


def test_blob_pull_in_chunks_and_bad_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    from swarmnode.p2p import streams

    monkeypatch.setattr(streams, "BLOB_CHUNK", 1000)
    store = BlobStore(BlobStats())
    blob = os.urandom(4500)
    digest = store.provide(blob)

    async def main() -> bytearray:
        client, server = trio.testing.memory_stream_pair()
        buf = bytearray()

        async def open_stream(_peer: str, _protocol: str) -> _TrioStream:
            return _TrioStream(client)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.serve, _TrioStream(server))
            await streams.fetch_from(open_stream, digest, "peer", buf, max_size=10_000)
        # Garbage instead of a BlobRequest: counted, and the handler survives.
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.serve, _TrioStream(server))
            await streams.write_frame(_TrioStream(client), b"\x93garbage")
        return buf

    assert trio.run(main) == blob
    assert store.stats.served_requests == 5
    assert store.stats.serve_errors == 1


# -- two real hosts in one process ---------------------------------------------------------------------------


def test_two_hosts_gossip_requests_and_blobs(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_host(HostConfig(data_dir=tmp_path / "a", max_message_bytes=4096)) as a:
            config_b = HostConfig(data_dir=tmp_path / "b", bootstrap=a.listen_addrs, max_message_bytes=4096)
            async with open_host(config_b) as b:
                assert a.listen_addrs[0].endswith(f"/p2p/{a.peer_id}")
                at_a = a.subscribe("t", validator=lambda _o, d: not d.startswith(b"bad"))
                at_b = b.subscribe("t")
                for _ in range(100):
                    if a.connected_peers() and b.connected_peers():
                        break
                    await asyncio.sleep(0.05)
                assert b.peer_id in a.connected_peers()

                async def first(sub: Any) -> Any:
                    return await asyncio.wait_for(sub.__anext__(), 5)

                # Mesh needs a heartbeat or two; publish until one arrives.
                for _ in range(40):
                    await b.publish("t", b"bad one")
                    await b.publish("t", b"good")
                    with contextlib.suppress(TimeoutError):
                        msg = await asyncio.wait_for(at_a.__anext__(), 0.25)
                        break
                assert msg.data == b"good"
                assert msg.origin == b.peer_id
                assert a.statistics()["topics"]["t"]["rejected"] >= 1
                await a.publish("t", b"from a")
                assert (await first(at_b)).data == b"from a"
                # Own messages come back from the library but are filtered.
                assert a.statistics()["topics"]["t"]["own_filtered"] >= 1
                with pytest.raises(ValueError, match="max_message_bytes"):
                    await a.publish("t", b"x" * 5000)

                async def echo(peer: str, data: bytes) -> bytes:
                    if data == b"fail":
                        raise RuntimeError("handler says no")
                    return peer.encode() + data

                a.set_request_handler("/test/echo/1", echo)
                await asyncio.sleep(0.05)
                assert await b.request(a.peer_id, "/test/echo/1", b"!") == b.peer_id.encode() + b"!"
                with pytest.raises(TransportError, match="handler says no"):
                    await b.request(a.peer_id, "/test/echo/1", b"fail")

                blob = os.urandom(300_000)
                digest = a.provide_blob(blob)
                assert await b.fetch(digest, [a.peer_id], max_size=1 << 20) == blob
                # Into a file (a 0.5 GB Δ never lives in memory), hashed as it is written.
                target = tmp_path / "pulled.blob"
                assert await b.fetch_file(digest, [a.peer_id], target, max_size=1 << 20) == len(blob)
                assert target.read_bytes() == blob
                with pytest.raises(TransportError, match="over the"):
                    await b.fetch(digest, [a.peer_id], max_size=1000)
                # A provider serving other bytes under the hash is caught by the hash check.
                a._blobs._blobs[digest] = b"evil"
                with pytest.raises(TransportError, match="does not match the hash"):
                    await b.fetch(digest, [a.peer_id], max_size=1 << 20)
                with pytest.raises(TransportError, match="does not match the hash"):
                    await b.fetch_file(digest, [a.peer_id], target, max_size=1 << 20)
                assert target.read_bytes() == b""  # nothing unverified is left in the file
                a.remove_blob(digest)
                with pytest.raises(TransportError, match="unknown blob"):
                    await b.fetch(digest, [a.peer_id], max_size=1 << 20)
                assert b.statistics()["blobs"]["fetched"] == 2
            # Subscriptions end when their host closes.
            assert [m async for m in at_b] == []

    asyncio.run(main())


def test_a_small_message_waits_briefly_behind_a_slowly_draining_queue() -> None:
    # A round manifest must not sit PACING_MAX_WAIT_S behind a relayed queue of bulk components that
    # drains, but slowly: small messages wait at most PACING_SMALL_WAIT_S.
    from swarmnode.p2p.gossip import PACING_MAX_WAIT_S, PACING_SMALL_WAIT_S

    pubsub, stats = _FakePubsub(), GossipStats()

    async def main() -> tuple[float, float]:
        pubsub.peer_queues["b"].extend(range(PACING_HIGH_WATER + 200))

        async def drain_slowly() -> None:
            while pubsub.peer_queues["b"]:
                await trio.sleep(0.2)
                pubsub.peer_queues["b"].pop()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_slowly)
            start = trio.current_time()
            await wait_queues_low(pubsub, stats, PACING_SMALL_WAIT_S)  # type: ignore[arg-type]
            small = trio.current_time() - start
            start = trio.current_time()
            await wait_queues_low(pubsub, stats)  # type: ignore[arg-type]
            large = trio.current_time() - start
            nursery.cancel_scope.cancel()
        return small, large

    small, large = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert small == pytest.approx(PACING_SMALL_WAIT_S, abs=0.01)
    assert large == pytest.approx(PACING_MAX_WAIT_S, abs=0.01)  # still draining: a bulk message waits
