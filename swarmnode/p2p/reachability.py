"""Am I publicly reachable? A dial-back probe by peers, like AutoNAT.

py-libp2p 0.8.1's AutoNAT server answers a dial-back with `host.connect`, which returns at once when the
requester is already connected, so every peer that passes its observed-IP check is reported reachable
(a firewalled public host included). Here a peer answers by opening a fresh TCP connection to the
requester's observed IP and checking that a libp2p listener (multistream-select) answers there.

Server: only the requester's observed IP is dialled (no amplification to third parties), at most
MAX_PORTS ports, one probe per peer per PROBE_COOLDOWN_S. Client: asks up to PROBE_PEERS connected peers;
the latest verdict of each (at most MAX_VERDICTS) decides: "behind NAT" if any peer could not dial back,
"public <multiaddr>" if peers could and none failed, "unknown" before any answer.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import OrderedDict
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from swarmnode.p2p.streams import read_frame, write_frame

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/swarmnode/dialback/1.0.0"
MAX_REQUEST_BYTES = 4096
MAX_PORTS = 4
DIAL_TIMEOUT_S = 3.0
# A probe asks for two TCP connects at most; one per peer per 10 s bounds what a peer can make us dial.
PROBE_COOLDOWN_S = 10.0
PROBE_PEERS = 3
MAX_VERDICTS = 8
# Re-probe while nothing is known (peers arrive over the first seconds), then rarely: addresses of a home
# connection change over hours, not seconds.
RETRY_S = 3.0
REFRESH_S = 120.0
_MULTISTREAM = b"/multistream/1.0.0\n"

UNKNOWN = "unknown"
BEHIND_NAT = "behind NAT"


async def _libp2p_listens(ip: str, port: int) -> bool:
    """A fresh TCP connection to ip:port answers multistream-select."""
    try:
        with trio.fail_after(DIAL_TIMEOUT_S):
            conn = await trio.open_tcp_stream(ip, port)
            async with conn:
                await conn.send_all(bytes([len(_MULTISTREAM)]) + _MULTISTREAM)
                got = b""
                while len(got) < len(_MULTISTREAM) + 1:
                    chunk = await conn.receive_some(64)
                    if not chunk:
                        break
                    got += chunk
                return _MULTISTREAM in got
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False


def _tcp_ports(addrs: list[str]) -> list[tuple[str, int]]:
    out = []
    for text in addrs[:16]:
        try:
            addr = multiaddr.Multiaddr(text)
            out.append((str(addr.value_for_protocol("ip4")), int(addr.value_for_protocol("tcp"))))
        except Exception:  # not an ip4/tcp address (or garbage): nothing to dial
            continue
    return out


class Reachability:
    """Both halves of the probe; runs in the trio thread."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.verdicts: OrderedDict[ID, str | None] = OrderedDict()  # server -> confirmed addr, None = failed
        self.stats = {"probes_sent": 0, "probes_failed": 0, "probes_served": 0, "probes_refused": 0}
        self._last_served: OrderedDict[ID, float] = OrderedDict()
        self._status = UNKNOWN
        host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL), self._serve)

    # -- verdict ----------------------------------------------------------------------------------------
    def status(self) -> str:
        return self._status

    def _update(self) -> None:
        confirmed = [a for a in self.verdicts.values() if a is not None]
        failed = sum(1 for a in self.verdicts.values() if a is None)
        # One peer that saw us and could not dial back proves a NAT or firewall between us; a peer on our
        # own LAN reaching us proves nothing about the rest of the network, so failures win.
        if failed:
            status = BEHIND_NAT
        elif confirmed:
            status = f"public {confirmed[-1]}"
        else:
            status = UNKNOWN
        if status != self._status:
            log.info(
                "reachability: %s (dial-back verdicts: %d reached, %d failed)", status, len(confirmed), failed
            )
        self._status = status

    # -- server -----------------------------------------------------------------------------------------
    async def _serve(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            now = time.monotonic()
            last = self._last_served.get(peer)
            remote = stream.get_remote_address()
            request = msgpack.unpackb(await read_frame(stream, MAX_REQUEST_BYTES), raw=False)
            if (last is not None and now - last < PROBE_COOLDOWN_S) or not remote:
                self.stats["probes_refused"] += 1
                await write_frame(stream, msgpack.packb({"ok": False, "refused": True}))
                return
            self._last_served[peer] = now
            self._last_served.move_to_end(peer)
            while len(self._last_served) > 1024:
                self._last_served.popitem(last=False)
            observed = str(remote[0])
            addrs = request.get("addrs", []) if isinstance(request, dict) else []
            ports = sorted({port for _ip, port in _tcp_ports([a for a in addrs if isinstance(a, str)])})
            reached = None
            for port in ports[:MAX_PORTS]:
                if await _libp2p_listens(observed, port):
                    reached = f"/ip4/{observed}/tcp/{port}"
                    break
            self.stats["probes_served"] += 1
            await write_frame(stream, msgpack.packb({"ok": reached is not None, "addr": reached}))
        except Exception as exc:  # a bad request costs the requester its answer, nothing else
            log.debug("dial-back request from %s failed: %r", peer, exc)
        finally:
            # A raise out of a stream handler would take the host down: the requester may have reset it.
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.close()

    # -- client -----------------------------------------------------------------------------------------
    async def probe(self, server: ID) -> None:
        self.stats["probes_sent"] += 1
        addrs = [str(a) for a in self.host.get_addrs()]
        try:
            with trio.fail_after(2 * DIAL_TIMEOUT_S * MAX_PORTS):
                stream = await self.host.new_stream(server, [TProtocol(DIALBACK_PROTOCOL)])
                try:
                    await write_frame(stream, msgpack.packb({"addrs": addrs}))
                    answer = msgpack.unpackb(await read_frame(stream, MAX_REQUEST_BYTES), raw=False)
                finally:
                    with trio.move_on_after(1.0):
                        await stream.close()
        except Exception as exc:  # the server is unreachable or old: no verdict from it
            self.stats["probes_failed"] += 1
            log.debug("dial-back probe via %s failed: %r", server, exc)
            return
        if not isinstance(answer, dict) or answer.get("refused"):
            return
        addr = answer.get("addr")
        self.verdicts[server] = addr if answer.get("ok") and isinstance(addr, str) else None
        self.verdicts.move_to_end(server)
        while len(self.verdicts) > MAX_VERDICTS:
            self.verdicts.popitem(last=False)
        self._update()

    async def run(self) -> None:
        while True:
            peers = list(self.host.get_connected_peers())
            random.shuffle(peers)
            for server in peers[:PROBE_PEERS]:
                await self.probe(server)
            # Until each of the first few peers has answered, ask again soon.
            settled = len(self.verdicts) >= min(PROBE_PEERS, len(peers)) > 0
            await trio.sleep(REFRESH_S if settled else RETRY_S)
