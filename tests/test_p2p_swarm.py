"""Integration tier: real node processes on 127.0.0.1, only node 0 as bootstrap."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from p2p_node_proc import NodeProcess, wait_until

pytestmark = pytest.mark.slow

TOPIC = "/swarmnode/test/t/1"
N = 5


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("swarm")
    nodes: list[NodeProcess] = []
    try:
        nodes.append(NodeProcess(root / "n0", subscribe=(TOPIC,)))
        for i in range(1, N):
            nodes.append(NodeProcess(root / f"n{i}", bootstrap=nodes[0].addr, subscribe=(TOPIC,)))
        assert wait_until(lambda: all(n.call("peers")["peers"] for n in nodes), 15)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


def _all_received(nodes: list[NodeProcess], tag: str, count: int, senders: set[str]) -> bool:
    for node in nodes:
        report = node.call("report", tag=tag)
        if not senders - {node.peer_id} <= set(report["origins"]):
            return False
        if report["count"] < count * len(senders - {node.peer_id}):
            return False
    return True


def test_every_node_receives_every_node(swarm: list[NodeProcess]) -> None:
    # Mesh formation takes a few heartbeats; publish until the first round gets everywhere.
    senders = {n.peer_id for n in swarm}
    for attempt in range(20):
        tag = f"all{attempt}"
        for node in swarm:
            node.call("publish", topic=TOPIC, tag=tag, count=3, size=1000)
        if wait_until(lambda tag=tag: _all_received(swarm, tag, 3, senders), 3):
            break
    else:
        pytest.fail("not every node received every node's messages")
    # And own messages were filtered, not delivered back.
    assert swarm[1].peer_id not in swarm[1].call("report", tag=tag)["origins"]


def test_dht_discovery_connects_leaves(swarm: list[NodeProcess]) -> None:
    # Leaves only know node 0; Kademlia lookups must find the other leaves.
    assert wait_until(lambda: all(len(n.call("peers")["peers"]) == N - 1 for n in swarm), 15, interval=0.3)


def test_rejects_malformed_oversized_forged_unsigned(swarm: list[NodeProcess]) -> None:
    # Node 0 is everyone's neighbour, so the attacker's messages reach its validator directly.
    attacker, victim = swarm[2], swarm[0]
    before = victim.call("stats")["stats"]["topics"][TOPIC]["rejected"]
    attacker.call("inject", topic=TOPIC, kind="malformed")
    attacker.call("inject", topic=TOPIC, kind="oversized", size=600 * 1024)
    attacker.call("inject", topic=TOPIC, kind="forged", claim=swarm[0].peer_id)
    attacker.call("inject", topic=TOPIC, kind="unsigned")
    # The victim keeps working: a good message after the bad ones still arrives.
    assert wait_until(
        lambda: (
            attacker.call("publish", topic=TOPIC, tag="after", count=1, size=100)
            and victim.call("report", tag="after")["count"] >= 1
        ),
        10,
        interval=0.5,
    )
    assert victim.call("report", tag="bad")["count"] == 0
    stats = victim.call("stats")["stats"]
    # Malformed and oversized fail the topic validator; forged and unsigned die at signature checking.
    assert wait_until(lambda: victim.call("stats")["stats"]["topics"][TOPIC]["rejected"] >= before + 2, 5)
    assert stats["topics"][TOPIC]["delivered"] >= 1


def test_blob_50mb_arrives_intact(swarm: list[NodeProcess]) -> None:
    provided = swarm[3].call("provide", size=50 << 20)["hash"]
    # First provider does not have it: the fetch must fall through to the next one.
    got = swarm[4].call(
        "fetch", hash=provided, providers=[swarm[0].peer_id, swarm[3].peer_id], max_size=64 << 20, timeout=60
    )
    assert got["sha256"] == provided
    assert got["size"] == 50 << 20
    with pytest.raises(RuntimeError, match="could not fetch"):
        swarm[4].call(
            "fetch", hash=hashlib.sha256(b"nope").hexdigest(), providers=[swarm[3].peer_id], max_size=1024
        )


def test_sigkill_restart_rejoins_with_same_id(swarm: list[NodeProcess], tmp_path: Path) -> None:
    victim = swarm[N - 1]
    data_dir = victim.data_dir
    old_id = victim.peer_id
    victim.kill()
    restarted = NodeProcess(data_dir, bootstrap=swarm[0].addr, subscribe=(TOPIC,))
    swarm[N - 1] = restarted
    assert restarted.peer_id == old_id
    assert wait_until(lambda: bool(restarted.call("peers")["peers"]), 10)

    def receives_again() -> bool:
        swarm[1].call("publish", topic=TOPIC, tag="rejoin", count=1, size=100)
        return restarted.call("report", tag="rejoin")["count"] >= 1

    assert wait_until(receives_again, 15, interval=0.5)


def test_sigterm_exits_zero_quickly(swarm: list[NodeProcess]) -> None:
    node = swarm.pop()
    code, seconds = node.terminate()
    assert code == 0
    assert seconds < 2.0
