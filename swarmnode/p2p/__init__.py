"""P2P transport: py-libp2p in a dedicated trio thread, bridged to asyncio.

`open_host(HostConfig(...))` yields a `Host` with gossip (`publish`, `subscribe`), request/response
streams (`set_request_handler`, `request`), content-addressed blobs (`provide_blob`, `fetch`) and
counters (`statistics`).
"""

from swarmnode.p2p.bridge import BridgeClosed
from swarmnode.p2p.config import HostConfig, Message
from swarmnode.p2p.host import Host, Subscription, open_host
from swarmnode.p2p.streams import BLOB_PROTOCOL, TransportError

__all__ = [
    "BLOB_PROTOCOL",
    "BridgeClosed",
    "Host",
    "HostConfig",
    "Message",
    "Subscription",
    "TransportError",
    "open_host",
]
