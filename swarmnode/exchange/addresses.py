"""Where our connections to peers come from: the transport's view, which a peer cannot claim.

``swarmnode.trust`` counts a state's support by the network groups of the peers offering it, taken
from the remote address of our connection to each (not the addresses a presence claims), as the host
reports them (``host.remote_addresses() -> {peer: "ip:port"}``; ``swarmnode.p2p.Host`` reads each
muxed connection's remote address: a relayed connection shows the relay's address, so peers behind
one relay share its group). A host that cannot say, or any failure, gives no addresses: nobody's
support counts then except peers whose contributions we verified, which is the safe side.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def remote_addresses(host: Any) -> dict[str, str]:
    """{peer id: "ip:port"} of the peers we are connected to now ({} if the host cannot say)."""
    own = getattr(host, "remote_addresses", None)
    if not callable(own):
        return {}
    try:
        return {str(p): str(a) for p, a in dict(own()).items() if a}
    except Exception as exc:  # a transport shutting down, a table changing under us: no addresses
        log.debug("remote addresses unavailable: %s", exc)
        return {}
