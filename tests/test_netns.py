"""Integration tier in network namespaces: NATed nodes behind home routers and a public bootstrap node.

Topology of `swarm` (tests/netns.py): pub0 (public, bootstrap) | router r1: h1a, h1b | router r2: h2a, hole
punching off (relayed paths stay relayed). `failover`: pub0, pub1, pub2 (all relay) | r1: h1a | r2: h2a,
hole punching off. The hole-punching test builds its own bed: pub0 | r1: h1a | r2: h2a.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netns import Endpoint, NetnsBed, skip_reason
from p2p_node_proc import NodeProcess, wait_until

_REASON = skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

TOPIC = "/swarmnode/test/nat/1"
PORT = 4001


@dataclass(slots=True)
class Swarm:
    bed: NetnsBed
    hosts: dict[str, Endpoint]
    nodes: dict[str, NodeProcess]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("netns")
    bed = NetnsBed()
    try:
        pub = bed.add_public("pub0")
        r1, r2 = bed.add_router("r1"), bed.add_router("r2")
        hosts = {"pub0": pub, "h1a": bed.add_home(r1, "h1a"), "h1b": bed.add_home(r1, "h1b")}
        hosts["h2a"] = bed.add_home(r2, "h2a")
        boot = bed.start_node(pub, root / "pub0", port=PORT, subscribe=[TOPIC], no_hole_punching=True)
        nodes = {"pub0": boot}
        for name in ("h1a", "h1b", "h2a"):
            nodes[name] = bed.start_node(
                hosts[name],
                root / name,
                port=PORT,
                bootstrap=[boot.addr],
                subscribe=[TOPIC],
                no_hole_punching=True,
            )
        assert wait_until(lambda: len(boot.call("peers")["peers"]) == 3, 30, interval=0.3)
        yield Swarm(bed=bed, hosts=hosts, nodes=nodes)
    finally:
        bed.close()


def _heard(sender: NodeProcess, receiver: NodeProcess, tag: str, attempts: int = 20) -> bool:
    for attempt in range(attempts):
        name = f"{tag}{attempt}"
        sender.call("publish", topic=TOPIC, tag=name, count=2, size=300)
        if wait_until(lambda name=name: receiver.call("report", tag=name)["count"] >= 2, 1.5):
            return True
    return False


def test_natted_node_reaches_the_public_bootstrap_and_gossips(swarm: Swarm) -> None:
    boot, home = swarm.nodes["pub0"], swarm.nodes["h2a"]
    assert boot.peer_id in home.call("peers")["peers"]
    assert _heard(home, boot, "up")
    assert _heard(boot, home, "down")


def test_public_side_cannot_dial_into_a_home_network(swarm: Swarm) -> None:
    home = swarm.hosts["h1a"]
    assert swarm.bed.tcp_connects(swarm.hosts["pub0"], home.ip, PORT) is False
    assert home.router is not None
    assert swarm.bed.tcp_connects(swarm.hosts["pub0"], home.router.wan_ip, PORT) is False


def test_natted_nodes_behind_different_routers_cannot_dial_each_other(swarm: Swarm) -> None:
    a, b = swarm.nodes["h1a"], swarm.nodes["h2a"]
    assert swarm.bed.tcp_connects(swarm.hosts["h1a"], swarm.hosts["h2a"].ip, PORT) is False
    dial = a.call("dial", addr=b.addr, deadline=5.0)
    assert dial["connected"] is False


def test_natted_nodes_behind_one_router_dial_each_other(swarm: Swarm) -> None:
    a, b = swarm.nodes["h1a"], swarm.nodes["h1b"]
    assert a.call("dial", addr=b.addr, deadline=5.0)["connected"] is True


def test_gossip_between_natted_nodes_flows_through_the_public_node(swarm: Swarm) -> None:
    a, b = swarm.nodes["h1a"], swarm.nodes["h2a"]
    assert b.peer_id not in a.call("peers")["peers"]
    assert _heard(a, b, "across")
    assert _heard(b, a, "back")


def test_each_node_learns_whether_it_is_publicly_reachable(swarm: Swarm) -> None:
    def reachability(name: str) -> str:
        return str(swarm.nodes[name].call("stats")["stats"]["reachability"])

    public = f"public /ip4/{swarm.hosts['pub0'].ip}/tcp/{PORT}"
    assert wait_until(lambda: reachability("pub0") == public, 30, interval=0.5)
    for name in ("h1a", "h1b", "h2a"):
        assert wait_until(lambda name=name: reachability(name).startswith("behind NAT"), 30, interval=0.5), (
            reachability(name)
        )


def test_natted_nodes_behind_different_routers_reach_each_other_through_the_relay(swarm: Swarm) -> None:
    # Runs last in `swarm`: afterwards h1a and h2a hold a relayed connection.
    a, b, boot = swarm.nodes["h1a"], swarm.nodes["h2a"], swarm.nodes["pub0"]
    relayed = f"behind NAT, reachable through relay {boot.peer_id}"
    assert wait_until(lambda: b.call("stats")["stats"]["reachability"] == relayed, 30, interval=0.5)
    answer = a.call("request", peer=b.peer_id, size=1000, deadline=20.0)
    assert answer["echo"] is True
    provided = b.call("provide", size=2 << 20)["hash"]
    got = a.call("fetch", hash=provided, providers=[b.peer_id], max_size=4 << 20, timeout=60)
    assert got["sha256"] == provided
    relay = boot.call("stats")["stats"]["relay"]
    assert relay["bytes_relayed"] >= 2 << 20
    assert relay["serving"] is True
    assert relay["reservations_served"] == 3  # h1a, h1b and h2a, within relay_max_reservations


def _relay_of(node: NodeProcess, peer: str) -> str | None:
    """The relay carrying `node`'s relayed connection to `peer`, or None."""
    for addrs in node.call("conns")["conns"].get(peer, []):
        if "/p2p-circuit" in addrs:
            return addrs.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]
    return None


