"""Integration tier: nodes that restart with the same identity are heard again at once (real libp2p, 127.0.0.1)."""

from __future__ import annotations

import hashlib
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from p2p_node_proc import NodeProcess, wait_until

from swarmnode.p2p import gossip
from swarmnode.p2p.gossip import SEQNO_RESERVE, SeqnoCounter

TOPIC = "/swarmnode/test/restart/1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _heard(sender: NodeProcess, receiver: NodeProcess, tag: str, count: int, attempts: int) -> bool:
    """Publish `count` messages per attempt until the receiver has all of one attempt's."""
    for attempt in range(attempts):
        name = f"{tag}{attempt}"
        sender.call("publish", topic=TOPIC, tag=name, count=count, size=200)
        if wait_until(lambda name=name: receiver.call("report", tag=name)["count"] >= count, 2.0):
            return True
    return False


def test_seqno_keeps_rising_across_restarts_and_clock_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "seqno"
    clock = [1_000_000_000_000]
    monkeypatch.setattr(gossip.time, "time_ns", lambda: clock[0])
    first = SeqnoCounter(path)
    sent = [first.take() for _ in range(5)]
    # Restart with the clock stepped back an hour: the persisted floor wins.
    clock[0] -= 3600 * 10**9
    second = SeqnoCounter(path)
    again = second.take()
    assert int.from_bytes(again, "big") > int.from_bytes(sent[-1], "big")
    # Running past the reservation extends it on disk.
    second.value += SEQNO_RESERVE
    second.take()
    assert int(path.read_text()) > second.value


def test_seqno_survives_a_corrupt_floor(tmp_path: Path) -> None:
    path = tmp_path / "seqno"
    path.write_text("not a number")
    counter = SeqnoCounter(path)
    assert len(counter.take()) == 8
    assert int(path.read_text()) > counter.value


@pytest.mark.slow
def test_restart_with_same_identity_reissues_no_message_ids(tmp_path: Path) -> None:
    # py-libp2p seeds its message counter with whole seconds and adds one per message: a node that sent
    # 300 messages and restarted a few seconds later re-used ~300 ids its peers had already seen.
    nodes: list[NodeProcess] = []
    try:
        hub = NodeProcess(tmp_path / "hub", subscribe=(TOPIC,))
        nodes.append(hub)
        first = NodeProcess(tmp_path / "leaf", bootstrap=hub.addr, subscribe=(TOPIC,))
        nodes.append(first)
        assert _heard(first, hub, "warm", 5, 20)
        first.call("publish", topic=TOPIC, tag="burst", count=300, size=200)
        assert wait_until(lambda: hub.call("report", tag="burst")["count"] == 300, 10)
        first.kill()
        again = NodeProcess(tmp_path / "leaf", bootstrap=hub.addr, subscribe=(TOPIC,))
        nodes.append(again)
        assert again.peer_id == first.peer_id
        # Heard again within a few publishes, not after the old ids age out of the seen cache.
        assert _heard(again, hub, "after", 20, 8)
        again.call("publish", topic=TOPIC, tag="bulk", count=100, size=200)
        assert wait_until(lambda: hub.call("report", tag="bulk")["count"] == 100, 10)
        assert hub.call("stats")["stats"]["equivocations"] == 0
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.slow
def test_restarted_bootstrap_is_redialed_within_seconds(tmp_path: Path) -> None:
    # A failed dial puts a peer in the library's 60 s negative cache; the leaf must not wait that out.
    port = _free_port()
    nodes: list[NodeProcess] = []
    try:
        hub = NodeProcess(tmp_path / "hub", port=port, subscribe=(TOPIC,))
        nodes.append(hub)
        leaf = NodeProcess(tmp_path / "leaf", bootstrap=hub.addr, subscribe=(TOPIC,))
        nodes.append(leaf)
        assert wait_until(lambda: leaf.call("peers")["peers"] == [hub.peer_id], 10)
        hub.kill()
        # The leaf's re-dials fail while the hub is down (and used to block it for a minute).
        assert wait_until(lambda: leaf.call("stats")["stats"]["dial"]["failures"] >= 2, 15)
        hub = NodeProcess(tmp_path / "hub", port=port, subscribe=(TOPIC,))
        nodes.append(hub)
        assert wait_until(lambda: leaf.call("peers")["peers"] == [hub.peer_id], 10)
        assert _heard(hub, leaf, "back", 5, 10)
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.slow
def test_peer_that_failed_a_stream_is_reachable_once_it_reconnects(tmp_path: Path) -> None:
    nodes: list[NodeProcess] = []
    try:
        hub = NodeProcess(tmp_path / "hub", subscribe=(TOPIC,))
        nodes.append(hub)
        leaf = NodeProcess(tmp_path / "leaf", bootstrap=hub.addr, subscribe=(TOPIC,))
        nodes.append(leaf)
        assert wait_until(lambda: hub.call("peers")["peers"] == [leaf.peer_id], 10)
        leaf.kill()
        missing = hashlib.sha256(b"never").hexdigest()
        # The hub's pull from the dead leaf fails (and used to block every stream to it for a minute).
        with pytest.raises(RuntimeError, match="could not fetch"):
            hub.call("fetch", hash=missing, providers=[leaf.peer_id], max_size=1024, timeout=20)
        leaf = NodeProcess(tmp_path / "leaf", bootstrap=hub.addr, subscribe=(TOPIC,))
        nodes.append(leaf)
        assert wait_until(lambda: hub.call("peers")["peers"] == [leaf.peer_id], 10)
        provided = leaf.call("provide", size=4096)["hash"]
        got = hub.call("fetch", hash=provided, providers=[leaf.peer_id], max_size=8192, timeout=20)
        assert got["sha256"] == provided
    finally:
        for node in nodes:
            node.kill()
