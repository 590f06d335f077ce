"""Wire protocol: typed records, msgpack codec, size limits, topic and stream names. Pure, no I/O."""

from swarmnode.protocol.errors import ProtocolError

__all__ = ["ProtocolError"]