def _request_ok(node: NodeProcess, peer: str, deadline: float) -> bool:
    try:
        return bool(
            node.call("request", peer=peer, size=100, deadline=deadline, timeout=deadline + 10)["echo"]
        )
    except RuntimeError:
        return False


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("netns_failover")
    bed = NetnsBed()
    try:
        hosts = {name: bed.add_public(name) for name in ("pub0", "pub1", "pub2")}
        r1, r2 = bed.add_router("r1"), bed.add_router("r2")
        hosts["h1a"], hosts["h2a"] = bed.add_home(r1, "h1a"), bed.add_home(r2, "h2a")
        nodes = {"pub0": bed.start_node(hosts["pub0"], root / "pub0", port=PORT, no_hole_punching=True)}
        boot = [nodes["pub0"].addr]
        for name in ("pub1", "pub2"):
            nodes[name] = bed.start_node(
                hosts[name], root / name, port=PORT, bootstrap=boot, no_hole_punching=True
            )
            boot.append(nodes[name].addr)
        for name in ("h1a", "h2a"):
            nodes[name] = bed.start_node(
                hosts[name], root / name, port=PORT, bootstrap=boot, no_hole_punching=True
            )
        yield Swarm(bed=bed, hosts=hosts, nodes=nodes)
    finally:
        bed.close()


def _relays(node: NodeProcess) -> set[str]:
    return set(node.call("stats")["stats"]["relay"]["relays"])


def test_natted_nodes_keep_reservations_on_two_public_relays(failover: Swarm) -> None:
    public = {failover.nodes[name].peer_id for name in ("pub0", "pub1", "pub2")}
    for name in ("h1a", "h2a"):
        node = failover.nodes[name]
        assert wait_until(lambda node=node: len(_relays(node) & public) == 2, 40, 0.5), _relays(node)
        text = node.call("stats")["stats"]["reachability"]
        assert text.startswith("behind NAT, reachable through relay "), text
        assert all(r in text for r in _relays(node)), text


def _kill_used_relay_and_recover(failover: Swarm, how: str) -> float:
    a, b = failover.nodes["h1a"], failover.nodes["h2a"]
    assert _request_ok(a, b.peer_id, 20.0)
    used = _relay_of(a, b.peer_id)
    assert used is not None, a.call("conns")
    name = next(name for name, n in failover.nodes.items() if n.peer_id == used)
    if how == "cut":
        failover.bed.cut(failover.hosts[name])
    failover.nodes[name].kill()
    killed = time.monotonic()
    recovered = None
    while time.monotonic() - killed < 30:  # bounded: 5 s attempts for 30 s at most
        if _request_ok(a, b.peer_id, 5.0):
            recovered = time.monotonic() - killed
            break
        time.sleep(0.2)
    assert recovered is not None, f"no path to h2a within 30 s after relay {name} ({how})"
    now_used = _relay_of(a, b.peer_id)
    assert now_used not in (None, used)
    for node in (a, b):
        assert wait_until(lambda node=node: used not in _relays(node) and len(_relays(node)) >= 1, 20, 0.5)
    print(f"recovered {recovered:.2f} s after relay {name} ({how})")
    return recovered


def test_natted_nodes_recover_when_their_relay_is_killed(failover: Swarm) -> None:
    # SIGKILL: the relay's kernel closes its connections, peers notice at once.
    assert _kill_used_relay_and_recover(failover, "kill") < 30


def test_natted_nodes_recover_when_their_relay_vanishes(failover: Swarm) -> None:
    # Link cut first: no FIN or RST reaches anyone; only the relay pings notice (Relay.PING_S).
    failover.nodes["h1a"].call("stats")
    assert wait_until(lambda: len(_relays(failover.nodes["h2a"])) == 2, 20, 0.5)
    assert _kill_used_relay_and_recover(failover, "cut") < 30


def test_hole_punching_replaces_the_relayed_connection(tmp_path: Path) -> None:
    # Home routers that drop unsolicited packets (tests/netns.py, stealth=True): an early SYN of the
    # simultaneous open is lost, not refused, and the kernel's retransmission finds the mapping open.
    with_bed = NetnsBed()
    try:
        pub = with_bed.add_public("pub0")
        r1, r2 = with_bed.add_router("r1"), with_bed.add_router("r2")
        h1a, h2a = with_bed.add_home(r1, "h1a"), with_bed.add_home(r2, "h2a")
        boot = with_bed.start_node(pub, tmp_path / "pub0", port=PORT)
        a = with_bed.start_node(h1a, tmp_path / "h1a", port=PORT, bootstrap=[boot.addr])
        b = with_bed.start_node(h2a, tmp_path / "h2a", port=PORT, bootstrap=[boot.addr])
        assert wait_until(
            lambda: "reachable through relay" in b.call("stats")["stats"]["reachability"], 30, 0.5
        )
        assert _request_ok(a, b.peer_id, 20.0)

        def direct() -> bool:
            return any("/p2p-circuit" not in c for c in a.call("conns")["conns"].get(b.peer_id, []))

        assert wait_until(direct, 40, 0.5), a.call("conns")
        # The direct path outlives the relay.
        boot.kill()
        assert _request_ok(a, b.peer_id, 5.0)
        assert wait_until(lambda: _relay_of(a, b.peer_id) is None, 10, 0.5)
    finally:
        with_bed.close()
