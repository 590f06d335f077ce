"""One p2p node for the namespace bed (tests/netns.py): `p2p_node_proc`'s commands plus direct dials and requests.

Run inside a namespace: `ip netns exec NS python tests/netns_node.py --data-dir D --listen-host IP ...`.
Prints `{"event": "ready", ...}`, then answers one JSON command per stdin line. Extra commands:
`dial` (a direct connection to one multiaddr, reporting success and seconds), `request` (an echo request
to a peer over `host.request`), `drop` (close every connection to a peer), `conns` (each peer's open
connections by transport address), `pull` (a blob fetch bounded by `deadline`). Their time limit is `deadline` (`timeout` is the driver's own wait for
the reply).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from p2p_node_proc import Node

ECHO_PROTOCOL = "/swarmnode/test/echo/1.0.0"


class BedNode(Node):
    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "dial":
            return await self.dial(cmd["addr"], float(cmd.get("deadline", 5.0)))
        if op == "request":
            start = time.perf_counter()
            payload = b"x" * int(cmd.get("size", 16))
            answer = await self.host.request(
                cmd["peer"], ECHO_PROTOCOL, payload, timeout=float(cmd.get("deadline", 10.0))
            )
            return {"seconds": time.perf_counter() - start, "size": len(answer), "echo": answer == payload}
        if op == "drop":
            return await self.drop(cmd["peer"])
        if op == "pull":
            import hashlib

            start = time.perf_counter()
            data = await self.host.fetch(
                cmd["hash"],
                cmd["providers"],
                max_size=int(cmd["max_size"]),
                timeout=float(cmd.get("deadline", 60.0)),
            )
            ok = hashlib.sha256(data).hexdigest() == cmd["hash"]
            return {"seconds": time.perf_counter() - start, "size": len(data), "intact": ok}
        if op == "conns":
            return {"conns": await self.host._b().run(self.conns)}
        return await super().handle(cmd)

    async def dial(self, addr: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        import multiaddr
        import trio
        from libp2p.peer.peerinfo import info_from_p2p_addr

        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))

        async def connect() -> dict[str, Any]:
            libp2p_host = self.host._t().host
            libp2p_host.get_network().unblock_peer(info.peer_id)
            start = time.perf_counter()
            try:
                with trio.fail_after(timeout):
                    await libp2p_host.connect(info)
            except Exception as exc:
                return {"connected": False, "seconds": time.perf_counter() - start, "error": repr(exc)[:300]}
            return {"connected": True, "seconds": time.perf_counter() - start}

        return await self.host._b().run(connect)

    async def conns(self) -> dict[str, list[str]]:
        """Each connected peer's open connections, by their transport addresses ("/p2p-circuit" = relayed)."""
        network = self.host._t().host.get_network()
        out: dict[str, list[str]] = {}
        for pid, conns in list(network.connections.items()):
            for conn in conns if isinstance(conns, list) else [conns]:
                if not conn.is_closed:
                    addrs = [str(a) for a in conn.get_transport_addresses()]
                    out.setdefault(pid.to_base58(), []).append(" ".join(addrs) or "?")
        return out

    async def drop(self, peer: str) -> dict[str, Any]:
        from libp2p.peer.id import ID

        async def close() -> None:
            await self.host._t().host.disconnect(ID.from_base58(peer))

        await self.host._b().run(close)
        return {}


async def echo(_peer: str, data: bytes) -> bytes:
    return data


async def node_main(args: argparse.Namespace) -> int:
    from swarmnode.p2p import HostConfig, open_host

    if args.log:
        import logging

        logging.basicConfig(
            level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
        )
        for name in args.log:
            logging.getLogger(name).setLevel(logging.DEBUG)
    config = HostConfig(
        data_dir=Path(args.data_dir),
        listen_host=args.listen_host,
        port=args.port,
        bootstrap=list(args.bootstrap),
        target_peers=args.target_peers,
        hole_punching=not args.no_hole_punching,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with open_host(config) as host:
        node = BedNode(host)
        host.set_request_handler(ECHO_PROTOCOL, echo)
        for topic in args.subscribe:
            node.readers.append(asyncio.create_task(node.read(topic)))
        print(json.dumps({"event": "ready", "peer_id": host.peer_id, "addrs": host.listen_addrs}), flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def answer(cmd: dict[str, Any]) -> None:
            try:
                reply = {"id": cmd.get("id"), "ok": True, **(await node.handle(cmd))}
            except Exception as exc:
                reply = {"id": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)

        async def commands() -> None:
            while line := await reader.readline():
                await answer(json.loads(line))

        command_task = asyncio.create_task(commands())
        await stop.wait()
        command_task.cancel()
        for task in node.readers:
            task.cancel()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--listen-host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--target-peers", type=int, default=8)
    parser.add_argument("--subscribe", action="append", default=[])
    parser.add_argument("--no-hole-punching", action="store_true")
    parser.add_argument("--log", action="append", default=[], help="a logger to show at DEBUG (on stderr)")
    sys.exit(asyncio.run(node_main(parser.parse_args())))
