"""Where our connections to peers come from: the transport's view, which a peer cannot claim.

``swarmnode.trust`` counts a state's support by the network groups of the peers offering it, taken
from the remote address of our connection to each (not the addresses a presence claims). The host
may expose them itself (``host.remote_addresses() -> {peer: "ip:port"}``); ``swarmnode.p2p.Host``
does not yet, so for it they are read, read-only, from py-libp2p's connection table (each muxed
connection's ``get_remote_address()``: a relayed connection shows the relay's address, so peers
behind one relay share its group). Any failure gives no addresses: nobody's support counts then
except peers whose contributions we verified, which is the safe side.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def remote_addresses(host: Any) -> dict[str, str]:
    """{peer id: "ip:port"} of the peers we are connected to now ({} if the host cannot say)."""
    own = getattr(host, "remote_addresses", None)
    try:
        if callable(own):
            return {str(p): str(a) for p, a in dict(own()).items() if a}
        return _from_libp2p(host)
    except Exception as exc:  # a transport shutting down, a table changing under us: no addresses
        log.debug("remote addresses unavailable: %s", exc)
        return {}


def _from_libp2p(host: Any) -> dict[str, str]:
    state = getattr(host, "_trio", None)
    if state is None:
        return {}
    network = state.host.get_network()
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
