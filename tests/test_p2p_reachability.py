"""The dial-back reachability probe (verdict rules, two real hosts on 127.0.0.1) and the relay's bounds and
direct-vs-circuit race (tests/test_netns.py runs the relay itself across NAT routers)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from swarmnode.p2p import HostConfig, open_host
from swarmnode.p2p.reachability import BEHIND_NAT, UNKNOWN, Reachability, _libp2p_listens
from swarmnode.p2p.relay import DIRECT_DIAL_S, SECOND_PATH_AFTER_S, Relay


class _FakeHost:
    def set_stream_handler(self, _protocol: Any, _handler: Any) -> None:
        pass


def test_any_failed_dial_back_means_behind_nat() -> None:
    probe = Reachability(_FakeHost())
    assert probe.status() == UNKNOWN
    probe.verdicts["lan-peer"] = "/ip4/198.19.1.10/tcp/4001"  # type: ignore[index]
    probe._update()
    assert probe.status() == "public /ip4/198.19.1.10/tcp/4001"
    probe.verdicts["public-peer"] = None  # type: ignore[index]
    probe._update()
    assert probe.status() == BEHIND_NAT


def test_a_port_without_a_libp2p_listener_is_not_reachable() -> None:
    async def main() -> bool:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:

            async def silent(stream: trio.SocketStream) -> None:
                await stream.aclose()

            nursery.start_soon(trio.serve_listeners, silent, listeners)
            ok = await _libp2p_listens("127.0.0.1", port)
            nursery.cancel_scope.cancel()
        return ok

    assert trio.run(main) is False


def test_two_hosts_on_loopback_learn_they_are_reachable(tmp_path: Path) -> None:
    async def main() -> tuple[str, str, str, dict[str, Any]]:
        async with open_host(HostConfig(data_dir=tmp_path / "a")) as a:
            b_config = HostConfig(data_dir=tmp_path / "b", bootstrap=[a.listen_addrs[0]])
            async with open_host(b_config) as b:
                for _ in range(80):
                    if UNKNOWN not in (a.statistics()["reachability"], b.statistics()["reachability"]):
                        break
                    await asyncio.sleep(0.1)
                stats = a.statistics()
                return (
                    stats["reachability"],
                    b.statistics()["reachability"],
                    b.listen_addrs[0],
                    stats["relay"],
                )

    seen_a, seen_b, b_addr, relay = asyncio.run(main())
    assert seen_a.startswith("public /ip4/127.0.0.1/tcp/")
    assert seen_b == "public " + b_addr.split("/p2p/")[0]
    # A public node relays (within HostConfig's limits) and reserves nothing itself.
    assert relay["serving"] is True
    assert relay["reservations"] == 0
    assert relay["peers"] == {"direct": 1, "relayed": 0, "both": 0}
    assert relay["limits"] == {
        "max_reservations": 32,
        "max_circuits_per_peer": 16,
        "max_circuit_bytes": 1 << 30,
        "max_circuit_s": 3600,
    }


# -- relay: config bounds, and the direct-vs-circuit race ----------------------------------------------------


def test_config_rejects_unbounded_relay_settings(tmp_path: Path) -> None:
    for field, value in (
        ("relay_max_circuits", 0),
        ("relay_max_circuit_bytes", 0),
        ("relay_reservations", -1),
    ):
        with pytest.raises(ValueError, match=field):
            HostConfig(data_dir=tmp_path, **{field: value})


class _Conn:
    is_closed = False


class _RaceHost:
    """Just enough of a libp2p host for Relay.connect: connections appear when a path 'connects'."""

    def __init__(self) -> None:
        self.conns: list[_Conn] = []

    def get_network(self) -> _RaceHost:
        return self

    def get_connections(self, _peer: Any) -> list[_Conn]:
        return self.conns


def _race_relay(circuit_after: float | None) -> tuple[Relay, _RaceHost, list[str]]:
    host = _RaceHost()
    relay = Relay.__new__(Relay)
    relay.host = host
    relay.stats = {"direct_connects": 0, "connect_failures": 0}
    relay._relayed_first = {}
    order: list[str] = []

    async def connect_via_relay(_peer: Any) -> bool:
        order.append(f"circuit@{trio.current_time():.0f}")
        if circuit_after is None:
            return False
        await trio.sleep(circuit_after)
        host.conns.append(_Conn())
        return True

    relay.connect_via_relay = connect_via_relay  # type: ignore[method-assign]
    return relay, host, order


def test_a_hanging_direct_dial_loses_to_the_circuit_and_the_circuit_goes_first_next_time() -> None:
    relay, host, order = _race_relay(circuit_after=0.1)

    async def hangs() -> None:
        order.append(f"direct@{trio.current_time():.0f}")
        await trio.sleep_forever()

    async def main() -> float:
        await relay.connect("peer", hangs)  # type: ignore[arg-type]
        first = trio.current_time()
        host.conns.clear()
        await relay.connect("peer", hangs)  # type: ignore[arg-type]
        return first

    took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert SECOND_PATH_AFTER_S <= took < SECOND_PATH_AFTER_S + 1
    assert order[:2] == ["direct@0", "circuit@2"]
    assert order[2].startswith("circuit@")  # relayed first the second time: no head start for the direct dial


def test_a_failed_direct_dial_starts_the_circuit_at_once_and_both_failing_says_why() -> None:
    relay, _host, order = _race_relay(circuit_after=None)

    async def refused() -> None:
        raise OSError("connection refused")

    async def main() -> None:
        await relay.connect("peer", refused)  # type: ignore[arg-type]

    with pytest.raises(ConnectionError, match=r"refused.*relay: no connected relay"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert order == ["circuit@0"]
    assert relay.stats["connect_failures"] == 1


def test_a_direct_dial_that_never_answers_is_bounded() -> None:
    relay, _host, _order = _race_relay(circuit_after=None)

    async def hangs() -> None:
        await trio.sleep_forever()

    async def main() -> float:
        with contextlib.suppress(ConnectionError):
            await relay.connect("peer", hangs)  # type: ignore[arg-type]
        return trio.current_time()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == pytest.approx(DIRECT_DIAL_S)
