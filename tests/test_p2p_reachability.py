"""The dial-back reachability probe: verdict rules, and two real hosts on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import trio

from swarmnode.p2p import HostConfig, open_host
from swarmnode.p2p.reachability import BEHIND_NAT, UNKNOWN, Reachability, _libp2p_listens


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
    async def main() -> tuple[str, str, str]:
        async with open_host(HostConfig(data_dir=tmp_path / "a")) as a:
            b_config = HostConfig(data_dir=tmp_path / "b", bootstrap=[a.listen_addrs[0]])
            async with open_host(b_config) as b:
                for _ in range(80):
                    if UNKNOWN not in (a.statistics()["reachability"], b.statistics()["reachability"]):
                        break
                    await asyncio.sleep(0.1)
                return a.statistics()["reachability"], b.statistics()["reachability"], b.listen_addrs[0]

    seen_a, seen_b, b_addr = asyncio.run(main())
    assert seen_a.startswith("public /ip4/127.0.0.1/tcp/")
    assert seen_b == "public " + b_addr.split("/p2p/")[0]
