"""One p2p node per OS process, for the integration tests and scripts/bench_p2p.py.

Run as a script: prints `{"event": "ready", "peer_id": ..., "addrs": [...]}` on stdout, then answers one
JSON command per stdin line with one JSON reply line carrying the same "id". SIGTERM exits 0.
Import it for `NodeProcess`, the driver that starts such a process and talks to it.

Gossip payloads are `b"OK" + json header + b"\\n" + padding`; the topic validator rejects anything else,
which is how the tests send "malformed" messages.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MAGIC = b"OK"


def make_payload(tag: str, seq: int, size: int) -> bytes:
    header = json.dumps({"tag": tag, "seq": seq, "t": time.time()}).encode()
    body = MAGIC + header + b"\n"
    return body + b"\x00" * max(0, size - len(body))


def valid_payload(_origin: str, data: bytes) -> bool:
    return data.startswith(MAGIC) and b"\n" in data[:200]


# -- the node process -----------------------------------------------------------------------------------------
class Node:
    def __init__(self, host: Any) -> None:
        self.host = host
        self.received: dict[str, list[tuple[str, int, float]]] = {}
        self.readers: list[asyncio.Task[None]] = []

    async def read(self, topic: str) -> None:
        async for msg in self.host.subscribe(topic, validator=valid_payload, maxsize=100_000):
            now = time.time()
            header = json.loads(msg.data[2 : msg.data.index(b"\n")])
            entry = (msg.origin, int(header["seq"]), (now - float(header["t"])) * 1000.0)
            self.received.setdefault(header["tag"], []).append(entry)

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "subscribe":
            self.readers.append(asyncio.create_task(self.read(cmd["topic"])))
            return {}
        if op == "publish":
            interval = float(cmd.get("interval", 0.0))
            start = time.perf_counter()
            for seq in range(int(cmd["count"])):
                await self.host.publish(cmd["topic"], make_payload(cmd["tag"], seq, int(cmd["size"])))
                if interval:
                    await asyncio.sleep(interval)
            return {"seconds": time.perf_counter() - start}
        if op == "report":
            tag = cmd["tag"]
            got = self.received.get(tag, [])
            return {
                "count": len(got),
                "origins": sorted({o for o, _, _ in got}),
                "latencies_ms": [x for _, _, x in got],
            }
        if op == "provide":
            data = os.urandom(int(cmd["size"]))
            return {"hash": self.host.provide_blob(data)}
        if op == "remove":
            self.host.remove_blob(cmd["hash"])
            return {}
        if op == "fetch":
            start = time.perf_counter()
            data = await self.host.fetch(cmd["hash"], cmd["providers"], max_size=int(cmd["max_size"]))
            return {
                "seconds": time.perf_counter() - start,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
        if op == "peers":
            return {"peers": self.host.connected_peers()}
        if op == "stats":
            return {"stats": self.host.statistics()}
        if op == "inject":
            return await self.inject(cmd)
        raise ValueError(f"unknown op {op!r}")

    async def inject(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Send a bad message straight through the router, bypassing our own publish checks."""
        from libp2p.peer.id import ID
        from libp2p.pubsub.pb import rpc_pb2
        from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

        trio_state = self.host._t()
        pubsub = trio_state.pubsub
        kind = cmd["kind"]
        data = make_payload("bad", 0, int(cmd.get("size", 100)))
        if kind == "malformed":
            data = b"garbage" + os.urandom(64)
        msg = rpc_pb2.Message(
            data=data, topicIDs=[cmd["topic"]], from_id=pubsub.my_id.to_bytes(), seqno=pubsub._next_seqno()
        )
        if kind == "forged":
            # Claim to come from another peer while signing with our own key.
            msg.from_id = ID.from_base58(cmd["claim"]).to_bytes()
        if kind != "unsigned":
            key = pubsub.sign_key
            msg.signature = key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
            msg.key = pubsub.host.get_public_key().serialize()

        async def send() -> None:
            await pubsub.router.publish(pubsub.my_id, msg)

        await self.host._b().run(send)
        return {}


async def node_main(args: argparse.Namespace) -> int:
    from swarmnode.p2p import HostConfig, open_host

    config = HostConfig(
        data_dir=Path(args.data_dir),
        port=args.port,
        bootstrap=[args.bootstrap] if args.bootstrap else [],
        target_peers=args.target_peers,
        max_message_bytes=args.max_message_bytes,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with open_host(config) as host:
        node = Node(host)
        for topic in args.subscribe:
            node.readers.append(asyncio.create_task(node.read(topic)))
        print(json.dumps({"event": "ready", "peer_id": host.peer_id, "addrs": host.listen_addrs}), flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def commands() -> None:
            while line := await reader.readline():
                cmd = json.loads(line)
                try:
                    reply = {"id": cmd.get("id"), "ok": True, **(await node.handle(cmd))}
                except Exception as exc:
                    reply = {"id": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(reply), flush=True)

        command_task = asyncio.create_task(commands())
        await stop.wait()
        command_task.cancel()
        for task in node.readers:
            task.cancel()
    return 0


# -- the driver -----------------------------------------------------------------------------------------------
class NodeProcess:
    """Starts `python tests/p2p_node_proc.py` and exchanges JSON lines with it. Always `kill()` it in a finally."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        bootstrap: str | None = None,
        subscribe: tuple[str, ...] = (),
        target_peers: int = 8,
        start_timeout: float = 20.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ]
        cmd += ["--target-peers", str(target_peers)]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        for topic in subscribe:
            cmd += ["--subscribe", topic]
        self.started_at = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self._next_id = 0
        ready = self._wait_for(lambda m: m.get("event") == "ready", start_timeout)
        self.peer_id: str = ready["peer_id"]
        self.addr: str = ready["addrs"][0]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for(self, match: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"node {self.proc.pid} gave no answer within {timeout} s")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"node {self.proc.pid} exited with {self.proc.wait()}")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if match(message):
                return message

    def call(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        return self.reply(self.send(op, **fields), timeout)

    def send(self, op: str, **fields: Any) -> int:
        """Send a command without waiting; pass the returned id to `reply` (one outstanding at a time)."""
        self._next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self._next_id, "op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._next_id

    def reply(self, request_id: int, timeout: float = 30.0) -> dict[str, Any]:
        reply = self._wait_for(lambda m: m.get("id") == request_id, timeout)
        if not reply["ok"]:
            raise RuntimeError(f"command {request_id} failed on node {self.proc.pid}: {reply['error']}")
        return reply

    def terminate(self, timeout: float = 5.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until exit)."""
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.perf_counter() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bootstrap", default="")
    parser.add_argument("--target-peers", type=int, default=8)
    parser.add_argument("--max-message-bytes", type=int, default=512 * 1024)
    parser.add_argument("--subscribe", action="append", default=[])
    sys.exit(asyncio.run(node_main(parser.parse_args())))
